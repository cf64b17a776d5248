"""The arithmetic of tests/bench/routes_choosers.py (retrofit/routes/choosers.py: leads, targets, choosers) on
hand-made scores, and the script's refusal of a block named twice."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from adaflex.retrofit.routes import choosers as rc
from tiny import ROOT

# two questions, dense + two skip sets, three choices each
REC = {"paths": [(0, 1, 2), (0, 2), (0, 1)], "label": [0, 2],
       "lp": [[[-1.0, -2.0, -3.0], [-2.5, -2.0, -3.0], [-0.5, -4.0, -3.0]],
              [[-1.0, -2.0, -1.5], [-3.0, -2.0, -1.0], [-1.0, -2.0, -3.0]]]}


def test_tables_lead_and_pick():
    lead, pick = rc.tables(REC)
    assert torch.allclose(lead, torch.tensor([[1.0, -0.5, 2.5], [-0.5, 1.0, -2.0]]))
    assert pick.tolist() == [[0, 1, 0], [0, 2, 0]]
    assert rc.acc(lead, 0) == 0.5 and rc.acc(lead, 1) == 0.5 and rc.acc(lead, 2) == 0.5
    assert torch.allclose(rc.target("lead", lead, pick), torch.tensor([[-1.5, 1.5], [1.5, -1.5]]))
    assert rc.target("correct", lead, pick).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert rc.target("agree", lead, pick).tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_choosers_pick_the_best_predicted_set():
    lead, pick = rc.tables(REC)
    good = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # set 2 for question 0, set 1 for question 1: both right
    assert rc.chosen_acc(good, lead) == 1.0
    assert rc.chosen_acc(1 - good, lead) == 0.0
    # one nearest neighbour on the training rows returns each row's own target; a strong ridge its column means
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
    Y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 2.0]])
    assert torch.equal(rc.fit(X, Y, ("knn", 1))(X), Y)
    assert torch.allclose(rc.fit(X, Y, ("ridge", 1e9))(X), Y.mean(0).expand_as(Y), atol=1e-4)


def test_path_of_skips_repeats_and_keeps_dense_dense():
    assert rc.path_of(5, (), "skip") == (0, 1, 2, 3, 4)
    assert rc.path_of(5, (1, 3), "skip") == (0, 2, 4)
    assert rc.path_of(5, (2,), "repeat") == (0, 1, 2, 2, 3, 4)
    assert rc.path_of(5, (1, 3), "skip", repeat=(4,)) == (0, 2, 4, 4)
    assert rc.path_of(5, (2,), "skip", repeat=(4,), drop=(0,)) == (1, 3, 4, 4)
    assert rc.path_of(5, (), "skip", repeat=(4,), drop=(0,)) == (0, 1, 2, 3, 4)  # column 0 stays the dense path


@pytest.mark.parametrize("args", [("12-17", "3", "3"), ("12-17", "", "14"), ("12,27", "27", "")])
def test_a_block_named_twice_is_refused(args):
    with pytest.raises(ValueError, match="named twice"):
        rc.block_args(*args)
    assert rc.block_args("12-14", "27", "0") == ([12, 13, 14], (27,), (0,))


def test_the_script_refuses_a_block_named_twice_before_the_model_loads():
    r = subprocess.run([sys.executable, str(ROOT / "tests/bench/routes_choosers.py"), "--drop", "3", "--repeat", "3"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2
    assert "named twice" in r.stderr.splitlines()[-1]
