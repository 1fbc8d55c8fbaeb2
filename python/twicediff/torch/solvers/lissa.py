"""LiSSA: h ← b + (1 − d) h − (H_batch + λI) h / s on a fresh shuffled batch per step, for all
right-hand sides together; the solution is h / s."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, Tuple

import torch

from ... import distributed as _distributed
from ... import ops
from ...errors import data_errors
from ...memory import KeptWhileFits, chunk_size, reserved
from ...progress import close_bar, progress_bar
from ...twice_differentiable import InverseHvpResult
from ..batch import check_training_data, num_points
from ..engines.amortise import solver_products
from ..twice_differentiable import TorchTwiceDifferentiable, check_model
from ..finite import CAUSE
from .common import check_nonnegative, check_rhs, initial_guess

logger = logging.getLogger(__name__)

__all__ = ["solve_lissa"]


def _step_product(batches: Iterator, h: torch.Tensor, dtype: torch.dtype, work: torch.dtype,
                  where: str) -> Tuple[torch.Tensor, int]:
    """(H_batch h in the iteration dtype, the batch's number of points) on the next batch."""
    n, product = next(batches)
    with data_errors(where, "a batch of training_data"):
        return product(h.to(dtype)).to(work), n


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (ascending) of t: a view when they are consecutive, else a copy."""
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) == n - 1:
        return t[int(idx[0]):int(idx[0]) + n]
    return t[idx]


def _is_view(rows: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> bool:
    """Whether ``rows`` (from :func:`_rows`) are t's own rows ``idx`` rather than a copy."""
    return idx.numel() > 0 and rows.data_ptr() == t[int(idx[0])].data_ptr()


def _row_norms(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """‖h_i‖ for the rows ``idx``, without copying them all at once."""
    if idx.numel() == h.shape[0]:
        return h.norm(dim=1)
    return torch.stack([h[i].norm() for i in idx.tolist()]) if idx.numel() else h.new_zeros(0)


def _step(draws: Iterator, batches: "_Batches", h: torch.Tensor, B: torch.Tensor, active: torch.Tensor,
          dtype: torch.dtype, work: torch.dtype, coefficients: Tuple[float, float, float],
          where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One LiSSA step of the active rows of h on the next batch, in place: the rows go through the
    batch's product and the fused update in chunks that fit the memory budget (each row's step is
    the same whatever the chunks). Returns the rows' (max_rel, sum_rel)."""
    _, product = next(draws)
    A, P = active.numel(), h.shape[1]
    elem = h.element_size()
    # A row of a chunk: the product's working memory, and the row of h, of b and of H h (copies
    # when the rows are not consecutive, or in another dtype).
    per_row = product.bytes_per_direction + 3 * P * elem
    with reserved(batches.kept_bytes):
        step = chunk_size(A, per_row, h.device, what="LiSSA right-hand sides")
    mx = torch.empty(A, dtype=torch.float64, device=h.device)
    sm = torch.empty(A, dtype=torch.float64, device=h.device)
    for s in range(0, A, step):
        idx = active[s:s + step]
        hv, Bv = _rows(h, idx), _rows(B, idx)
        with reserved(batches.kept_bytes + 3 * idx.numel() * P * elem), data_errors(where, "a batch of training_data"):
            Hh = product(hv.to(dtype)).to(work)
        mx[s:s + step], sm[s:s + step] = ops.lissa_step(hv, Bv, Hh, *coefficients)
        if not _is_view(hv, h, idx):
            h[idx] = hv
        del hv, Bv, Hh
    return mx, sm


class _Batches:
    """Batches of ``training_data`` without end, each with its product function (the batch prepared
    once: on the device, the engine chosen, a native model's frozen prefix applied).

    The first epoch reads the loader as it is. While the batches' product functions fit in a
    quarter of the memory budget they are kept, and later epochs visit them in the order the loader
    would give them again (a fresh random one, from torch's generator, for a DataLoader that
    reshuffles): a frozen feature extractor then runs once per batch, not once per step.
    Otherwise every epoch reads the loader again: a DataLoader over a map-style dataset reshuffled
    (same batch size and collate_fn), any other iterable as it is.
    """

    def __init__(self, model: TorchTwiceDifferentiable, training_data: Iterable, where: str,
                 expected_products: Optional[int] = None):
        self.model, self.training_data, self.where = model, training_data, where
        self.kept_bytes = 0  # bytes of the prepared batches kept for later epochs
        self.expected_products = expected_products

    def _source(self) -> Iterable:
        from torch.utils.data import DataLoader, IterableDataset
        from torch.utils.data.distributed import DistributedSampler

        data = self.training_data
        if isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler):
            # A rank's shard: the sampler reshuffles it each epoch (set_epoch) and keeps it this rank's.
            self._epoch = getattr(self, "_epoch", data.sampler.epoch) + 1
            data.sampler.set_epoch(self._epoch)
            return data
        if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) \
                and data.batch_size is not None:
            return DataLoader(data.dataset, batch_size=data.batch_size, shuffle=True, collate_fn=data.collate_fn)
        return data

    def _reshuffles(self) -> bool:
        from torch.utils.data import DataLoader, IterableDataset

        data = self.training_data
        return isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) \
            and data.batch_size is not None

    def _prepared(self, x, y):
        """(points in the batch, its product function)."""
        with data_errors(self.where, "a batch of training_data", x, y):
            product = self.model.hvp_function(x, y, expected_products=self.expected_products)
        return num_points(x), product  # x checked by hvp_function

    def __iter__(self) -> Iterator:
        keep = KeptWhileFits(self.model.device)
        empty = True
        for x, y in self.training_data:
            empty = False
            product = self._prepared(x, y)
            keep.offer(product, product[1].nbytes, product[1].bytes_per_direction)
            self.kept_bytes = keep.nbytes
            yield product
        if empty:
            raise ValueError(f"{self.where}: training_data yielded no batch")
        kept = keep.items
        # Kept batches are visited as the loader would have given them again: in a fresh random order
        # where it reshuffles (a DataLoader over a map-style dataset), else in its own order.
        while kept:
            order = torch.randperm(len(kept)).tolist() if self._reshuffles() else range(len(kept))
            for i in order:
                yield kept[i]
        while True:
            for x, y in self._source():
                yield self._prepared(x, y)


def solve_lissa(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                hessian_perturbation: float = 0.0, *, maxiter: int = 1000, dampen: float = 0.0, scale: float = 10.0,
                h0: Optional[torch.Tensor] = None, rtol: float = 1e-4, progress: bool = False,
                on_failure: str = "raise") -> InverseHvpResult:
    r"""LiSSA (Agarwal et al. 2017): for all rows of b at once, iterate

        h ← b + (1 − dampen)·h − (H_batch + λI)·h / scale

    with H_batch the Hessian on a batch drawn for each step (see below), and return x = h / scale.
    A row stops when max_j |Δh_j / h_j| < rtol; stopped rows cost nothing more. The iteration
    converges only when ``scale`` exceeds the largest eigenvalue of H_batch + λI; ``dampen`` > 0
    makes it contract faster (and solves a damped system, (H + λI + dampen·scale·I) x = b).

    Batches: the first epoch reads ``training_data`` as it is; while the prepared batches fit a
    quarter of the memory budget (and leave a direction of the products room) they are kept and later epochs visit them in a fresh random order
    (a frozen feature extractor runs once per batch), else every epoch reads the loader again
    (reshuffled when it is a DataLoader over a map-style dataset). A model in bfloat16 or float16
    iterates in float32 (its products are still taken in its own dtype).

    Memory: one [N, P] iterate beside b (it becomes x); each step takes the active rows through the
    batch's product and the fused update in chunks of rows that fit the memory budget (a row's step
    does not depend on the chunks), so a step holds one chunk's products, not N rows of them.

    Args:
        h0: initial h, [P] or [N, P]; default b.
        maxiter: steps at most.
        on_failure: what a row that has not met ``rtol`` after ``maxiter`` steps gets: ``"raise"``
            (a RuntimeError with advice on scale, dampen and maxiter) or ``"warn"`` (a warning, and
            the last iterate).

    Returns:
        InverseHvpResult: x of b's shape; info ``max_perc_residual`` and ``mean_perc_residual``
        (100·max and 100·mean of |Δh/h| over every entry at each row's last step), plus ``niter``
        (steps per row, a list) and ``converged`` (whether every row met rtol).

    Raises:
        RuntimeError: the iterate became non-finite, or (``on_failure="raise"``) a row did not
            converge in ``maxiter`` steps.
    """
    where = "solve_lissa"
    group = _distributed.enter(where, model)
    check_model(model, where)
    check_training_data(training_data, where)
    B, one = check_rhs(model, b, where)
    lam = check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    dampen = check_nonnegative(dampen, "dampen", where)
    rtol = check_nonnegative(rtol, "rtol", where)
    if not (float(scale) > 0 and float(scale) != float("inf")):
        raise ValueError(f"{where}: scale must be a finite number > 0, got {scale!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"{where}: maxiter must be an int >= 0, got {maxiter!r}")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"{where}: on_failure must be 'raise' or 'warn', got {on_failure!r}")
    scale = float(scale)
    N, P = B.shape
    # The fused step op takes float32 and float64; a half-precision model iterates in float32.
    work = torch.float32 if model.dtype in (torch.bfloat16, torch.float16) else model.dtype
    elem = torch.finfo(work).bits // 8
    # One [N, P] iterate in the iteration dtype: the active rows step in it in place, a stopped
    # row keeps its last iterate there, and it becomes x (h / scale) at the end.
    h = initial_guess(h0, B, model, where, "h0").to(work)
    held = N * P * elem + (N * P * elem if B.dtype != work else 0)
    B = B.to(work)
    max_rel = torch.full((N,), float("inf"), dtype=torch.float64, device=B.device)
    sum_rel = torch.full((N,), float("inf"), dtype=torch.float64, device=B.device)
    niter = torch.zeros(N, dtype=torch.int64, device=B.device)
    active = torch.arange(N, device=B.device)
    half_norm = h.norm(dim=1)  # ‖h‖ of every row halfway through (diverging iterates keep growing)
    with reserved(held):
        batches = _Batches(model, training_data, where, solver_products(N, maxiter))
        draws = iter(batches)
        bar = progress_bar(range(maxiter), progress, desc="lissa", unit="step", count_only=True)
        for step in bar:
            if active.numel() == 0:
                break
            if step == maxiter // 2:
                half_norm[active] = _row_norms(h, active)
            if group is None:
                mx, sm = _step(draws, batches, h, B, active, model.dtype, work, (dampen, scale, lam), where)
            else:
                # A step takes one batch on every rank: the products of the ranks' batches are
                # averaged, weighted by batch size (twicediff.distributed), all active rows at once.
                hv, Bv = _rows(h, active), _rows(B, active)
                Hh = _distributed.mean_over_ranks(
                    group, where, lambda: _step_product(draws, hv, model.dtype, work, where), check=hv)
                mx, sm = ops.lissa_step(hv, Bv, Hh, dampen, scale, lam)
                if not _is_view(hv, h, active):
                    h[active] = hv
                del hv, Bv, Hh
            if bool(torch.isnan(mx).any()):
                raise RuntimeError(f"{where}: the iterate h became non-finite (NaN or inf) at step {step + 1}; LiSSA "
                                   f"diverges when ‖I − (H + λI)/scale‖ ≥ 1: increase scale (now {scale}) or dampen "
                                   f"(now {dampen}); a training batch whose loss or curvature is not finite "
                                   f"({CAUSE}) does it at once")
            niter[active] += 1
            max_rel[active], sum_rel[active] = mx, sm
            active = active[~(mx < rtol)]
            if progress:
                bar.set_postfix(active=int(active.numel()), max_residual=float(mx.max()) if mx.numel() else 0.0)
        close_bar(bar)
    max_perc = 100 * float(max_rel.max()) if N else 0.0
    mean_perc = 100 * float(sum_rel.sum()) / (N * P) if N * P else 0.0
    logger.info("%s: max residual %.4g %%, mean residual %.4g %%", where, max_perc, mean_perc)
    converged = active.numel() == 0
    if not converged:
        # A converging iterate approaches scale·(H + λI)⁻¹b and levels off; a diverging one grows
        # geometrically, by orders of magnitude over the second half of the steps.
        growth = float((_row_norms(h, active) / half_norm[active].clamp_min(torch.finfo(work).tiny)).max())
        trend = (f"‖h‖ grew {growth:.3g}-fold over the last half of the steps, so the iteration diverges: LiSSA "
                 f"converges only when scale exceeds the largest eigenvalue of H + λI: increase scale (now "
                 f"{scale}) or dampen (now {dampen})"
                 if growth > 1e3 else
                 f"increase maxiter (now {maxiter}) or rtol (mini-batch noise keeps |Δh/h| near "
                 f"‖H_batch − H‖/scale), or increase scale (now {scale}) or dampen (now {dampen}) if ‖h‖ keeps "
                 "growing")
        message = (f"{where}: {int(active.numel())} of {N} right-hand sides did not converge in {maxiter} steps "
                   f"(largest relative change of h in the last step {max_perc:.3g} %, rtol {100 * rtol:.3g} %); "
                   f"{trend}")
        if on_failure == "raise":
            raise RuntimeError(message + "; on_failure='warn' returns the last iterate instead")
        logger.warning("%s", message)
    x = h.div_(scale).to(model.dtype)
    info = {"max_perc_residual": max_perc, "mean_perc_residual": mean_perc, "niter": niter.tolist(),
            "converged": converged}
    return InverseHvpResult(x=x[0] if one else x, info=info)
