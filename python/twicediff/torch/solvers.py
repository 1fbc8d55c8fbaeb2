r"""Inverse-HVP solvers for torch models: x with (H + λI) x = b, b [N, P] one right-hand side per row.

H is the Hessian of the mean training loss (batch losses weighted by batch size), applied through
:class:`twicediff.torch.operator.HessianOperator`: a block of vectors costs one pass over the data.

- :func:`solve_linear` (Direct): the explicit H in one pass, Cholesky (general solve as fallback).
- :func:`solve_batch_cg` (Cg): conjugate gradients on all right-hand sides at once; each iteration
  is one batched product with the still-active columns; converged columns drop out.
  Optional Jacobi (Hutchinson diagonal) or Nyström low-rank preconditioning.
- :func:`solve_lissa` (Lissa): h ← b + (1 − d) h − (H_batch + λI) h / s on a fresh shuffled batch
  per step, for all right-hand sides together; returns h / s.
- :func:`solve_arnoldi` (Arnoldi): x = V D⁻¹ Vᵀ b from the ``rank_estimate`` eigenpairs of H + λI
  largest in absolute value (block Lanczos in torch, or ARPACK through scipy).

Names, signatures and info keys are pyDVL 0.7.1's; the fused updates of CG and LiSSA are native
ops (:func:`twicediff._ops.cg_step`, ``cg_direction``, ``lissa_step``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from .. import _ops
from ..memory import chunk_size
from ..inversion import InversionMethod, InversionRegistry
from ..progress import progress_bar
from ..twice_differentiable import InverseHvpResult
from .operator import HessianOperator, check_training_data
from .twice_differentiable import TorchTwiceDifferentiable, data_errors

__all__ = [
    "LowRankProductRepresentation",
    "lanzcos_low_rank_hessian_approx",
    "model_hessian_low_rank",
    "solve_arnoldi",
    "solve_batch_cg",
    "solve_cg",
    "solve_linear",
    "solve_lissa",
]

logger = logging.getLogger(__name__)

PRECONDITIONERS = (None, "jacobi", "nystrom")
STAGNATION_STEPS = 50
EIGEN_SOLVERS = ("lanczos", "arpack")


# ---- argument checks ---------------------------------------------------------------------------


def _check_model(model, where: str) -> None:
    if not isinstance(model, TorchTwiceDifferentiable):
        raise TypeError(f"{where}: model must be a TorchTwiceDifferentiable, got {type(model).__name__}")


def _check_rhs(model: TorchTwiceDifferentiable, b, where: str, name: str = "b") -> Tuple[torch.Tensor, bool]:
    """b as [N, P] (one right-hand side per row) on the model's device, and whether it was one [P]."""
    b = model.check_vectors(b, where, name=name, rows="N")
    one = b.dim() == 1
    return (b.unsqueeze(0) if one else b), one


def _check_nonnegative(value, name: str, where: str) -> float:
    v = float(value)
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return v


def _initial_guess(x0: Optional[torch.Tensor], B: torch.Tensor, model, where: str, name: str) -> torch.Tensor:
    """x0 as [N, P] (a [P] vector is used for every row), else a copy of b (pyDVL's default)."""
    if x0 is None:
        return B.clone()
    X, _ = _check_rhs(model, x0, where, name)
    if X.shape[0] == 1 and B.shape[0] != 1:
        return X.expand_as(B).clone()
    if X.shape != B.shape:
        raise ValueError(f"{where}: {name} must be [P] or b's shape {tuple(B.shape)}, got {tuple(x0.shape)}")
    return X.clone()


# ---- Direct ------------------------------------------------------------------------------------


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Direct)
def solve_linear(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                 hessian_perturbation: float = 0.0, *, progress: bool = False) -> InverseHvpResult:
    r"""x = (H + λI)⁻¹ b with the explicit Hessian H = Σ_b (n_b/N) H_b ([P, P], one pass over the
    data, :meth:`TorchTwiceDifferentiable.mean_hessian`).

    Solved by Cholesky; when H + λI is not positive definite, by Cholesky of its positive definite
    leading block and LU of the Schur complement of the rest (``_cholesky_then_lu``), or by a
    plain LU solve, noted in ``info["solver"]``.

    Returns:
        InverseHvpResult: x of b's shape; info ``hessian`` (H without λ, [P, P]), ``solver``
        (``"cholesky"``, ``"cholesky+lu"`` or ``"lu"``) and ``positive_definite_block`` (the k
        leading rows factored by Cholesky).

    Raises:
        RuntimeError: H + λI is singular (advises a larger ``hessian_perturbation``).
    """
    where = "solve_linear"
    _check_model(model, where)
    check_training_data(training_data, where)
    B, one = _check_rhs(model, b, where)
    lam = _check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    P = model.num_params
    hessian = model.mean_hessian(training_data, progress=progress)
    matrix = hessian.clone()
    matrix.diagonal().add_(lam)
    x, k = _cholesky_then_lu(matrix, B.T)
    solver = "cholesky" if k == P else ("lu" if k == 0 else "cholesky+lu")
    if x is None:
        try:
            x = torch.linalg.solve(matrix, B.T)
        except torch.linalg.LinAlgError as exc:
            raise RuntimeError(f"solve_linear: H + λI is singular; increase hessian_perturbation (now {lam}). "
                               f"{exc}") from exc
        solver = "lu"
    if solver != "cholesky":
        logger.info("solve_linear: H + λI is not positive definite; solved by %s (positive definite leading "
                    "block of %d of %d)", solver, k, P)
    x = x.T
    x = x.contiguous()
    return InverseHvpResult(x=x[0] if one else x,
                            info={"hessian": hessian, "solver": solver, "positive_definite_block": k})


CHOLESKY_BLOCK = 256


def _cholesky_then_lu(A: torch.Tensor, B: torch.Tensor) -> Tuple[Optional[torch.Tensor], int]:
    r"""X with A X = B for a symmetric A [n, n] (lower triangle read), B [n, m]: blocked Cholesky for
    as long as the leading block stays positive definite, then LU on the Schur complement of the rest.

    With A11 = L11 L11ᵀ (the first k rows, k a multiple of ``CHOLESKY_BLOCK`` or n), L21 = A21 L11⁻ᵀ
    and S = A22 − L21 L21ᵀ, A = [L11 0; L21 I] diag(I, S) [L11ᵀ L21ᵀ; 0 I]. A positive definite A
    costs one Cholesky (k = n); an indefinite one costs the Cholesky of its positive definite
    leading block plus an LU of size n − k, instead of a failed full Cholesky and then a full LU
    (on the issue-4 Hessian, 4,810² float32, Cholesky fails at row 4,762: 0.7 s instead of 1.4 s).
    The panels L21 come from right-side triangular solves and the trailing update runs in place;
    the solves then use all of W as the block factor [L11 0; L21 I] (S set aside), because
    triangular solves on a contiguous matrix are several times faster than on a sub-block view
    (2 threads: 0.47 s → 0.34 s on that Hessian).

    Below float64, X gets one step of iterative refinement: R = B − A X in float64, X += A⁻¹ R with
    the same factors.

    Returns (X, k), or (None, k) when S is singular or the result's normwise backward error
    ‖AX − B‖ / (‖A‖‖X‖ + ‖B‖) exceeds 1e3·eps (a nearly singular leading block can amplify
    rounding in S), for the caller to fall back to a plain LU solve.
    """
    n = A.shape[0]
    W = A.clone()  # right-looking: L11 and L21 overwrite their blocks, the trailing part becomes S
    k = 0
    while k < n:
        e = min(n, k + CHOLESKY_BLOCK)
        Ljj, info = torch.linalg.cholesky_ex(W[k:e, k:e])
        if int(info) != 0:
            break
        W[k:e, k:e] = Ljj
        if e < n:
            L21 = torch.linalg.solve_triangular(Ljj.mT, W[e:, k:e], upper=True, left=False)  # A21 Ljj⁻ᵀ
            W[e:, k:e] = L21
            for c0 in range(e, n, CHOLESKY_BLOCK):  # the lower block triangle of the trailing part
                c1 = min(n, c0 + CHOLESKY_BLOCK)
                # in place, no temporary; the native GEMM (oneDNN for float32 on the CPU: twice MKL's speed)
                _ops.gemm_(W[c0:, c0:c1], L21[c0 - e:], L21[c0 - e:c1 - e].T, beta=1.0, alpha=-1.0)
        k = e
    lu = None
    if k < n:  # set S aside; W's lower triangle becomes the unit-block factor [L11 0; L21 I]
        S = W[k:, k:].tril()
        S = S + S.tril(-1).mT
        W[k:, k:] = torch.eye(n - k, dtype=W.dtype, device=W.device)
        lu = torch.linalg.lu_factor_ex(S)
        if int(lu.info) != 0:
            return None, k

    def solve(R: torch.Tensor) -> torch.Tensor:
        # Both triangular solves run on the whole contiguous W (a sub-block view would be copied first).
        Z = torch.linalg.solve_triangular(W, R, upper=False)  # [L11⁻¹ R1; R2 − L21 L11⁻¹ R1]
        if lu is not None:
            Z[k:] = torch.linalg.lu_solve(lu.LU, lu.pivots, Z[k:])
        return torch.linalg.solve_triangular(W.mT, Z, upper=True)  # x1 = L11⁻ᵀ (y1 − L21ᵀ x2), x2

    X = solve(B)
    if A.dtype == torch.float64:
        if k < n and not bool(_backward_error(A, X, B, A @ X - B) <= 1e3 * torch.finfo(A.dtype).eps):
            return None, k
        return X, k
    # Lower precision: one step of iterative refinement with a float64 residual removes the
    # factorization's rounding, leaving the error of A itself (on the issue-4 Hessian in float32,
    # 4.5e-5 → 2.1e-5 of the float64 solution, for about a tenth more time).
    R = _residual64(A, X, B)
    if k < n and not bool(_backward_error(A, X, B, R) <= 1e3 * torch.finfo(A.dtype).eps):
        return None, k
    X = (X.double() + solve(R.to(A.dtype)).double()).to(A.dtype)
    return X, k


def _residual64(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """B − A X in float64, A converted a block of rows at a time (no float64 copy of A)."""
    Xd = X.double()
    R = B.double()
    for r in range(0, A.shape[0], rows):
        R[r:r + rows] -= A[r:r + rows].double() @ Xd
    return R


def _backward_error(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The normwise backward error ‖R‖ / (‖A‖‖X‖ + ‖B‖) of X for A X = B, R = A X − B (or B − A X)."""
    return R.norm() / (torch.linalg.matrix_norm(A).double() * X.double().norm() + B.double().norm())


# ---- conjugate gradients -----------------------------------------------------------------------


def _block_cg(apply_rows: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, X0: torch.Tensor, *,
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
    Bd = B.to(torch.float64)
    X = X0.to(torch.float64).clone()
    if bool((X != 0).any()):
        R = Bd - apply_rows(X)
    else:
        R = Bd.clone()
    out = X.clone()
    gamma = R.square().sum(1)
    stop = torch.clamp(rtol ** 2 * Bd.square().sum(1), min=atol ** 2)
    niter = torch.zeros(N, dtype=torch.int64, device=dev)
    optimal = gamma <= stop
    final_gamma = gamma.clone()
    active = torch.nonzero(~optimal).flatten()
    X, R = X[active].contiguous(), R[active].contiguous()
    Z = precondition(R) if precondition is not None else R
    rz = (R * Z).sum(1) if precondition is not None else gamma[active]
    Pd = Z.clone()
    negative_curvature = False
    bar = progress_bar(range(maxiter), progress, desc="cg", unit="it")
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
        g = _ops.cg_step(X, R, Pd, AP, alpha)
        niter[active] += 1
        final_gamma[active] = g
        converged = g <= stop[active]
        optimal[active] = converged
        done = converged | ~curvature_ok | ~torch.isfinite(g)
        if bool(done.any()):
            if not bool(curvature_ok.all()):
                logger.warning("cg: %d system(s) broke down (pᵀ(H + λI)p = 0 or not finite); increase "
                               "hessian_perturbation", int((~curvature_ok).sum()))
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
        _ops.cg_direction(Pd, Z, beta)
        if progress:
            bar.set_postfix(active=int(active.numel()))
    if active.numel():
        out[active] = X
    if negative_curvature:
        logger.warning("cg: H + λI has negative curvature along some search directions (it is not positive "
                       "definite); CG may converge slowly or not at all: consider a larger hessian_perturbation")
    return out, {"niter": niter, "optimal": optimal, "gamma": final_gamma}


def _orthonormal_rows(W: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (as rows) of the row space of W [k, P], rank-revealing: directions whose
    singular value is below 1e-12 of the largest are dropped (float64). Householder QR of Wᵀ, then
    the SVD R = U S Vᵀ of the small [k, k] factor: the singular values of W to the same accuracy as
    an SVD of W itself, in about half the time for k ≪ P. The basis Q U is formed by applying the
    reflectors to U (ormqr) rather than forming Q and multiplying (5.8–7.4 against 7.6–8.8 ms for
    k = 64, P = 4,810 at 2 threads)."""
    k, P = W.shape
    if k == 0:
        return W
    A, tau = torch.geqrf(W.T)  # W.T is column-major: LAPACK takes it without a copy
    r = min(k, P)
    U, S, _ = torch.linalg.svd(A[:r].triu())
    if not float(S[0]) > 0:
        return W[:0]
    keep = U[:, S > 1e-12 * S[0]]
    E = W.new_zeros(keep.shape[1], P)  # [U_keep; 0] as a column-major [P, rank]
    E[:, :r] = keep.T
    return torch.ormqr(A, tau, E.T).T


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


def _block_krylov_cg(apply_rows: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, X0: torch.Tensor, *,
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
    Bd = B.to(torch.float64)
    X = X0.to(torch.float64).clone()
    R = Bd - apply_rows(X).to(torch.float64) if bool((X != 0).any()) else Bd.clone()
    gamma = R.square().sum(1)
    stop = torch.clamp(rtol ** 2 * Bd.square().sum(1), min=atol ** 2)
    niter = torch.zeros(N, dtype=torch.int64, device=dev)
    indefinite = False
    stalled = torch.zeros(N, dtype=torch.bool, device=dev)
    steps = 0
    bar = progress_bar(range(maxiter), progress, desc="block cg", unit="step")
    tick = iter(bar)
    for _ in range(max_rounds):
        todo = torch.nonzero((gamma > stop) & ~stalled).flatten()
        if todo.numel() == 0 or steps >= maxiter:
            break
        active, Xa, Ra = todo, X[todo], R[todo]
        X_before = Xa.clone()
        Pm = _orthonormal_rows(precondition(Ra) if precondition is not None else Ra)
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
            Pm = _orthonormal_rows(torch.addmm(Z, beta.T, Pm, alpha=-1))
            if progress:
                bar.set_postfix(active=int(active.numel()))
        if active.numel():
            X[active] = Xa
        # the rule on the true residual of every row this round worked on
        R_true = Bd[todo] - apply_rows(X[todo]).to(torch.float64)
        g_true = R_true.square().sum(1)
        stalled[todo] = g_true > 0.25 * gamma[todo]  # another round must at least halve ‖r‖
        worse = g_true > gamma[todo]  # keep the better iterate of the row
        X[todo[worse]] = X_before[worse]
        better = todo[~worse]
        R[better], gamma[better] = R_true[~worse], g_true[~worse]
    if progress:
        bar.close()
    if indefinite:
        logger.warning("cg: H + λI is not positive definite on the search directions (it is indefinite); "
                       "block CG still converges when no row breaks down, but consider a larger "
                       "hessian_perturbation")
    return X, {"niter": niter, "optimal": gamma <= stop, "gamma": gamma}


def _cg_info(stats: Dict[str, torch.Tensor]) -> Dict[str, Dict]:
    niter, optimal, gamma = (stats[k].tolist() for k in ("niter", "optimal", "gamma"))
    return {f"batch_{i}": {"niter": int(niter[i]), "optimal": bool(optimal[i]), "gamma": float(gamma[i])}
            for i in range(len(niter))}


def _check_cg_args(rtol, atol, maxiter, where: str) -> Tuple[float, float]:
    rtol = _check_nonnegative(rtol, "rtol", where)
    atol = _check_nonnegative(atol, "atol", where)
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0):
        raise ValueError(f"{where}: maxiter must be an int >= 0 or None, got {maxiter!r}")
    return rtol, atol


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


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Cg)
def solve_batch_cg(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                   hessian_perturbation: float = 0.0, *, x0: Optional[torch.Tensor] = None, rtol: float = 1e-7,
                   atol: float = 1e-7, maxiter: Optional[int] = None, progress: bool = False,
                   preconditioner: Optional[str] = None, preconditioner_rank: int = 32,
                   hutchinson_samples: int = 32, block_krylov: bool = True, mode: str = "hessian",
                   product_dtype: Optional[torch.dtype] = torch.float64) -> InverseHvpResult:
    r"""Conjugate gradients for (H + λI) x_i = b_i, all rows of b ([N, P]) at once.

    Each iteration applies H + λI to one block of vectors of the still-active rows in one pass
    over the data (:meth:`HessianOperator.apply_rows`); a row stops when
    ‖(H + λI) x_i − b_i‖ ≤ max(rtol·‖b_i‖, atol) and costs nothing more. Iterates and scalars are
    float64 whatever the model's dtype.

    With ``block_krylov=True`` (default) the rows share one search block (breakdown-free block CG,
    see ``_block_krylov_cg``): k steps give every row the best solution from the block Krylov
    space of all rows' residuals, so N related right-hand sides converge in a few times fewer
    products than N separate CGs, also on mildly indefinite H + λI; ``optimal`` is then judged on
    the true residual. With ``block_krylov=False`` each row runs its own CG recurrence (fused native
    updates; ``optimal`` judged on the recursive residual, as pyDVL does).

    Args:
        x0: initial guess, [P] (for every row) or [N, P]; default b (as pyDVL).
        rtol, atol: the stopping rule above.
        maxiter: iterations per row (block steps for block_krylov); default 10·P.
        progress: a bar over iterations with the number of active rows.
        preconditioner: None, ``"jacobi"`` (Hutchinson estimate of diag(H + λI) from
            ``hutchinson_samples`` probes) or ``"nystrom"`` (randomized Nyström of rank
            ``preconditioner_rank``); each costs one extra pass.
        block_krylov: share one Krylov space among the rows (fewer products when N > 1).
        mode: ``"hessian"`` or ``"gauss_newton"`` (see :func:`hessian_operator`).
        product_dtype: the dtype of the Hessian products. float64 (default) runs them on a float64
            copy of the model when it is float32 or lower: about twice the cost on a CPU, but the
            rule can then be met — float32 products carry errors near 1e-7·‖A‖·‖x‖, which for an
            ill-conditioned H + λI exceed rtol·‖b‖ at rtol 1e-6. None computes in the model's dtype.

    Returns:
        InverseHvpResult: x of b's shape (model dtype); info ``batch_{i}`` → ``{"niter", "optimal",
        "gamma"}`` (gamma = ‖r_i‖²) per row, plus ``num_passes`` (passes over the data) and
        ``preconditioner``.
    """
    where = "solve_batch_cg"
    _check_model(model, where)
    B, one = _check_rhs(model, b, where)
    rtol, atol = _check_cg_args(rtol, atol, maxiter, where)
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"{where}: preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    lam = _check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    if product_dtype is not None and not (isinstance(product_dtype, torch.dtype) and product_dtype.is_floating_point):
        raise TypeError(f"{where}: product_dtype must be None or a floating torch.dtype, got {product_dtype!r}")
    op = HessianOperator(model, training_data, hessian_perturbation=lam, mode=mode, dtype=product_dtype)
    X0 = _initial_guess(x0, B, model, where, "x0")
    precondition = None
    used = preconditioner
    if preconditioner == "jacobi":
        precondition = jacobi_preconditioner(op, hutchinson_samples)
    elif preconditioner == "nystrom":
        precondition = nystrom_preconditioner(op, preconditioner_rank)
        if precondition is None:
            logger.warning("%s: H + λI is not positive definite on the Nyström sketch; running without "
                           "preconditioner (increase hessian_perturbation)", where)
            used = None
    maxiter = 10 * model.num_params if maxiter is None else maxiter
    solver = _block_krylov_cg if block_krylov else _block_cg
    # The iteration holds about seven float64 [rows, P] blocks (x, r, the true residual or z, the
    # search block, its product, a copy of x); right-hand sides that do not fit the memory budget
    # together are solved in groups, each a block of its own.
    N = B.shape[0]
    group = chunk_size(N, 7 * model.num_params * 8, model.device, what="CG right-hand sides")
    parts = [solver(op.apply_rows, B[s:s + group], X0[s:s + group], rtol=rtol, atol=atol, maxiter=maxiter,
                    precondition=precondition, progress=progress) for s in range(0, N, group)]
    X = torch.cat([x for x, _ in parts]).to(model.dtype)
    stats = {key: torch.cat([st[key] for _, st in parts]) for key in ("niter", "optimal", "gamma")}
    info = _cg_info(stats)
    info.update(num_passes=op.num_passes, preconditioner=used)
    return InverseHvpResult(x=X[0] if one else X, info=info)


def solve_cg(hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, x0: Optional[torch.Tensor] = None,
             rtol: float = 1e-7, atol: float = 1e-7, maxiter: Optional[int] = None) -> InverseHvpResult:
    r"""Conjugate gradients for one system A x = b, A given by ``hvp`` ([P] → [P]).

    Stops when ‖A x − b‖ ≤ max(rtol·‖b‖, atol). Args as :func:`solve_batch_cg` (x0 default b,
    maxiter default 10·P).

    Returns:
        InverseHvpResult: x [P] in b's dtype, info ``{"niter", "optimal", "gamma"}``.
    """
    where = "solve_cg"
    if not callable(hvp):
        raise TypeError(f"{where}: hvp must be callable ([P] -> [P]), got {type(hvp).__name__}")
    if not isinstance(b, torch.Tensor) or b.dim() != 1 or not b.is_floating_point():
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"{where}: b must be a floating [P] vector, got {got}")
    rtol, atol = _check_cg_args(rtol, atol, maxiter, where)
    P = b.shape[0]
    if x0 is None:
        X0 = b.unsqueeze(0)
    elif not isinstance(x0, torch.Tensor) or x0.shape != b.shape:
        raise ValueError(f"{where}: x0 must have b's shape {tuple(b.shape)}, got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    else:
        X0 = x0.to(b.device).unsqueeze(0)

    def apply_rows(V: torch.Tensor) -> torch.Tensor:
        return hvp(V[0].to(b.dtype)).reshape(1, P).to(V.dtype)

    X, stats = _block_cg(apply_rows, b.unsqueeze(0), X0, rtol=rtol, atol=atol,
                         maxiter=10 * P if maxiter is None else maxiter)
    info = _cg_info(stats)["batch_0"]
    return InverseHvpResult(x=X[0].to(b.dtype), info=info)


# ---- LiSSA -------------------------------------------------------------------------------------


def _shuffled_batches(training_data: Iterable, where: str) -> Iterator:
    """Batches of ``training_data`` without end: a DataLoader over a map-style dataset is reshuffled
    every epoch (same batch size and collate_fn); any other iterable is cycled as it is."""
    from torch.utils.data import DataLoader, IterableDataset

    source = training_data
    if isinstance(training_data, DataLoader) and not isinstance(training_data.dataset, IterableDataset) \
            and training_data.batch_size is not None:
        source = DataLoader(training_data.dataset, batch_size=training_data.batch_size, shuffle=True,
                            collate_fn=training_data.collate_fn)
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{where}: training_data yielded no batch")


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Lissa)
def solve_lissa(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                hessian_perturbation: float = 0.0, *, maxiter: int = 1000, dampen: float = 0.0, scale: float = 10.0,
                h0: Optional[torch.Tensor] = None, rtol: float = 1e-4, progress: bool = False) -> InverseHvpResult:
    r"""LiSSA (Agarwal et al. 2017): for all rows of b at once, iterate

        h ← b + (1 − dampen)·h − (H_batch + λI)·h / scale

    with H_batch the Hessian on a fresh shuffled batch each step (the loader is iterated without
    end, reshuffled every epoch), and return x = h / scale. A row stops when
    max_j |Δh_j / h_j| < rtol; stopped rows cost nothing more.

    Args:
        h0: initial h, [P] or [N, P]; default b.
        maxiter: steps at most.

    Returns:
        InverseHvpResult: x of b's shape; info ``max_perc_residual`` and ``mean_perc_residual``
        (100·max and 100·mean of |Δh/h| over every entry at each row's last step), plus ``niter``
        (steps per row, a list).

    Raises:
        RuntimeError: the iterate became non-finite (increase scale or dampen).
    """
    where = "solve_lissa"
    _check_model(model, where)
    check_training_data(training_data, where)
    B, one = _check_rhs(model, b, where)
    lam = _check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    dampen = _check_nonnegative(dampen, "dampen", where)
    rtol = _check_nonnegative(rtol, "rtol", where)
    if not (float(scale) > 0 and float(scale) != float("inf")):
        raise ValueError(f"{where}: scale must be a finite number > 0, got {scale!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"{where}: maxiter must be an int >= 0, got {maxiter!r}")
    scale = float(scale)
    N, P = B.shape
    out = _initial_guess(h0, B, model, where, "h0")
    max_rel = torch.full((N,), float("inf"), dtype=torch.float64, device=B.device)
    sum_rel = torch.full((N,), float("inf"), dtype=torch.float64, device=B.device)
    niter = torch.zeros(N, dtype=torch.int64, device=B.device)
    active = torch.arange(N, device=B.device)
    h, Bact = out.clone(), B
    batches = _shuffled_batches(training_data, where)
    bar = progress_bar(range(maxiter), progress, desc="lissa", unit="step")
    for _ in bar:
        if active.numel() == 0:
            break
        x, y = next(batches)
        with data_errors(where, "a batch of training_data", x, y):
            Hh = model.hvp(x, y, h)
        mx, sm = _ops.lissa_step(h, Bact, Hh, dampen, scale, lam)
        if bool(torch.isnan(mx).any()):
            raise RuntimeError(f"{where}: the iterate h became non-finite (NaN or inf); LiSSA diverges when "
                               f"‖I − (H + λI)/scale‖ ≥ 1: increase scale (now {scale}) or dampen (now {dampen})")
        niter[active] += 1
        max_rel[active], sum_rel[active] = mx, sm
        done = mx < rtol
        if bool(done.any()):
            out[active[done]] = h[done]
            keep = torch.nonzero(~done).flatten()
            active, h, Bact = active[keep], h[keep], Bact[keep]
        if progress:
            bar.set_postfix(active=int(active.numel()), max_residual=float(mx.max()) if mx.numel() else 0.0)
    if active.numel():
        out[active] = h
    x = out / scale
    max_perc = 100 * float(max_rel.max()) if N else 0.0
    mean_perc = 100 * float(sum_rel.sum()) / (N * P) if N * P else 0.0
    logger.info("%s: max residual %.4g %%, mean residual %.4g %%", where, max_perc, mean_perc)
    info = {"max_perc_residual": max_perc, "mean_perc_residual": mean_perc, "niter": niter.tolist()}
    return InverseHvpResult(x=x[0] if one else x, info=info)


# ---- low rank (Arnoldi / Lanczos) --------------------------------------------------------------


@dataclass
class LowRankProductRepresentation:
    r"""A ≈ V D Vᵀ: ``eigen_vals`` the diagonal of D ([r]), ``projections`` V ([P, r], orthonormal
    columns)."""

    eigen_vals: torch.Tensor
    projections: torch.Tensor

    def __post_init__(self):
        for name in ("eigen_vals", "projections"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"LowRankProductRepresentation: {name} must be a torch.Tensor, got "
                                f"{type(getattr(self, name)).__name__}")
        r = self.eigen_vals.shape[0] if self.eigen_vals.dim() == 1 else None
        if r is None or self.projections.dim() != 2 or self.projections.shape[1] != r:
            raise ValueError(f"LowRankProductRepresentation: eigen_vals must be [r] and projections [P, r], got "
                             f"{tuple(self.eigen_vals.shape)} and {tuple(self.projections.shape)}")
        if self.eigen_vals.device != self.projections.device:
            raise ValueError(f"LowRankProductRepresentation: eigen_vals and projections must be on the same "
                             f"device, got {self.eigen_vals.device} and {self.projections.device}")

    @property
    def device(self) -> torch.device:
        return self.eigen_vals.device

    def to(self, device) -> "LowRankProductRepresentation":
        """The same representation with both tensors on ``device``."""
        return LowRankProductRepresentation(self.eigen_vals.to(device), self.projections.to(device))


def _orthonormalize(V: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Rows of V made orthonormal to the rows of Q and to each other (classical Gram-Schmidt twice,
    then QR); rows that were (numerically) in span(Q) or dependent are dropped. V, Q float64."""
    if V.shape[0] == 0:
        return V
    norms = V.norm(dim=1, keepdim=True)
    V = V / torch.clamp(norms, min=torch.finfo(V.dtype).tiny)
    for _ in range(2):
        if Q.shape[0]:
            V = V - (V @ Q.T) @ Q
    Qv, Rv = torch.linalg.qr(V.T)
    keep = Rv.diagonal().abs() > 1e-10
    V = Qv.T[keep]
    if Q.shape[0] and V.shape[0]:
        V = V - (V @ Q.T) @ Q
        V = V / V.norm(dim=1, keepdim=True)
    return V


def _lanczos_top_eigenpairs(apply_rows: Callable[[torch.Tensor], torch.Tensor], P: int, k: int, *,
                            device: torch.device, krylov_dimension: Optional[int] = None, tol: float = 1e-6,
                            max_iter: Optional[int] = None, block_size: int = 1, seed: int = 0,
                            progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The k eigenpairs of a symmetric A ([P, P], given by ``apply_rows`` on [D, P] row blocks)
    largest in absolute value, by thick-restart block Lanczos with full reorthogonalization, in
    float64 on ``device``.

    The basis Q ([m, P], orthonormal rows) and AQ are kept; Rayleigh-Ritz on T = Q A Qᵀ gives Ritz
    pairs (θ_i, u_i) with exact residuals r_i = A u_i − θ_i u_i ∈ span(Q, AQ). The basis grows by the
    residuals of the (up to ``block_size``) wanted pairs not yet converged — with block_size 1 this is
    the Lanczos recurrence — orthogonalized against Q twice, one call of ``apply_rows`` each. When it
    would exceed ``krylov_dimension`` vectors it is restarted from the Ritz vectors of the largest
    |θ| (a thick restart). Pair i has converged when ‖r_i‖ ≤ tol·|θ_i| (ARPACK's rule).

    Returns:
        (θ [k] ascending, V [P, k]) float64; ``max_iter`` caps the calls of ``apply_rows``
        (default 10·P); on reaching it the best pairs found are returned with a warning.
    """
    k = min(int(k), P)
    if k <= 0:
        return (torch.zeros(0, dtype=torch.float64, device=device),
                torch.zeros(P, 0, dtype=torch.float64, device=device))
    bs = max(1, min(int(block_size), k))
    m_max = krylov_dimension if krylov_dimension is not None else max(4 * k, 20)
    m_max = min(P, max(int(m_max), k + bs))
    tol = tol if tol > 0 else torch.finfo(torch.float64).eps
    max_iter = 10 * P if max_iter is None else int(max_iter)
    gen = torch.Generator(device=device).manual_seed(seed)
    Q = torch.zeros(0, P, dtype=torch.float64, device=device)
    AQ = torch.zeros_like(Q)
    new = torch.randn(bs, P, generator=gen, dtype=torch.float64, device=device)
    bar = progress_bar(range(max_iter), progress, desc="lanczos", unit="pass")
    theta = S = sel = None
    converged = False
    for _ in bar:
        new = _orthonormalize(new, Q)
        if new.shape[0] == 0:
            if Q.shape[0] >= P:
                break
            new = _orthonormalize(torch.randn(bs, P, generator=gen, dtype=torch.float64, device=device), Q)
            if new.shape[0] == 0:
                break
        Q = torch.cat([Q, new])
        AQ = torch.cat([AQ, apply_rows(new).to(torch.float64)])
        T = Q @ AQ.T
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        order = torch.argsort(theta.abs(), descending=True)
        sel = order[:k]
        Ssel = S[:, sel]
        residual = Ssel.T @ AQ - theta[sel, None] * (Ssel.T @ Q)
        res_norm = residual.norm(dim=1)
        ok = res_norm <= tol * theta[sel].abs()
        if progress:
            bar.set_postfix(basis=int(Q.shape[0]), converged=int(ok.sum()))
        if (bool(ok.all()) and sel.numel() == k) or Q.shape[0] >= P:
            converged = True
            break
        new = residual[~ok][:bs]
        if Q.shape[0] + new.shape[0] > m_max:
            keep = order[:max(k, min(m_max - bs, (m_max + k) // 2))]
            Q, AQ = S[:, keep].T @ Q, S[:, keep].T @ AQ
            theta, S, sel = theta[keep], torch.eye(keep.numel(), dtype=torch.float64, device=device), \
                torch.arange(min(k, keep.numel()), device=device)
    if not converged:
        logger.warning("lanczos: the %d eigenpairs did not converge to tol=%g within max_iter=%d products; "
                       "returning the best approximation found; raise max_iter or krylov_dimension", k, tol, max_iter)
    vals = theta[sel]
    vecs = (S[:, sel].T @ Q).T
    asc = torch.argsort(vals)
    return vals[asc], vecs[:, asc].contiguous()


def _arpack_top_eigenpairs(apply_rows: Callable[[torch.Tensor], torch.Tensor], P: int, k: int, *,
                           krylov_dimension: Optional[int], tol: float, max_iter: Optional[int],
                           device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same through scipy's ARPACK (``eigsh``, which="LM") on the CPU."""
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def mv(v):
        V = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(1, -1), device=device)
        return apply_rows(V).to(torch.float64).cpu().numpy()[0]

    try:
        vals, vecs = eigsh(LinearOperator((P, P), matvec=mv, dtype=np.float64), k=k, maxiter=max_iter, tol=tol,
                           ncv=krylov_dimension, return_eigenvectors=True)
    except ArpackNoConvergence as exc:
        logger.warning("arpack: no convergence for max_iter=%s, tol=%g, krylov_dimension=%s, rank %d; returning "
                       "the pairs that converged: %s", max_iter, tol, krylov_dimension, k, exc)
        vals, vecs = exc.eigenvalues, exc.eigenvectors
    return torch.as_tensor(vals, device=device), torch.as_tensor(vecs, device=device)


def _low_rank(apply_rows: Callable[[torch.Tensor], torch.Tensor], P: int, dtype: torch.dtype, device: torch.device, *,
              rank_estimate: int, krylov_dimension: Optional[int], tol: float, max_iter: Optional[int],
              eigen_solver: str, block_size: int, progress: bool, where: str) -> LowRankProductRepresentation:
    if eigen_solver not in EIGEN_SOLVERS:
        raise ValueError(f"{where}: eigen_solver must be one of {EIGEN_SOLVERS}, got {eigen_solver!r}")
    if isinstance(rank_estimate, bool) or not isinstance(rank_estimate, int) or not 1 <= rank_estimate <= P:
        raise ValueError(f"{where}: rank_estimate must be an int in [1, P = {P}], got {rank_estimate!r}")
    if krylov_dimension is not None and not (isinstance(krylov_dimension, int) and rank_estimate < krylov_dimension):
        raise ValueError(f"{where}: krylov_dimension must be None or an int > rank_estimate = {rank_estimate}, "
                         f"got {krylov_dimension!r}")
    if eigen_solver == "arpack":
        vals, vecs = _arpack_top_eigenpairs(apply_rows, P, rank_estimate, krylov_dimension=krylov_dimension, tol=tol,
                                            max_iter=max_iter, device=device)
    else:
        vals, vecs = _lanczos_top_eigenpairs(apply_rows, P, rank_estimate, device=device,
                                             krylov_dimension=krylov_dimension, tol=tol, max_iter=max_iter,
                                             block_size=block_size, progress=progress)
    return LowRankProductRepresentation(vals.to(dtype), vecs.to(dtype))


def lanzcos_low_rank_hessian_approx(hessian_vp: Callable[[torch.Tensor], torch.Tensor], matrix_shape: Tuple[int, int],
                                    hessian_perturbation: float = 0.0, rank_estimate: int = 10,
                                    krylov_dimension: Optional[int] = None, tol: float = 1e-6,
                                    max_iter: Optional[int] = None, device: Optional[torch.device] = None,
                                    eigen_computation_on_gpu: bool = False, torch_dtype: Optional[torch.dtype] = None,
                                    *, eigen_solver: str = "lanczos", block_size: int = 1,
                                    progress: bool = False) -> LowRankProductRepresentation:
    r"""The ``rank_estimate`` eigenpairs largest in |θ| of A = H + λI, H given by ``hessian_vp``
    ([P] → [P]), as V D Vᵀ (the name keeps pyDVL's spelling).

    Args:
        matrix_shape: (P, P).
        krylov_dimension: largest basis (Lanczos; default max(4·rank, 20)) or ARPACK's ncv (default
            scipy's, max(2·rank + 1, 20)).
        tol: a pair has converged when ‖A v − θ v‖ ≤ tol·|θ|.
        max_iter: Lanczos: most products with A (default 10·P); ARPACK: its maxiter.
        device: where the products and (Lanczos) the eigen computation run (default CPU).
        eigen_computation_on_gpu: accepted for compatibility; the Lanczos solver runs on ``device``.
        torch_dtype: dtype of the result (default torch's default dtype).
        eigen_solver: ``"lanczos"`` (torch, on ``device``) or ``"arpack"`` (scipy, CPU).
        block_size: Lanczos directions added per step (each one product with ``hessian_vp``).
    """
    where = "lanzcos_low_rank_hessian_approx"
    if not callable(hessian_vp):
        raise TypeError(f"{where}: hessian_vp must be callable ([P] -> [P]), got {type(hessian_vp).__name__}")
    if len(matrix_shape) != 2 or matrix_shape[0] != matrix_shape[1] or matrix_shape[0] < 1:
        raise ValueError(f"{where}: matrix_shape must be (P, P) with P >= 1, got {tuple(matrix_shape)}")
    P = int(matrix_shape[0])
    lam = _check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    device = torch.device(device or "cpu")
    dtype = torch_dtype or torch.get_default_dtype()

    def apply_rows(V: torch.Tensor) -> torch.Tensor:
        Vm = V.to(dtype)
        return torch.stack([hessian_vp(v).reshape(P) for v in Vm]).to(V.dtype) + lam * V

    return _low_rank(apply_rows, P, dtype, device, rank_estimate=rank_estimate, krylov_dimension=krylov_dimension,
                     tol=tol, max_iter=max_iter, eigen_solver=eigen_solver, block_size=block_size,
                     progress=progress, where=where)


def model_hessian_low_rank(model: TorchTwiceDifferentiable, training_data: Iterable, hessian_perturbation: float = 0.0,
                           rank_estimate: int = 10, krylov_dimension: Optional[int] = None, tol: float = 1e-6,
                           max_iter: Optional[int] = None, eigen_computation_on_gpu: bool = False, *,
                           eigen_solver: str = "lanczos", block_size: int = 4, mode: str = "hessian",
                           progress: bool = False) -> LowRankProductRepresentation:
    r"""The ``rank_estimate`` eigenpairs largest in |θ| of H + λI, H the Hessian of the model's mean
    training loss, as V D Vᵀ (values and vectors in the model's dtype, on its device).

    Each product with H + λI is one pass over the data for a block of ``block_size`` vectors: the
    default 4 needs about half the passes of single-vector Lanczos for each pass costing little
    more (``benchmarks/results/solvers_cpu.md``); see :func:`lanzcos_low_rank_hessian_approx` for
    the other arguments.
    """
    where = "model_hessian_low_rank"
    _check_model(model, where)
    lam = _check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    op = HessianOperator(model, training_data, hessian_perturbation=lam, mode=mode)
    return _low_rank(op.apply_rows, model.num_params, model.dtype, model.device, rank_estimate=rank_estimate,
                     krylov_dimension=krylov_dimension, tol=tol, max_iter=max_iter, eigen_solver=eigen_solver,
                     block_size=block_size, progress=progress, where=where)


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Arnoldi)
def solve_arnoldi(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                  hessian_perturbation: float = 0.0, *, rank_estimate: int = 10, krylov_dimension: Optional[int] = None,
                  low_rank_representation: Optional[LowRankProductRepresentation] = None, tol: float = 1e-6,
                  max_iter: Optional[int] = None, eigen_computation_on_gpu: bool = False,
                  eigen_solver: str = "lanczos", block_size: int = 4, progress: bool = False) -> InverseHvpResult:
    r"""x = V D⁻¹ Vᵀ b, V D Vᵀ the ``rank_estimate`` eigenpairs of H + λI largest in |θ|
    (:func:`model_hessian_low_rank`), or the given ``low_rank_representation`` (then the other
    arguments of the eigen computation are ignored; it is moved to b's device).

    Returns:
        InverseHvpResult: x of b's shape; info ``eigenvalues`` ([r]) and ``eigenvectors`` ([P, r]).
    """
    where = "solve_arnoldi"
    _check_model(model, where)
    B, one = _check_rhs(model, b, where)
    if low_rank_representation is None:
        low_rank_representation = model_hessian_low_rank(
            model, training_data, hessian_perturbation, rank_estimate, krylov_dimension, tol, max_iter,
            eigen_computation_on_gpu, eigen_solver=eigen_solver, block_size=block_size, progress=progress)
    elif not isinstance(low_rank_representation, LowRankProductRepresentation):
        raise TypeError(f"{where}: low_rank_representation must be a LowRankProductRepresentation, got "
                        f"{type(low_rank_representation).__name__}")
    else:
        if low_rank_representation.projections.shape[0] != model.num_params:
            raise ValueError(f"{where}: low_rank_representation.projections must be [P, r] with P = "
                             f"{model.num_params}, got {tuple(low_rank_representation.projections.shape)}")
        logger.info("%s: using the given low rank representation; ignoring the eigen computation arguments", where)
        low_rank_representation = low_rank_representation.to(B.device)
    V = low_rank_representation.projections.to(B.dtype)
    vals = low_rank_representation.eigen_vals.to(B.dtype)
    x = ((B @ V) / vals) @ V.T
    info = {"eigenvalues": low_rank_representation.eigen_vals, "eigenvectors": low_rank_representation.projections}
    return InverseHvpResult(x=x[0] if one else x, info=info)
