r"""Per-sample derivatives of the single-point loss, for a block of B samples at once.

The loss of one point is pyDVL 0.7's, as :meth:`TorchTwiceDifferentiable.grad` takes it on a batch
of one: ``ℓ(x_i, y_i) = loss(squeeze(model(x_i[None])), squeeze(y_i[None]))``. x is a tensor, a
tuple / list or a dict (:mod:`twicediff.torch.batch`); a point of a tuple or dict x is row i of each
of its tensors with a batch dimension, the other entries passed as they are.

- :func:`per_sample_grads` — ∇θℓ(x_i, y_i) for every i of the block, as per-parameter blocks
  [B, *shape_k]: ``vmap`` over samples of ``torch.func.grad`` of a ``functional_call``.
- :func:`per_sample_mixed_products` — ``out[t, i] = ∇x_i (v[t] · ∇θℓ(x_i, y_i))`` for T
  directions, [T, B, *x_i.shape]: the mixed products of the summed loss Σ_i ℓ(x_i, y_i) with
  respect to the whole block x, which separate per sample because ℓ(x_j, y_j) does not depend on
  x_i for j ≠ i; T backward passes over the block instead of T·B over single points.
- :func:`bytes_per_sample` — the memory estimate the callers chunk blocks with.
- :func:`gradient_matrix`, :func:`gradient_blocks` — per-sample gradients of every point of a loader,
  in chunks that fit the memory budget.

Where torch.func cannot run the model (an op without a vmap rule), both fall back to one forward
pass per sample through plain autograd (gradients: also one backward per sample, as pyDVL 0.7
computes them), and log it once per function when the fallback works (on bad data it raises
autograd's error instead).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from ..errors import data_errors
from ..memory import chunk_size
from ..progress import progress_bar
from .derivative_routes import batched_routes
from .finite import CAUSE, nonfinite_rows
from .batch import (batch_size, call_model, input_tensors, model_args, num_points, per_point, slice_batch,
                    squeezed_loss, vmap_dims)
from .engines.generic import activation_numel
from .guard import model_call
from .mvp import batched_mvp, flat_grads
from .stateless import functional_call, split_params
from .tensor_utilities import TorchTensorUtilities
from .twice_differentiable import TorchTwiceDifferentiable

__all__ = ["bytes_per_sample", "finite_gradients", "gradient_blocks", "gradient_matrix", "loader_batches",
           "num_points_of", "per_sample_grads", "per_sample_mixed_products", "sample_chunks"]

logger = logging.getLogger(__name__)

_FUNC_ERRORS = (RuntimeError, NotImplementedError)


def finite_gradients(gradients: torch.Tensor, where: str, name: str) -> torch.Tensor:
    """``gradients`` [N, P] (of the points of ``name``, in order), after a ValueError naming the first
    point whose gradient holds NaN or inf: its influence factor would be NaN, and Direct would blame
    a singular H + λI."""
    rows = nonfinite_rows(gradients)
    if rows.numel():
        raise ValueError(f"{where}: the loss gradient at point {int(rows[0])} of {name} (counted across its batches) "
                         f"holds NaN or inf ({rows.numel()} of {gradients.shape[0]} points do): the loss or its "
                         f"gradient is not finite ({CAUSE})")
    return gradients


def bytes_per_sample(model: TorchTwiceDifferentiable, x: Any, directions: int = 0) -> int:
    """Estimated bytes one sample of ``x`` ([B, ...], or a tuple / dict of such) costs in
    :func:`per_sample_grads` (``directions=0``: its gradient, 3 copies of P, and 6 copies of its
    activations) or in :func:`per_sample_mixed_products` with ``directions`` = T (6 copies of its
    activations for the twice-differentiable graph, and T·(2 + |x_i|) for the products and their
    cotangents)."""
    elem = torch.finfo(model.dtype).bits // 8
    one = slice_batch(x, 0, 1)
    activations = activation_numel(model.model, one)
    if directions == 0:
        return elem * (3 * model.num_params + 6 * activations)
    point = sum(t.numel() for _, t in input_tensors(one))
    return elem * (6 * activations + directions * (2 + point))


def _point_loss(model: TorchTwiceDifferentiable, params, fixed, x_i, y_i: torch.Tensor, dims=0,
                gradient_check: bool = True) -> torch.Tensor:
    """The loss of one point inside vmap: x_i (a tensor, or a tuple / dict of them, ``dims`` saying
    which entries vmap took a row of) made a batch of one. ``gradient_check``: as in
    :func:`~twicediff.torch.batch.squeezed_loss`, False under a bare vmap."""
    args, kwargs = model_args(per_point(x_i, dims))
    output = functional_call(model.model, (params, fixed), args, kwargs)
    return squeezed_loss(model.loss, output, y_i.unsqueeze(0), gradient_check=gradient_check)


def per_sample_grads(model: TorchTwiceDifferentiable, x: Any, y: torch.Tensor) -> List[torch.Tensor]:
    r"""∇θℓ(x_i, y_i) for each of the B samples of the block.

    Args:
        model: the model and loss; derivatives are taken in its trainable parameters.
        x: [B, *x_i.shape] inputs (or a tuple / list / dict of them, :mod:`twicediff.torch.batch`),
            on the model's device.
        y: [B, *y_i.shape] targets, on the model's device.

    Returns:
        One tensor [B, *shape_k] per trainable parameter k (in ``model.parameters`` order), detached;
        packed, row i is ``model.grad(x[i:i+1], y[i:i+1])``.
    """
    with model_call(model.model, "per sample grads"):
        names, params, fixed = split_params(model.model)
        dims = vmap_dims(x)
        try:
            with batched_routes():  # recurrent layers step by step: torch's fused ops do not vmap
                grads = torch.func.vmap(torch.func.grad(lambda p, xi, yi: _point_loss(model, p, fixed, xi, yi, dims)),
                                        in_dims=(None, dims, 0))(params, x, y)
            return [grads[n].detach() for n in names]
        except _FUNC_ERRORS as exc:
            func_error = exc
        trainable = model.parameters
        # Bad data (a wrong shape, a class index out of range) fails here too, and raises plain
        # autograd's error: the fallback is logged only when it works.
        rows = [torch.autograd.grad(squeezed_loss(model.loss, call_model(model.model, slice_batch(x, i, i + 1)),
                                                  y[i:i + 1]), trainable, allow_unused=True, materialize_grads=True)
                for i in range(num_points(x))]
        _log_fallback("per_sample_grads", func_error)
        return [torch.stack([r[k] for r in rows]) if rows else p.new_empty(0, *p.shape)
                for k, p in enumerate(trainable)]


def per_sample_mixed_products(model: TorchTwiceDifferentiable, x: torch.Tensor, y: torch.Tensor,
                              v: torch.Tensor) -> torch.Tensor:
    r"""``out[t, i] = ∇x_i (v[t] · ∇θℓ(x_i, y_i))`` for T directions v and the B samples of the block.

    Args:
        model: the model and loss.
        x: [B, *x_i.shape] floating-point inputs, on the model's device.
        y: [B, *y_i.shape] targets, on the model's device.
        v: [T, P] directions (e.g. influence factors), on the model's device.

    Returns:
        [T, B, *x_i.shape], detached.
    """
    with model_call(model.model, "per sample mixed products"):
        B = x.shape[0]
        T = v.shape[0]
        if B == 0 or T == 0:
            return x.new_zeros(T, *x.shape)
        xg = x.detach().requires_grad_(True)
        trainable = model.parameters
        names, _, fixed = split_params(model.model)
        params = dict(zip(names, trainable))  # the live parameters: the graph reaches them
        try:
            with batched_routes():
                losses = torch.func.vmap(
                    lambda xi, yi: _point_loss(model, params, fixed, xi, yi, gradient_check=False))(xg, y)
        except _FUNC_ERRORS as exc:
            losses = torch.stack([squeezed_loss(model.loss, model.model(xg[i:i + 1]), y[i:i + 1])
                                  for i in range(B)])
            _log_fallback("per_sample_mixed_products", exc)  # once it worked (see per_sample_grads)
        g = flat_grads(torch.autograd.grad(losses.sum(), trainable, create_graph=True, allow_unused=True), trainable)
        return batched_mvp(g, v, xg, allow_unused=True).reshape(T, *x.shape)


_logged_fallback: set = set()


def _log_fallback(where: str, exc: BaseException) -> None:
    if where not in _logged_fallback:
        _logged_fallback.add(where)
        logger.warning("%s: torch.func cannot run this model (%s); computing one sample at a time "
                       "with autograd (slower)", where, exc)


# ---- per-sample gradients over a loader -------------------------------------------------------


def num_points_of(data: Any) -> Optional[int]:
    """The number of points ``data`` yields, when it can be known without iterating it: a
    DataLoader over a sized sampler, or a list/tuple of (x, y) batches; else None."""
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            return None
        try:
            n = len(data.sampler)
        except TypeError:  # an iterable-style dataset
            return None
        return n - n % data.batch_size if data.drop_last else n
    if isinstance(data, (list, tuple)):
        try:
            return sum(batch_size(batch[0], "num_points_of") for batch in data)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError):
            return None  # malformed; loader_batches names the problem
    return None


def loader_batches(model: TorchTwiceDifferentiable, data: Any, where: str, name: str, progress: bool
             ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The (x, y) batches of ``data`` on the model's device, checked; a bar over batches when
    ``progress``. Raises once the data is exhausted if it held no point."""
    if isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{where}: {name} must be an iterable of (x, y) batches, e.g. a torch DataLoader, "
                        f"got {type(data).__name__}")
    total = len(data) if hasattr(data, "__len__") else None
    points = 0
    for i, batch in enumerate(progress_bar(data, progress, desc=f"{where}: {name}", total=total, unit="batch")):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{where}: {name} must yield (x, y) pairs; batch {i} is a "
                            f"{type(batch).__name__}" + (f" of length {len(batch)}" if hasattr(batch, "__len__") else ""))
        x, y = model.checked_batch(batch[0], batch[1], where)
        if isinstance(x, torch.Tensor) and x.dim() == 0:
            raise ValueError(f"{where}: {name} batch {i} has a 0-d x; x must be [B, *x_i.shape]")
        if y.dim() == 0:  # otherwise x's first axis would be taken for B points
            raise ValueError(f"{where}: {name} batch {i} has a 0-d y (one point without a batch dimension, as a "
                             "DataLoader with batch_size=None yields it); per-point work needs batches [B, ...] of "
                             "B points: use batch_size=1 or more")
        points += num_points(x)
        yield x, y
    if points == 0:
        raise ValueError(f"{where}: {name} holds no points (an empty loader); it needs at least one")


def sample_chunks(model: TorchTwiceDifferentiable, data: Any, where: str, name: str, progress: bool,
            directions: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, str]]:
    """The batches of ``data`` cut into chunks of samples that fit the memory budget for
    :func:`per_sample_grads` (``directions=0``) or :func:`per_sample_mixed_products` with T
    directions, each with the name of its batch for error messages (:func:`data_errors`)."""
    for i, (x, y) in enumerate(loader_batches(model, data, where, name, progress)):
        B = num_points(x)
        if B == 0:
            continue
        batch = f"{name} batch {i}"
        with data_errors(where, batch, x, y):  # the estimate runs the model once
            step = chunk_size(B, bytes_per_sample(model, x, directions), model.device, what=f"{name} samples")
        for start in range(0, B, step):
            yield slice_batch(x, start, start + step), y[start:start + step], batch


def gradient_blocks(model: TorchTwiceDifferentiable, data: Any, where: str, name: str, progress: bool
                     ) -> Iterator[List[torch.Tensor]]:
    """Per-sample gradients of ``data`` as per-parameter blocks [B, *shape_k], chunk by chunk."""
    for x, y, batch in sample_chunks(model, data, where, name, progress):
        with data_errors(where, batch, x, y):
            blocks = per_sample_grads(model, x, y)
        yield blocks


def gradient_matrix(model: TorchTwiceDifferentiable, data: Any, where: str, name: str, progress: bool
                     ) -> torch.Tensor:
    """[N, P]: row i is ∇θℓ(z_i) for the points of ``data`` in order, packed into preallocated
    memory (when N can be known up front; else the blocks are gathered first)."""
    blocks = gradient_blocks(model, data, where, name, progress)
    n = num_points_of(data)
    if n is None:
        blocks = list(blocks)
        n = sum(b[0].shape[0] for b in blocks)
    return TorchTensorUtilities.cat_gen(blocks, (n, model.num_params), model)
