r"""Per-sample derivatives of the single-point loss, for a block of B samples at once.

The loss of one point is pyDVL 0.7's, as :meth:`TorchTwiceDifferentiable.grad` takes it on a batch
of one: ``ℓ(x_i, y_i) = loss(squeeze(model(x_i[None])), squeeze(y_i[None]))``.

- :func:`per_sample_grads` — ∇θℓ(x_i, y_i) for every i of the block, as per-parameter blocks
  [B, *shape_k]: ``vmap`` over samples of ``torch.func.grad`` of a ``functional_call``.
- :func:`per_sample_mixed_products` — ``out[t, i] = ∇x_i (v[t] · ∇θℓ(x_i, y_i))`` for T
  directions, [T, B, *x_i.shape]: the mixed products of the summed loss Σ_i ℓ(x_i, y_i) with
  respect to the whole block x, which separate per sample because ℓ(x_j, y_j) does not depend on
  x_i for j ≠ i; T backward passes over the block instead of T·B over single points.
- :func:`bytes_per_sample` — the memory estimate the callers chunk blocks with.

Where torch.func cannot run the model (an op without a vmap rule), both fall back to one forward
pass per sample through plain autograd (gradients: also one backward per sample, as pyDVL 0.7
computes them), and log it once per function when the fallback works (on bad data it raises
autograd's error instead).
"""
from __future__ import annotations

import logging
from typing import List

import torch

from . import hvp as _hvp
from .twice_differentiable import TorchTwiceDifferentiable, _activation_numel

__all__ = ["bytes_per_sample", "per_sample_grads", "per_sample_mixed_products"]

logger = logging.getLogger(__name__)

_FUNC_ERRORS = (RuntimeError, NotImplementedError)


def bytes_per_sample(model: TorchTwiceDifferentiable, x: torch.Tensor, directions: int = 0) -> int:
    """Estimated bytes one sample of ``x`` ([B, ...]) costs in :func:`per_sample_grads`
    (``directions=0``: its gradient, 3 copies of P, and 6 copies of its activations) or in
    :func:`per_sample_mixed_products` with ``directions`` = T (6 copies of its activations for the
    twice-differentiable graph, and T·(2 + |x_i|) for the products and their cotangents)."""
    elem = torch.finfo(model.dtype).bits // 8
    activations = _activation_numel(model.model, x[:1])
    if directions == 0:
        return elem * (3 * model.num_params + 6 * activations)
    return elem * (6 * activations + directions * (2 + x[0].numel()))


def _point_loss(model: TorchTwiceDifferentiable, params, fixed, x_i: torch.Tensor, y_i: torch.Tensor) -> torch.Tensor:
    output = torch.func.functional_call(model.model, (params, fixed), (x_i.unsqueeze(0),))
    return _hvp.squeezed_loss(model.loss, output, y_i.unsqueeze(0))


def per_sample_grads(model: TorchTwiceDifferentiable, x: torch.Tensor, y: torch.Tensor) -> List[torch.Tensor]:
    r"""∇θℓ(x_i, y_i) for each of the B samples of the block.

    Args:
        model: the model and loss; derivatives are taken in its trainable parameters.
        x: [B, *x_i.shape] inputs, on the model's device.
        y: [B, *y_i.shape] targets, on the model's device.

    Returns:
        One tensor [B, *shape_k] per trainable parameter k (in ``model.parameters`` order), detached;
        packed, row i is ``model.grad(x[i:i+1], y[i:i+1])``.
    """
    names, params, fixed = _hvp._split_params(model.model)
    try:
        grads = torch.func.vmap(torch.func.grad(lambda p, xi, yi: _point_loss(model, p, fixed, xi, yi)),
                                in_dims=(None, 0, 0))(params, x, y)
        return [grads[n].detach() for n in names]
    except _FUNC_ERRORS as exc:
        func_error = exc
    trainable = model.parameters
    # Bad data (a wrong shape, a class index out of range) fails here too, and raises plain
    # autograd's error: the fallback is logged only when it works.
    rows = [torch.autograd.grad(_hvp.squeezed_loss(model.loss, model.model(x[i:i + 1]), y[i:i + 1]), trainable)
            for i in range(x.shape[0])]
    _log_fallback("per_sample_grads", func_error)
    return [torch.stack([r[k] for r in rows]) if rows else x.new_empty(0, *p.shape)
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
    B = x.shape[0]
    T = v.shape[0]
    if B == 0 or T == 0:
        return x.new_zeros(T, *x.shape)
    xg = x.detach().requires_grad_(True)
    trainable = model.parameters
    names, _, fixed = _hvp._split_params(model.model)
    params = dict(zip(names, trainable))  # the live parameters: the graph reaches them
    try:
        losses = torch.func.vmap(lambda xi, yi: _point_loss(model, params, fixed, xi, yi))(xg, y)
    except _FUNC_ERRORS as exc:
        losses = torch.stack([_hvp.squeezed_loss(model.loss, model.model(xg[i:i + 1]), y[i:i + 1])
                              for i in range(B)])
        _log_fallback("per_sample_mixed_products", exc)  # once it worked (see per_sample_grads)
    g = torch.autograd.grad(losses.sum(), trainable, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in g])
    return _hvp.batched_mvp(g, v, xg).reshape(T, *x.shape)


_logged_fallback: set = set()


def _log_fallback(where: str, exc: BaseException) -> None:
    if where not in _logged_fallback:
        _logged_fallback.add(where)
        logger.warning("%s: torch.func cannot run this model (%s); computing one sample at a time "
                       "with autograd (slower)", where, exc)
