"""Execution by path: dense equality, manual composition, mixed-path batches, cache slots, generate()."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.data import MCItem
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.evaluate import choice_logliks, cost_figures
from adaflex.retrofit.routes.runtime import (
    FixedPolicy,
    RandomPolicy,
    counts_path,
    forced_paths,
    install,
    path_counts,
    runtime_of,
    uninstall,
)
from tiny import byte_tokenizer, tiny_llama

PATHS = [[0, 2, 2, 3], [1, 3], [0, 1, 1, 2, 3, 3]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def manual(model, path, x):
    """Logits of `x` along `path`: the model's own embeddings, blocks in path order, norm and head."""
    dec = model.model
    cap = {}

    class Stop(Exception):
        pass

    def hook(_m, args, kwargs):
        cap["h"], cap["kw"] = args[0], kwargs
        raise Stop

    handle = dec.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        dec(input_ids=x, use_cache=False)
    except Stop:
        pass
    finally:
        handle.remove()
    h = cap["h"]
    for b in path:
        h = dec.layers[b](h, **cap["kw"])
    return model.lm_head(dec.norm(h))


@torch.no_grad()
def test_dense_path_equals_unmodified_model(model):
    x = torch.randint(0, 250, (2, 10))
    ref = model(x).logits
    ref_gen = model.generate(x, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(x))
    install(model, FixedPolicy(counts=(1, 1, 1, 1)))
    try:
        assert torch.equal(model(x).logits, ref)
        out = model.generate(x, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(x))
        assert torch.equal(out, ref_gen)
    finally:
        uninstall(model)
    assert torch.equal(model(x).logits, ref)  # uninstall restores the plain forward


@torch.no_grad()
def test_any_path_equals_manual_composition_mixed_batch(model):
    x = torch.randint(0, 250, (3, 12))
    want = [manual(model, p, x[i : i + 1])[0] for i, p in enumerate(PATHS)]
    install(model, FixedPolicy(counts=(1, 1, 1, 1)))
    try:
        with forced_paths(model, PATHS):
            got = model(x, use_cache=False).logits
        for i in range(3):
            torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-5)
        # same path for the whole batch: exact
        install(model, FixedPolicy(counts=path_counts(PATHS[0], 4)))
        torch.testing.assert_close(model(x[:1]).logits[0], want[0], atol=0, rtol=0)
    finally:
        uninstall(model)


@torch.no_grad()
def test_generate_routed_batch_equals_per_row(model):
    x = torch.randint(0, 250, (3, 9))
    install(model, FixedPolicy(counts=(1, 1, 1, 1)))
    try:
        with forced_paths(model, PATHS):
            batch = model.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x))
        for i, p in enumerate(PATHS):
            with forced_paths(model, [p]):
                row = model.generate(x[i : i + 1], max_new_tokens=8, do_sample=False,
                                     attention_mask=torch.ones_like(x[i : i + 1]))
            assert torch.equal(batch[i], row[0])
    finally:
        uninstall(model)


@torch.no_grad()
def test_repeat_has_own_cache_slot_and_decode_matches_full(model):
    x = torch.randint(0, 250, (3, 14))
    install(model, FixedPolicy(counts=(1, 1, 1, 1)))
    try:
        from transformers import DynamicCache

        with forced_paths(model, PATHS):
            full = model(x, use_cache=False).logits
            cache = DynamicCache(config=model.config)
            model(x[:, :8], cache=cache, use_cache=True)
        # routes stay fixed for the decode steps (no forcing any more)
        steps = [model(x[:, t : t + 1], cache=cache, use_cache=True).logits[:, 0] for t in range(8, 14)]
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:14], atol=1e-5, rtol=1e-5)
        L = 4
        assert len(cache.layers) == 2 * L
        assert cache.layers[L + 2].keys.shape[0] == 1  # only row 0 repeats block 2
        assert cache.layers[L + 1].keys.shape[0] == 1 and cache.layers[L + 3].keys.shape[0] == 1  # row 2
        assert cache.layers[1].keys.shape[0] == 2  # rows 1 and 2 run block 1
        assert cache.get_seq_length() == 14
        assert cache.adaflex_routes.tolist() == [list(path_counts(p, L)) for p in PATHS]
        # row selection (beam/contrastive style) keeps each row's slots
        cache.batch_select_indices(torch.tensor([2, 0]))
        nxt = torch.randint(0, 250, (2, 1))
        got = model(nxt, cache=cache, use_cache=True).logits[:, 0]
        with forced_paths(model, [PATHS[2], PATHS[0]]):
            ref = model(torch.cat([x[[2, 0]], nxt], 1), use_cache=False).logits[:, -1]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    finally:
        uninstall(model)


@torch.no_grad()
def test_skipped_blocks_not_called_and_cost_counts_rows(model):
    calls = [0] * 4
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + a[0].shape[0]))
             for i, blk in enumerate(model.model.layers)]
    install(model, FixedPolicy(counts=(1, 1, 1, 1)))
    try:
        with forced_paths(model, PATHS):
            model(torch.randint(0, 250, (3, 6)), use_cache=False)
        assert calls == [2, 3, 3, 4]  # rows running each block, repeats counted twice
        calls[:] = [0] * 4
        install(model, FixedPolicy(counts=path_counts([1, 3], 4)))
        model(torch.randint(0, 250, (2, 6)), use_cache=False)
        assert calls == [0, 2, 0, 2]
        c = cost_figures(model, torch.randint(0, 250, (2, 16)))
        assert c["layers_executed_mean"] == 2 and c["kv_bytes_ratio"] == pytest.approx(0.5)
    finally:
        for h in hooks:
            h.remove()
        uninstall(model)


@torch.no_grad()
def test_block_wrapper_runs_only_where_rows_differ_or_a_router_decides(model, monkeypatch):
    from adaflex.retrofit.routes import runtime
    from adaflex.retrofit.routes.router import Routers

    stepped = []
    base = runtime._Step.forward

    def counted(self, *a, **k):
        stepped.append(self.b)
        return base(self, *a, **k)

    monkeypatch.setattr(runtime._Step, "forward", counted)
    x = torch.randint(0, 250, (2, 7))
    want = manual(model, [1, 3], x[:1])[0, -1].argmax()
    try:
        # rows agree on blocks 0, 2, 3: decoding wraps block 1 only (the prefill's fixed rows: every block)
        with forced_paths(model, [[0, 1, 2, 3], [0, 2, 3]]):
            ref = model(x, use_cache=False).logits
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            model(x[:, :5], cache=cache, use_cache=True)
        stepped.clear()
        got = torch.cat([model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in (5, 6)], 1)
        torch.testing.assert_close(got, ref[:, 5:], atol=1e-5, rtol=1e-5)
        assert stepped == [1, 1]
        # one static path: no wrapper at all, prefill or decoding, and the output is the path's
        install(model, FixedPolicy(counts=path_counts([1, 3], 4)))
        stepped.clear()
        out = model.generate(x[:1], max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(x[:1]))
        assert stepped == []
        assert out[0, 7] == want
        # routers: only the block with a choice runs through its step; a block whose labels always skipped
        # it is left out and recorded as skipped
        routers = Routers(4, model.config.hidden_size, 8)
        routers.allowed[:] = torch.tensor([[0, 1, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
        rt = install(model, runtime.RouterPolicy(routers, 8, 0.0), routers)
        stepped.clear()
        logits = model(x, use_cache=False).logits
        assert stepped == [1]
        assert rt.last_routes[:, 2].tolist() == [0, 0] and rt.last_routes[:, [0, 3]].eq(1).all()
        with forced_paths(model, [counts_path(r) for r in rt.last_routes.tolist()]):
            torch.testing.assert_close(model(x, use_cache=False).logits, logits, atol=1e-5, rtol=1e-5)
    finally:
        uninstall(model)


@torch.no_grad()
def test_evaluator_reuses_prefill_routes_per_row(model):
    tok = byte_tokenizer()
    items = [MCItem(f"Question {i}: which?{' pad' * i}\nAnswer:", (" yes", " no", " maybe"), i % 3) for i in range(4)]
    install(model, RandomPolicy(4, 1.5, seed=3))
    try:
        together, _ = choice_logliks(model, tok, items, batch_size=12, show_progress=False)
        routes_batch = model.adaflex.routes.last_routes
        assert routes_batch.shape[0] == 12  # the continuation pass carried the prefill's routes per row
    finally:
        uninstall(model)
    # the same decisions one item at a time give the same scores
    install(model, RandomPolicy(4, 1.5, seed=3))
    rt = model.adaflex.routes
    decided = []
    orig = rt.policy.prepare
    rt.policy.prepare = lambda valid: decided.append(orig(valid)) or decided[-1]
    try:
        choice_logliks(model, tok, items, batch_size=12, show_progress=False)
        rows = [r for batch in decided for r in batch]
    finally:
        uninstall(model)
    # items are batched by context length (longest first): map each to its routed path
    order = sorted(range(4), key=lambda i: -len(items[i].context))
    install(model, FixedPolicy(counts=(1, 1, 1, 1)))
    try:
        for pos, i in enumerate(order):
            with forced_paths(model, [tuple(b for b, c in enumerate(rows[pos]) for _ in range(c))]):
                alone, _ = choice_logliks(model, tok, [items[i]], batch_size=3, show_progress=False)
            torch.testing.assert_close(torch.tensor(alone[0]), torch.tensor(together[i]), atol=1e-4, rtol=1e-4)
    finally:
        uninstall(model)


def test_bad_paths_are_usage_errors():
    with pytest.raises(UsageError, match="out of range"):
        path_counts([0, 4], 4)
    with pytest.raises(UsageError, match="at least one"):
        path_counts([], 4)
    with pytest.raises(UsageError, match="at most twice"):
        path_counts([1, 1, 1], 4)
    with pytest.raises(UsageError, match="in order"):
        path_counts([2, 1], 4)


@torch.no_grad()
@pytest.mark.parametrize("allocation", ["uniform", "cake"])
def test_routes_with_budgeted_cache_give_repeat_slots_their_block_budget(model, allocation):
    """routes + kv: a repeated block's slot is one more budgeted layer of the same cache (not a copy of the
    cache), capped like its block; a full budget decodes exactly as the routed model without a cache."""
    from adaflex.retrofit.kv.apply import install as kv_install
    from adaflex.retrofit.kv.apply import spec_from
    from adaflex.retrofit.kv.apply import uninstall as kv_uninstall
    from adaflex.retrofit.kv.cache import BudgetedCache
    from adaflex.retrofit.kv.config import KVConfig

    L, x = 4, torch.randint(0, 250, (3, 60))
    install(model, FixedPolicy(counts=(1, 1, 1, 1)))
    try:
        kv_install(model, spec_from(KVConfig(budget=1.0, sinks=2, window=8, allocation=allocation), L))
        with forced_paths(model, PATHS):
            full = model(x, use_cache=False).logits
            cache = model.adaflex.make_cache()
            model(x[:, :50], cache=cache, use_cache=True)
        steps = [model(x[:, t : t + 1], cache=cache, use_cache=True).logits[:, 0] for t in range(50, 59)]
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 50:59], atol=1e-4, rtol=1e-4)
        # row selection reaches each budgeted slot's keys, masks and scores alike
        cache.batch_select_indices(torch.tensor([2, 0]))
        assert all(lay.valid.shape[0] == lay.keys.shape[0] for lay in cache.layers if lay.is_initialized)
        got = model(x[[2, 0], 59:60], cache=cache, use_cache=True).logits[:, 0]
        torch.testing.assert_close(got, full[[2, 0], 59], atol=1e-4, rtol=1e-4)

        kv_install(model, spec_from(KVConfig(budget=0.5, sinks=2, window=8, allocation=allocation), L))
        cache = model.adaflex.make_cache()
        with forced_paths(model, PATHS):
            model(x[:, :50], cache=cache, use_cache=True)
        assert isinstance(cache, BudgetedCache) and len(cache.layers) == 2 * L
        assert all(lay.owner is cache for lay in cache.layers)  # slots belong to this cache
        assert [lay.budget_idx for lay in cache.layers[L:]] == list(range(L))
        rep = cache.layers[L + 2]  # row 0 repeats block 2
        assert rep.keys.shape[0] == 1 and rep.stored < 50
        if allocation == "uniform":  # a static plan: the repeat keeps what its block keeps
            assert rep.stored == cache.layers[2].stored
        used = [lay for lay in cache.layers if lay.keys is not None]
        assert len(used) == 7  # 4 blocks + the 3 repeat slots some row executes (blocks 1, 2, 3)
        assert sum(lay.stored for lay in used) <= 0.5 * 50 * len(used) + len(used)  # the budget, rounding aside
        out = model.generate(x[:, :50], max_new_tokens=3, do_sample=False)
        assert out.shape == (3, 53)
    finally:
        kv_uninstall(model)
        uninstall(model)


@torch.no_grad()
def test_guard_runs_out_of_domain_prompts_dense_and_survives_reload(model):
    from adaflex.retrofit.routes.apply import routers_from
    from adaflex.retrofit.routes.plan import RoutesPlan
    from adaflex.retrofit.routes.router import Routers
    from adaflex.retrofit.routes.runtime import RouterPolicy

    d = model.config.hidden_size
    routers = Routers(4, d, 8)
    routers.allowed[:] = torch.tensor([[0, 1, 0], [1, 1, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    for b in (1, 2):  # these routers always skip
        routers.blocks[b][2].weight.zero_()
        routers.blocks[b][2].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    x = torch.randint(0, 250, (2, 8))  # 8 tokens: 8 one-token windows, the pooled state is the token mean
    entering = model.model(x, output_hidden_states=True, use_cache=False).hidden_states[1].mean(1)  # block 1
    gap = (entering[1] - entering[0]).norm()
    routers.set_guard(entering[0], torch.zeros(0, d), float(gap / 2))  # row 0 in domain, row 1 out of it
    assert routers.guarded and routers.first_routed() == 1
    rt = install(model, RouterPolicy(routers, 8, 0.0), routers)
    try:
        got = model(x, use_cache=False).logits
        assert rt.last_routes.tolist() == [[1, 0, 0, 1], [1, 1, 1, 1]]
        with forced_paths(model, [[0, 3], [0, 1, 2, 3]]):
            torch.testing.assert_close(model(x, use_cache=False).logits, got, atol=1e-5, rtol=1e-5)
        # saved and reloaded (adaflex.safetensors keys), and routers saved before the guard: no guard
        plan = RoutesPlan(num_layers=4, hidden_size=d)
        tensors = {f"router.{k}": v for k, v in routers.state_dict().items()}
        again = routers_from(tensors, plan)
        assert again.guarded and torch.equal(again.outside(entering), torch.tensor([False, True]))
        old = routers_from({k: v for k, v in tensors.items() if "guard" not in k}, plan)
        assert not old.guarded and not old.outside(entering).any()
        install(model, RouterPolicy(old, 8, 0.0), old)
        model(x, use_cache=False)
        assert runtime_of(model).last_routes.tolist() == [[1, 0, 0, 1], [1, 0, 0, 1]]
    finally:
        uninstall(model)
