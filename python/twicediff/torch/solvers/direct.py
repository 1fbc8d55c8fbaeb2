"""Direct: the explicit Hessian of the mean loss, factored (Cholesky as far as H + λI is positive
definite, LU beyond)."""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Tuple

import torch

from ... import ops
from ...errors import MemoryBudgetError
from ...twice_differentiable import InverseHvpResult
from ..batch import check_training_data
from ..finite import CAUSE, all_finite
from ..twice_differentiable import TorchTwiceDifferentiable, check_model
from .common import LAMBDA, check_nonnegative, check_rhs

logger = logging.getLogger(__name__)

__all__ = ["CHOLESKY_BLOCK", "cholesky_then_lu", "solve_linear"]


def solve_linear(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                 hessian_perturbation: float = 0.0, *, progress: bool = False) -> InverseHvpResult:
    r"""x = (H + λI)⁻¹ b with the explicit Hessian H = Σ_b (n_b/N) H_b ([P, P], one pass over the
    data, :meth:`TorchTwiceDifferentiable.mean_hessian`).

    Solved by Cholesky; when H + λI is not positive definite, by Cholesky of its positive definite
    leading block and LU of the Schur complement of the rest (``cholesky_then_lu``), or by a
    plain LU solve, noted in ``info["solver"]``.

    Returns:
        InverseHvpResult: x of b's shape; info ``hessian`` (H without λ, [P, P]), ``solver``
        (``"cholesky"``, ``"cholesky+lu"`` or ``"lu"``) and ``positive_definite_block`` (the k
        leading rows factored by Cholesky).

    A model in bfloat16 or float16 has its Hessian factored in float32 (x is returned in its dtype).

    Raises:
        MemoryBudgetError: the [P, P] matrices do not fit the memory free on the device (before
            anything is allocated; names P, the bytes and the alternatives).
        RuntimeError: H + λI is singular: a factorization fails, or the solution leaves a residual
            above a tenth of ‖b‖ (advises a larger ``hessian_perturbation``).
    """
    where = "solve_linear"
    check_model(model, where)
    check_training_data(training_data, where)
    B, one = check_rhs(model, b, where)
    lam = check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    P = model.num_params
    _check_fits(P, model.dtype, model.device, where)
    hessian = model.mean_hessian(training_data, progress=progress)
    if not all_finite(hessian):
        raise ValueError(f"{where}: the Hessian of training_data has NaN or inf entries: the loss or its curvature is "
                         f"not finite on some training points ({CAUSE})")
    # The factorizations take float32 and float64; a half-precision model's Hessian (assembled in
    # its dtype, as hessian() returns it) is factored in float32 and the solution cast back.
    work = torch.float32 if hessian.dtype in (torch.bfloat16, torch.float16) else hessian.dtype
    matrix = hessian.to(work, copy=True)
    matrix.diagonal().add_(lam)
    rhs = B.T.to(work)
    x, k = cholesky_then_lu(matrix, rhs)
    solver = "cholesky" if k == P else ("lu" if k == 0 else "cholesky+lu")
    if x is None:
        try:
            x = torch.linalg.solve(matrix, rhs)
        except torch.linalg.LinAlgError as exc:
            raise RuntimeError(f"{where}: H + λI is singular; increase {LAMBDA} (now {lam}). "
                               f"{exc}") from exc
        solver = "lu"
    if solver != "cholesky":
        logger.info("solve_linear: H + λI is not positive definite; solved by %s (positive definite leading "
                    "block of %d of %d)", solver, k, P)
    # A (numerically) singular H + λI can factor without complaint and give an x that does not
    # solve the system: every column must meet its right-hand side to a tenth of its norm.
    residual = _residual64(matrix, x, rhs).norm(dim=0)
    worst = float((residual / rhs.double().norm(dim=0).clamp_min(1e-300)).max()) if rhs.shape[1] else 0.0
    if not worst <= 0.1:
        raise RuntimeError(f"{where}: H + λI is singular (or nearly): the solution leaves a residual of "
                           f"{worst:.3g}·‖b‖; increase {LAMBDA} (now {lam})")
    x = x.T.to(model.dtype)
    x = x.contiguous()
    return InverseHvpResult(x=x[0] if one else x,
                            info={"hessian": hessian, "solver": solver, "positive_definite_block": k})


CHOLESKY_BLOCK = 256

# [P, P] matrices Direct holds at its peak: the Hessian (returned in info), H + λI and its factor.
_DIRECT_COPIES = 3


def _check_fits(P: int, dtype: torch.dtype, device: torch.device, where: str) -> None:
    """MemoryBudgetError before anything is allocated when Direct's [P, P] matrices exceed the memory
    free on the device (the explicit Hessian is what Direct is; no budget can chunk it away)."""
    from ...memory import free_bytes

    elem = max(torch.finfo(dtype).bits // 8, 4)
    need = _DIRECT_COPIES * P * P * elem
    free = free_bytes(device)
    if need > free:
        raise MemoryBudgetError(
            f"{where}: Direct factors the explicit [P, P] Hessian; with P = {P:,} parameters that needs about "
            f"{need:,} bytes ({_DIRECT_COPIES} [P, P] matrices of {elem}-byte elements) but {free:,} bytes are "
            f"free on {device}. Use an iterative or low-rank method: inversion_method='cg' (CG), 'arnoldi' "
            "(low rank), or EK-FAC where available; or freeze parameters (requires_grad=False) to shrink P")


def _prepare_direct(model: TorchTwiceDifferentiable, training_data: Iterable, hessian_perturbation: float,
                    **options) -> Tuple[dict, int]:
    """What :func:`solve_linear` checks before its right-hand sides exist (an influence computation
    calls it before it computes the test gradients): that its [P, P] matrices can fit, else
    MemoryBudgetError before anything is computed. Returns the options unchanged and 0 bytes held."""
    check_model(model, "solve_linear")
    _check_fits(model.num_params, model.dtype, model.device, "solve_linear")
    return options, 0


solve_linear.prepare = _prepare_direct


def cholesky_then_lu(A: torch.Tensor, B: torch.Tensor) -> Tuple[Optional[torch.Tensor], int]:
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
                ops.gemm_(W[c0:, c0:c1], L21[c0 - e:], L21[c0 - e:c1 - e].T, beta=1.0, alpha=-1.0)
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
    R = B.to(torch.float64, copy=True)  # B itself is never written (a float64 B is not copied by .double())
    for r in range(0, A.shape[0], rows):
        R[r:r + rows] -= A[r:r + rows].double() @ Xd
    return R


def _backward_error(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The normwise backward error ‖R‖ / (‖A‖‖X‖ + ‖B‖) of X for A X = B, R = A X − B (or B − A X)."""
    return R.norm() / (torch.linalg.matrix_norm(A).double() * X.double().norm() + B.double().norm())
