"""Device placement: the tensors adaflex creates while a retrofitted model runs (kv, routes, drop, width and fused
blocks at prefill and decoding, a heal step, the evaluations, generated text) land on the device of the tensors
they meet, so a model moved to a GPU runs.

There is no GPU here. The default device is set to `meta` while the tiny model and its inputs stay on the CPU: a
tensor made without `device=` then lands on `meta`, and the next op mixing it with a CPU tensor fails (or the
output comes back on `meta`, which `_on_cpu` refuses). Where torch or transformers themselves create such
tensors, the test works around them (a tokenizer called outside the trick, torch's cross-entropy). The token ids
the evaluations build go to the model's device: a model moved to `meta` stands in for one on a GPU there.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaflex.retrofit import arch, fused
from adaflex.retrofit.evaluate import cost, ppl
from tiny import byte_tokenizer, tiny_llama

META = torch.device("meta")  # as a context manager: the default device inside the block
TEXT = " ".join(f"sentence {i} about tiny models." for i in range(60))


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _ids_on_the_models_device(decoder, args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None:  # meta ids would pass silently: a CPU embedding indexed by them gives CPU garbage
        assert ids.device == next(decoder.parameters()).device, f"token ids on {ids.device}"


@pytest.fixture
def model():
    model = tiny_llama()
    model.model.register_forward_pre_hook(_ids_on_the_models_device, with_kwargs=True)
    return model


def _on_cpu(*tensors) -> None:
    for t in tensors:
        assert t.device.type == "cpu", f"a result on {t.device}"
        assert bool(torch.isfinite(t).all())


@torch.no_grad()
def _decode(model, x, steps: int = 3):
    """Prefill x through the model's own cache (its budgets evict there), then `steps` greedy single-token steps,
    under the meta default device; returns the cache and every step's logits."""
    with META:
        cache = arch.new_cache(model)
        out = [model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits]
        for _ in range(steps):
            out.append(model(input_ids=out[-1][:, -1].argmax(-1, keepdim=True), cache=cache, use_cache=True).logits)
    _on_cpu(*out)
    return cache, out


# ---- kv: budgeted caches, prefill with eviction, decoding through them ----

HEAD_PLAN = np.array([[0.2, 0.5], [0.3, 0.3], [1.0, 0.1], [0.25, 0.35]])  # searched: per KV head [L, H]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("policy,allocation,plan,storage,budget", [
    ("mix", "uniform", None, "model", 0.3),
    ("mix", "searched", HEAD_PLAN, "model", 0.3),
    ("snapkv", "cake", None, "int8", 0.1),  # the budget counts bytes: int8 holds ~4x the tokens
])
def test_kv_prefill_evicts_and_decodes(model, batch, policy, allocation, plan, storage, budget):
    from adaflex.retrofit.kv.apply import install, spec_from
    from adaflex.retrofit.kv.config import KVConfig

    cfg = KVConfig(budget=budget, sinks=2, window=8, policy=policy, allocation=allocation, storage=storage)
    install(model, spec_from(cfg, 4, fractions=plan, model=model))
    cache, _ = _decode(model, torch.randint(0, 250, (batch, 60)))
    assert all(layer.seen == 63 for layer in cache.layers)
    assert all(layer.stored < 60 for layer in cache.layers)  # the prompt was compressed
    if plan is not None:
        assert cache.layers[2].ragged  # heads of different budgets stored apart


def test_kv_sliding_window_layers_decode_as_without_the_trick():
    """Mistral's sliding windows (the keys' positions, the window mask of a multi-token forward)."""
    from adaflex.retrofit.kv.apply import install, spec_from
    from adaflex.retrofit.kv.config import KVConfig
    from tiny import tiny_family

    model, _ = tiny_family("mistral")  # window 16, shorter than the prompt
    install(model, spec_from(KVConfig(budget=0.5, sinks=2, window=8, policy="mix"), 2, model=model))
    x = torch.randint(0, 250, (2, 40))
    with torch.no_grad():
        cache = arch.new_cache(model)
        expected = [model(input_ids=x[:, :30], cache=cache, use_cache=True).logits,
                    model(input_ids=x[:, 30:], cache=cache, use_cache=True).logits]
        with META:
            cache = arch.new_cache(model)
            got = [model(input_ids=x[:, :30], cache=cache, use_cache=True).logits,
                   model(input_ids=x[:, 30:], cache=cache, use_cache=True).logits]
    _on_cpu(*got)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1))


# ---- routes: decided at prefill, reused while decoding ----


def _routers(model):
    from adaflex.retrofit.routes.router import Routers
    from adaflex.retrofit.routes.runtime import RouterPolicy

    routers = Routers(4, model.config.hidden_size, 8)
    routers.allowed[:] = torch.tensor([[0, 1, 0], [1, 1, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    return RouterPolicy(routers, 8, 0.0), routers


@pytest.mark.parametrize("policy", ["routers", "random", "rows", "rows+kv"])
def test_routes_decide_at_prefill_and_decode(model, policy):
    from adaflex.retrofit.routes.runtime import FixedPolicy, RandomPolicy, install

    x = torch.randint(0, 250, (4, 24))
    if policy == "routers":
        install(model, *_routers(model))
    elif policy == "random":
        install(model, RandomPolicy(4, 1.5, seed=0))
    else:  # one path per row: skips, repeats, rows gathered
        install(model, FixedPolicy(rows=[(1, 0, 2, 1), (0, 1, 1, 1), (1, 1, 2, 2), (1, 1, 1, 1)]))
    if policy == "rows+kv":  # a repeated block's slot is one more budgeted layer
        from adaflex.retrofit.kv.apply import install as kv_install
        from adaflex.retrofit.kv.apply import spec_from
        from adaflex.retrofit.kv.config import KVConfig

        kv_install(model, spec_from(KVConfig(budget=0.5, sinks=2, window=8, policy="mix"), 4, model=model))
    cache, _ = _decode(model, x)
    assert cache.adaflex_routes.shape == (4, 4) and cache.adaflex_routes.device.type == "cpu"


# ---- drop and width: forward and decoding of the smaller model ----


def test_drop_influence_removal_and_decode(model):
    from adaflex.retrofit.drop.apply import apply, block_influence
    from adaflex.retrofit.drop.plan import DropPlan

    windows = torch.randint(0, 250, (4, 16))
    with META:
        bi = block_influence(model, windows, batch_size=2, show_progress=False)
    assert len(bi) == 4 and all(np.isfinite(bi))
    apply(model, DropPlan(num_layers=4, kept=[0, 2], removed=[1, 3], block_influence=bi))
    _decode(model, torch.randint(0, 250, (4, 20)))


def _width_plan(model):
    from adaflex.retrofit.width.apply import narrow_plan
    from adaflex.retrofit.width.importance import collect
    from adaflex.retrofit.width.parts import dims_of
    from adaflex.retrofit.width.plan import WidthPlan
    from adaflex.retrofit.width.shapes import BlockWidth

    dims, parts = dims_of(model, "width")
    widths = [BlockWidth(64, 1, 2), BlockWidth(96, 2, 1), BlockWidth(128, 2, 2), BlockWidth(32, 1, 1)]
    st = collect(model, torch.randint(0, 250, (2, 16)), dims, parts, gram=True)  # refit weights too
    g = torch.Generator().manual_seed(0)
    mlp_s = [torch.rand(dims.intermediate, generator=g) for _ in widths]
    head_s = [torch.rand(dims.heads, generator=g) for _ in widths]
    plan, tensors = narrow_plan(model, dims, widths, mlp_s, head_s, st, 0.01, parts)
    return WidthPlan(**plan), tensors


def test_width_narrowing_and_decode(model):
    from adaflex.retrofit.width.apply import apply

    plan, tensors = _width_plan(model)
    with META:
        apply(model, plan, tensors)
    _decode(model, torch.randint(0, 250, (4, 20)))


def test_width_applied_on_the_models_device_stays_there(model):
    """Narrowing a model that already sits on its device (meta here, a GPU in use) with the plan's CPU tensors
    (refit weights included) keeps every new linear on that device."""
    from adaflex.retrofit.width.apply import apply

    plan, tensors = _width_plan(model)
    model.to(META)
    apply(model, plan, tensors)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_width_statistics_where_the_model_runs(model):
    """Fitting widths on a model on its device (the GPU benchmark narrows a 7B-like model there): the activation
    sums and Gram matrices are made on the model's device, not the default one."""
    from adaflex.retrofit.width.importance import collect
    from adaflex.retrofit.width.parts import dims_of

    dims, parts = dims_of(model, "width")
    with META:
        st = collect(model, torch.randint(0, 250, (2, 12), device="cpu"), dims, parts, gram=True)
    _on_cpu(*st.act_mlp, *st.act_head, *st.sq_mlp, *st.gram_mlp)
    assert float(st.act_mlp[0].sum()) > 0


# ---- heal: a few steps with the top-k teacher ----


def test_heal_steps_with_topk_teacher(model):
    from adaflex.retrofit.heal.config import HealConfig
    from adaflex.retrofit.heal.train import TopKTeacher, heal, mean_kl

    teacher = TopKTeacher(copy.deepcopy(model), 16, 1.0)
    down = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        down[:, :10] = 0  # a pruned matrix: its mask is enforced
    cfg = HealConfig(tokens=256, batch_size=2, top_k=16, checkpoint_every=100)
    groups = {"fast": {"model.norm.weight": model.model.norm.weight}, "slow": {"down": down}}
    windows = torch.randint(0, 250, (4, 16))
    with META:
        out = heal(model, windows, groups, cfg, teacher, steps=2)
        kl = mean_kl(model, windows[:2], teacher, cfg)
    assert out["steps"] == 2 and out["masked_matrices"] == 1 and np.isfinite(out["train_loss_last"])
    assert np.isfinite(kl) and bool((down[:, :10] == 0).all())


def test_shards_steps_with_a_cached_teacher(model):
    from adaflex.retrofit.shards.apply import init_tensors, install, make_plan
    from adaflex.retrofit.shards.config import ShardsConfig
    from adaflex.retrofit.shards.train import CachedTeacher, heal

    dense = copy.deepcopy(model)
    cfg = ShardsConfig(method="lora", rank=4, steps=2, batch_size=2, lr=1e-2, dropout=0.0, checkpoint_every=100)
    plan = make_plan(model, cfg)
    install(model, plan, init_tensors(plan, 0))
    teacher = CachedTeacher(lambda _which, ids: dense(input_ids=ids, use_cache=False).logits)
    windows, holdout = torch.randint(0, 250, (4, 16)), torch.randint(0, 250, (2, 16))
    with META:
        out = heal(model, windows, cfg, teacher, holdout=holdout)
    assert out["steps"] == 2 and np.isfinite(out["train_loss_last"]) and np.isfinite(out["holdout_loss_after"])


# ---- fused add + RMSNorm, and the evaluations ----


def test_fused_blocks_decode(model):
    assert fused.install(model) == 4
    _decode(model, torch.randint(0, 250, (4, 20)))


class _CpuTokenizer:
    """transformers' tokenizer builds its tensors on the default device: called outside the trick."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **kwargs):
        with torch.device("cpu"):
            return self.tok(*args, **kwargs)

    def __getattr__(self, name):  # pad_token_id, decode, ...
        return getattr(self.tok, name)


def _items():
    from adaflex.retrofit.data import MCItem

    return [MCItem("Question: what is red?\nAnswer:", (" apple", " sky", " grass blade"), 0),
            MCItem("The cat sat on the", (" mat", " moon"), 1)]


def _generated():
    """A `generated` source: rows of token ids, each scored from its `starts` on."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(ids=[torch.randint(0, 250, (40,), generator=g) for _ in range(3)], starts=[4, 4, 4],
                           spec=SimpleNamespace(raw="generated:test"))


def test_evaluations_through_a_budgeted_cache(model, monkeypatch, tmp_path):
    from adaflex.retrofit.evaluate.fidelity import fidelity
    from adaflex.retrofit.evaluate.mc import choice_logliks
    from adaflex.retrofit.evaluate.retrieval import passkey
    from adaflex.retrofit.kv.apply import install, spec_from
    from adaflex.retrofit.kv.config import KVConfig

    nll = ppl._nll
    # torch's cross-entropy decomposition makes a scalar on the default device itself (not adaflex's code)
    monkeypatch.setattr(ppl, "_nll", lambda *a: _under_cpu(nll, *a))
    install(model, spec_from(KVConfig(budget=0.5, sinks=2, window=8, policy="mix"), 4, model=model))
    tok, x, src = _CpuTokenizer(byte_tokenizer()), torch.randint(0, 250, (2, 40)), _generated()
    expected, _ = choice_logliks(model, tok, _items(), batch_size=5, show_progress=False)
    with META:
        flat = ppl.perplexity(model, tok, TEXT, seq_len=32, limit=2)
        cont = ppl.continuation_perplexity(model, tok, TEXT, 24, 8, limit=2)
        at = cost.kv_at_context(model, x)
        figures = cost.cost_figures(model, x)
        logliks, _ = choice_logliks(model, tok, _items(), batch_size=5, show_progress=False)
        key = passkey(model, tok, TEXT * 4, 300, depths="0.5", limit=2)
        ref = tmp_path / "fidelity.safetensors"  # the first call keeps the reference, the second compares to it
        same = [fidelity(model, tok, src, reference=ref, batch_size=2) for _ in range(2)][1]
    assert np.isfinite(flat.value) and np.isfinite(cont.value)
    # (a CPU tensor indexed by meta indices gives CPU garbage: the scores must be those of a plain call)
    np.testing.assert_allclose(sum(logliks, []), sum(expected, []), rtol=1e-5)
    assert 0 <= key.value <= 1 and same.extra["kl"] < 1e-6
    assert 0 < at["kv_bytes_ratio_at_context"] < 1 and 0 < figures["kv_bytes_ratio"] < 1


def test_generated_text_is_sampled_alike(model):
    """The dense model writes `generated` text: prompts on the model's device, draws on the seeded CPU generator."""
    from adaflex.retrofit.generated import GeneratedConfig, sample, settings_of

    settings = settings_of(GeneratedConfig(sequences=3, tokens=8), "train", 0)
    tok = _CpuTokenizer(byte_tokenizer())
    expected, _ = sample(model, tok, settings, batch_size=2)
    with META:
        seqs, starts = sample(model, tok, settings, batch_size=2)
    assert len(seqs) == 3 and all(torch.equal(a, b) for a, b in zip(seqs, expected, strict=True))


def _under_cpu(fn, *args):
    with torch.device("cpu"):
        return fn(*args)


class _Reached(Exception):
    pass


@pytest.mark.parametrize("call", ["perplexity", "continuation", "kv_at_context", "cost_figures", "heal_loss",
                                  "shards_loss", "block_influence", "mc", "passkey", "fidelity", "generated"])
def test_token_ids_go_to_the_models_device(model, call):
    """The evaluations, the heal loss and drop's block influence build or get token ids on the CPU: they reach the
    model on its device (meta here). The decoder's entrance records where they arrive and stops the call."""
    from adaflex.retrofit.drop.apply import block_influence
    from adaflex.retrofit.evaluate.fidelity import fidelity
    from adaflex.retrofit.evaluate.mc import choice_logliks
    from adaflex.retrofit.evaluate.retrieval import passkey
    from adaflex.retrofit.generated import GeneratedConfig, sample, settings_of
    from adaflex.retrofit.heal.config import HealConfig
    from adaflex.retrofit.heal.train import loss_on
    from adaflex.retrofit.shards.config import ShardsConfig
    from adaflex.retrofit.shards.train import loss_of

    arch.reference_of(model)  # the dense reference, measured while the weights are real
    model.to(META)
    arrived = []

    def stop(_mod, _args, kwargs):
        arrived.append(kwargs["input_ids"].device)
        raise _Reached

    model.model.register_forward_pre_hook(stop, with_kwargs=True)
    tok, x = byte_tokenizer(), torch.randint(0, 250, (2, 40))
    calls = {
        "perplexity": lambda: ppl.perplexity(model, tok, TEXT, seq_len=32, limit=2),
        "continuation": lambda: ppl.continuation_perplexity(model, tok, TEXT, 24, 8, limit=2),
        "kv_at_context": lambda: cost.kv_at_context(model, x),
        "cost_figures": lambda: cost.cost_figures(model, x),
        "heal_loss": lambda: loss_on(model, x, torch.arange(2), None, HealConfig(loss="lm")),
        "shards_loss": lambda: loss_of(model, x, torch.arange(2), None, ShardsConfig(loss="lm")),
        "block_influence": lambda: block_influence(model, x, show_progress=False),
        "mc": lambda: choice_logliks(model, tok, _items(), show_progress=False),
        "passkey": lambda: passkey(model, tok, TEXT * 4, 300, depths="0.5", limit=1),
        "fidelity": lambda: fidelity(model, tok, _generated()),
        "generated": lambda: sample(model, tok, settings_of(GeneratedConfig(sequences=1, tokens=8), "train", 0), 1),
    }
    with pytest.raises(_Reached):
        calls[call]()
    assert arrived == [META]
