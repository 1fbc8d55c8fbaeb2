"""Preconditioners for CG: Jacobi (a Hutchinson estimate of diag H) and Nyström (a low-rank
approximation of H from a few products)."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ...memory import chunk_size, reserved
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

    def probes(n: int) -> torch.Tensor:
        return torch.randint(0, 2, (n, P), generator=gen, device=operator.device).to(torch.float64) * 2 - 1

    # A probe holds its row, its product and their product (three float64 [P] rows) beside the
    # product's own chunk: the probes go in groups that fit the memory budget, all at once when they fit.
    step = chunk_size(num_samples, 4 * P * 8, operator.device, what="Hutchinson probes")
    if step >= num_samples:
        Z = probes(num_samples)
        with reserved(Z.numel() * 8):
            AZ = operator.apply_rows(Z)
        d = (Z * AZ).mean(0)
    else:
        d = torch.zeros(P, dtype=torch.float64, device=operator.device)
        for start in range(0, num_samples, step):
            Z = probes(min(step, num_samples - start))
            with reserved(P * 8 + Z.numel() * 8):
                AZ = operator.apply_rows(Z)
            d.add_((Z * AZ).sum(0))
            del Z, AZ
        d.div_(num_samples)
    floor = max(operator.hessian_perturbation, 1e-8 * float(d.abs().max()), torch.finfo(torch.float64).tiny)
    d = d.clamp_min(floor)

    def apply(R: torch.Tensor) -> torch.Tensor:
        return R / d

    apply.nbytes = d.numel() * d.element_size()  # what the preconditioner holds
    return apply


def nystrom_preconditioner(operator: HessianOperator, rank: int = 32,
                           seed: int = 0) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    r"""Randomized Nyström preconditioner (after Frangella, Tropp, Udell 2023) for A = H + λI.

    From a sketch Y = A Ω (Ω [P, r] orthonormal, one pass), the Nyström approximation
    Â = U Λ Uᵀ of rank r gives M⁻¹ = Λ_r U Λ⁻¹ Uᵀ + (I − U Uᵀ): the top r eigen-directions of A are
    scaled down to its r-th eigenvalue, the rest left alone. Returns None when A is not positive
    definite on the sketch (Cholesky of Ωᵀ Y fails), where CG would not apply either."""
    P = operator.shape[0]
    r = max(1, min(int(rank), P))
    # The sketch holds about five float64 [P, r] blocks at once (Ω, AΩ, its shift, Y C⁻ᵀ, U) beside
    # the products' chunks.
    chunk_size(1, 5 * r * P * 8, operator.device, what=f"a Nyström preconditioner of rank {r} (preconditioner_rank)")
    gen = torch.Generator(device=operator.device).manual_seed(seed)
    Omega = torch.linalg.qr(torch.randn(P, r, generator=gen, device=operator.device, dtype=torch.float64))[0]
    with reserved(4 * r * P * 8):  # Ω now, the rest of the sketch's blocks after the products
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

    apply.nbytes = U.numel() * U.element_size()  # what the preconditioner holds
    return apply
