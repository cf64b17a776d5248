"""The routes stage end to end on the tiny model: run, export, reload, and the bad-input exits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit import export, load, run
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.routes.apply import apply
from adaflex.retrofit.routes.plan import RoutesPlan
from adaflex.retrofit.routes.runtime import runtime_of

WIKI = "../shared/data/wikitext2_dev.txt"  # text rewards: dense is always a valid label on a random model
RECIPE = {
    "stages": [{"routes": {"max_executed": 3, "simulations": 6, "examples": 3, "train": [WIKI], "text_len": 24,
                           "epochs": 2,
                           "batch_size": 2, "min_fix_share": 0.0, "calibrate_examples": 2, "max_tokens": 32}}],
    "eval": [{"task": "mc", "data": "../shared/data/arc_easy_validation.jsonl", "limit": 2}],
}


def test_run_export_reload_restores_routers(tiny_dir, tmp_path):
    report = run(RECIPE, str(tiny_dir), out=tmp_path / "run")
    st = report["stages"][0]
    assert st["block_evals"] < st["block_evals_naive"] and report["trainable_params"] > 0
    assert report["retrofitted"]["layers_executed_mean"] <= 4
    assert st["calibrated_executed_mean"] <= 3  # the auto dial meets max_executed on its prompts
    tensors = load_file(str(tmp_path / "run" / "adaflex.safetensors"))
    assert any(k.startswith("stages.0.routes.router.blocks.3.") for k in tensors)

    export(tmp_path / "run", tmp_path / "exp")
    assert not any("adaflex" in k for k in load_file(str(tmp_path / "exp" / "model.safetensors")))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    restored, _ = load(tmp_path / "exp")
    from_run, _ = load(tmp_path / "run")
    dense, _ = load(str(tiny_dir))
    for m in (restored, from_run):
        sd = m.model.adaflex_router.state_dict()
        for k, v in sd.items():
            assert torch.equal(v, tensors[f"stages.0.routes.router.{k}"])
    x = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        a, b = restored(x).logits, from_run(x).logits
        assert torch.equal(a, b)
        assert torch.equal(restored.adaflex.routes.last_routes, from_run.adaflex.routes.last_routes)
        assert torch.equal(plain(x).logits, dense(x).logits)  # plain transformers sees the dense model

    # routers for another model: one clear error
    plan = RoutesPlan.model_validate(json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][0]["plan"])
    from tiny import tiny_llama

    other = tiny_llama(layers=3, hidden=32)
    with pytest.raises(UsageError, match="4 blocks of width 64; this model has 3 blocks of width 32"):
        apply(other, plan, {})
    # missing routers: an error unless the user asks for the dense fallback
    fresh, _ = load(str(tiny_dir))
    with pytest.raises(UsageError, match="router weights missing"):
        apply(fresh, plan, {})
    apply(fresh, plan.model_copy(update={"fallback_dense": True}), {})
    assert runtime_of(fresh) is None
    bad = {k[len("stages.0.routes."):]: v for k, v in tensors.items()}
    bad["router.blocks.0.0.weight"] = torch.zeros(32, 48)
    with pytest.raises(UsageError, match="width 48"):
        apply(fresh, plan, bad)


def test_guard_is_fitted_on_the_training_prompts_and_reloaded(tiny_dir, tmp_path):
    # a loose text tolerance: labels skip blocks, so there are routers to guard
    cfg = {**RECIPE["stages"][0]["routes"], "examples": 10, "text_tolerance": 5.0, "guard": 0.9}
    report = run({**RECIPE, "stages": [{"routes": cfg}]}, str(tiny_dir), out=tmp_path / "run")
    threshold = report["stages"][0]["guard_threshold"]
    assert 0 < threshold < float("inf")
    m, _ = load(tmp_path / "run")
    routers = m.model.adaflex_router
    assert routers.guarded and float(routers.guard_threshold) == pytest.approx(threshold)
    assert routers.guard_basis.shape == (8, m.config.hidden_size)
    with pytest.raises(UsageError, match=r"stages\.0\.routes\.guard: 3 training prompts, at least 8 needed"):
        run({**RECIPE, "stages": [{"routes": {**cfg, "examples": 3}}]}, str(tiny_dir), out=tmp_path / "few")


@pytest.mark.parametrize("setting, message", [
    ("routes.path=[0,1,7]", "block 7 out of range 0..3"),
    ("routes.max_executed=0", "max_executed"),
])
def test_bad_input_exits_2(tiny_dir, tmp_path, setting, message):
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(RECIPE))
    res = CliRunner().invoke(app, ["retrofit", str(tiny_dir), "--recipe", str(recipe), "--set", setting,
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_fixed_path_stage(tiny_dir, tmp_path):
    rec = {"stages": [{"routes": {"path": [0, 2, 3]}}], "eval": RECIPE["eval"]}
    report = run(rec, str(tiny_dir), out=tmp_path / "run")
    assert report["layers_executed_mean"] == 3
    m, _ = load(tmp_path / "run")
    assert m.adaflex.routes.policy.counts == (1, 0, 1, 1)


@torch.no_grad()
def test_auto_dial_meets_the_budget_on_every_prompt_source():
    """The dial is calibrated so that each source of prompts (training prompts, calibration windows) meets
    max_executed on average, not only their pooled mean."""
    from adaflex.retrofit.routes.apply import calibrate_dial, executed_mean
    from adaflex.retrofit.routes.router import Routers
    from adaflex.retrofit.routes.runtime import RouterPolicy, install, uninstall
    from tiny import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    routers = Routers(L, d, 8)
    for blk in routers.blocks:  # lean to execute, more so on some inputs: sources differ at every dial
        torch.nn.init.normal_(blk[0].weight, std=2.0)
        blk[2].bias.data = torch.tensor([0.0, 1.0, -5.0])
    gen = torch.Generator().manual_seed(1)
    sources = {"short": [torch.randint(0, 250, (1, 6), generator=gen) for _ in range(6)],
               "long": [torch.randint(0, 250, (1, 40), generator=gen) for _ in range(6)]}

    def means(p):
        install(model, RouterPolicy(routers, 8, p), routers)
        try:
            return {k: executed_mean(model, v) for k, v in sources.items()}
        finally:
            uninstall(model)

    base = means(0.0)
    budget = min(base.values()) - 0.5  # below both: the dial must push
    p, got = calibrate_dial(model, routers, 8, sources, budget, 0)
    at = means(p)
    assert p < 0 and all(v <= budget for v in at.values()) and got == max(at.values())
    p_one, _ = calibrate_dial(model, routers, 8, sources["short"], budget, 0)  # a list: one source
    assert p <= p_one


def test_expansion_prior_is_block_influence_of_the_calibration_or_the_prompts():
    import types

    from adaflex.retrofit.drop.apply import block_influence
    from adaflex.retrofit.routes.apply import expansion_prior
    from adaflex.retrofit.routes.config import RoutesConfig
    from tiny import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    cal = torch.randint(0, 250, (3, 16))
    prompts = [types.SimpleNamespace(prompt=torch.randint(0, 250, (1, n))) for n in (5, 9, 12)]
    def ctx(calibration):
        data = types.SimpleNamespace(calibration=None if calibration is None else object())
        return types.SimpleNamespace(model=model, calibration=calibration, recipe=types.SimpleNamespace(data=data))

    with_cal, without = ctx(cal), ctx(None)
    cfg = RoutesConfig(calibrate_examples=2)
    assert expansion_prior(with_cal, cfg, prompts) == pytest.approx(block_influence(model, cal))
    per = [block_influence(model, p.prompt) for p in prompts[:2]]  # the first calibrate_examples prompts
    assert expansion_prior(without, cfg, prompts) == pytest.approx([(a + b) / 2 for a, b in zip(*per)])
    assert expansion_prior(with_cal, RoutesConfig(expand="random"), prompts) is None


def test_auto_dial_reads_prompts_the_mcts_did_not_label(tiny_dir, tmp_path, monkeypatch):
    """The routers fit their labelled prompts closely, so the dial is calibrated on the next prompts of the
    training files (the labelled examples' prompts only when the files hold no more)."""
    from adaflex.retrofit.restore import load as load_model
    from adaflex.retrofit.routes import apply as routes_apply
    from adaflex.retrofit.routes.config import RoutesConfig
    from adaflex.retrofit.routes.label import load_examples

    _, tok = load_model(str(tiny_dir))
    cfg = RoutesConfig(**RECIPE["stages"][0]["routes"])
    first = load_examples(cfg, tok, [WIKI], 0)
    nxt = load_examples(cfg, tok, [WIKI], 0, start=cfg.examples, count=cfg.calibrate_examples)
    both = load_examples(RoutesConfig(**{**cfg.model_dump(), "examples": cfg.examples + cfg.calibrate_examples}),
                         tok, [WIKI], 0)
    assert [e.prompt.tolist() for e in first + nxt] == [e.prompt.tolist() for e in both]
    seen = {}
    real = routes_apply.calibrate_dial

    def spy(model, routers, windows, prompts, *a, **k):
        seen.update(prompts)
        return real(model, routers, windows, prompts, *a, **k)

    monkeypatch.setattr(routes_apply, "calibrate_dial", spy)
    run(RECIPE, str(tiny_dir), out=tmp_path / "run")
    assert [p.tolist() for p in seen["train"]] == [e.prompt.tolist() for e in nxt]
    labelled = {str(e.prompt.tolist()) for e in first}
    assert not labelled & {str(p.tolist()) for p in seen["train"]}


@torch.no_grad()
def test_dial_out_of_reach_returns_its_limit_and_the_stage_warns(tiny_dir, tmp_path, monkeypatch, capsys):
    from adaflex.retrofit.routes import apply as routes_apply
    from adaflex.retrofit.routes.router import SKIP, Routers
    from tiny import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    routers = Routers(L, d, 8)
    routers.allowed[:, SKIP] = False
    routers.allowed[1, SKIP] = True  # one block may be skipped: at best L - 1 blocks run
    prompts = [torch.randint(0, 250, (1, 9)) for _ in range(4)]
    p, got = routes_apply.calibrate_dial(model, routers, 8, prompts, 1.0, 0)
    assert p == -1.0 and L - 1 <= got <= L
    monkeypatch.setattr(routes_apply, "calibrate_dial", lambda *a, **k: (-1.0, 3.5))
    run(RECIPE, str(tiny_dir), out=tmp_path / "run")
    assert "3.50 blocks run on the dial's prompts at dial -1.000, over max_executed 3" in capsys.readouterr().err


def test_router_seed_seeds_the_routers_only(tiny_dir, tmp_path, monkeypatch):
    """`router_seed` reseeds the routers' training (default: the stage's seed); the labels stay the same."""
    from adaflex.retrofit.routes import apply as routes_apply

    seeds, labels = [], []
    real = routes_apply.train_routers

    def spy(feats, wmask, lab, cfg, seed=0):
        seeds.append(seed)
        labels.append(lab.clone())
        return real(feats, wmask, lab, cfg, seed)

    monkeypatch.setattr(routes_apply, "train_routers", spy)
    reseeded = json.loads(json.dumps(RECIPE))
    reseeded["stages"][0]["routes"]["router_seed"] = 7
    run(RECIPE, str(tiny_dir), out=tmp_path / "a")
    run(reseeded, str(tiny_dir), out=tmp_path / "b")
    assert seeds == [0, 7]
    assert torch.equal(labels[0], labels[1])
    a, b = (load_file(str(tmp_path / r / "adaflex.safetensors")) for r in ("a", "b"))
    key = next(k for k in a if k.endswith("router.blocks.1.0.weight"))
    assert not torch.equal(a[key], b[key])
