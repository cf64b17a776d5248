"""Routers: window pooling, class weights, focal loss, schedule, and learning a toy labelling."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.routes.config import RoutesConfig
from adaflex.retrofit.routes.router import decide, window_weights
from adaflex.retrofit.routes.train import class_weights, focal_loss, lr_at, train_routers


def test_window_weights_equal_windows_and_padding():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    w, m = window_weights(valid, windows=8)
    assert m.sum(1).tolist() == [4, 6]  # min(8, T) windows
    assert torch.allclose(w.sum(2)[m], torch.ones(10))
    assert w[0, :, :2].abs().sum() == 0  # padding never pooled
    w2, m2 = window_weights(torch.ones(1, 16, dtype=torch.bool), windows=8)
    assert m2.sum() == 8 and torch.allclose(w2[0, 0, :2], torch.full((2,), 0.5))


def test_class_weights_focal_and_schedule():
    labels = torch.tensor([[1, 0], [1, 1], [1, 1], [0, 1]])
    w = class_weights(labels, 0.999)
    assert w[0, 2] == 0 and w[0, 0] > w[0, 1]  # rarer class weighs more, absent class 0
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    easy = focal_loss(logits, torch.tensor([0, 1]), torch.ones(3), 2.0)
    hard = focal_loss(logits, torch.tensor([1, 0]), torch.ones(3), 2.0)
    assert hard > 10 * easy
    assert lr_at(0, 100, 10) == 0.1 and lr_at(10, 100, 10) == 1.0 and lr_at(100, 100, 10) < 1e-9
    # the dial leans to skip below zero and to repeat above
    lg = torch.tensor([[0.0, 1.0, 0.0]])
    assert decide(lg, 0.0).item() == 1 and decide(lg, -0.5).item() == 0 and decide(lg, 0.5).item() == 2


def test_routers_learn_a_toy_labelling():
    torch.manual_seed(0)
    N, L, W, d = 96, 3, 4, 16
    feats = torch.randn(N, L, W, d)
    wmask = torch.ones(N, W, dtype=torch.bool)
    s = feats[..., 0].mean(2)  # [N, L]
    labels = torch.where(s > 0.3, 0, torch.where(s < -0.6, 2, 1))
    cfg = RoutesConfig(epochs=40, batch_size=48, lr=0.03, warmup=0, bottleneck=16)
    routers, stats = train_routers(feats, wmask, labels, cfg, seed=0)
    assert stats["train_acc"] > 0.9, stats
    assert stats["train_skip_recall"] > 0.8, stats


def test_few_examples_still_get_min_steps_and_fit_their_labels():
    """13 examples in 10 epochs of batch 16 would be 10 steps: the routers would stay near their initial flat
    logits and the dial would decide every block. min_steps trains on the cached features for longer."""
    torch.manual_seed(1)
    N, L, W, d = 13, 3, 4, 16
    feats = torch.randn(N, L, W, d)
    wmask = torch.ones(N, W, dtype=torch.bool)
    labels = torch.where(feats[..., 0].mean(2) > 0.2, 0, 1)
    short, s_stats = train_routers(feats, wmask, labels, RoutesConfig(epochs=10, min_steps=0, warmup=0), seed=0)
    long, l_stats = train_routers(feats, wmask, labels, RoutesConfig(epochs=10, warmup=0), seed=0)
    assert s_stats["steps"] == 10 and l_stats["steps"] >= 300
    with torch.no_grad():
        def margin(r):  # mean |execute - skip| logit gap: how far the routers are from flat
            return torch.stack([r.logits(b, feats[:, b], wmask) for b in range(L)]).diff(dim=-1)[..., 0].abs().mean()
        assert margin(long) > 2 * margin(short)
    assert l_stats["train_acc"] > 0.9 > s_stats["train_acc"]


def test_a_class_no_label_chose_is_never_decided_even_at_full_dial():
    """Block 0's labels never skip: its skip logit gets no gradient of its own, so it is masked; the dial at -1
    (8 nats towards skip) still cannot make block 0 skip, while block 1 (skipped in its labels) can."""
    from adaflex.retrofit.routes.router import Routers

    torch.manual_seed(0)
    N, L, W, d = 24, 2, 4, 16
    feats = torch.randn(N, L, W, d)
    wmask = torch.ones(N, W, dtype=torch.bool)
    labels = torch.ones(N, L, dtype=torch.long)
    labels[: N // 3, 1] = 0
    routers, _ = train_routers(feats, wmask, labels, RoutesConfig(epochs=5, min_steps=50, warmup=0), seed=0)
    assert routers.allowed.tolist() == [[False, True, False], [True, True, False]]
    with torch.no_grad():
        lg0, lg1 = routers.logits(0, feats[:, 0], wmask), routers.logits(1, feats[:, 1], wmask)
    assert (decide(lg0, -1.0) == 1).all() and (decide(lg1, -1.0) == 0).all()
    # the mask travels with the weights (state dict), and routers saved without it allow every class
    fresh = Routers(L, d, 32)
    fresh.load_state_dict(routers.state_dict())
    assert torch.equal(fresh.allowed, routers.allowed)
    from adaflex.retrofit.routes.apply import routers_from
    from adaflex.retrofit.routes.plan import RoutesPlan

    old = {f"router.{k}": v for k, v in routers.state_dict().items() if k != "allowed"}
    assert routers_from(old, RoutesPlan(num_layers=L, hidden_size=d)).allowed.all()


def test_folded_inference_path_decides_as_the_router_logits_do():
    """`Routers.choose` (prefill's path: window mean after the GELU, bias + dial + mask folded) picks the same
    class as `decide(logits(...))` for ragged window masks, every dial and masked classes."""
    from adaflex.retrofit.routes.router import Routers

    torch.manual_seed(1)
    B, L, W, d = 64, 3, 8, 16
    routers = Routers(L, d, 8)
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0, 0.5)
    routers.allowed[0, 0] = False
    routers.allowed[2, 2] = False
    pooled = torch.randn(B, W, d)
    n = torch.randint(1, W + 1, (B,))
    wmask = torch.arange(W)[None] < n[:, None]
    wnorm = (wmask.float() / wmask.float().sum(1, keepdim=True))[:, None]
    for dial in (0.0, -0.3, -1.0, 0.4):
        for b in range(L):
            want = decide(routers.logits(b, pooled, wmask).detach(), dial)
            got = routers.choose(b, pooled, wnorm, dial)
            assert torch.equal(got, want), (dial, b)
    assert (routers.choose(0, pooled, wnorm, -1.0) != 0).all()  # a masked class stays masked
    with torch.no_grad():  # changed weights are seen (the folded bias is keyed by the tensor's version)
        routers.blocks[1][2].bias.add_(torch.tensor([50.0, 0.0, 0.0]))
    assert (routers.choose(1, pooled, wnorm, 0.0) == 0).all()


def test_guard_threshold_from_held_out_prompts_flags_states_off_the_subspace():
    from adaflex.retrofit.routes.router import fit_guard, guard_residual

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=g)).Q.T  # a 3-d subspace of R^16

    def sample(n):
        return 5 + torch.randn(n, 3, generator=g) @ basis * 4 + 0.1 * torch.randn(n, 16, generator=g)

    mean, got, threshold = fit_guard(sample(80), rank=3, quantile=0.9)
    assert got.shape == (3, 16)
    fresh = guard_residual(sample(400), mean, got) > threshold
    assert 0.02 < fresh.float().mean() < 0.25  # about 1 - quantile of new in-domain states
    off = torch.linalg.svd(torch.cat([basis, torch.randn(1, 16, generator=g)]), full_matrices=True).Vh[-1]
    assert (guard_residual(sample(50) + off, mean, got) > threshold).all()  # a step off the subspace
    s = sample(50)
    torch.testing.assert_close(guard_residual(s + 3 * basis[0], mean, got), guard_residual(s, mean, got),
                               atol=0.05, rtol=0)  # a step along it changes nothing
    with pytest.raises(ValueError, match="7 training prompts, at least 8"):
        fit_guard(sample(7), rank=3, quantile=0.9)
