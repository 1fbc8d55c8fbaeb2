"""LiSSA: h ← b + (1 − d) h − (H_batch + λI) h / s on a fresh shuffled batch per step, for all
right-hand sides together; the solution is h / s."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, Tuple

import torch

from ... import distributed as _distributed
from ... import ops
from ...errors import data_errors
from ...progress import progress_bar
from ...twice_differentiable import InverseHvpResult
from ..batch import check_training_data, num_points
from ..twice_differentiable import TorchTwiceDifferentiable, check_model
from .common import check_nonnegative, check_rhs, initial_guess

logger = logging.getLogger(__name__)

__all__ = ["solve_lissa"]


def _shuffled_batches(training_data: Iterable, where: str) -> Iterator:
    """Batches of ``training_data`` without end: a DataLoader over a map-style dataset is reshuffled
    every epoch (same batch size and collate_fn); any other iterable is cycled as it is."""
    from torch.utils.data import DataLoader, IterableDataset
    from torch.utils.data.distributed import DistributedSampler

    source = training_data
    if isinstance(training_data, DataLoader) and isinstance(training_data.sampler, DistributedSampler):
        # A rank's shard: the sampler reshuffles it each epoch (set_epoch) and keeps it this rank's.
        epoch = training_data.sampler.epoch
        while True:
            training_data.sampler.set_epoch(epoch)
            epoch += 1
            empty = True
            for batch in training_data:
                empty = False
                yield batch
            if empty:
                raise ValueError(f"{where}: training_data yielded no batch")
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


def _lissa_product(model: TorchTwiceDifferentiable, batches: Iterator, h: torch.Tensor,
                   where: str) -> Tuple[torch.Tensor, int]:
    """(H_batch h, the batch's number of points) on the next batch."""
    x, y = next(batches)
    with data_errors(where, "a batch of training_data", x, y):
        return model.hvp(x, y, h), (num_points(x) if isinstance(x, torch.Tensor) else 1)


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
    scale = float(scale)
    N, P = B.shape
    out = initial_guess(h0, B, model, where, "h0")
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
        # A step takes one batch on every rank: with a process group, the products of the ranks'
        # batches are averaged, weighted by batch size (twicediff.distributed).
        Hh = _distributed.mean_over_ranks(group, where, lambda: _lissa_product(model, batches, h, where), check=h)
        mx, sm = ops.lissa_step(h, Bact, Hh, dampen, scale, lam)
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
