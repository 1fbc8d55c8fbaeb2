"""Typed Python wrappers over ``torch.ops.twicediff.*``, with a fake (meta) kernel for every op and
an autograd formula for every op that can be called on tensors requiring grad.

Each wrapper is the documented entry to its op; ``_reference.py`` holds the pure-torch twin that
tests compare against.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from . import _build  # noqa: F401  (loads twicediff._C, which registers the ops)

_ops = torch.ops.twicediff

# ---- parameter-space ops ------------------------------------------------------------------------


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Write ``blocks[k]`` ([B, *shape_k]) into ``out[row_offset:row_offset+B, col_k:col_k+n_k]``
    of the preallocated ``out`` ([N, P], P = sum_k n_k) in one launch; returns ``out``.
    Not differentiable (it writes into ``out``)."""
    _ops.pack_into(list(blocks), out, int(row_offset))
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The inverse of :func:`pack_into`: ``outs[k]`` ([B, *shape_k]) = ``rows[:, col_k:col_k+n_k]``
    for ``rows`` of shape [B, P]; returns ``outs``."""
    outs = list(outs)
    _ops.unpack_into(rows, outs)
    return outs


@torch.library.register_fake("twicediff::pack_into")
def _pack_into_fake(blocks, out, row_offset):
    return None


@torch.library.register_fake("twicediff::unpack_into")
def _unpack_into_fake(rows, outs):
    return None


# ---- HVP engine ops -----------------------------------------------------------------------------


# ---- solver ops ---------------------------------------------------------------------------------
