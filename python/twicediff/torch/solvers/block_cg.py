"""Block conjugate gradients on a row operator: all right-hand sides share one search space."""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch

from ... import ops
from ...progress import close_bar, progress_bar
from .common import LAMBDA

logger = logging.getLogger(__name__)

__all__ = ["STAGNATION_STEPS", "block_cg", "block_krylov_cg", "orthonormal_rows"]

#: Block steps without progress after which CG stops (products too inexact for its stopping rule).
STAGNATION_STEPS = 50


def block_cg(apply_rows: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, X0: torch.Tensor, *,
              rtol: float, atol: float, maxiter: int,
              precondition: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              progress: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    r"""(Preconditioned) CG on the N systems A x_i = b_i at once (rows of B, X0: [N, P]).

    All iterates and scalars are float64; ``apply_rows`` ([D, P] → [D, P]) is called once per
    iteration on the active rows only. Row i stops when ‖r_i‖ ≤ max(rtol·‖b_i‖, atol) (r the
    recursively updated residual), or when it breaks down (pᵀAp = 0 or not finite).

    Returns:
        X [N, P] float64 and per-row ``niter`` (int64), ``optimal`` (bool), ``gamma`` (‖r‖², float64).
    """
    N, P = B.shape
    dev = B.device
    X = X0.to(torch.float64, copy=True)
    R = _residual(apply_rows, B, X)
    out = X.clone()
    gamma = R.square().sum(1)
    stop = torch.clamp(rtol ** 2 * _square_norms(B), min=atol ** 2)
    niter = torch.zeros(N, dtype=torch.int64, device=dev)
    optimal = gamma <= stop
    final_gamma = gamma.clone()
    active = torch.nonzero(~optimal).flatten()
    if active.numel() < N:
        X, R = X[active].contiguous(), R[active].contiguous()
    Z = precondition(R) if precondition is not None else R
    rz = (R * Z).sum(1) if precondition is not None else gamma[active]
    Pd = Z.clone()
    del Z  # not held during the products
    negative_curvature = False
    bar = progress_bar(range(maxiter), progress, desc="cg", unit="it", count_only=True)
    for _ in bar:
        if active.numel() == 0:
            break
        AP = apply_rows(Pd)
        pAp = (Pd * AP).sum(1)
        # CG needs pᵀAp ≠ 0; it keeps going through negative curvature (as scipy's and pyDVL's do)
        # and converges on non-singular indefinite systems when it does not break down.
        curvature_ok = (pAp != 0) & torch.isfinite(pAp)
        negative_curvature |= bool((pAp < 0).any())
        alpha = torch.where(curvature_ok, rz / torch.where(curvature_ok, pAp, 1.0), 0.0)
        g = ops.cg_step(X, R, Pd, AP, alpha)
        del AP  # not held during the next product
        niter[active] += 1
        final_gamma[active] = g
        converged = g <= stop[active]
        optimal[active] = converged
        done = converged | ~curvature_ok | ~torch.isfinite(g)
        if bool(done.any()):
            if not bool(curvature_ok.all()):
                logger.warning("cg: %d system(s) broke down (pᵀ(H + λI)p = 0 or not finite); increase %s",
                               int((~curvature_ok).sum()), LAMBDA)
            out[active[done]] = X[done]
            keep = torch.nonzero(~done).flatten()
            active = active[keep]
            X, R, Pd, rz, g = X[keep], R[keep], Pd[keep], rz[keep], g[keep]
            if active.numel() == 0:
                break
        if precondition is not None:
            Z = precondition(R)
            rz_new = (R * Z).sum(1)
        else:
            Z, rz_new = R, g
        beta = rz_new / rz
        rz = rz_new
        ops.cg_direction(Pd, Z, beta)
        del Z
        if progress:
            bar.set_postfix(active=int(active.numel()))
    close_bar(bar)
    if active.numel():
        out[active] = X
    if negative_curvature:
        logger.warning("cg: H + λI has negative curvature along some search directions (it is not positive "
                       "definite); CG may converge slowly or not at all: consider a larger %s", LAMBDA)
    return out, {"niter": niter, "optimal": optimal, "gamma": final_gamma}


def _residual(apply_rows: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """B − A X in float64 (B in any dtype), formed in the product's memory; B itself, as a float64
    copy, when X is zero."""
    if not bool((X != 0).any()):
        return B.to(torch.float64, copy=True)
    return apply_rows(X).to(torch.float64).neg_().add_(B)  # −AX + B: the bits of B − AX


def _square_norms(B: torch.Tensor) -> torch.Tensor:
    """‖b_i‖² of every row in float64, one row's float64 copy at a time."""
    return torch.stack([B[i].to(torch.float64).square().sum() for i in range(B.shape[0])]) if B.shape[0] \
        else torch.zeros(0, dtype=torch.float64, device=B.device)


def orthonormal_rows(W: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (as rows) of the row space of W [k, P], rank-revealing: directions whose
    singular value is below 1e-12 of the largest are dropped (float64). Householder QR of Wᵀ, then
    the SVD R = U S Vᵀ of the small [k, k] factor: the singular values of W to the same accuracy as
    an SVD of W itself, in about half the time for k ≪ P. The basis Q U is formed by applying the
    reflectors to U (ormqr, in place) rather than forming Q and multiplying, which is cheaper (NOTE:
    measured in docs/notes/influence_cpu.md). W is not read after its factorization: a caller that
    passes a temporary has its memory back before the basis is formed (two [k, P] blocks at most)."""
    k, P = W.shape
    if k == 0:
        return W
    A, tau = torch.geqrf(W.T)  # W.T is column-major: LAPACK takes it without a copy
    del W
    r = min(k, P)
    U, S, _ = torch.linalg.svd(A[:r].triu())
    if not float(S[0]) > 0:
        return A.new_zeros(0, P)
    keep = U[:, S > 1e-12 * S[0]]
    E = A.new_zeros(keep.shape[1], P)  # [U_keep; 0] as a column-major [P, rank]
    E[:, :r] = keep.T
    return torch.ormqr(A, tau, E.T, out=E.T).T  # LAPACK applies the reflectors to E in place


def _small_solve(M: torch.Tensor, C: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """M⁻¹ C for the small symmetric M = Pᵀ A P, and whether M was positive definite (Cholesky;
    else LU; else least squares when M is singular)."""
    L, status = torch.linalg.cholesky_ex(M)
    if int(status) == 0:
        return torch.cholesky_solve(C, L), True
    Y, status = torch.linalg.solve_ex(M, C)
    if int(status) == 0 and bool(torch.isfinite(Y).all()):
        return Y, False
    return torch.linalg.lstsq(M, C).solution, False


def block_krylov_cg(apply_rows: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, X0: torch.Tensor, *,
                     rtol: float, atol: float, maxiter: int,
                     precondition: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     progress: bool = False, max_rounds: int = 5) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    r"""Breakdown-free block CG (after Ji and Li, 2017) on the N systems A x_i = b_i at once.

    The rows share one search block, kept orthonormal and rank-revealing:
    α = (PᵀAP)⁻¹PᵀR, X += αᵀP, R −= αᵀ(AP), β = −(PᵀAP)⁻¹(AP)ᵀZ, P = orth(Z + βᵀP) with
    Z = M⁻¹R (or R). After k steps every row has its solution from the k-step *block* Krylov space
    of all rows' residuals, so right-hand sides that share curvature (per-sample gradients of one
    model) converge together in far fewer products than one CG each. Directions that become
    linearly dependent are dropped instead of breaking the recurrence down, and a row whose
    recursive residual meets the rule leaves the block, so it costs nothing more.

    The rule is then checked on the true residual b − A x (one more product): a row that misses
    it — the recursive residual drifts from the true one in finite precision — runs another
    round from its current x (iterative refinement), at most ``max_rounds`` rounds, while the
    true residual still falls. A round also ends when the block's residual has not halved in
    ``STAGNATION_STEPS`` steps (products too inexact for the rule). ``maxiter`` caps the block
    steps over all rounds.

    Returns:
        X [N, P] float64 and per-row ``niter`` (block steps the row took part in), ``optimal``
        (the rule holds for the true residual), ``gamma`` (true ‖r_i‖²).
    """
    N, P = B.shape
    dev = B.device
    X = X0.to(torch.float64, copy=True)
    R = _residual(apply_rows, B, X)
    gamma = R.square().sum(1)
    stop = torch.clamp(rtol ** 2 * _square_norms(B), min=atol ** 2)
    niter = torch.zeros(N, dtype=torch.int64, device=dev)
    indefinite = False
    stalled = torch.zeros(N, dtype=torch.bool, device=dev)
    steps = 0
    bar = progress_bar(range(maxiter), progress, desc="block cg", unit="step", count_only=True)
    tick = iter(bar)
    for _ in range(max_rounds):
        todo = torch.nonzero((gamma > stop) & ~stalled).flatten()
        if todo.numel() == 0 or steps >= maxiter:
            break
        # A round on every row works on X and R themselves (a row that leaves the block is then
        # copied out of them); R's rows are not read after a round that made them worse (those
        # rows stall), so the round may overwrite them.
        whole = todo.numel() == N
        active = todo
        Xa, Ra = (X, R) if whole else (X[todo], R[todo])
        X_before = Xa.clone()
        Pm = orthonormal_rows(precondition(Ra) if precondition is not None else Ra)
        mark, mark_step = float(Ra.square().sum()), steps
        while active.numel() and Pm.shape[0] and steps < maxiter:
            AP = apply_rows(Pm).to(torch.float64)
            steps += 1
            next(tick, None)
            PAP = Pm @ AP.T
            PAP = 0.5 * (PAP + PAP.T)
            alpha, pd = _small_solve(PAP, Pm @ Ra.T)
            indefinite |= not pd
            Xa.addmm_(alpha.T, Pm)
            Ra.addmm_(alpha.T, AP, alpha=-1)
            niter[active] += 1
            done = Ra.square().sum(1) <= stop[active]
            if bool(done.any()):
                X[active[done]] = Xa[done]
                keep = ~done
                active, Xa, Ra = active[keep], Xa[keep], Ra[keep]
                if active.numel() == 0:
                    break
            if steps - mark_step >= STAGNATION_STEPS:  # ‖R‖ must halve every so many steps
                now = float(Ra.square().sum())
                if now > 0.25 * mark:
                    break
                mark, mark_step = now, steps
            Z = precondition(Ra) if precondition is not None else Ra
            beta, _ = _small_solve(PAP, AP @ Z.T)
            del AP  # not held while the next block is formed
            Pm = orthonormal_rows(torch.addmm(Z, beta.T, Pm, alpha=-1))
            del Z
            if progress:
                bar.set_postfix(active=int(active.numel()))
        if active.numel() and Xa is not X:
            X[active] = Xa
        Pm = Xa = Ra = AP = None  # nothing of the round is held during the product below
        # the rule on the true residual of every row this round worked on (−AX + B: the bits of B − AX)
        R_true = apply_rows(X if whole else X[todo]).to(torch.float64).neg_().add_(B if whole else B[todo])
        g_true = R_true.square().sum(1)
        stalled[todo] = g_true > 0.25 * gamma[todo]  # another round must at least halve ‖r‖
        worse = g_true > gamma[todo]  # keep the better iterate of the row
        X[todo[worse]] = X_before[worse]
        better = todo[~worse]
        R[better], gamma[better] = R_true[~worse], g_true[~worse]
    close_bar(bar)
    if indefinite:
        logger.warning("cg: H + λI is not positive definite on the search directions (it is indefinite); "
                       "block CG still converges when no row breaks down, but consider a larger %s", LAMBDA)
    return X, {"niter": niter, "optimal": gamma <= stop, "gamma": gamma}
