"""prune on MoE experts stored as 3-D parameters (issue 26): per-expert Wanda statistics from the tokens routed to
each expert, routers left whole, masks kept through run -> load_run -> export -> reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adaflex.retrofit as af
from adaflex.retrofit.arch import decoder_layers
from adaflex.retrofit.prune.experts import experts_modules, stats_hook
from adaflex.retrofit.prune.scores import block_linears
from adaflex.retrofit.restore import load_run
from tiny import GENERATED, tiny_family

from .helpers import run_fit

MOE = ["mixtral", "qwen2_moe"]
ROUTERS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")


def _routers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(ROUTERS)}


@pytest.mark.parametrize("family", MOE)
def test_expert_statistics_come_from_the_tokens_routed_to_that_expert(family, one_thread):
    model, _ = tiny_family(family)
    moe = decoder_layers(model)[0].mlp
    name, experts = experts_modules(decoder_layers(model)[0])[0]
    wanted = {n for n, _ in block_linears(decoder_layers(model)[0]) if n.startswith(name + ".")}
    stats: dict = {}
    x = torch.randn(1, 24, model.config.hidden_size)
    h = experts.register_forward_hook(stats_hook(experts, name, wanted, stats), with_kwargs=True)
    with torch.no_grad():
        moe(x)
    h.remove()
    with torch.no_grad():
        index = moe.gate(x.reshape(-1, x.shape[-1]))[2]
        for e in range(experts.gate_up_proj.shape[0]):
            xe = x.reshape(-1, x.shape[-1])[(index == e).any(-1)]
            gate, up = (xe @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            act = experts.act_fn(gate) * up
            torch.testing.assert_close(stats[f"{name}.gate_up_proj.{e}"], (xe * xe).sum(0))
            torch.testing.assert_close(stats[f"{name}.down_proj.{e}"], (act * act).sum(0))
    assert len(stats) == len(wanted) == 2 * experts.gate_up_proj.shape[0]


@pytest.mark.parametrize("family", MOE)
def test_half_of_every_expert_is_zero_and_routers_are_untouched(family, one_thread):
    model, tok = tiny_family(family)
    routers = _routers(model)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    res, _ = run_fit(model, tok, sparsity=0.5, allocation="uniform", score="wanda")
    assert res.plan["achieved"] == 0.5
    for n, p in model.named_parameters():
        if n in routers:
            assert torch.equal(p, routers[n]), n
        if n in dense:  # every expert's slice at 50%, and the wanda ranking is not magnitude's
            assert all((p[e] == 0).float().mean() == 0.5 for e in range(p.shape[0])), n
            mag = dense[n].abs().argsort(dim=-1)[..., : p.shape[-1] // 2]
            assert not torch.equal(torch.gather(p, -1, mag) == 0, torch.ones_like(mag, dtype=torch.bool)), n
    slices = [e for e in res.plan["linears"] if "expert" in e]
    assert slices and all(e["sparsity"] == 0.5 and e["param"].endswith(("gate_up_proj", "down_proj"))
                          for e in slices)
    assert not [e for e in res.plan["linears"] if e["name"].endswith(("mlp.gate", "shared_expert_gate"))]


@pytest.mark.parametrize("family", MOE)
def test_masks_survive_load_run_export_and_reload(family, tmp_path, one_thread):
    model, tok = tiny_family(family)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    model, tok = af.load(str(tmp_path / "model"))
    recipe = {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 32},
                                  "generated": GENERATED},
              "stages": [{"prune": {"sparsity": 0.5, "allocation": "owl", "score": "wanda"}}]}
    report = af.run(recipe, model, tok, model_name=str(tmp_path / "model"), out=tmp_path / "run", log=lambda m: None)
    assert report["stages"][0]["achieved"] == pytest.approx(0.5)
    assert report["retrofitted"]["sparsity"] == pytest.approx(report["stages"][0]["achieved"], abs=1e-12)
    ids = tok("the routed tokens of each expert", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits
        restored = load_run(tmp_path / "run")[0]
        torch.testing.assert_close(restored(input_ids=ids).logits, want, rtol=0, atol=0)
    af.export(tmp_path / "run", tmp_path / "export")
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][0]["plan"]
    for e in plan["linears"]:
        w = weights[e["param"]] if e.get("expert") is None else weights[e["param"]][e["expert"]]
        assert int((w == 0).sum()) == round(e["sparsity"] * w.numel()), e["name"]
    reloaded, _ = af.load(str(tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)
