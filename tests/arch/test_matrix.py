"""The architecture matrix (issue 26): every family of tests/tiny.py (FAMILIES) through every registered method,
with each method's own tiny-model settings (`Method.contract_config()`). A cell either runs, exports and reloads
(`AutoModelForCausalLM` generates, peft loads exported adapters; `adaflex.retrofit.load` gives the run's logits
and evaluation) or is refused in one line naming the model type and the missing piece (REFUSED below; README.md,
Supported families, is this table). An untouched model of every family reports flops_ratio 1.0, sparsity 0, KV
1.0."""

from __future__ import annotations

import pytest
import torch

import adaflex.retrofit as af
from adaflex.retrofit import registry
from adaflex.retrofit.errors import UsageError
from tiny import FAMILIES, GENERATED, generated_logits, tiny_family

pytestmark = pytest.mark.arch

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs back home across the field. " * 2
TEXT = " ".join(f"sentence {i} about tiny models and their blocks." for i in range(400))

_WIDTH = "width does not narrow MoE experts (role 'experts': mlp.experts)"
# (family, method) -> what the one-line refusal says is missing; every other cell must run
REFUSED = {
    ("qwen2_moe", "width"): _WIDTH,
    ("mixtral", "width"): _WIDTH,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> its saved tiny model directory (built once per module)."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp("arch") / family
            model, tok = tiny_family(family)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch-text") / "text.txt"
    path.write_text(TEXT)
    return path


def recipe_for(method, text_path) -> dict:
    return {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 64},
                                "generated": GENERATED},
            "stages": [{method.name: method.contract_config()}],
            "eval": [{"task": "perplexity", "data": str(text_path), "seq_len": 64, "limit": 2}]}


@pytest.mark.parametrize("name", list(registry.METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_through_method(family, name, saved, text_path, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from adaflex.retrofit.evaluate import run_eval

    method = registry.get(name)
    model, tok = af.load(str(saved(family)))
    recipe = recipe_for(method, text_path)
    model_type = model.config.model_type
    if (family, name) in REFUSED:
        with pytest.raises(UsageError) as err:
            af.run(recipe, model, tok, model_name=str(saved(family)), out=tmp_path / "run", log=lambda m: None)
        msg = str(err.value)
        assert "\n" not in msg and f"model type '{model_type}'" in msg and REFUSED[family, name] in msg, msg
        assert not (tmp_path / "run").exists()  # refused before anything is written
        return

    report = af.run(recipe, model, tok, model_name=str(saved(family)), out=tmp_path / "run", log=lambda m: None)
    assert report["dense"]["flops_ratio"] == 1.0 and report["dense"]["sparsity"] == 0.0, report["dense"]
    fitted = generated_logits(model, tok, PROMPT)

    af.export(tmp_path / "run", tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export")  # transformers alone loads and generates
    ids = tok("hello", return_tensors="pt").input_ids
    out = plain.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3

    reloaded, rtok = af.load(str(tmp_path / "export"))
    torch.testing.assert_close(generated_logits(reloaded, rtok, PROMPT), fitted, rtol=0, atol=1e-5)
    if (tmp_path / "export" / "lora" / "adapter_config.json").is_file():  # adapters exported as plain peft LoRA
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "export" / "lora")).eval()
        ids = tok(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=ids).logits, reloaded(input_ids=ids).logits,
                                       rtol=0, atol=1e-5)
    again = run_eval(reloaded, rtok, "perplexity", str(text_path), seq_len=64, limit=2)
    ran = report["evals"][0]["retrofitted"]
    assert again["value"] == pytest.approx(ran["value"], rel=1e-5)
    assert again["flops_ratio"] == pytest.approx(ran["flops_ratio"], rel=1e-9)
    assert again["kv_bytes_ratio_at_context"] == pytest.approx(ran["kv_bytes_ratio_at_context"], rel=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_untouched_model_costs_its_dense_reference(family, one_thread):
    from adaflex.retrofit.evaluate import cost_figures, kv_at_context, probe_ids

    model, tok = tiny_family(family)
    cost = cost_figures(model, probe_ids(tok, PROMPT * 4))
    assert (cost["flops_ratio"], cost["sparsity"], cost["kv_bytes_ratio"]) == (1.0, 0.0, 1.0), cost
    # at another length too (a sliding layer's window − 1 binds at both)
    assert kv_at_context(model, probe_ids(tok, PROMPT * 4, rows=1, length=40))["kv_bytes_ratio_at_context"] == 1.0


def test_a_refused_cell_exits_2_in_one_line_from_the_cli(saved, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from adaflex.cli.main import app

    recipe = tmp_path / "r.yaml"
    settings = recipe_for(registry.get("width"), tmp_path / "unused.txt")
    del settings["eval"]
    recipe.write_text(yaml.safe_dump(settings))
    res = CliRunner().invoke(app, ["retrofit", str(saved("mixtral")), "--recipe", str(recipe), "--out",
                                   str(tmp_path / "run")])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model type 'mixtral'" in lines[0] and "Traceback" not in res.output, res.stderr
