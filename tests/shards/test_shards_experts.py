"""LoRA on the 3-D experts of transformers 5's MoE models (issue 26): tiny Mixtral and Qwen2-MoE trained with
`targets: [q, experts]`, the experts' outputs changed, the merged export reloaded by transformers alone and the
unmerged one by peft (`target_parameters`) with the run's logits, and the adapter parameters and MACs counted."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

import adaflex.retrofit as af
from adaflex.retrofit import registry
from adaflex.retrofit.arch import search_shape
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.method import CostState
from adaflex.retrofit.shards.apply import make_plan
from adaflex.retrofit.shards.config import ShardsConfig
from adaflex.retrofit.shards.layer import adapted, disabled
from tiny import GENERATED, tiny_family

RANK = 2
TEXT = " ".join(f"sentence {i} about tiny experts and their routers." for i in range(200))


def _recipe(stage: dict, text_path) -> dict:
    return {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 64},
                                "generated": GENERATED},
            "stages": [stage],
            "eval": [{"task": "perplexity", "data": str(text_path), "seq_len": 64, "limit": 2}]}


SHARDS = {"shards": {"method": "lora", "rank": RANK, "targets": ["q", "experts"], "loss": "lm", "steps": 3,
                     "lr": 0.05, "batch_size": 2}}
HEAL = {"heal": {"train": ["adapters"], "loss": "lm", "tokens": 256, "batch_size": 2, "lr": 0.05,
                 "adapter": {"method": "lora", "rank": RANK, "targets": ["experts.down_proj"]}}}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def trained(request, tmp_path_factory):
    """(family, saved dir, run dir, report) of a shards run adapting q_proj and both expert parameters."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model, tok = tiny_family(family)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    torch.set_num_threads(1)
    model, tok = af.load(str(root / "model"))
    report = af.run(_recipe(SHARDS, root / "text.txt"), model, tok, model_name=str(root / "model"),
                    out=root / "run", log=lambda m: None)
    return family, root, report


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def test_params_and_macs_counted(trained):
    family, root, report = trained
    model, _ = tiny_family(family)
    ex = model.model.layers[0].mlp.experts
    e, d, top_k = ex.gate_up_proj.shape[0], model.config.hidden_size, model.config.num_experts_per_tok
    inter = ex.down_proj.shape[2]
    per_expert = (d + 2 * inter) + (inter + d)  # gate_up [2I, H], down [H, I]: d_in + d_out each
    layers = model.config.num_hidden_layers
    want = RANK * layers * (2 * d + e * per_expert)  # q_proj [d, d] once, each expert's pair
    stage = report["stages"][0]
    assert stage["trainable_params"] == want == report["trainable_params"]
    ran = report["evals"][0]["retrofitted"]
    assert ran["trainable_params"] == want  # evaluate/cost.py counts them too
    # the 3-D factors are no experts module: neither block weights (sparsity) nor expert MACs
    assert ran["sparsity"] == 0.0 and ran["flops_ratio"] == 1.0, ran
    plan = json.loads((root / "run" / "plan.json").read_text())["stages"][0]["plan"]
    assert plan["experts"] == {"experts.gate_up_proj": [e, top_k], "experts.down_proj": [e, top_k]}
    state = CostState(shape=search_shape(model), context=64)
    shards = registry.get("shards")
    shards.cost(shards.config(**SHARDS["shards"]), shards.plan.model_validate(plan), {}, state)
    assert state.adapter_params == want
    assert state.adapter_macs == RANK * (2 * d + top_k * per_expert)  # a token passes top_k experts


def test_trained_adapters_change_the_experts(trained):
    family, root, _ = trained
    model, _ = af.load(str(root / "run"))
    sites = [(n, m) for n, m in adapted(model) if ".experts." in n]
    assert len(sites) == 2 * model.config.num_hidden_layers
    assert all(m.adaflex_delta.adaflex_b.abs().max() > 0 for _, m in sites)  # trained away from B = 0
    weight = model.model.layers[0].mlp.experts.down_proj
    captured = {}
    hook = model.model.layers[0].mlp.experts.register_forward_hook(
        lambda _m, _a, out: captured.setdefault("out", []).append(out))
    ids = _ids()
    with torch.no_grad():
        model(input_ids=ids)
        with disabled(model):
            model(input_ids=ids)
    hook.remove()
    on, off = captured["out"]
    assert (on - off).abs().max() > 1e-4  # the experts' own output moved
    assert model.model.layers[0].mlp.experts.down_proj is weight  # the parameter is put back after each forward
    assert weight.dim() == 3 and "parametrizations" not in dict(model.model.layers[0].mlp.experts.named_children())


def test_merged_export_reloads_with_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    _, root, _ = trained
    exp = af.export(root / "run", tmp_path / "merged", merge_adapters=True)
    assert not (exp / "lora").exists()
    want = _logits(af.load(str(root / "run"))[0], _ids())
    hf = AutoModelForCausalLM.from_pretrained(str(exp)).eval()
    dense = AutoModelForCausalLM.from_pretrained(str(root / "model")).eval()
    assert (_logits(dense, _ids()) - want).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(_logits(hf, _ids()), want, atol=1e-5, rtol=0)


def test_peft_export_loads_with_target_parameters(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, root, _ = trained
    exp = af.export(root / "run", tmp_path / "exp")
    cfg = json.loads((exp / "lora" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert cfg["target_modules"] == ["q_proj"] and cfg["lora_dropout"] == 0.0
    ours, _ = af.load(str(exp))
    base = AutoModelForCausalLM.from_pretrained(str(exp)).eval()
    peft_model = PeftModel.from_pretrained(base, str(exp / "lora")).eval()
    torch.testing.assert_close(_logits(peft_model, _ids()), _logits(ours, _ids()), atol=1e-5, rtol=0)


PRUNE = {"prune": {"sparsity": 0.5, "allocation": "owl", "score": "wanda"}}


@pytest.mark.parametrize("family, pruned", [("mixtral", True), ("qwen2_moe", False)])
def test_heal_adapters_on_experts(family, pruned, tmp_path, one_thread):
    """heal's adapters on the experts: merged where the experts are dense, left unmerged (and re-installed on
    load) where prune zeroed expert weights."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_family(family)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    model, tok = af.load(str(tmp_path / "model"))
    recipe = _recipe(HEAL, tmp_path / "text.txt")
    recipe["stages"] = [PRUNE, HEAL] if pruned else [HEAL]
    report = af.run(recipe, model, tok, model_name=str(tmp_path / "model"), out=tmp_path / "run",
                    log=lambda m: None)
    e, inter = model.model.layers[0].mlp.experts.down_proj.shape[::2]
    assert report["stages"][-1]["trainable_params"] == RANK * 2 * e * (inter + model.config.hidden_size)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][-1]["plan"]
    assert plan["unmerged"] == ([f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)] if pruned else [])
    want = _logits(af.load(str(tmp_path / "run"))[0], _ids())
    exp = af.export(tmp_path / "run", tmp_path / "exp")
    if pruned:  # the pruned experts keep their adapter beside the weights: adaflex's load re-installs it
        ours, _ = af.load(str(exp))
        assert [n for n, _ in adapted(ours)] == plan["unmerged"]
        torch.testing.assert_close(_logits(ours, _ids()), want, atol=1e-5, rtol=0)
        return
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    assert (_logits(dense, _ids()) - want).abs().max() > 1e-4  # healed experts changed the model
    merged = AutoModelForCausalLM.from_pretrained(str(exp)).eval()  # heal merged its adapters
    torch.testing.assert_close(_logits(merged, _ids()), want, atol=1e-5, rtol=0)


def test_refusals(one_thread):
    llama, _ = tiny_family("llama")
    with pytest.raises(UsageError) as err:
        make_plan(llama, ShardsConfig(method="lora", targets=["experts"]))
    msg = str(err.value)
    assert "\n" not in msg and "model type 'llama'" in msg and "experts.gate_up_proj" in msg, msg
    mixtral, _ = tiny_family("mixtral")
    with pytest.raises(UsageError, match=r"3-D experts parameters: experts\.gate_up_proj, experts\.down_proj"):
        make_plan(mixtral, ShardsConfig(method="lora", targets=["gate_up_proj"]))  # Phi-3's fused linear's name
    with pytest.raises(ValidationError, match="use method: lora"):
        ShardsConfig(method="mos", targets=["q", "experts"])
    # unset targets leave the experts out (opt-in): Qwen2-MoE keeps Llama's seven (attention + shared expert)
    qwen, _ = tiny_family("qwen2_moe")
    plan = make_plan(qwen, ShardsConfig(method="lora"))
    assert plan.experts is None and "down_proj" in plan.targets
    assert ShardsConfig(method="lora", targets="experts").targets == ["experts.gate_up_proj", "experts.down_proj"]


def test_peft_export_of_one_expert_parameter_alone(tmp_path, one_thread):
    """Only `experts.down_proj` adapted: no target_modules at all (peft adds no default linears), keys without
    `base_layer.` nesting, peft's logits."""
    import copy

    from peft import PeftModel

    from adaflex.retrofit.shards.apply import write_peft_lora
    from shards.helpers import adapt

    model, _ = tiny_family("qwen2_moe")
    base = copy.deepcopy(model)
    _, plan, _ = adapt(model, method="lora", rank=RANK, targets=["experts.down_proj"], dropout=0.0)
    write_peft_lora(model, plan, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["target_modules"] is None and cfg["target_parameters"] == ["experts.down_proj"]
    dense = _logits(base, _ids())
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    assert (_logits(model, _ids()) - dense).abs().max() > 1e-4  # the adapter acts
    torch.testing.assert_close(_logits(peft_model, _ids()), _logits(model, _ids()), atol=1e-5, rtol=0)
