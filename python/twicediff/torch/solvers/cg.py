"""CG: conjugate gradients on all right-hand sides at once, on the Hessian operator (one pass over
the data per step), optionally preconditioned."""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from ...memory import reserved
from ...twice_differentiable import InverseHvpResult
from ..engines.amortise import solver_products
from ..operator import HessianOperator
from ..twice_differentiable import TorchTwiceDifferentiable, check_model
from .common import LAMBDA, check_nonnegative, check_rhs, initial_guess

from .block_cg import block_cg, block_krylov_cg
from .preconditioners import PRECONDITIONERS, jacobi_preconditioner, nystrom_preconditioner

logger = logging.getLogger(__name__)

__all__ = ["solve_batch_cg", "solve_cg"]


def _cg_info(stats: Dict[str, torch.Tensor]) -> Dict[str, Dict]:
    niter, optimal, gamma = (stats[k].tolist() for k in ("niter", "optimal", "gamma"))
    return {f"batch_{i}": {"niter": int(niter[i]), "optimal": bool(optimal[i]), "gamma": float(gamma[i])}
            for i in range(len(niter))}


def _check_cg_args(rtol, atol, maxiter, where: str) -> Tuple[float, float]:
    rtol = check_nonnegative(rtol, "rtol", where)
    atol = check_nonnegative(atol, "atol", where)
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0):
        raise ValueError(f"{where}: maxiter must be an int >= 0 or None, got {maxiter!r}")
    return rtol, atol


def solve_batch_cg(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                   hessian_perturbation: float = 0.0, *, x0: Optional[torch.Tensor] = None, rtol: float = 1e-7,
                   atol: float = 1e-7, maxiter: Optional[int] = None, progress: bool = False,
                   preconditioner: Optional[str] = None, preconditioner_rank: int = 32,
                   hutchinson_samples: int = 32, block_krylov: bool = True, mode: str = "hessian",
                   product_dtype: Optional[torch.dtype] = torch.float64,
                   out: Optional[torch.Tensor] = None) -> InverseHvpResult:
    r"""Conjugate gradients for (H + λI) x_i = b_i, all rows of b ([N, P]) at once.

    Each iteration applies H + λI to one block of vectors of the still-active rows in one pass
    over the data (:meth:`HessianOperator.apply_rows`); a row stops when
    ‖(H + λI) x_i − b_i‖ ≤ max(rtol·‖b_i‖, atol) and costs nothing more. Iterates and scalars are
    float64 whatever the model's dtype.

    With ``block_krylov=True`` (default) the rows share one search block (breakdown-free block CG,
    see ``block_krylov_cg``): k steps give every row the best solution from the block Krylov
    space of all rows' residuals, so N related right-hand sides converge in a few times fewer
    products than N separate CGs, also on mildly indefinite H + λI; ``optimal`` is then judged on
    the true residual. With ``block_krylov=False`` each row runs its own CG recurrence (fused native
    updates; ``optimal`` judged on the recursive residual, as pyDVL does).

    Memory: the iteration holds about five float64 [rows, P] blocks (x, r, x at the start of a
    round, the search block and its product; seven once some rows of a group have stopped). Rows
    are solved in groups, each a block of its own, as many at once as the memory budget holds with
    room left for one direction of the products (at least one row); the blocks, the float64 copy of
    the model, the result and the preconditioner are reserved (:func:`twicediff.memory.reserved`),
    so that the products are chunked against what is left.

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
        out: where to write x ([N, P], or [P] for one b; the model's dtype and device); it may be b
            itself, whose rows are overwritten once their group is solved (an influence computation
            writes the factors over the test gradients they are solved from). Default: a new tensor.

    Returns:
        InverseHvpResult: x of b's shape (model dtype); info ``batch_{i}`` → ``{"niter", "optimal",
        "gamma"}`` (gamma = ‖r_i‖²) per row, plus ``num_passes`` (passes over the data) and
        ``preconditioner``.
    """
    where = "solve_batch_cg"
    check_model(model, where)
    B, one = check_rhs(model, b, where)
    rtol, atol = _check_cg_args(rtol, atol, maxiter, where)
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"{where}: preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    lam = check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    if product_dtype is not None and not (isinstance(product_dtype, torch.dtype) and product_dtype.is_floating_point):
        raise TypeError(f"{where}: product_dtype must be None or a floating torch.dtype, got {product_dtype!r}")
    X = _check_out(out, B, one, model, where)
    N, P = B.shape
    if N == 0:  # no system to solve (an empty set of test points), no pass over the data
        return InverseHvpResult(x=X[0] if one else X, info={"num_passes": 0, "preconditioner": None})
    maxiter = 10 * model.num_params if maxiter is None else maxiter
    op = HessianOperator(model, training_data, hessian_perturbation=lam, mode=mode, dtype=product_dtype,
                         expected_products=solver_products(N, maxiter))
    X0 = None if x0 is None else initial_guess(x0, B, model, where, "x0")
    held = op.model_copy_bytes + (0 if out is not None else N * P * B.element_size())
    precondition = None
    used = preconditioner
    with reserved(held):
        if preconditioner == "jacobi":
            precondition = jacobi_preconditioner(op, hutchinson_samples)
        elif preconditioner == "nystrom":
            precondition = nystrom_preconditioner(op, preconditioner_rank)
            if precondition is None:
                logger.warning("%s: H + λI is not positive definite on the Nyström sketch; running without "
                               "preconditioner (increase %s)", where, LAMBDA)
                used = None
    held += getattr(precondition, "nbytes", 0)
    solver = block_krylov_cg if block_krylov else block_cg
    group = _group_size(N, P, held, op.bytes_per_direction(), model.device)
    stats = {"niter": [], "optimal": [], "gamma": []}
    b_norms = B.norm(dim=1).double()  # for the warning below: out may overwrite b
    # The products get what the blocks leave: while a product runs, a group of g rows holds 6g - 2
    # blocks (the product's own result is reserved by the operator; see _group_size).
    with reserved(held + (6 * group - 2) * P * 8):
        for s in range(0, N, group):
            part, st = solver(op.apply_rows, B[s:s + group], B[s:s + group] if X0 is None else X0[s:s + group],
                              rtol=rtol, atol=atol, maxiter=maxiter, precondition=precondition, progress=progress)
            X[s:s + group] = part  # b's rows of this group are read no more (out may be b)
            del part
            for key in stats:
                stats[key].append(st[key])
    stats = {key: torch.cat(parts) for key, parts in stats.items()}
    missed = ~stats["optimal"]
    if bool(missed.any()):
        # pyDVL returns such rows with optimal=False in info, which influence callers never see.
        relative = stats["gamma"][missed].sqrt() / b_norms.to(stats["gamma"].device)[missed].clamp_min(1e-300)
        logger.warning("%s: %d of %d system(s) did not meet the stopping rule in maxiter=%d iterations (largest "
                       "relative residual ‖(H + λI)x − b‖/‖b‖ = %.3g); their x is the last iterate: increase "
                       "maxiter, rtol or %s, or use a preconditioner (info['batch_i']['optimal'] says "
                       "which)",
                       where, int(missed.sum()), N, maxiter, float(relative.max()), LAMBDA)
    info = _cg_info(stats)
    info.update(num_passes=op.num_passes, preconditioner=used)
    return InverseHvpResult(x=X[0] if one else X, info=info)


def _check_out(out: Optional[torch.Tensor], B: torch.Tensor, one: bool, model: TorchTwiceDifferentiable,
               where: str) -> torch.Tensor:
    """``out`` as [N, P] (a new tensor when None), after checking its shape, dtype and device."""
    if out is None:
        return torch.empty(B.shape, dtype=model.dtype, device=model.device)
    want = tuple(B.shape[1:]) if one else tuple(B.shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != model.dtype \
            or out.device != model.device:
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"{where}: out must be {list(want)} {model.dtype} on {model.device} like b, got {got}")
    return out.unsqueeze(0) if one else out


def _group_size(N: int, P: int, held: int, per_direction: int, device: torch.device) -> int:
    """Right-hand sides per CG group: a group of g rows holds 7g − 2 float64 [P] blocks (x, r, x at
    the round's start, the search block and its product; copies of x and r once rows have
    stopped: five blocks for g = 1), and its products need room for at least one direction
    (``per_direction`` bytes) beside them. At least one row, whose products then find out whether
    they fit."""
    from ...memory import get_memory_budget

    row = P * 8
    room = get_memory_budget(device) - held - per_direction + 2 * row
    return int(max(1, min(N, room // (7 * row))))


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

    X, stats = block_cg(apply_rows, b.unsqueeze(0), X0, rtol=rtol, atol=atol,
                         maxiter=10 * P if maxiter is None else maxiter)
    info = _cg_info(stats)["batch_0"]
    return InverseHvpResult(x=X[0].to(b.dtype), info=info)
