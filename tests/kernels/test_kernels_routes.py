import pytest
import torch

from adaflex.kernels import (
    gather_rows,
    gather_rows_torch,
    gather_rows_triton,
    scatter_add_rows,
    scatter_add_rows_torch,
    scatter_add_rows_triton,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 7, 40), (4, 3, 576), (6, 96)])
def test_gather_then_scatter_add(interpret, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=gen).to(dtype)
    rows = torch.tensor([3, 0, 2])
    sub = gather_rows_triton(h, rows)
    assert sub.shape == (3, *shape[1:]) and sub.is_contiguous()
    assert torch.equal(sub, gather_rows_torch(h, rows))

    delta = torch.randn(sub.shape, generator=gen).to(dtype)
    h_tri, h_ref = h.clone(), h.clone()
    out = scatter_add_rows_triton(h_tri, rows, delta)
    assert out is h_tri  # in place
    assert torch.equal(h_tri, scatter_add_rows_torch(h_ref, rows, delta))
    assert torch.equal(h_tri[rows], h[rows] + delta)  # executed rows: residual + block delta
    skipped = [i for i in range(shape[0]) if i not in rows.tolist()]
    assert torch.equal(h_tri[skipped], h[skipped])  # the other rows are untouched


def test_strided_residual_and_empty_rows(interpret):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(7, 4, 33, generator=gen)
    h = base.transpose(0, 1)  # [4, 7, 33], non-contiguous
    rows = torch.tensor([1, 3])
    assert torch.equal(gather_rows(h, rows), h[rows])
    delta = torch.randn(2, 7, 33, generator=gen)
    expect = h.clone()
    expect[rows] += delta
    scatter_add_rows(h, rows, delta)
    assert torch.equal(h, expect) and torch.equal(base.transpose(0, 1), expect)  # written through the view

    none = torch.empty(0, dtype=torch.long)
    assert gather_rows(h, none).shape == (0, 7, 33)
    assert torch.equal(scatter_add_rows(h, none, torch.empty(0, 7, 33)), expect)
