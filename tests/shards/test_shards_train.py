"""The healing loop: KL to the dense teacher goes down, LoRA runs through the same loop, resume is exact."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.drop.apply import apply as drop_apply
from adaflex.retrofit.drop.plan import DropPlan
from adaflex.retrofit.shards.apply import collect
from adaflex.retrofit.shards.config import ShardsConfig
from adaflex.retrofit.shards.train import heal, mean_loss
from tiny import tiny_llama

from .helpers import adapt


def _setup(method="mos", **kw):
    torch.manual_seed(0)
    teacher = tiny_llama()
    student = tiny_llama()
    drop_apply(student, DropPlan(num_layers=4, kept=[0, 1, 2], removed=[3], block_influence=[0.0] * 4))
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = {"method": method, "rank": 4, "equivalent_rank": 2, "shards_per_vector": 4, "steps": 12,
                "lr": 1e-2, "batch_size": 4, "dropout": 0.0, "checkpoint_every": 4}
    settings.update(kw)
    cfg, plan, _ = adapt(student, random_b=False, **{k: v for k, v in settings.items()
                                                        if k in ("method", "rank", "equivalent_rank",
                                                                 "shards_per_vector", "dropout")})
    cfg = ShardsConfig(**settings)

    def fn(_which, ids):
        return teacher(input_ids=ids, use_cache=False).logits

    return student, windows, cfg, plan, fn


@pytest.mark.parametrize("method", ["mos", "lora"])
def test_shards_training_reduces_kl(method):
    student, windows, cfg, _, teacher = _setup(method)
    ids = torch.arange(windows.shape[0])
    base = {n: p.detach().clone() for n, p in student.named_parameters() if "adaflex" not in n}
    before = mean_loss(student, windows, ids, teacher, cfg)
    metrics = heal(student, windows, cfg, teacher, seed=0)
    after = mean_loss(student, windows, ids, teacher, cfg)
    assert after < 0.9 * before, (before, after)
    assert metrics["train_tokens"] == 12 * 4 * 32 and metrics["train_tokens_per_s"] > 0
    assert all(torch.equal(p, base[n]) for n, p in student.named_parameters() if "adaflex" not in n)


def test_shards_lm_loss_option_trains():
    student, windows, cfg, _, _ = _setup("mos", loss="lm", steps=6)
    before = mean_loss(student, windows, torch.arange(8), None, cfg)
    heal(student, windows, cfg, None, seed=0)
    assert mean_loss(student, windows, torch.arange(8), None, cfg) < before


def test_shards_resume_from_checkpoint_is_exact(tmp_path):
    student, windows, cfg, plan, teacher = _setup("mos", dropout=0.1, steps=8)
    heal(student, windows, cfg, teacher, seed=5, state_dir=tmp_path / "full", fingerprint="f")
    full = collect(student, plan)

    student, windows, cfg, plan, teacher = _setup("mos", dropout=0.1, steps=8)
    calls = {"n": 0}

    def flaky(which, ids):
        calls["n"] += 1
        if calls["n"] == 7:  # the 7th step dies: the checkpoint of step 4 is on disk
            raise KeyboardInterrupt
        return teacher(which, ids)

    with pytest.raises(KeyboardInterrupt):
        heal(student, windows, cfg, flaky, seed=5, state_dir=tmp_path / "cut", fingerprint="f")
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    student, windows, cfg, plan, teacher = _setup("mos", dropout=0.1, steps=8)  # a fresh process
    seen = []
    m = heal(student, windows, cfg, teacher, seed=5, state_dir=tmp_path / "cut", fingerprint="f", log=seen.append)
    assert m["resumed_at"] == 4 and any("resumed at step 4" in s for s in seen)
    for k, v in collect(student, plan).items():
        torch.testing.assert_close(v, full[k], atol=1e-6, rtol=1e-5)
    # a checkpoint of other settings is not reused
    student, windows, cfg, plan, teacher = _setup("mos", dropout=0.1, steps=8)
    assert heal(student, windows, cfg, teacher, seed=5, state_dir=tmp_path / "cut", fingerprint="g")["resumed_at"] == 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_shards_chunked_kl_equals_the_plain_formula(temperature, monkeypatch):
    # the chunked KL (custom backward) against KL(t‖s) written out with log_softmax, value and gradient;
    # a row count that is not a multiple of the chunk, and a bfloat16 teacher read as fp32
    import torch.nn.functional as F

    from adaflex.retrofit.shards import train

    monkeypatch.setattr(train, "KL_ROWS", 5)
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 3

    def plain(s, t):
        ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean() * temperature**2

    got = train.kl_loss(student, teacher, temperature)
    (grad,) = torch.autograd.grad(got, student)
    want = plain(student, teacher)
    (grad_want,) = torch.autograd.grad(want, student)
    assert got.item() > 0.1
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, grad_want, atol=1e-12, rtol=1e-10)
    half = teacher.to(torch.bfloat16)
    s32 = student.detach().float().requires_grad_()
    got = train.kl_loss(s32, half, temperature)
    got.backward()
    want = plain(student.detach(), half.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert s32.grad.dtype == torch.float32


def test_cached_teacher_runs_each_window_once_and_respects_its_memory_bound():
    from adaflex.retrofit.shards.train import CachedTeacher

    calls = []

    def fn(which, ids):
        calls.append(which.tolist())
        return torch.randn(len(which), 8, 16, generator=torch.Generator().manual_seed(sum(which.tolist())))

    row_bytes = 8 * 16 * 2  # bfloat16
    t = CachedTeacher(fn, max_bytes=3 * row_bytes)
    first = t(torch.tensor([0, 1]), None)
    again = t(torch.tensor([1, 0]), None)
    assert calls == [[0, 1]]  # both rows served from the store
    assert again.dtype == torch.bfloat16 and torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    t(torch.tensor([2, 3]), None)  # only one more row fits
    assert t.used == 3 * row_bytes and sorted(t.store) == [0, 1, 2]
    t(torch.tensor([2, 3]), None)
    assert calls == [[0, 1], [2, 3], [2, 3]]  # window 3 is not stored, so it is recomputed
