"""Fused residual add + RMSNorm inside Llama-style decoder blocks, without editing transformers' files.

A Llama block computes `h = residual + attn_out; post_attention_layernorm(h)`: two passes over h where
`kernels.add_rmsnorm` needs one. `install(model)` switches each Llama-style block's class to a subclass
(`Fused<Name>`, made once per class) whose `forward` does the block's own steps with that pair fused; the
modeling file stays untouched and the instances keep their modules, weights and state-dict keys. Being a
class, not an instance `forward`, it composes with the instance patches of other stages (prune's argument
recorder sets and deletes `block.forward`); routes (retrofit/routes/runtime.py) call whole blocks, on all
rows or gathered ones. The block boundary (`residual + mlp_out` -> the next block's `input_layernorm`) is not
fused: routes skip, repeat and gather blocks there, and the last block feeds the final norm.

The fused step runs only when the dispatcher picks Triton (CUDA, or CPU under TRITON_INTERPRET=1) and no
gradient is needed; otherwise the block runs its class's own forward (or, when gradients appear only after
the attention, the exact unfused add and norm). `ADAFLEX_KERNELS=torch` turns it off.
"""

from __future__ import annotations

from adaflex.kernels import add_rmsnorm, backend

from .state import state_of

# Decoder layers whose forward is Llama's, step for step (checked against transformers 5.x sources).
LLAMA_STYLE = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})


def _fusable(block) -> bool:
    post = getattr(block, "post_attention_layernorm", None)
    return (
        type(block).__name__ in LLAMA_STYLE
        and all(hasattr(block, n) for n in ("input_layernorm", "mlp"))
        and hasattr(post, "weight")
        and hasattr(post, "variance_epsilon")
    )


def _fused_forward(self, hidden_states, *args, **kwargs):
    """The Llama block with `residual + attn_out` and `post_attention_layernorm` in one kernel."""
    post = self.post_attention_layernorm
    if args or backend(hidden_states, post.weight) != "triton":
        return self._unfused_forward(hidden_states, *args, **kwargs)
    residual = hidden_states
    h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    if h.shape == residual.shape and h.dtype == residual.dtype and backend(h, residual, post.weight) == "triton":
        normed, residual = add_rmsnorm(h, residual, post.weight, post.variance_epsilon)
    else:  # gradients flow through the attention (adapters): the exact unfused pair
        residual = residual + h
        normed = post(residual)
    return residual + self.mlp(normed)


_FUSED: dict[type, type] = {}


def _fused_class(base: type) -> type:
    cls = _FUSED.get(base)
    if cls is None:
        name = f"Fused{base.__name__}"
        attrs = {
            "forward": _fused_forward,
            "_unfused_forward": base.forward,
            "adaflex_fused": True,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": base.__doc__,
        }
        cls = _FUSED[base] = type(name, (base,), attrs)
        globals()[name] = cls  # pickle finds the class by name (once this process fused that base)
    return cls


def _is_fused(block) -> bool:
    return getattr(type(block), "adaflex_fused", False)


def installed(model) -> bool:
    return any(_is_fused(b) for b in getattr(model.get_decoder(), "layers", ()))


def install(model) -> int:
    """Fuse the add + norm pair in `model`'s Llama-style blocks (idempotent); returns how many blocks are fused."""
    n = 0
    for block in getattr(model.get_decoder(), "layers", ()):
        if not _is_fused(block) and _fusable(block):
            block.__class__ = _fused_class(type(block))
        n += _is_fused(block)
    if n:
        state_of(model).patched("fused", _undo)
    return n


def uninstall(model) -> None:
    for block in getattr(model.get_decoder(), "layers", ()):
        if _is_fused(block):
            block.__class__ = type(block).__mro__[1]
    state_of(model).unpatched("fused")


def _undo(model, _saved) -> None:
    uninstall(model)
