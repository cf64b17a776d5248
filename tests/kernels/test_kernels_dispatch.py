"""Which implementation runs: ADAFLEX_KERNELS=torch, plain CPU, the interpreter, CUDA, autograd."""

import subprocess
import sys
import textwrap

import pytest
import torch

import adaflex.kernels as K
from adaflex.kernels import backend
from adaflex.kernels._dispatch import interpreting

NAMES = ["compact_kv", "decode_attention", "shard_lora_linear", "gather_rows", "scatter_add_rows", "add_rmsnorm"]


def _calls(device="cpu"):
    """One small call per public kernel: name -> args."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def i(high, *shape):
        return torch.randint(0, high, shape, generator=g).to(device)

    return {
        "compact_kv": (r(1, 2, 20, 16), r(1, 2, 20, 16), i(20, 1, 2, 7)),
        "decode_attention": (r(1, 4, 16), r(1, 2, 20, 16), r(1, 2, 20, 16), torch.tensor([[20, 9]], device=device)),
        "shard_lora_linear": (r(3, 32), r(24, 32), r(5, 16), i(5, 4, 2), r(6, 12), i(6, 4, 2), 0.5),
        "gather_rows": (r(4, 3, 8), torch.tensor([2, 0], device=device)),
        "scatter_add_rows": (r(4, 3, 8), torch.tensor([2, 0], device=device), r(2, 3, 8)),
        "add_rmsnorm": (r(3, 8), r(3, 8), r(8)),
    }


def _forbid(monkeypatch, suffix):
    """Make every `<name><suffix>` implementation raise, so a passing call proves the other one ran."""
    for name in NAMES:
        module = sys.modules[getattr(K, name).__module__]

        def boom(*args, _name=name + suffix, **kwargs):
            raise AssertionError(f"{_name} must not run here")

        monkeypatch.setattr(module, name + suffix, boom)


def _run_all(device="cpu"):
    for name, args in _calls(device).items():
        getattr(K, name)(*args)


def test_env_torch_forces_reference(monkeypatch):
    monkeypatch.setenv("ADAFLEX_KERNELS", "torch")
    assert backend(torch.zeros(1)) == "torch"
    if torch.cuda.is_available():
        assert backend(torch.zeros(1, device="cuda")) == "torch"
    _forbid(monkeypatch, "_triton")
    _run_all()


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    if interpreting():
        pytest.skip("this process runs the interpreter")
    monkeypatch.delenv("ADAFLEX_KERNELS", raising=False)
    assert backend(torch.zeros(1)) == "torch"
    _forbid(monkeypatch, "_triton")
    _run_all()


def test_interpreter_selects_triton(interpret, monkeypatch):
    assert backend(torch.zeros(1)) == "triton"
    _forbid(monkeypatch, "_torch")
    _run_all()


def test_cuda_selects_triton(cuda, monkeypatch):
    assert backend(torch.zeros(1, device=cuda)) == "triton"
    assert backend(torch.zeros(1, device=cuda), torch.zeros(1)) == "torch"  # mixed devices: let torch complain
    _forbid(monkeypatch, "_torch")
    _run_all("cuda")


def test_gradients_take_the_reference(monkeypatch):
    monkeypatch.delenv("ADAFLEX_KERNELS", raising=False)
    x = torch.zeros(2, requires_grad=True)
    assert backend(x) == "torch"
    with torch.no_grad():
        assert backend(x) == backend(torch.zeros(2))


def test_unknown_env_value_is_an_error(monkeypatch):
    monkeypatch.setenv("ADAFLEX_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ADAFLEX_KERNELS"):
        backend(torch.zeros(1))


def test_imports_nothing_else_and_works_without_triton():
    if interpreting():
        pytest.skip("checked by the parent process")
    # fresh process: adaflex.kernels pulls in no transformers and no other adaflex package, and with
    # triton missing (non-Linux) it still imports and runs every reference
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        import adaflex.kernels as K
        sys.path.insert(0, sys.argv[1])
        from test_kernels_dispatch import _run_all
        assert K.backend(torch.zeros(1)) == "torch"
        _run_all()
        bad = [m for m in sys.modules if m.split(".")[0] == "transformers"
               or (m.startswith("adaflex.") and not m.startswith("adaflex.kernels"))]
        assert not bad, bad
    """)
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
