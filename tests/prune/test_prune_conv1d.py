"""prune on GPT-2's Conv1D (a linear whose weight is stored [in, out]): scores, masks and sparsity are those of the
nn.Linear it computes, so a twin model whose Conv1Ds are replaced by nn.Linear (weight transposed) gets the same
masks bit for bit (issue 26). Export and reload: the gpt2 × prune cell of tests/arch/test_matrix.py."""

from __future__ import annotations

import copy

import pytest
import torch

from adaflex.retrofit import arch
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.evaluate.cost import cost_figures
from adaflex.retrofit.prune.apply import apply
from adaflex.retrofit.prune.plan import PrunePlan
from adaflex.retrofit.prune.scores import unpack_mask
from tiny import tiny_family

from .helpers import run_fit


def _linear_twin(model):
    """A copy of `model` with every block Conv1D replaced by the nn.Linear it computes (weight transposed)."""
    twin = copy.deepcopy(model)
    for blk in arch.decoder_layers(twin):
        for name, m in list(blk.named_modules()):
            if arch.is_conv1d(m):
                lin = torch.nn.Linear(*m.weight.shape)
                with torch.no_grad():
                    lin.weight.copy_(m.weight.T)
                    lin.bias.copy_(m.bias)
                parent, attr = name.rsplit(".", 1)
                setattr(blk.get_submodule(parent), attr, lin)
    return twin


def _conv1ds(model):
    return [(b, n, m) for b, blk in enumerate(arch.decoder_layers(model)) for n, m in blk.named_modules()
            if arch.is_conv1d(m)]


@pytest.fixture
def gpt2():
    return tiny_family("gpt2")


def test_conv1d_masks_equal_the_linear_twins(gpt2, one_thread):
    model, tok = gpt2
    twin = _linear_twin(model)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=1e-5)  # the same function
    convs = _conv1ds(model)
    assert len(convs) == 8 and not _conv1ds(twin)
    assert cost_figures(model, ids)["sparsity"] == 0.0  # untouched

    res, _ = run_fit(model, tok, sparsity=0.5, allocation="uniform", score="wanda")
    ref, _ = run_fit(twin, tok, sparsity=0.5, allocation="uniform", score="wanda")
    twin_mods = [dict(blk.named_modules()) for blk in arch.decoder_layers(twin)]
    entries = {(e["block"], e["name"]): e for e in res.plan["linears"]}
    for b, name, m in convs:
        w = m.weight  # [in, out]
        assert int((w == 0).sum()) == w.numel() // 2, name  # exactly half of every Conv1D's weights
        keep = (w != 0).T  # as the linear's [out, in]
        assert torch.equal(keep, twin_mods[b][name].weight != 0), (b, name)  # Wanda chose the same weights
        assert torch.equal(keep.sum(1), torch.full((w.shape[1],), w.shape[0] // 2)), name  # compared per output row
        e = entries[(b, name)]
        assert e["transposed"] is True and e["shape"] == [w.shape[1], w.shape[0]] and e["sparsity"] == 0.5
        assert e["param"] == f"transformer.h.{b}.{name}.weight"
        assert torch.equal(unpack_mask(res.tensors[f"mask.{b}.{name}"], e["shape"]), keep)
        assert torch.equal(res.tensors[f"mask.{b}.{name}"], ref.tensors[f"mask.{b}.{name}"])
    assert res.plan["achieved"] == ref.plan["achieved"] == 0.5
    assert all("transposed" not in e for e in ref.plan["linears"])  # nn.Linear plans are unchanged
    assert cost_figures(model, ids)["sparsity"] == 0.5  # the evaluation counts the same weights


def test_conv1d_plan_reapplies_and_checks_the_layout(gpt2, one_thread):
    model, tok = gpt2
    fresh = copy.deepcopy(model)
    res, _ = run_fit(model, tok, sparsity=0.5, allocation="owl", score="wanda")
    plan = PrunePlan(**res.plan)
    apply(fresh, plan, res.tensors)  # a run directory's masks land on the [in, out] weights as fitted
    for (_, _, a), (_, _, b) in zip(_conv1ds(model), _conv1ds(fresh), strict=True):
        assert torch.equal(a.weight, b.weight)
    flipped = copy.deepcopy(res.plan)
    del flipped["linears"][0]["transposed"]
    with pytest.raises(UsageError, match="planned untransposed, the model's is a Conv1D"):
        PrunePlan(**flipped).check_model(fresh)


def test_conv1d_two_four_groups_inputs(gpt2, one_thread):
    model, tok = gpt2
    res, _ = run_fit(model, tok, pattern="2:4", allocation="uniform", score="wanda")
    assert res.plan["semi_structured"]["ok"], res.plan["semi_structured"]["problems"]
    for _, name, m in _conv1ds(model):
        nz = (m.weight.T != 0).reshape(m.weight.shape[1], -1, 4).sum(-1)  # groups of 4 consecutive inputs
        assert bool((nz == 2).all()), name
