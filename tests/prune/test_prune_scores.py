"""Scores against hand computation, exact-count masks, N:M validity, 2:4 layout rules, mask packing."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.prune.calibrate import capture, dense_statistics
from adaflex.retrofit.prune.scores import (
    keep_mask,
    magnitude_score,
    pack_mask,
    pruned_count,
    semi_structured_problems,
    unpack_mask,
    wanda_score,
)


def test_wanda_score_by_hand():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5], [-0.5, 0.25, 4.0, -1.0]])
    x = torch.tensor([[1.0, 0.0, 0.1, 2.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # 3 tokens
    sq = (x * x).sum(0)  # ‖X_j‖² = [1, 1, 0.01, 4]
    s = wanda_score(w, sq)
    assert torch.allclose(s, torch.tensor([[1.0, 3.0, 0.2, 1.0], [0.5, 0.25, 0.4, 2.0]]))
    assert torch.equal(magnitude_score(w), w.abs())
    # per output row: the two lowest of each row go
    keep = keep_mask(s, 0.5, row=True)
    assert keep.tolist() == [[False, True, False, True], [True, False, False, True]]
    # over the whole matrix: the 4 lowest (0.2, 0.25, 0.4, 0.5) go, whatever their rows
    keep = keep_mask(s, 0.5, row=False)
    assert keep.tolist() == [[True, True, False, True], [False, False, False, True]]


def test_wanda_statistics_are_input_norms(tiny):
    model, _ = tiny
    ids = torch.randint(0, 250, (3, 20))
    stats = dense_statistics(model, capture(model, ids, batch_size=2))
    blk = model.model.layers[0]
    with torch.no_grad():
        x = blk.input_layernorm(model.model.embed_tokens(ids))  # what q/k/v of block 0 see
    hand = (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.allclose(stats[0][name], hand, rtol=1e-4, atol=1e-5)
    assert set(stats[0]) == {n for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("row", [True, False])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_unstructured_count_is_exact(row, s):
    score = torch.rand(48, 80)
    keep = keep_mask(score, s, row=row)
    assert int((~keep).sum()) == pruned_count(score.numel(), s) == round(s * score.numel())
    if row:  # rows differ by at most one pruned weight
        per_row = (~keep).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1
        # and in each row the pruned scores are the lowest
        for r in range(score.shape[0]):
            if (~keep[r]).any() and keep[r].any():
                assert score[r][~keep[r]].max() <= score[r][keep[r]].min()


def test_two_four_pattern_and_layout():
    score = torch.rand(64, 128)
    keep = keep_mask(score, 0.5, nm=(2, 4))
    groups = keep.reshape(64, -1, 4)
    assert bool((groups.sum(-1) == 2).all())
    top = score.reshape(64, -1, 4).topk(2, -1).values.min(-1).values
    assert bool((score.reshape(64, -1, 4)[~groups] <= top.repeat_interleave(2, 1).reshape(-1)).all())
    w = torch.randn(64, 128)
    assert semi_structured_problems(w)  # dense: more than 2 nonzeros per group
    w = w * keep
    assert semi_structured_problems(w) == []
    assert semi_structured_problems(w, torch.float16) == []
    assert any("multiple" in p for p in semi_structured_problems(torch.zeros(48, 128)))  # 48 rows: not 32k
    with pytest.raises(ValueError):
        keep_mask(torch.rand(4, 6), 0.5, nm=(2, 4))


def test_pack_roundtrip():
    keep = torch.rand(33, 17) > 0.4
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_mask(packed, keep.shape), keep)
