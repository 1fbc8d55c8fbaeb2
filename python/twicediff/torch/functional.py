r"""pyDVL 0.7.1's functional Hessian-vector products (``pydvl.influence.torch.functional``), with
its names, signatures and values: the parameters as a dict ``{name: tensor}`` of the trainable
parameters (``model.named_parameters()`` with ``requires_grad``), a direction as a flat [P] vector
or in that structure (:func:`twicediff.torch.util.align_structure`), and the loss of a batch
``loss(model(x), y)`` as the model gives it (no squeeze, unlike ``TorchTwiceDifferentiable.grad``).

How the products are computed:

- :func:`hvp` on an arbitrary function: torch.func, reverse-over-reverse (``reverse_only=True``)
  or forward-over-reverse.
- The batch products of :func:`batch_hvp_gen` and :func:`get_hvp_function` go through twicediff's
  native R-operator engine (:class:`twicediff.torch.engines.NativeEngine`) when it takes the model and the
  loss (an ``nn.Sequential`` of Linear layers and elementwise activations, behind any frozen
  prefix, under MSE / cross-entropy / BCE-with-logits, in evaluation mode) and the batch's shapes
  make ``loss(model(x), y)`` the same function as the engine's squeezed loss: ``y`` shaped like the
  output (MSE, BCE) or like its rows (class indices). Everything else, and every product whose
  result must stay differentiable (``track_gradients=True``), goes through :func:`hvp`.
- ``get_hvp_function(..., use_hessian_avg=False)`` is the Hessian of the empirical loss
  \(\sum_b n_b L_b / \sum_b n_b\); it is taken batch by batch, \(\sum_b (n_b/N) H_b v\) (the same
  matrix), so that memory holds one batch's graph, not the whole data set's.
"""
from __future__ import annotations

from typing import Callable, Dict, Generator, Iterable, Optional, Tuple

import torch
from torch.func import functional_call, grad, jvp, vjp  # noqa: F401  (functional_call: in pyDVL's namespace too)
from torch.utils.data import DataLoader

from ..errors import NotNativeError
from .engines import NativeEngine
from .derivative_routes import routes_for_derivatives
from .forward_mode import formula_failure, reverse_mode_constants
from . import stateless
from .util import TorchTensorContainerType, align_structure, flatten_tensors_to_vector, to_model_device

__all__ = [
    "get_hvp_function",
]


def hvp(func: Callable[[TorchTensorContainerType], torch.Tensor], params: TorchTensorContainerType,
        vec: TorchTensorContainerType, reverse_only: bool = True) -> TorchTensorContainerType:
    r"""\(\nabla^2 f(\theta)\, v\) for a scalar function ``func`` at ``params``, in the structure of
    ``params`` (a tensor, a tuple or a dict of tensors; ``vec`` has the same structure).

    ``reverse_only=True``: the pullback of v through ∇f (reverse over reverse); False: the tangent
    of ∇f along v (forward over reverse, holding constant what reverse mode does:
    :mod:`twicediff.torch.forward_mode`). Both are exact (``F.embedding_bag`` and weight
    normalisation computed as :mod:`twicediff.torch.derivative_routes` says); where torch's forward-mode formula of an
    op fails (``F.mse_loss``'s, on an implicit zero tangent or an integer target:
    ``forward_mode.FORMULA_FAILURES``), the product is taken reverse over reverse instead.
    """
    with routes_for_derivatives():  # torch's ops without (correct) second derivatives, rerouted
        if reverse_only:
            return vjp(grad(func), params)[1](vec)[0]
        try:
            with reverse_mode_constants():  # padding rows and no_grad values stay constants, as in reverse mode
                return jvp(grad(func), (params,), (vec,))[1]
        except RuntimeError as exc:
            if not formula_failure(exc):
                raise
            return vjp(grad(func), params)[1](vec)[0]


def batch_loss_function(model: torch.nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        x: torch.Tensor, y: torch.Tensor) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    r"""``params ↦ loss(model(params, x), y)``: the loss of the batch (x, y) as a function of the
    parameters given by name (those not given are the module's own)."""

    def batch_loss(params: Dict[str, torch.Tensor]):
        return loss(stateless.functional_call(model, params, (to_model_device(x, model),)), y)

    return batch_loss


def empirical_loss_function(model: torch.nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            data_loader: DataLoader) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    r"""``params ↦ Σ_b n_b · loss(model(params, x_b), y_b) / Σ_b n_b`` over the batches of
    ``data_loader`` (n_b = ``x_b.size(0)``): the mean loss over the data when the loss of a batch is
    its mean. Parameters not given are the module's own.

    Raises (when called):
        ValueError: the loader yields no point.
    """

    def empirical_loss(params: Dict[str, torch.Tensor]):
        total, count = None, 0
        for x, y in iter(data_loader):
            output = stateless.functional_call(model, params, (to_model_device(x, model),))
            value = loss(output, to_model_device(y, model))
            total = value * x.size(0) if total is None else total + value * x.size(0)
            count += x.size(0)
        if count == 0:
            raise ValueError("empirical_loss_function: data_loader yielded no points; the mean loss needs at least one")
        return total / count

    return empirical_loss


def _native_engine(model: torch.nn.Module, loss: Callable):
    """The native engine for (model, loss), or None (also for a model in training mode: pyDVL's
    functional API runs it so, with batch statistics and dropout)."""
    if any(m.training for m in model.modules()):
        return None
    try:
        return NativeEngine(model, loss)
    except NotNativeError:
        return None


class _NativeBatch:
    """The native engine's product on one batch, when it computes the Hessian of exactly
    ``loss(model(x), y)``; ``None`` from :meth:`make` otherwise."""

    @staticmethod
    def make(engine, model: torch.nn.Module, x, y, shapes: Dict) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if engine is None or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            return None
        x = to_model_device(x, model)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in shapes:
            try:
                h = engine.features(x)
            except Exception:  # the batch is wrong for the model: the generic path raises torch's error
                shapes[key] = None
            else:
                C = engine.linears[-1].out_features
                shapes[key] = (*h.shape[:-1], C) if h.dim() in (1, 2) else None
        out_shape = shapes[key]
        if out_shape is None:
            return None
        weight = engine.linears[0].weight
        if engine.loss_kind == "cross_entropy":
            agrees = y.dtype == torch.long and tuple(y.shape) == out_shape[:-1]
        else:
            agrees = y.dtype == weight.dtype and tuple(y.shape) == out_shape
        agrees = agrees and y.device == weight.device  # pyDVL does not move y: torch's error on the generic path
        if not agrees:  # the squeezed and the unsqueezed loss may differ: pyDVL's value is the unsqueezed one
            return None
        try:
            prepared = engine.prepare(x, y)
        except (NotNativeError, ValueError, TypeError):
            return None

        def product(v: torch.Tensor) -> Optional[torch.Tensor]:
            if v.dtype != weight.dtype or v.device != weight.device:
                return None
            return engine.apply(prepared, v.reshape(1, -1), "hessian")[0]

        return product


def _trainable(model: torch.nn.Module, track_gradients: bool) -> Dict[str, torch.Tensor]:
    return {k: p if track_gradients else p.detach() for k, p in model.named_parameters() if p.requires_grad}


def _batch_products(model: torch.nn.Module, loss: Callable, data_loader: Iterable, reverse_only: bool,
                    params: Dict[str, torch.Tensor], native: bool
                    ) -> Generator[Tuple[int, Callable[[TorchTensorContainerType], torch.Tensor]], None, None]:
    """(n_b, v ↦ H_b v as a flat [P] vector) for each batch (x_b, y_b) of the loader."""
    shapes: Dict = {}
    engine = _native_engine(model, loss) if native else None  # read once per pass over the data
    for x, y in iter(data_loader):
        fast = _NativeBatch.make(engine, model, x, y, shapes)
        batch_loss = batch_loss_function(model, loss, x, y)

        def batch_hvp(vec, batch_loss=batch_loss, fast=fast):
            v = align_structure(params, vec)
            if fast is not None:
                out = fast(flatten_tensors_to_vector(v.values()))
                if out is not None:
                    return out
            return flatten_tensors_to_vector(hvp(batch_loss, params, v, reverse_only=reverse_only).values())

        yield x.size(0), batch_hvp


def batch_hvp_gen(model: torch.nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  data_loader: DataLoader, reverse_only: bool = True
                  ) -> Generator[Callable[[torch.Tensor], torch.Tensor], None, None]:
    r"""For each batch (x_b, y_b) of ``data_loader``, the function ``v ↦ H_b v`` ([P] → [P], v also
    as a dict or tuple in the parameters' structure) with H_b the Hessian of
    ``loss(model(x_b), y_b)`` in the trainable parameters. The products are detached."""
    params = _trainable(model, False)
    for _, product in _batch_products(model, loss, data_loader, reverse_only, params, native=True):
        yield product


def get_hvp_function(model: torch.nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     data_loader: DataLoader, use_hessian_avg: bool = True, reverse_only: bool = True,
                     track_gradients: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""``v ↦ H v`` ([P] → [P]) for a Hessian of the loss over ``data_loader``, read anew at each call.

    Args:
        use_hessian_avg: True: \(H = \frac{1}{B}\sum_b H_b\), the batch Hessians averaged with equal
            weights over the B batches (``len(data_loader)``, or the batches seen when the loader
            has no length); False: the Hessian of the empirical loss
            (:func:`empirical_loss_function`), \(\sum_b (n_b/N) H_b\).
        reverse_only: how :func:`hvp` differentiates (the same values either way).
        track_gradients: keep the product differentiable in the parameters (computed by :func:`hvp`
            on the live parameters); else the parameters are read detached and so is the result.
    """
    params = _trainable(model, track_gradients)

    def products():
        return _batch_products(model, loss, data_loader, reverse_only, params, native=not track_gradients)

    def hvp_function(vec: torch.Tensor) -> torch.Tensor:
        total, count = None, 0
        for n, product in products():
            part = product(vec) * n
            total = part if total is None else total + part
            count += n
        if count == 0:
            raise ValueError("get_hvp_function: data_loader yielded no points")
        return total / count

    def avg_hvp_function(vec: torch.Tensor) -> torch.Tensor:
        total, batches = None, 0
        for _, product in products():
            part = product(vec)
            total = part if total is None else total + part
            batches += 1
        if batches == 0:
            raise ValueError("get_hvp_function: data_loader yielded no batch")
        divisor = len(data_loader) if hasattr(data_loader, "__len__") else batches
        return total / float(divisor)

    return avg_hvp_function if use_hessian_avg else hvp_function
