"""Arnoldi: the low-rank eigen-representation of H + λI (block Lanczos in torch, or ARPACK through
scipy), and x = V D⁻¹ Vᵀ b."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch

from ... import distributed as _distributed
from ...progress import close_bar, progress_bar
from ...twice_differentiable import InverseHvpResult
from ..operator import HessianOperator
from ..twice_differentiable import TorchTwiceDifferentiable, check_model
from .common import check_nonnegative, check_rhs

logger = logging.getLogger(__name__)

__all__ = ["EIGEN_SOLVERS", "LowRankProductRepresentation", "lanzcos_low_rank_hessian_approx",
           "model_hessian_low_rank", "solve_arnoldi"]

#: The eigensolvers ``solve_arnoldi`` takes.
EIGEN_SOLVERS = ("lanczos", "arpack")


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
    bar = progress_bar(range(max_iter), progress, desc="lanczos", unit="pass", count_only=True)
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
    close_bar(bar)
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

    # ARPACK starts from a random vector of its own, different per process: with a process group
    # every rank must start from the same one (twicediff.distributed).
    v0 = None if _distributed.current_group() is None else np.random.default_rng(0).standard_normal(P)
    try:
        vals, vecs = eigsh(LinearOperator((P, P), matvec=mv, dtype=np.float64), k=k, maxiter=max_iter, tol=tol,
                           ncv=krylov_dimension, return_eigenvectors=True, v0=v0)
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
    lam = check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
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
    check_model(model, where)
    lam = check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    op = HessianOperator(model, training_data, hessian_perturbation=lam, mode=mode)
    return _low_rank(op.apply_rows, model.num_params, model.dtype, model.device, rank_estimate=rank_estimate,
                     krylov_dimension=krylov_dimension, tol=tol, max_iter=max_iter, eigen_solver=eigen_solver,
                     block_size=block_size, progress=progress, where=where)


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
    check_model(model, where)
    B, one = check_rhs(model, b, where)
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
