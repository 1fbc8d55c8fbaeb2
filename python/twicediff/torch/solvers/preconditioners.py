"""Preconditioners for CG: Jacobi (a Hutchinson estimate of diag H) and Nyström (a low-rank
approximation of H from a few products)."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..operator import HessianOperator

logger = logging.getLogger(__name__)

__all__ = ["PRECONDITIONERS", "jacobi_preconditioner", "nystrom_preconditioner"]

#: The preconditioners ``solve_batch_cg`` takes.
PRECONDITIONERS = (None, "jacobi", "nystrom")


def jacobi_preconditioner(operator: HessianOperator, num_samples: int = 32,
                          seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""R ↦ R / d with d ≈ diag(A) from Hutchinson's estimator d = mean_k z_k ⊙ A z_k, z_k Rademacher
    ([num_samples, P], one pass over the data). Entries are floored at max(λ, 1e-8·max|d|) so that
    the preconditioner stays positive definite."""
    P = operator.shape[0]
    gen = torch.Generator(device=operator.device).manual_seed(seed)
    Z = torch.randint(0, 2, (num_samples, P), generator=gen, device=operator.device).to(torch.float64) * 2 - 1
    d = (Z * operator.apply_rows(Z)).mean(0)
    floor = max(operator.hessian_perturbation, 1e-8 * float(d.abs().max()), torch.finfo(torch.float64).tiny)
    d = d.clamp_min(floor)
    return lambda R: R / d


def nystrom_preconditioner(operator: HessianOperator, rank: int = 32,
                           seed: int = 0) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    r"""Randomized Nyström preconditioner (after Frangella, Tropp, Udell 2023) for A = H + λI.

    From a sketch Y = A Ω (Ω [P, r] orthonormal, one pass), the Nyström approximation
    Â = U Λ Uᵀ of rank r gives M⁻¹ = Λ_r U Λ⁻¹ Uᵀ + (I − U Uᵀ): the top r eigen-directions of A are
    scaled down to its r-th eigenvalue, the rest left alone. Returns None when A is not positive
    definite on the sketch (Cholesky of Ωᵀ Y fails), where CG would not apply either."""
    P = operator.shape[0]
    r = max(1, min(int(rank), P))
    gen = torch.Generator(device=operator.device).manual_seed(seed)
    Omega = torch.linalg.qr(torch.randn(P, r, generator=gen, device=operator.device, dtype=torch.float64))[0]
    Y = operator.apply_rows(Omega.T).T  # A Ω, [P, r]
    shift = P ** 0.5 * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(Y, ord=2))
    Y = Y + shift * Omega
    C, status = torch.linalg.cholesky_ex(0.5 * (Omega.T @ Y + Y.T @ Omega))
    if int(status) != 0:
        return None
    Bmat = torch.linalg.solve_triangular(C, Y.T, upper=False).T  # Y C⁻ᵀ, [P, r]
    U, S, _ = torch.linalg.svd(Bmat, full_matrices=False)
    Lam = torch.clamp(S ** 2 - shift, min=torch.finfo(torch.float64).tiny)
    if not float(Lam[-1]) > 0:
        return None
    coef = Lam[-1] / Lam - 1.0  # M⁻¹ = I + U diag(coef) Uᵀ

    def apply(R: torch.Tensor) -> torch.Tensor:
        return R + ((R @ U) * coef) @ U.T

    return apply
