"""Arnoldi: the low-rank eigen-representation of H + λI (block Lanczos in torch, or ARPACK through
scipy), and x = V D⁻¹ Vᵀ b."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch

from ... import distributed as _distributed
from ...errors import MemoryBudgetError
from ...memory import get_memory_budget
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


def _expected_products(k, krylov_dimension, bs) -> Optional[int]:
    """One Krylov basis' worth of products (the basis :func:`_basis_rows` aims at), None where the
    arguments are not integers (their own checks then say so)."""
    ints = all(isinstance(a, int) and not isinstance(a, bool) for a in (k, bs))
    if isinstance(krylov_dimension, int) and not isinstance(krylov_dimension, bool):
        return max(0, krylov_dimension)
    return max(0, 2 * k + 2 * bs, 20) if ints and krylov_dimension is None else None


def _basis_rows(P: int, k: int, bs: int, krylov_dimension: Optional[int], device: torch.device) -> int:
    """How many basis vectors Lanczos keeps: ``krylov_dimension`` when given, else max(2k + 2·block,
    20), at most P; the float64 basis ([rows + block, P]) and its few [block, P] work blocks must fit
    the memory budget. A default that does not fit shrinks (down to k + 2·block); an explicit one
    that does not fit, or a minimum that does not, raises MemoryBudgetError."""
    lowest = min(P, k + 2 * bs)
    wanted = krylov_dimension if krylov_dimension is not None else max(2 * k + 2 * bs, 20)
    wanted = min(P, max(int(wanted), lowest))
    row = 8 * P
    budget = get_memory_budget(device)
    fits = budget // row - 4 * bs  # the basis' extra block, the product, two work blocks
    if fits >= wanted:
        return wanted
    if krylov_dimension is None and fits >= lowest:
        return int(fits)
    need = (max(lowest, wanted if krylov_dimension is not None else lowest) + 4 * bs) * row
    raise MemoryBudgetError(
        f"lanczos: a float64 basis of {wanted if krylov_dimension is not None else lowest} vectors of P = {P} "
        f"needs about {need:,} bytes but the memory budget is {budget:,} bytes; raise it with "
        f"twicediff.set_memory_budget(nbytes), lower krylov_dimension or rank_estimate, or use "
        f"eigen_solver='arpack'")


def _orthonormalize_block(Q: torch.Tensor, m: int, b: int, cap: int, gen: torch.Generator,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor, int]:
    r"""Make rows [m, m + b) of Q (a block R) orthonormal to rows [0, m) and to each other, in place.

    Two passes of classical Gram-Schmidt against Q[:m] in three or four reads of the basis (see
    the code), then a rank-revealing orthonormalisation inside the block
    (:func:`_qr_orthonormalize`): directions of singular value below 1e-10·``scale`` (``scale``
    the largest ‖A q‖ seen) are dropped and, while the space has room (``cap`` rows in all),
    replaced by random directions orthogonal to everything: an invariant subspace was found, and
    the Krylov space continues elsewhere.

    Returns:
        (C [m, b], B [g, b], g): R = Cᵀ Q[:m] + Bᵀ Q[m:m + g] with g ≤ b new orthonormal rows
        (of which the random ones have zero rows in B); C and B float64 on the CPU.
    """
    R = Q[m:m + b]
    basis = Q[:m]
    C = torch.zeros(m, b, dtype=torch.float64)
    if m:
        # Classical Gram-Schmidt twice: c = Q R^T, R -= c^T Q, then the second pass' projections
        # c2 = Q R^T; the second subtraction is skipped when c2 is already at rounding level (R is
        # then orthogonal to the basis as two full passes would leave it). Whole-basis GEMMs: a
        # column-chunked form that keeps a chunk in cache reads the basis once less, but torch's
        # CPU GEMM on such strided [b, chunk] slices takes a slow path for b > 1 that costs far
        # more than the read it saves.
        c = basis @ R.T
        R.addmm_(c.T, basis, alpha=-1.0)
        c2 = basis @ R.T
        C += c.cpu()
        if bool((c2.norm(dim=0) > 1e-13 * R.norm(dim=1)).any()):
            R.addmm_(c2.T, basis, alpha=-1.0)
            C += c2.cpu()
    B, g = _qr_orthonormalize(R, 1e-10 * scale, min(b, cap - m))
    want = min(b, cap - m)
    tries = 0
    while g < want and tries < 3:  # an invariant subspace was found: continue in a random direction
        tries += 1
        fill = Q[m + g:m + want]
        fill.copy_(torch.randn(fill.shape, generator=gen, dtype=torch.float64, device=Q.device))
        done = Q[:m + g]
        for _ in range(2):
            if m + g:
                fill.addmm_(fill @ done.T, done, alpha=-1.0)
        fill.div_(fill.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))
        _, got = _qr_orthonormalize(fill, 1e-8, want - g)
        g += got
        B = torch.cat([B, torch.zeros(got, b, dtype=torch.float64)])
    return C, B, g


def _qr_orthonormalize(R: torch.Tensor, threshold: float, cap: int) -> Tuple[torch.Tensor, int]:
    """Rows of R ([b, P]) → g ≤ cap orthonormal rows written to R[:g], and B [g, b] (CPU) with
    R_in = Bᵀ R[:g] up to the dropped directions, those of singular value ≤ ``threshold``
    (Householder QR of Rᵀ, then the SVD of its [b, b] triangle: rank-revealing and backward
    stable, so tiny but genuine residual directions are kept to rounding)."""
    b = R.shape[0]
    Qh, Rf = torch.linalg.qr(R.T)
    Us, sig, VsT = torch.linalg.svd(Rf.cpu())
    g = int(min(cap, int((sig > threshold).sum())))
    if g == 0:
        return torch.zeros(0, b, dtype=torch.float64), 0
    R[:g] = (Qh @ Us[:, :g].to(R.device)).T
    return sig[:g, None] * VsT[:g], g


def _lanczos_top_eigenpairs(apply_rows: Callable[[torch.Tensor], torch.Tensor], P: int, k: int, *,
                            device: torch.device, krylov_dimension: Optional[int] = None, tol: float = 1e-6,
                            max_iter: Optional[int] = None, block_size: int = 1, seed: int = 0,
                            progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The k eigenpairs of a symmetric A ([P, P], given by ``apply_rows`` on [D, P] row blocks)
    largest in absolute value, by thick-restart block Lanczos with full reorthogonalisation, in
    float64 on ``device``.

    One preallocated basis Q ([m + b, P], orthonormal rows; m from ``krylov_dimension`` and the
    memory budget, b = ``block_size``) holds everything of size P: each step applies A to the
    current block once (W = A Q_j, one call of ``apply_rows``), writes W into the rows after the
    basis and orthogonalises it there in place against the whole basis (two classical
    Gram-Schmidt passes in three or four reads of the basis). Their coefficients give the new columns of the small
    projected matrix T = Q A Qᵀ (kept on the CPU), so no product of A with the basis is stored:
    the Ritz pairs (θ_i, Qᵀ s_i) of T have residual norms ‖B s_i[last block]‖, B the coupling of
    the last block to the next. When the basis is full it is restarted in place from the Ritz
    vectors of the largest |θ| (a thick restart: T becomes their θ's, bordered by their coupling to
    the next block). Pair i has converged when ‖A y_i − θ_i y_i‖ ≤ tol·|θ_i| (ARPACK's rule).

    Returns:
        (θ [k] ascending, V [P, k]) float64; ``max_iter`` caps the calls of ``apply_rows``
        (default 10·P); on reaching it the best pairs found are returned with a warning.
    """
    k = min(int(k), P)
    if k <= 0:
        return (torch.zeros(0, dtype=torch.float64, device=device),
                torch.zeros(P, 0, dtype=torch.float64, device=device))
    bs = max(1, min(int(block_size), k))
    m_max = _basis_rows(P, k, bs, krylov_dimension, device)
    tol = tol if tol > 0 else torch.finfo(torch.float64).eps
    max_iter = max(1, 10 * P if max_iter is None else int(max_iter))
    gen = torch.Generator(device=device).manual_seed(seed)
    cap = min(P, m_max + bs)
    Q = torch.empty(m_max + bs, P, dtype=torch.float64, device=device)
    T = torch.zeros(m_max + bs, m_max + bs, dtype=torch.float64)
    Q[:bs] = torch.randn(bs, P, generator=gen, dtype=torch.float64, device=device)
    _, _, cur = _orthonormalize_block(Q, 0, bs, cap, gen, 1.0)
    m = 0  # rows [0, m) are the basis before the current block, rows [m, m + cur) the current block
    bar = progress_bar(range(max_iter), progress, desc="lanczos", unit="pass", count_only=True)
    theta = S = sel = Q_final = None
    anorm = 0.0  # the largest ‖A q‖ seen: the scale below which a residual direction counts as zero
    converged = False
    chunk = max(1, (1 << 24) // (8 * m_max))  # columns per step of the in-place restart
    for _ in bar:
        blk = slice(m, m + cur)
        W = apply_rows(Q[blk])
        end = m + cur
        Q[end:end + cur].copy_(W)
        anorm = max(anorm, float(Q[end:end + cur].norm(dim=1).max()))
        del W
        C, B, g = _orthonormalize_block(Q, end, cur, P, gen, anorm)
        T[:end, m:end] = C
        T[m:end, :end] = C.T
        T[m:end, m:end] = 0.5 * (C[m:end] + C[m:end].T)
        theta, S = torch.linalg.eigh(T[:end, :end])
        order = torch.argsort(theta.abs(), descending=True)
        sel = order[:k]
        res = (B @ S[m:end, sel]).norm(dim=0) if g else torch.zeros(sel.numel(), dtype=torch.float64)
        ok = res <= tol * theta[sel].abs()
        if progress:
            bar.set_postfix(basis=end, converged=int(ok.sum()))
        if (bool(ok.all()) and sel.numel() == k) or g == 0:
            converged = True
            Q_final = Q[:end]
            break
        Q_final = Q[:end]
        T[end:end + g, m:end] = B
        T[m:end, end:end + g] = B.T
        if end + g > m_max:
            # Thick restart: the basis becomes the Ritz vectors of the largest |θ|, in place.
            keep = order[:max(k, min(end - g, (end + k) // 2))]
            Sk = S[:, keep].to(device)
            for c0 in range(0, P, chunk):
                cols = slice(c0, min(P, c0 + chunk))
                Q[:keep.numel(), cols] = Sk.T @ Q[:end, cols]
            n = keep.numel()
            Q[n:n + g] = Q[end:end + g].clone()
            coupling = B @ S[m:end, keep]
            T.zero_()
            T[:n, :n] = torch.diag(theta[keep])
            T[n:n + g, :n] = coupling
            T[:n, n:n + g] = coupling.T
            theta, S, sel = theta[keep], torch.eye(n, dtype=torch.float64), torch.arange(k)
            Q_final = Q[:n]
            m, cur = n, g
        else:
            m, cur = end, g
    close_bar(bar)
    if not converged:
        logger.warning("lanczos: the %d eigenpairs did not converge to tol=%g within max_iter=%d products; "
                       "returning the best approximation found; raise max_iter or krylov_dimension", k, tol, max_iter)
    sel = sel[torch.argsort(theta[sel])]
    vecs = Q_final.T @ S[:, sel].to(device)
    return theta[sel].to(device), vecs


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
    op = HessianOperator(model, training_data, hessian_perturbation=lam, mode=mode,
                         expected_products=_expected_products(rank_estimate, krylov_dimension, block_size))
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
