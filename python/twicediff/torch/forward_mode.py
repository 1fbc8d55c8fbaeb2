"""Forward-mode products hold constant what reverse mode holds constant.

The reverse-mode engines (autograd, the loop) differentiate the gradient that torch's backward
returns. Two things the model's forward does make that gradient treat a value as a constant, and
forward mode (``jvp``, under the func and compiled engines, their Gauss-Newton products and pyDVL's
functional ``hvp(..., reverse_only=False)``) does not follow either on its own:

- an embedding's padding row. ``nn.Embedding(padding_idx=k)`` (and ``F.embedding``,
  ``torch.embedding`` with a padding index) looks row k up like any other, but its backward gives
  row k no gradient. ``jvp`` of the lookup carries the row's tangent on;
- values computed with gradients disabled (``torch.no_grad()``, ``torch.set_grad_enabled(False)``
  inside the forward, a frozen backbone, say). Their parameters get no gradient, but grad mode does
  not switch forward mode off: ``jvp`` carries their tangents on.

In both cases ``vmap(jvp(grad(L)))`` applied ``∂grad/∂θ_c`` for the constant's parameters θ_c, a
column reverse mode never sees: another matrix than the reverse-mode engines', not symmetric, and
``auto`` would pick one or the other by speed. :func:`reverse_mode_constants` removes those
tangents: under it, an embedding lookup's output at padding positions, and the output of any
function run with gradients disabled, are detached. Values are unchanged, and so are gradients
(reverse mode gives those values none). Dynamo traces the mode into the compiled engine's graphs.
An in-place op's output is left as it is (it is the tensor it was given).

The func engine also asks it to route ``F.layer_norm`` (``nn.LayerNorm``) to
:func:`twicediff.torch.layer_norm.layer_norm`, whose forward-mode rules are fused native ops: same
values, same derivatives, fewer passes over the batched tangents; and nn.MultiheadAttention's
plain self-attention to :func:`twicediff.torch.attention.self_attention`, the same attention
without the copies and zero-filled select backwards of torch's packed projection. The compiled engine does not: its
compiler fuses torch's own rules. Those rules differentiate LayerNorm's backward forward only: a
product taken reverse over reverse runs under a context without them.

It routes the ops that batched forward-mode and compiled products cannot take from torch (no
forward-mode rule, or a wrong batching rule) to their equivalents: the table is
:data:`twicediff.torch.derivative_routes.FORWARD_MODE_ROUTES`.

The module also names the forward-mode formulas of torch that fail where reverse mode computes
(:data:`FORMULA_FAILURES`): there the callers take the product reverse over reverse, which is exact too.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .attention import applies as _attention_applies, self_attention as _self_attention
from .derivative_routes import FORWARD_MODE_ROUTES
from .layer_norm import applies as _fused_applies, layer_norm as _fused_layer_norm

__all__ = ["FORMULA_FAILURES", "formula_failure", "reverse_mode_constants"]

#: torch's words where one of its forward-mode formulas fails on input reverse mode takes: an
#: implicit zero tangent written into ("ZeroTensors are immutable", ``mse_loss``'s backward), and
#: an integer target in ``mse_loss``'s backward ("result type Double can't be cast to the desired
#: output type Long", torch 2.14). Reverse over reverse is exact there too, and callers use it.
FORMULA_FAILURES = ("ZeroTensor", "can't be cast to the desired output type")


def formula_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is one of :data:`FORMULA_FAILURES`."""
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in FORMULA_FAILURES)


# The leading positional arguments of each spelling of an embedding lookup.
_LOOKUP_ARGUMENTS = {F.embedding: ("input", "weight", "padding_idx"),
                     torch.embedding: ("weight", "indices", "padding_idx")}


def _lookup_padding(func: Callable, args: Tuple, kwargs: Dict[str, Any]) -> Tuple[torch.Tensor, Optional[int]]:
    """(indices, padding row) of an embedding lookup, the row None when it has none. F.embedding
    counts a negative index from the end; torch.embedding (which F.embedding calls with -1 for
    none) takes any negative index for none."""
    bound = {**dict(zip(_LOOKUP_ARGUMENTS[func], args)), **kwargs}
    pad = bound.get("padding_idx")
    if func is F.embedding:
        return bound["input"], pad if pad is None or pad >= 0 else pad + bound["weight"].shape[0]
    return bound["indices"], pad if pad is not None and pad >= 0 else None


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _layer_norm_call(args: Tuple, kwargs: Dict[str, Any]) -> Optional[Tuple]:
    """F.layer_norm's (input, normalized_shape, weight, bias, eps) when the fused rules take it."""
    bound = {**dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)), **kwargs}
    call = (bound.get("input"), bound.get("normalized_shape"), bound.get("weight"), bound.get("bias"),
            bound.get("eps", 1e-5))
    return call if _fused_applies(*call[:4]) else None


class _ReverseModeConstants(TorchFunctionMode):
    def __init__(self, fused_layer_norm: bool, packed_attention: bool):
        super().__init__()
        self.fused_layer_norm = fused_layer_norm
        self.packed_attention = packed_attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm and self.fused_layer_norm and torch.is_grad_enabled():
            call = _layer_norm_call(args, kwargs)
            if call is not None:
                return _fused_layer_norm(*call)
        if func is F.multi_head_attention_forward and self.packed_attention and torch.is_grad_enabled():
            bound = _attention_applies(args, kwargs)
            if bound is not None:
                return _self_attention(bound["query"], bound["num_heads"], bound["in_proj_weight"],
                                       bound["in_proj_bias"], bound["out_proj_weight"], bound["out_proj_bias"],
                                       bound["key_padding_mask"])
        # the routed ops (no forward-mode rule, or a wrong batching rule: cdist) detached like any other
        out = FORWARD_MODE_ROUTES.get(func, func)(*args, **kwargs)
        if not torch.is_grad_enabled():
            if isinstance(out, torch.Tensor) and any(out is a for a in args):
                return out  # in place: the caller's own tensor
            return tree_map(_detach, out)
        if func is F.embedding or func is torch.embedding:
            indices, pad = _lookup_padding(func, args, kwargs)
            if pad is not None:
                out = torch.where((indices == pad).unsqueeze(-1), out.detach(), out)
        return out


def reverse_mode_constants(fused_layer_norm: bool = False, packed_attention: bool = False) -> TorchFunctionMode:
    """A context under which forward mode holds constant what reverse mode does (see the module
    docstring). Enter it around a forward-mode product; ``fused_layer_norm``: route the model's
    layer_norm calls to the fused rules (eager products); ``packed_attention``: route the
    self-attention calls of nn.MultiheadAttention that :mod:`twicediff.torch.attention` takes to it."""
    _load_jvp_decompositions()
    return _ReverseModeConstants(fused_layer_norm, packed_attention)


_jvp_decompositions_loaded = False


def _load_jvp_decompositions() -> None:
    """Load what torch loads on the first forward-mode product of a process, without its warning.
    torch (2.14) scripts a few of its own functions then, with ``torch.jit.script``, which warns
    that it is deprecated: a FutureWarning about torch's code, not the user's, that surfaced at
    their first hvp. Loaded on first use, not at import: it takes about 75 ms."""
    global _jvp_decompositions_loaded
    if _jvp_decompositions_loaded:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # another torch: it loads what it needs itself
            pass
    _jvp_decompositions_loaded = True
