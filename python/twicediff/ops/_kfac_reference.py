r"""Pure-torch references of the K-FAC ops (the native kernels are tested against these).

Shapes: rows [R, d]; ā_r = [x_r, 1] when ``bias`` (the 1 is implied, never stored by the kernels),
so D = d + bias. Per-sample tokens: g [N, T, O], a [N, T, I]; I' = I + bias.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["covariance_accumulate", "eigen_correction_accumulate", "augment"]


def augment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """x with a trailing column of ones when ``bias`` (materialised: the reference may)."""
    if not bias:
        return x
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def covariance_accumulate(out: torch.Tensor, x: torch.Tensor, weights: Optional[torch.Tensor] = None,
                          bias: bool = False) -> torch.Tensor:
    """out [D, D] += Σ_r w_r ā_r ā_rᵀ (w_r = 1 without weights), computed in float64 and added to
    ``out`` in its dtype; returns ``out``."""
    a = augment(x.double(), bias)
    w = torch.ones(a.shape[0], dtype=torch.float64, device=x.device) if weights is None else weights.double()
    out.add_(((a * w[:, None]).T @ a).to(out.dtype))
    return out


def eigen_correction_accumulate(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, q_s: torch.Tensor,
                                q_a: torch.Tensor, weights: Optional[torch.Tensor] = None,
                                bias: bool = False) -> torch.Tensor:
    """out [O, I'] += Σ_n (Q_Sᵀ G_n Q_A)², G_n = Σ_t w_{n,t} g_{n,t} ā_{n,t}ᵀ [O, I'], for g [N, T, O],
    a [N, T, I], q_s [O, O], q_a [I', I'], weights [N, T] (1 without); float64 inside; returns out."""
    gd = g.double()
    if weights is not None:
        gd = gd * weights.double()[..., None]
    G = torch.einsum("nto,nti->noi", gd, augment(a.double(), bias))
    R = q_s.double().T @ G @ q_a.double()
    out.add_((R * R).sum(0).to(out.dtype))
    return out
