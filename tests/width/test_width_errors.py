"""Bad width settings end in one line naming the key, exit 2, before anything is written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from adaflex.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("sets, key", [
    (["width.allocation=uniform", "width.fraction=null", "width.num_heads=3"], "width.num_heads"),  # GQA: 3 over 2
    (["width.allocation=uniform", "width.fraction=null", "width.num_heads=0"], "width.num_heads"),
    (["width.allocation=uniform", "width.fraction=null", "width.intermediate_size=0"], "width.intermediate_size"),
    (["width.allocation=uniform", "width.fraction=null", "width.intermediate_size=500"], "width.intermediate_size"),
    (["width.allocation=uniform", "width.fraction=null", "width.num_kv_heads=3"], "width.num_kv_heads"),
    (["width.allocation=uniform", "width.fraction=0.99"], "width.fraction"),  # leaves no FFN channel
    (["width.fraction=0.97", "width.max_removed=0.95"], "width.fraction"),  # dp: no block may reach it
    (["width.fraction=1.0"], "width.fraction"),
    (["width.intermediate_size=64"], "width"),  # explicit widths need allocation uniform
])
def test_bad_width_is_one_line_exit_2(tiny_dir, tmp_path, sets, key):
    out = tmp_path / "run"
    args = ["retrofit", str(tiny_dir), "--recipe", "recipes/ci/width-tiny.yaml", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
