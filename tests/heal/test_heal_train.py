"""Healing on the tiny model: KL to dense goes down after drop, pruning masks hold, routes stay active,
a killed run resumes to the same tensors, and run dir -> load -> export -> reload keeps the logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adaflex.retrofit as af
from adaflex.retrofit.arch import decoder_layers
from adaflex.retrofit.heal import train as heal_train
from adaflex.retrofit.prune.scores import block_linears
from adaflex.retrofit.shards.layer import adapted
from adaflex.retrofit.state import state_of, undo_all

from .helpers import dense_kl, heal_tensors, recipe, run

PRUNE = {"prune": {"sparsity": 0.5, "allocation": "owl", "score": "wanda"}}
DROP = {"drop": {"blocks": 1}}


def _held(tok) -> torch.Tensor:
    text = open("../shared/data/wikitext2_dev.txt").read()[-20000:]  # the end of the file: not calibration
    return tok(text, return_tensors="pt").input_ids[:, :256].reshape(4, 64)


def test_heal_reduces_kl_to_dense_after_drop(tiny_dir, one_thread):
    dense, tok = af.load(str(tiny_dir))
    held = _held(tok)
    # held-out WikiText needs WikiText calibration: a random tiny model's own text is byte noise, and healing on it
    # does not carry over to prose
    data = {"calibration": {"path": "../shared/data/wikitext2_dev.txt", "samples": 8, "seq_len": 64}}
    dropped, _, _ = run(tiny_dir, {"seed": 0, "data": data, "stages": [DROP]})
    # the random tiny model's distributions are nearly flat: the whole vocabulary is its "top k"
    healed, _, report = run(tiny_dir, {**recipe(DROP, tokens=4096, top_k=259, lr=0.01, weights_lr=0.003),
                                       "data": data})
    before, after = dense_kl(dropped, dense, held), dense_kl(healed, dense, held)
    assert after < 0.9 * before, (before, after)
    m = report["stages"][1]
    assert m["kl_after"] < m["kl_before"] and m["replacements"] == 1
    hooks = [blk for blk in decoder_layers(healed) if "adaflex_heal_after" in blk._modules]
    assert len(hooks) == 1  # the replacement of the dropped block is part of the healed model


def test_topk_kl_is_the_full_kl_at_full_k_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 50, generator=g) * 3, torch.randn(2, 5, 50, generator=g) * 3
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    full = float((lt.exp() * (lt - ls)).sum(-1).mean())
    vals, idx = lt.topk(50, -1)
    assert heal_train.topk_kl(s, vals, idx, 1.0).item() == pytest.approx(full, rel=1e-4)
    vals, idx = lt.topk(8, -1)
    assert 0 < heal_train.topk_kl(s, vals, idx, 1.0).item() <= full


def test_pruning_masks_stay_enforced(tiny_dir, tmp_path, one_thread):
    pruned, _, _ = run(tiny_dir, {"seed": 0, "data": recipe()["data"], "stages": [PRUNE]})
    zeros = [{n: m.weight == 0 for n, m in block_linears(b)} for b in decoder_layers(pruned)]
    healed, _, _ = run(tiny_dir, recipe(PRUNE, train=["adapters", "norms", "last_blocks"], last_blocks=2,
                                        weights_lr=0.01), out=tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][1]["plan"]
    assert plan["unmerged"], "pruned linears keep their adapters unmerged"
    changed = 0
    for b, blk in enumerate(decoder_layers(healed)):
        for n, m in block_linears(blk):
            assert bool((m.weight[zeros[b][n]] == 0).all()), f"block {b} {n}: a pruned weight came back"
            changed += int(b >= 2 and not torch.equal(m.weight != 0, ~zeros[b][n]))
    assert changed == 0
    last = decoder_layers(healed)[-1].mlp.down_proj
    assert not torch.equal(last.weight, decoder_layers(pruned)[-1].mlp.down_proj.weight)  # it trained
    assert {n for n, _ in adapted(healed)} == set(plan["unmerged"])
    af.export(tmp_path / "run", tmp_path / "export")
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    for b in range(len(zeros)):
        for n, z in zeros[b].items():
            assert bool((weights[f"model.layers.{b}.{n}.weight"][z] == 0).all())


def test_routes_stay_active_while_healing(tiny_dir, monkeypatch, one_thread):
    routes = {"routes": {"path": [0, 1, 3]}}  # a fixed path skipping block 2
    seen, steps = [], []
    model, tok = af.load(str(tiny_dir))
    blk2 = decoder_layers(model)[2]
    h = blk2.register_forward_hook(lambda *a: seen.append(1))
    real = heal_train.loss_on

    def watched(*a, **k):
        before = len(seen)
        out = real(*a, **k)
        steps.append(len(seen) - before)
        return out

    monkeypatch.setattr(heal_train, "loss_on", watched)
    af.run(recipe(routes, train=["head"], tokens=512), model, tok, model_name=str(tiny_dir), log=lambda m: None)
    h.remove()
    assert steps and not any(steps), "the skipped block ran during healing"


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch, one_thread):
    rec = recipe(DROP, train=["adapters", "head", "replacements"], tokens=1536)
    run(tiny_dir, rec, out=tmp_path / "whole")
    real, calls = heal_train.loss_on, []

    def dies(model, *a, **k):
        calls.append(model.training)  # training steps, not the KL measured before and after
        if sum(calls) == 4:  # checkpoints after steps 2 and 4 of 6: killed during step 4
            raise KeyboardInterrupt
        return real(model, *a, **k)

    monkeypatch.setattr(heal_train, "loss_on", dies)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, rec, out=tmp_path / "killed")
    monkeypatch.setattr(heal_train, "loss_on", real)
    run(tiny_dir, rec, out=tmp_path / "killed")
    stage = json.loads((tmp_path / "killed" / "state" / "stage-1.json").read_text())
    assert stage["metrics"]["resumed_at"] == 2
    whole, resumed = heal_tensors(tmp_path / "whole"), heal_tensors(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


@torch.no_grad()
def _logits(model, tok) -> torch.Tensor:
    return model(input_ids=_held(tok), use_cache=False).logits


def test_run_dir_load_export_reload_keep_the_logits(tiny_dir, tmp_path, one_thread):
    rec = recipe(PRUNE, DROP, train=["adapters", "norms", "head", "replacements"], tokens=1024)
    model, tok, _ = run(tiny_dir, rec, out=tmp_path / "run")
    fitted = _logits(model, tok)
    restored, _ = af.load(str(tmp_path / "run"))
    torch.testing.assert_close(_logits(restored, tok), fitted, rtol=0, atol=1e-5)
    af.export(tmp_path / "run", tmp_path / "export")
    reloaded, _ = af.load(str(tmp_path / "export"))
    torch.testing.assert_close(_logits(reloaded, tok), fitted, rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())["adaflex"]["stages"][2]
    assert cfg["plan"]["weights_baked"] and not cfg["baked"]
    assert {"heal", "shards"} <= set(state_of(model).patches)  # replacements; adapters left on pruned linears
    undo_all(model)
    assert not [n for n, _ in model.named_modules() if "adaflex" in n]
