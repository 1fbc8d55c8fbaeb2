"""Arnoldi: the low-rank eigen-representation of H + λI (block Lanczos in torch, or ARPACK through
scipy), and x = V D⁻¹ Vᵀ b."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple, Union

import torch

from ... import distributed as _distributed
from ...errors import MemoryBudgetError
from ...memory import get_memory_budget
from ...twice_differentiable import InverseHvpResult
from ..operator import HessianOperator
from ..twice_differentiable import TorchTwiceDifferentiable, check_model
from .common import check_nonnegative, check_rhs
from .lanczos import BLOCK_SIZE_CHOICES, check_block_size, lanczos_top_eigenpairs

logger = logging.getLogger(__name__)

__all__ = ["EIGEN_SOLVERS", "LowRankProductRepresentation", "lanzcos_low_rank_hessian_approx",
           "model_hessian_low_rank", "solve_arnoldi"]

#: The eigensolvers ``solve_arnoldi`` takes.
EIGEN_SOLVERS = ("lanczos", "arpack")


def _expected_products(k, krylov_dimension, bs) -> Optional[int]:
    """One Krylov basis' worth of products (the basis lanczos' _basis_rows aims at), None where the
    arguments are not integers (their own checks then say so)."""
    bs = max(BLOCK_SIZE_CHOICES) if bs == "auto" else bs
    ints = all(isinstance(a, int) and not isinstance(a, bool) for a in (k, bs))
    if isinstance(krylov_dimension, int) and not isinstance(krylov_dimension, bool):
        return max(0, krylov_dimension)
    return max(0, 2 * k + 2 * bs, 20) if ints and krylov_dimension is None else None


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


def _arpack_fits(P: int, k: int, krylov_dimension: Optional[int], device: torch.device) -> None:
    """MemoryBudgetError unless what ARPACK holds fits the memory budget: its float64 basis of ncv
    vectors (scipy's default max(2k + 1, 20)), its three work vectors, the k eigenvectors and a
    product's four [P] blocks."""
    ncv = min(P, krylov_dimension if krylov_dimension is not None else max(2 * k + 1, 20))
    need = (ncv + 3 + k + 4) * 8 * P
    budget = get_memory_budget(device)
    if need > budget:
        raise MemoryBudgetError(
            f"arpack: a float64 basis of ncv = {ncv} vectors of P = {P}, its work vectors and {k} eigenvectors "
            f"need about {need:,} bytes but the memory budget is {budget:,} bytes; raise it with "
            f"twicediff.set_memory_budget(nbytes), or lower krylov_dimension or rank_estimate")


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
              eigen_solver: str, block_size: Union[int, str], progress: bool, where: str) -> LowRankProductRepresentation:
    if eigen_solver not in EIGEN_SOLVERS:
        raise ValueError(f"{where}: eigen_solver must be one of {EIGEN_SOLVERS}, got {eigen_solver!r}")
    check_block_size(block_size, where)
    if isinstance(rank_estimate, bool) or not isinstance(rank_estimate, int) or not 1 <= rank_estimate <= P:
        raise ValueError(f"{where}: rank_estimate must be an int in [1, P = {P}], got {rank_estimate!r}")
    if krylov_dimension is not None and not (isinstance(krylov_dimension, int) and rank_estimate < krylov_dimension):
        raise ValueError(f"{where}: krylov_dimension must be None or an int > rank_estimate = {rank_estimate}, "
                         f"got {krylov_dimension!r}")
    tol = check_nonnegative(tol, "tol", where)
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"{where}: max_iter must be None or an int >= 1, got {max_iter!r}")
    if eigen_solver == "arpack":
        _arpack_fits(P, rank_estimate, krylov_dimension, device)
        vals, vecs = _arpack_top_eigenpairs(apply_rows, P, rank_estimate, krylov_dimension=krylov_dimension, tol=tol,
                                            max_iter=max_iter, device=device)
    else:
        vals, vecs = lanczos_top_eigenpairs(apply_rows, P, rank_estimate, device=device,
                                             krylov_dimension=krylov_dimension, tol=tol, max_iter=max_iter,
                                             block_size=block_size, progress=progress)
    # A [P, k] copy of their own in the result's dtype (Lanczos' vecs are a view of its basis, which
    # is freed on return).
    projections = torch.empty(vecs.shape, dtype=dtype, device=vecs.device).copy_(vecs)
    del vecs
    return LowRankProductRepresentation(vals.to(dtype), projections)


def lanzcos_low_rank_hessian_approx(hessian_vp: Callable[[torch.Tensor], torch.Tensor], matrix_shape: Tuple[int, int],
                                    hessian_perturbation: float = 0.0, rank_estimate: int = 10,
                                    krylov_dimension: Optional[int] = None, tol: float = 1e-6,
                                    max_iter: Optional[int] = None, device: Optional[torch.device] = None,
                                    eigen_computation_on_gpu: bool = False, torch_dtype: Optional[torch.dtype] = None,
                                    *, eigen_solver: str = "lanczos", block_size: Union[int, str] = 1,
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
        block_size: Lanczos directions added per step (each one product with ``hessian_vp``), or
            ``"auto"``: 1 or 4, whichever a timed probe of the operator favours (see
            :func:`model_hessian_low_rank`). Products of ``hessian_vp`` are taken one row at a
            time, so a block costs its rows' products and 1 (the default) is the right choice.
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
                           eigen_solver: str = "lanczos", block_size: Union[int, str] = "auto",
                           mode: str = "hessian",
                           progress: bool = False) -> LowRankProductRepresentation:
    r"""The ``rank_estimate`` eigenpairs largest in |θ| of H + λI, H the Hessian of the model's mean
    training loss, as V D Vᵀ (values and vectors in the model's dtype, on its device).

    Each product with H + λI is one pass over the data for a block of ``block_size`` vectors. Blocks
    of 4 need fewer passes than single-vector Lanczos; they are faster where a pass over 4 vectors
    costs little more than one (small P, many points: ``benchmarks/results/solvers_cpu.md``) and
    slower where it costs several (large P, few points: ``benchmarks/results/lanczos_cpu.md``).
    The default ``"auto"`` measures which: before the iteration it applies H + λI twice to 4 and
    twice to 1 random orthonormal vectors, times the second of each, and takes blocks of 4 when
    the 4-vector pass costs less than ``lanczos.BLOCK_PASS_RATIO`` single ones (summed over the
    ranks of a process group, so all ranks choose alike). The probe costs 10 vectors' products, of
    which the chosen block's start the iteration; the choice is logged at INFO. An int fixes the
    block size. See :func:`lanzcos_low_rank_hessian_approx` for the other arguments.
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
                  eigen_solver: str = "lanczos", block_size: Union[int, str] = "auto",
                  progress: bool = False) -> InverseHvpResult:
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


def _prepare_arnoldi(model: TorchTwiceDifferentiable, training_data: Iterable, hessian_perturbation: float,
                     **options) -> Tuple[dict, int]:
    """What :func:`solve_arnoldi` can do before its right-hand sides exist (an influence computation
    calls it before it computes the test gradients, so that they and the Krylov basis are not held at
    once): the low-rank representation, computed exactly as ``solve_arnoldi(model, training_data, b,
    hessian_perturbation, **options)`` would. Returns the options for that call (the eigen
    computation's replaced by ``low_rank_representation``) and the bytes the representation holds."""
    if options.get("low_rank_representation") is not None:
        return options, 0
    import inspect

    args = inspect.signature(solve_arnoldi).bind(model, training_data, None, hessian_perturbation, **options)
    args.apply_defaults()
    a = args.arguments
    rep = model_hessian_low_rank(model, training_data, a["hessian_perturbation"], a["rank_estimate"],
                                 a["krylov_dimension"], a["tol"], a["max_iter"], a["eigen_computation_on_gpu"],
                                 eigen_solver=a["eigen_solver"], block_size=a["block_size"], progress=a["progress"])
    kept = {"low_rank_representation": rep, **({"progress": a["progress"]} if "progress" in options else {})}
    nbytes = sum(t.numel() * t.element_size() for t in (rep.eigen_vals, rep.projections))
    return kept, nbytes


solve_arnoldi.prepare = _prepare_arnoldi
