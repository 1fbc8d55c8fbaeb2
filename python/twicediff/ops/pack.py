"""Packing parameter-shaped blocks into rows of a [B, P] matrix and back (csrc/cpu/pack.cpp,
csrc/cuda/pack.cu): one launch over a whole parameter list.

A parameter list is K blocks; "rows" of a block are its leading dimension, and n_k = numel of one
row of block k. Packed, a row of the blocks is one row of a [B, P] matrix, P = sum_k n_k, block k at
columns [col_k, col_k + n_k), col_k = sum_{j<k} n_j.
"""
from __future__ import annotations

import operator
from typing import List, Sequence

import torch

from .. import _build  # noqa: F401  (loads twicediff._C, which registers the ops)
from ._checks import named, not_tracked, one_device, tensor, tensor_list

__all__ = ["pack", "pack_into", "unpack_into"]

_native = torch.ops.twicediff


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Write ``blocks[k]`` ([B, *shape_k]) into ``out[row_offset:row_offset+B, col_k:col_k+n_k]``
    of the preallocated ``out`` ([N, P], P = sum_k n_k) in one launch; returns ``out``.

    Copies values only: ``out`` gets no autograd graph (blocks that require grad are read as
    detached); see :func:`pack` for the differentiable form.

    Raises:
        TypeError, ValueError: blocks not a non-empty list of tensors, row_offset not an int, out
            part of an autograd graph; the native checks name shapes and dtypes that do not fit.
    """
    blocks = tensor_list("pack_into", "blocks", blocks)
    tensor("pack_into", "out", out)
    if isinstance(row_offset, bool):
        raise TypeError("pack_into: row_offset must be an int, got bool")
    try:
        row_offset = operator.index(row_offset)
    except TypeError:
        raise TypeError(f"pack_into: row_offset must be an int, got {type(row_offset).__name__}") from None
    not_tracked("pack_into", [("out", out)])
    _native.pack_into(blocks, out, row_offset)
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The inverse of :func:`pack_into`: ``outs[k]`` ([B, *shape_k]) = ``rows[:, col_k:col_k+n_k]``
    for ``rows`` of shape [B, P]; returns ``outs``. Copies values only (no autograd graph)."""
    outs = tensor_list("unpack_into", "outs", outs)
    tensor("unpack_into", "rows", rows)
    not_tracked("unpack_into", named("outs", outs))
    _native.unpack_into(rows, outs)
    return outs


def pack(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The packed rows of ``blocks[k]`` ([B, *shape_k]) as a fresh [B, P] matrix,
    ``out[b] = cat_k(blocks[k][b].flatten())``.

    What ``torch.cat([x.reshape(B, -1) for x in blocks], 1)`` gives, in one pass. Differentiable:
    the gradient of block k is ``grad[:, col_k:col_k+n_k].reshape(blocks[k].shape)``.

    Example:
        >>> twicediff.ops.pack([torch.ones(2, 3), torch.zeros(2, 1, 2)]).shape
        torch.Size([2, 5])
    """
    return _native.pack(tensor_list("pack", "blocks", blocks))


def _row_width(op: str, name: str, blocks: Sequence[torch.Tensor]) -> tuple:
    """(B, P) of the blocks [B, *shape_k], as the native checks see it."""
    if len(blocks) == 0:
        raise ValueError(f"{op}: {name} must hold at least one tensor, got an empty list")
    for k, t in enumerate(blocks):
        if t.dim() == 0 or t.shape[0] != blocks[0].shape[0]:
            raise ValueError(f"{op}: every tensor in {name} must have the same leading size B; {name}[0] has "
                             f"shape {list(blocks[0].shape)} but {name}[{k}] has shape {list(t.shape)}")
    return blocks[0].shape[0], sum(t.shape[1:].numel() for t in blocks)


@torch.library.register_fake("twicediff::pack_into")
def _pack_into_fake(blocks, out, row_offset):
    one_device("pack_into", [("out", out)] + named("blocks", blocks))
    return None


@torch.library.register_fake("twicediff::unpack_into")
def _unpack_into_fake(rows, outs):
    one_device("unpack_into", [("rows", rows)] + named("outs", outs))
    return None


@torch.library.register_fake("twicediff::pack")
def _pack_fake(blocks):
    one_device("pack", named("blocks", blocks))
    rows, width = _row_width("pack", "blocks", blocks)
    return blocks[0].new_empty((rows, width))


def _pack_setup(ctx, inputs, output):
    ctx.shapes = [t.shape for t in inputs[0]]


def _pack_backward(ctx, grad):
    widths = [s[1:].numel() for s in ctx.shapes]
    return [piece.reshape(s) for piece, s in zip(grad.split(widths, dim=1), ctx.shapes)]


torch.library.register_autograd("twicediff::pack", _pack_backward, setup_context=_pack_setup)
