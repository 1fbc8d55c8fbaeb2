"""Pure-torch references of every native op in ``twicediff._ops``: same arguments, same results.

Tests compare the native kernels with these (in float64 where the maths is checked); they are also
readable statements of what each op computes.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

# ---- parameter-space ops ------------------------------------------------------------------------


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """out[row_offset:row_offset+B] = cat_k(blocks[k].reshape(B, -1)) along columns."""
    rows = blocks[0].shape[0]
    flat = [b.reshape(rows, -1) for b in blocks]
    out[row_offset:row_offset + rows] = torch.cat(flat, dim=1)
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """outs[k] = rows[:, col_k:col_k+n_k].reshape(outs[k].shape)."""
    col = 0
    for o in outs:
        n = o[0].numel() if o.shape[0] else o.numel()
        o.copy_(rows[:, col:col + n].reshape(o.shape))
        col += n
    return list(outs)


# ---- HVP engine ops -----------------------------------------------------------------------------


# ---- solver ops ---------------------------------------------------------------------------------


def cg_step(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x += alpha[:, None] p; r -= alpha[:, None] Ap; returns (r ** 2).sum(1) in float64."""
    a = alpha.to(x.dtype)[:, None]
    x.add_(a * p)
    r.sub_(a * Ap)
    return r.double().square().sum(1)


def cg_direction(p: torch.Tensor, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """p = z + beta[:, None] p."""
    return p.copy_(z + beta.to(p.dtype)[:, None] * p)


def lissa_step(h: torch.Tensor, b: torch.Tensor, Hh: torch.Tensor, dampen: float, scale: float,
               hessian_perturbation: float):
    """h' = b + (1 - dampen - λ/scale) h - Hh/scale into h; per-row max and sum of |h'-h|/|h'|
    (0/0 = 0), NaN in rows where h' is not finite."""
    old = h.clone()
    h.copy_(b + (1.0 - dampen - hessian_perturbation / scale) * old - Hh / scale)
    delta = (h.double() - old.double()).abs()
    rel = torch.where(delta == 0, torch.zeros_like(delta), delta / h.double().abs())
    finite = torch.isfinite(h).all(1)
    nan = torch.full((h.shape[0],), float("nan"), dtype=torch.float64, device=h.device)
    max_rel = rel.amax(1) if h.shape[1] else rel.new_zeros(h.shape[0])
    return torch.where(finite, max_rel, nan), torch.where(finite, rel.sum(1), nan)
