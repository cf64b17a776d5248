import math

import pytest
import torch
import torch.nn.functional as F

from adaflex.kernels import decode_attention, decode_attention_torch, decode_attention_triton


def _inputs(B, Hq, Hkv, T, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    return q, k, v


def _sdpa_over_kept(q, k, v, lengths):
    # the definition: per (batch, KV head), SDPA of its query group over its first `length` keys
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D)
    for b in range(B):
        for h in range(Hkv):
            n = int(lengths[b, h])
            qg = q[b, h * G:(h + 1) * G, None].float()  # [G, 1, D]
            kk, vv = k[b, h, :n].float(), v[b, h, :n].float()
            out[b, h * G:(h + 1) * G] = F.scaled_dot_product_attention(qg, kk.expand(G, n, D), vv.expand(G, n, D))[:, 0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gqa_9_3_variable_lengths(interpret, close, dtype, num_splits):
    B, Hq, Hkv, T, D = 2, 9, 3, 150, 64  # T and the lengths are not multiples of the 64-key block
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype)
    lengths = torch.tensor([[150, 1, 67], [93, 128, 5]])
    out = decode_attention_triton(q, k, v, lengths, num_splits=num_splits)
    ref = decode_attention_torch(q, k, v, lengths)
    assert out.shape == (B, Hq, D) and out.dtype == dtype
    close(out, ref)
    close(ref.float(), _sdpa_over_kept(q, k, v, lengths).to(dtype).float())


def test_garbage_past_length_and_empty_cache(interpret, close):
    q, k, v = _inputs(2, 4, 2, 40, 64, torch.float32, seed=3)
    lengths = torch.tensor([[17, 0], [40, 3]], dtype=torch.int32)
    valid = torch.arange(40) < lengths[..., None].long()
    k = k.masked_fill(~valid[..., None], float("nan"))  # unused slots of a cache may hold anything
    v = v.masked_fill(~valid[..., None], float("inf"))
    out = decode_attention(q, k, v, lengths)  # dispatcher -> triton under the interpreter
    ref = decode_attention_torch(q, k, v, lengths)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert torch.equal(out[0, 2:], torch.zeros(2, 64))  # length 0 -> zeros
    close(out, ref)
    close(ref, _sdpa_over_kept(q, k.nan_to_num(), v.nan_to_num(), lengths))


def test_equals_sdpa_over_compacted_cache(interpret, close):
    # kept positions gathered by compact_kv, then attended: the runtime's decode path
    from adaflex.kernels import compact_kv

    q, k, v = _inputs(1, 6, 2, 70, 64, torch.float32, seed=5)
    gen = torch.Generator().manual_seed(6)
    idx = torch.stack([torch.randperm(70, generator=gen)[:45].sort().values for _ in range(2)]).view(1, 2, 45)
    kc, vc = compact_kv(k, v, idx)
    lengths = torch.tensor([[45, 30]])
    out = decode_attention(q, kc, vc, lengths, scale=0.5 / math.sqrt(64))
    ref = decode_attention_torch(q, kc, vc, lengths, scale=0.5 / math.sqrt(64))
    close(out, ref)
    close(decode_attention_torch(q, kc, vc, lengths), _sdpa_over_kept(q, kc, vc, lengths))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_valid_span_with_starts(interpret, close, num_splits):
    # a left-padded row keeps its real tokens in a suffix [start, start + length); slots outside hold garbage
    B, Hq, Hkv, T, D = 2, 6, 3, 150, 24  # head dim 24: not a power of two
    q, k, v = _inputs(B, Hq, Hkv, T, D, torch.float32, seed=7)
    starts = torch.tensor([[0, 10, 149], [83, 0, 70]])
    lengths = torch.tensor([[150, 140, 1], [67, 64, 0]])
    pos = torch.arange(T)
    valid = (pos >= starts[..., None]) & (pos < (starts + lengths)[..., None])
    k, v = k.masked_fill(~valid[..., None], float("nan")), v.masked_fill(~valid[..., None], float("inf"))
    out = decode_attention_triton(q, k, v, lengths, num_splits=num_splits, starts=starts)
    ref = decode_attention_torch(q, k, v, lengths, starts=starts)
    assert torch.isfinite(out).all() and torch.equal(out[1, 4:], torch.zeros(2, D))
    close(out, ref)
    # the definition: the same as a prefix of the keys shifted to the front
    shifted = [torch.stack([torch.roll(x[b, h], -int(starts[b, h]), 0) for h in range(Hkv)]) for b in range(B)
               for x in (k, v)]
    ks, vs = torch.stack(shifted[0::2]), torch.stack(shifted[1::2])
    close(ref, _sdpa_over_kept(q, ks.nan_to_num(), vs.nan_to_num(), lengths))
