import pytest
import torch

from adaflex.kernels import add_rmsnorm, add_rmsnorm_torch, add_rmsnorm_triton


def _llama_rmsnorm(h, weight, eps):
    # transformers' LlamaRMSNorm.forward, written out
    dtype = h.dtype
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 576), (5, 40)])
def test_add_rmsnorm(interpret, close, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    res = torch.randn(shape, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    normed, new_res = add_rmsnorm_triton(x, res, w, 1e-5)
    ref_normed, ref_res = add_rmsnorm_torch(x, res, w, 1e-5)
    assert torch.equal(new_res, x + res) and torch.equal(ref_res, x + res)
    close(normed, ref_normed)
    close(ref_normed, _llama_rmsnorm(x + res, w, 1e-5))


def test_fp32_weight_on_fp16_activations(interpret, close):
    # HF keeps the weight in fp32 under some loaders: the product is then fp32, in both versions
    gen = torch.Generator().manual_seed(1)
    x, res = (torch.randn(3, 96, generator=gen).half() for _ in range(2))
    w = torch.rand(96, generator=gen) + 0.5
    normed, _ = add_rmsnorm(x, res, w, 1e-6)
    ref, _ = add_rmsnorm_torch(x, res, w, 1e-6)
    assert normed.dtype == ref.dtype == torch.float32
    close(normed, ref)
