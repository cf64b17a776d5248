"""Issue 23: hypothesis draws bad recipes and `--set` values (the cases of tests/recipe_fuzz.py); each is
accepted and valid, or a UsageError of one line naming the file (or --set) and the key."""

from __future__ import annotations

import tempfile
from pathlib import Path

import recipe_fuzz as fz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TEXTS = {p.name: p.read_text() for p in fz.ci_recipes()}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bad_recipes_and_sets_are_accepted_valid_or_one_line(data, tmp_path):
    case = fz.make_case(lambda options: data.draw(st.sampled_from(list(options))), TEXTS)
    outcome, detail = fz.run_case(case, Path(tempfile.mkdtemp(dir=tmp_path)))
    assert outcome in ("accepted-valid", "rejected-cleanly"), (outcome, detail, case.get("what"), case["sets"])
