"""``torch.cdist`` as batched second derivatives need it.

torch (2.14) computes ``torch.cdist`` by one of two ops. Where it takes ``_cdist_forward`` (every
p other than 2, and p = 2 on at most 25 rows a side under the default ``compute_mode``), the op
has no forward-mode rule, so the forward-over-reverse engines (func, compiled) could not take the
model; and torch.func's batching rule of its backward's derivative is wrong: ``vmap`` over the
pullback of ``grad`` (the compiled engine's reverse-over-reverse product) gave other numbers than
the same pullbacks one at a time, up to the products' own size, with no error. Its matrix-product
path (``_euclidean_dist``, p = 2 on more rows) has neither fault.

:func:`cdist` computes the same distances from ops torch differentiates in both modes and batches
correctly: the matrix-product formula where torch uses it (the same arithmetic), else the
coordinate differences ``x1_i − x2_j`` (memory: [.., r1, r2, M]). ``F.pdist`` (the distances
between the rows of one matrix) has no forward-mode rule either; :func:`pdist` computes them from
the same differences.
:mod:`twicediff.torch.forward_mode` routes the model's ``torch.cdist`` and ``F.pdist`` calls to
them inside every batched forward-mode or compiled product. Where a distance is 0 its derivative is
taken as 0, as torch's backward does (the norm has no derivative there).
"""
from __future__ import annotations

import math

import torch

__all__ = ["cdist", "pdist"]

MODES = ("use_mm_for_euclid_dist_if_necessary", "use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist")
#: torch's rule (2.14): under the default mode, p = 2 takes the matrix-product formula when either
#: side has more rows than this.
MM_ROWS = 25


def _root(total: torch.Tensor, p: float) -> torch.Tensor:
    """``total ** (1/p)``, with value and derivative 0 where ``total`` is 0."""
    positive = total > 0
    return torch.where(positive, torch.where(positive, total, 1).pow(1.0 / p), 0)


def _euclidean_by_products(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """torch's matrix-product form of the Euclidean distances: ‖a‖² − 2 a·b + ‖b‖², clamped at 0."""
    n1, n2 = x1.pow(2).sum(-1, keepdim=True), x2.pow(2).sum(-1, keepdim=True)
    left = torch.cat([x1 * -2, n1, torch.ones_like(n1)], dim=-1)
    right = torch.cat([x2, torch.ones_like(n2), n2], dim=-1)
    return _root((left @ right.mT).clamp_min(0), 2.0)


def cdist(x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0,
          compute_mode: str = "use_mm_for_euclid_dist_if_necessary") -> torch.Tensor:
    """``torch.cdist``: the p-norm distances [.., r1, r2] between the rows of x1 [.., r1, M] and
    x2 [.., r2, M] (leading dimensions broadcast)."""
    if x1.dim() < 2 or x2.dim() < 2:
        raise ValueError(f"cdist: x1 and x2 must have at least 2 dimensions [.., rows, M], got shapes "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"cdist: x1 and x2 must have the same number of columns, got {x1.shape[-1]} and "
                         f"{x2.shape[-1]}")
    if not p >= 0:
        raise ValueError(f"cdist: p must be >= 0, got {p}")
    if compute_mode not in MODES:
        raise ValueError(f"cdist: compute_mode must be one of {MODES}, got {compute_mode!r}")
    if p == 2 and (compute_mode == "use_mm_for_euclid_dist" or (
            compute_mode == MODES[0] and (x1.shape[-2] > MM_ROWS or x2.shape[-2] > MM_ROWS))):
        return _euclidean_by_products(x1, x2)
    return _norms((x1.unsqueeze(-2) - x2.unsqueeze(-3)).abs(), p)  # [.., r1, r2, M]


def pdist(input: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``F.pdist``: the p-norm distances between the rows i < j of input [N, M], in row-major order
    of the pairs, [N (N − 1) / 2]."""
    if input.dim() != 2:
        raise ValueError(f"pdist: input must be a matrix [N, M], got shape {tuple(input.shape)}")
    if not p >= 0:
        raise ValueError(f"pdist: p must be >= 0, got {p}")
    i, j = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return _norms((input.index_select(0, i) - input.index_select(0, j)).abs(), p)


def _norms(size: torch.Tensor, p: float) -> torch.Tensor:
    """The p-norms of the last dimension of ``size`` (coordinate differences' absolute values)."""
    if p == 0:  # the number of coordinates that differ: no derivative
        return (size != 0).sum(-1).to(size.dtype) + 0 * size.sum(-1)
    if math.isinf(p):
        return size.amax(-1)
    if p == 1:
        return size.sum(-1)
    moved = size > 0  # |d|^p with derivative 0 at d = 0 (for p < 1 it has none there)
    return _root(torch.where(moved, torch.where(moved, size, 1).pow(p), 0).sum(-1), p)
