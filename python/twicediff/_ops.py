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


def cg_step(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    r"""One conjugate-gradient update of D systems at once, in place and in one pass:
    ``x += alpha[:, None] * p``, ``r -= alpha[:, None] * Ap``; returns ``‖r[d]‖²`` per row.

    x, r, p, Ap: [D, P], one dtype (float32 / float64) and device; alpha: float64 [D].
    Returns: float64 [D]. Not differentiable (it writes into x and r)."""
    return _ops.cg_step(x, r, p, Ap, alpha)


def cg_direction(p: torch.Tensor, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The next CG search directions, in place: ``p = z + beta[:, None] * p`` for p, z [D, P] and
    float64 beta [D]; returns p."""
    _ops.cg_direction(p, z, beta)
    return p


def lissa_step(h: torch.Tensor, b: torch.Tensor, Hh: torch.Tensor, dampen: float, scale: float,
               hessian_perturbation: float):
    r"""One LiSSA update of D right-hand sides at once, in place and in one pass:
    ``h' = b + (1 - dampen)·h - (Hh + λ·h) / scale`` with λ = ``hessian_perturbation``.

    h, b, Hh: [D, P] (Hh = H h without λ). Returns ``(max_rel, sum_rel)``, float64 [D]:
    ``max_j |h'-h| / |h'|`` and ``sum_j |h'-h| / |h'|`` per row (0/0 counted as 0), both NaN in
    rows where h' holds a non-finite value."""
    return _ops.lissa_step(h, b, Hh, float(dampen), float(scale), float(hessian_perturbation))


@torch.library.register_fake("twicediff::cg_step")
def _cg_step_fake(x, r, p, Ap, alpha):
    return x.new_empty(x.shape[0], dtype=torch.float64)


@torch.library.register_fake("twicediff::cg_direction")
def _cg_direction_fake(p, z, beta):
    return None


@torch.library.register_fake("twicediff::lissa_step")
def _lissa_step_fake(h, b, Hh, dampen, scale, hessian_perturbation):
    return h.new_empty(h.shape[0], dtype=torch.float64), h.new_empty(h.shape[0], dtype=torch.float64)
