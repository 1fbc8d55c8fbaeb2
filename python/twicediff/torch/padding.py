"""An embedding's padding row is a constant, in forward mode as in reverse mode.

``nn.Embedding(padding_idx=k)`` (and ``F.embedding(..., padding_idx=k)``) looks up row k like any
other in its forward pass, but its backward gives row k no gradient: torch treats the padding row
as a constant. Reverse-mode engines (autograd, the loop) therefore differentiate a function in which
row k is fixed, and their Hessian has zero rows and columns there. Forward mode does not follow
that convention: ``jvp`` of the lookup carries the tangent of row k into every position that reads
it. So ``vmap(jvp(grad(L)))`` applied ``∂grad/∂(row k)`` (a column reverse mode never sees) and
returned another, non-symmetric matrix: a different product for the same model depending on the
engine, whenever a direction has nonzero entries in row k or the row is tied to another use of the
weight (an output layer sharing the embedding).

:func:`padding_rows_constant` gives forward mode reverse mode's convention: every lookup's output
at padding positions loses its tangent and its gradient (``torch.where`` with the detached value).
Values are unchanged, and so is the gradient (reverse mode already gives those positions none).
Every forward-mode product runs under it: the func engine, the compiled engine (Dynamo traces the
mode into the graph), and both of their Gauss-Newton products.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["padding_rows_constant"]


def _lookup_padding(func: Callable, args: Tuple, kwargs: Dict[str, Any]):
    """(indices, padding row) of an embedding lookup, the row None when it has none."""
    if func is F.embedding:  # F.embedding(input, weight, padding_idx=None, ...)
        names = ("input", "weight", "padding_idx")
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        pad = bound.get("padding_idx")
        if pad is not None and pad < 0:
            pad += bound["weight"].shape[0]
    else:  # torch.embedding(weight, indices, padding_idx=-1, ...): a negative index means none
        names = ("weight", "input", "padding_idx")
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in ("weight", "padding_idx")})
        bound.setdefault("input", kwargs.get("indices"))
        pad = bound.get("padding_idx", -1)
        pad = None if pad < 0 else pad
    return bound["input"], pad


class _PaddingConstant(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.embedding or func is torch.embedding:
            indices, pad = _lookup_padding(func, args, kwargs)
            if pad is not None:
                out = torch.where((indices == pad).unsqueeze(-1), out.detach(), out)
        return out


def padding_rows_constant() -> TorchFunctionMode:
    """A context under which every embedding lookup's padding positions carry no tangent and no
    gradient (see the module docstring). Enter it around a forward-mode product."""
    return _PaddingConstant()
