"""Explicit Hessians: of the loss on one batch, and of the mean loss over a loader.

For a model the native engine takes, H is assembled block by block from per-sample curvature
(:mod:`twicediff.torch.engines.hessian_assembly`: several times fewer flops than P products);
other models go through batched Hessian-vector products on chunks of unit vectors. Either way the
work is sized by the memory budget: memory is P² plus one chunk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Tuple

import logging

import torch

from .. import distributed as _distributed
from ..errors import NotNativeError, data_errors
from ..memory import chunk_size, get_memory_budget
from ..progress import progress_bar
from .batch import check_training_data, num_points
from .engines.base import MAX_DIRECTIONS_PER_CHUNK, PreparedBatch
from .engines.hessian_assembly import assemble_hessian, assemble_hessian_batches
from .engines.select import native_engine

if TYPE_CHECKING:
    from .twice_differentiable import TorchTwiceDifferentiable

__all__ = ["HESSIAN_METHODS", "add_hessian_", "mean_hessian"]

logger = logging.getLogger(__name__)

#: ``"auto"``: blockwise assembly where the native engine takes the model, else ``"columns"``:
#: batched products on chunks of unit vectors.
HESSIAN_METHODS = ("auto", "columns")


def _native(td: "TorchTwiceDifferentiable", x: torch.Tensor, y: torch.Tensor):
    """(native engine, prepared batch), or (None, None) where the native engine does not take it."""
    try:
        return native_engine(td.model, td.loss, x, y)
    except NotNativeError:
        return None, None


def add_hessian_(td: "TorchTwiceDifferentiable", x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, *,
                 alpha: float = 1.0, method: str = "auto", progress: bool = False) -> torch.Tensor:
    """``out += alpha · ∇²θ L(x, y)`` in place and returned (see
    :meth:`TorchTwiceDifferentiable.add_hessian_`); x and y already checked and on the device."""
    P = td.num_params
    with data_errors("hessian", "", x, y):
        native, prepared = _native(td, x, y) if method == "auto" else (None, None)
        if native is not None:
            return assemble_hessian(native, prepared, out, alpha=alpha, progress=progress)
        # P products on this batch: enough, on a large model, to repay compiling them (engines/amortise.py)
        product = td.hvp_function(x, y, engine="auto", expected_products=P)
        # A chunk of c columns holds the c unit directions, their products and the engine's work.
        per_column = 2 * P * out.element_size() + product.bytes_per_direction
        step = chunk_size(P, per_column, td.device, most=MAX_DIRECTIONS_PER_CHUNK, what="Hessian columns")
        for start in progress_bar(range(0, P, step), progress, desc="hessian", unit="chunk"):
            stop = min(P, start + step)
            eye = torch.zeros(stop - start, P, dtype=td.dtype, device=td.device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            # H is symmetric: the products H e_j are its rows as well as its columns.
            out[start:stop].add_(product(eye), alpha=alpha)
        return out


def mean_hessian(td: "TorchTwiceDifferentiable", training_data, *, progress: bool = False) -> torch.Tensor:
    r"""The Hessian of the mean loss over the batches of ``training_data``,
    \(H = \sum_b (n_b / N) \nabla^2_\theta L(x_b, y_b)\), [P, P].

    Native models: the batches are prepared and assembled together, a group at a time (one pass over
    the P² result per block for the whole group), the group cut where its prepared rows would exceed
    an eighth of the memory budget; the sizes of the groups are logged at DEBUG level. Other models
    go batch by batch through :func:`add_hessian_`. With a process group, each rank's sums and
    count are all-reduced (:mod:`twicediff.distributed`).
    """
    group = _distributed.enter("mean_hessian", td)
    out, total = _distributed.sum_over_ranks(group, "mean_hessian",
                                             lambda: _hessian_sum(td, training_data, progress))
    if total == 0:
        raise ValueError("mean_hessian: training_data yielded no points")
    return out.div_(total)


def _hessian_sum(td: "TorchTwiceDifferentiable", training_data, progress: bool) -> Tuple[torch.Tensor, int]:
    r"""(\(\sum_b n_b \nabla^2_\theta L(x_b, y_b)\) [P, P], N) over the batches of ``training_data``."""
    check_training_data(training_data, "mean_hessian")
    P = td.num_params
    out = torch.zeros(P, P, dtype=td.dtype, device=td.device)
    room = get_memory_budget(td.device) // 8
    group: List[Tuple[PreparedBatch, float]] = []
    held, total, engine, groups = 0, 0, None, []

    def flush():
        nonlocal group, held
        if group:
            assemble_hessian_batches(engine, group, out)
            groups.append(len(group))
        group, held = [], 0

    for i, (x, y) in enumerate(progress_bar(training_data, progress, desc="hessian", unit="batch")):
        x, y = td.checked_batch(x, y, "mean_hessian")
        n = num_points(x)
        total += n
        with data_errors("mean_hessian", f"training_data batch {i}", x, y):
            native, prepared = _native(td, x, y)
            if native is None:
                add_hessian_(td, x, y, out, alpha=n)
                continue
        engine = native
        if group and held + prepared.nbytes > room:
            flush()
        group.append((prepared, float(n)))
        held += prepared.nbytes
    flush()
    if groups:
        logger.debug("mean_hessian: assembled %d batches in %d group(s) of %s", sum(groups), len(groups), groups)
    return out, total
