r"""What a batch is, and checking what callers pass: batches (x, y), vectors in parameter space and
training loaders. The one place every path (gradients, products, Hessians, solvers, influence,
per-sample gradients, K-FAC, the distributed data path) learns what a batch is.

A batch is a pair ``(x, y)``; ``x`` is the model's input in one of three forms:

- a tensor: the model is called ``model(x)``;
- a tuple or list: ``model(*x)`` (a model with several positional inputs);
- a dict with string keys: ``model(**x)`` (keyword inputs such as ``input_ids`` and
  ``attention_mask``, the form transformer models take).

The entries of a tuple, list or dict may be tensors, further tuples / lists / dicts, or anything
else (a flag, a config object), which is passed to the model unchanged. The batch size B is the
leading dimension of every tensor of x with at least one dimension; they must agree. 0-d tensors
and other leaves are the same for every point (they are not sliced per sample). A tensor x keeps
pyDVL 0.7's convention: a 0-d x is one point, and a single point may come as [D] or [1, D].

Floating tensors of x must have the model's dtype; integer and boolean tensors (token ids,
masks) pass as they are. Every tensor is moved to the model's device.

Every check takes primitives (the expected dtype, device and P) rather than a model object, so that
any module can use it without importing the model wrapper. Each raises a TypeError or ValueError
that names the function (``where``), the argument (and the key of x), what was expected and what was
given.
"""
from __future__ import annotations

import collections.abc
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import describe_inputs
from .derivative_routes import loss_routes

__all__ = ["Inputs", "apply_loss", "batch_size", "call_model", "check_reread", "check_training_data", "check_vectors",
           "checked_batch", "detached", "floating_inputs", "index_batch", "input_tensors", "map_inputs", "model_args",
           "move_inputs", "num_points", "per_point", "slice_batch", "split_batch", "squeezed_loss", "vmap_dims"]

#: The forms x takes: a tensor, a tuple / list of positional inputs, a dict of keyword inputs.
Inputs = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]

_FORMS = ("a torch.Tensor (model(x)), a tuple/list of inputs (model(*x)) or a dict of keyword inputs "
          "(model(**x))")


def _rows_kept(t: torch.Tensor) -> torch.Tensor:
    """``t`` of one point ([1, ...]) with its size-1 dimensions squeezed but the first."""
    return t.reshape((1,) + tuple(s for s in t.shape[1:] if s != 1))


def apply_loss(loss: Callable, output: torch.Tensor, y: torch.Tensor) -> Any:
    """``loss(squeeze(output), squeeze(y))``, pyDVL 0.7's convention, which aligns an [N, 1]
    output with an [N] target. On a batch of one point the squeeze drops the batch dimension too,
    and a loss written for batches (``F.log_softmax(o, dim=1)``, ``o[:, 0]``) fails on the [C] it
    leaves, where pyDVL failed: per-sample gradients and influences give the loss single points. Such a
    loss then gets the point as a batch of one, its other size-1 dimensions squeezed, which is the
    loss of that batch as the loss defines it. If that fails as well, its error is raised, caused by
    the first."""
    try:
        return loss(torch.squeeze(output), torch.squeeze(y))
    except (IndexError, RuntimeError, ValueError) as exc:
        if not (output.dim() >= 1 and output.shape[0] == 1 and y.dim() >= 1 and y.shape[0] == 1):
            raise
        first = exc
    try:
        return loss(_rows_kept(output), _rows_kept(y))
    except Exception as retry:  # the loss's error on a batch of one, which it was written for
        raise retry from first


def squeezed_loss(loss: Callable, output: torch.Tensor, y: torch.Tensor, *, gradient_check: bool = True
                  ) -> torch.Tensor:
    """pyDVL 0.7's convention for the loss of a batch: ``loss(squeeze(output), squeeze(y))``, a
    scalar. A one-element result is taken as that scalar (autograd takes it, torch.func's grad does
    not, so every engine would not agree on it otherwise); a larger one is a ValueError saying so,
    where torch would fail later with a message about gradients. A model output or a loss value that
    is not a tensor (a tuple, a dict, an output object; a Python float) is a TypeError saying which;
    a loss without a gradient, where one is being taken, a ValueError (``gradient_check=False``: not
    checked, for a caller inside a bare ``vmap``, where the batched value does not show its graph).
    The losses torch cannot differentiate twice are computed by equivalent ones that it can
    (:func:`twicediff.torch.derivative_routes.loss_routes`)."""
    if not isinstance(output, torch.Tensor):
        what = type(output).__name__
        if isinstance(output, dict):
            what += f" with keys {list(output)[:6]}"
        elif isinstance(output, (tuple, list)):
            what += f" of {len(output)}"
        raise TypeError(f"the model must return one tensor, which the loss takes as loss(squeeze(model(x)), "
                        f"squeeze(y)); it returned a {what}: wrap it in a module whose forward returns the "
                        "tensor the loss takes (the logits, say)")
    with loss_routes():  # torch's losses without a second derivative, computed by ones with it
        value = apply_loss(loss, output, y)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the loss must return a scalar tensor (the batch's mean or sum), got a {type(value).__name__}"
                        + ("; a Python number has no gradient: return the tensor, not its .item()"
                           if isinstance(value, (int, float)) else ""))
    if value.dim() != 0:
        if value.numel() == 1:
            value = value.reshape(())
        else:
            raise ValueError(f"the loss must return a scalar (the batch's mean or sum), got a tensor of shape "
                             f"{tuple(value.shape)}; a loss with reduction='none' gives one value per point: use "
                             f"reduction='mean'")
    # Differentiated, a value without a graph would give zeros from torch.func and an autograd error
    # from the rest, so every engine refuses it alike (torch.func's grad reports requires_grad as
    # autograd does; a compiled trace is not checked, its eager fallback is).
    if gradient_check and not torch.compiler.is_compiling() and torch.is_grad_enabled() and not value.requires_grad:
        raise ValueError("the loss does not depend on the model's trainable parameters on this batch (its value has "
                         "no gradient), so every gradient, Hessian product and influence would be zero: a loss "
                         "of argmax or of a rounded output has no gradient, and neither has a model that detaches "
                         "its output or runs under torch.no_grad")
    return value


# ---- the structure of x ---------------------------------------------------------------------------


def _rebuild(container, values: List[Any]):
    """A container of ``container``'s type holding ``values`` (a namedtuple by its fields)."""
    if isinstance(container, tuple) and hasattr(container, "_fields"):
        return type(container)(*values)
    return tuple(values) if isinstance(container, tuple) else list(values)


def map_inputs(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """x with every tensor t replaced by ``fn(t)``, in the same structure; other leaves unchanged."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return _rebuild(x, [map_inputs(fn, v) for v in x])
    if isinstance(x, dict):
        return {k: map_inputs(fn, v) for k, v in x.items()}
    return x


def input_tensors(x: Any, name: str = "x") -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in x, in order: ``x``, ``x[0]``, ``x['input_ids']``, ..."""
    if isinstance(x, torch.Tensor):
        return [(name, x)]
    if isinstance(x, (tuple, list)):
        return [item for k, v in enumerate(x) for item in input_tensors(v, f"{name}[{k}]")]
    if isinstance(x, dict):
        return [item for k, v in x.items() for item in input_tensors(v, f"{name}[{k!r}]")]
    return []


def _check_form(x: Any, where: str) -> None:
    if isinstance(x, torch.Tensor):
        return
    if not isinstance(x, (tuple, list, dict)):
        raise TypeError(f"{where}: x must be {_FORMS}, got {type(x).__name__}")
    if isinstance(x, dict):
        bad = [k for k in x if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: a dict x is passed as model(**x) and needs string keys, got key {bad[0]!r} "
                            f"({type(bad[0]).__name__})")


def batch_size(x: Any, where: str) -> int:
    """B, the number of points of ``x``: its leading size for a tensor (1 for a 0-d tensor); for a
    tuple, list or dict, the leading size of its tensors with at least one dimension, which must agree.

    Raises:
        TypeError: x is not one of the forms (see the module docstring).
        ValueError: the tensors of x disagree on the batch size, or none has a batch dimension.
    """
    _check_form(x, where)
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    tensors = input_tensors(x)
    if not tensors:  # raw Python data (a list of numbers), not a model's inputs
        raise TypeError(f"{where}: x must be {_FORMS}; x is a {type(x).__name__} that holds no tensor: "
                        f"{describe_inputs(x)}")
    batched = [(n, t) for n, t in tensors if t.dim() > 0]
    if not batched:
        raise ValueError(f"{where}: x holds no tensor with a batch dimension (the leading size of its tensors "
                         f"gives the batch size); got {describe_inputs(x)}")
    first_name, first = batched[0]
    for n, t in batched[1:]:
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"{where}: the inputs disagree on the batch size (the leading dimension): "
                             f"{first_name} has shape {tuple(first.shape)} but {n} has shape {tuple(t.shape)}")
    return int(first.shape[0])


def num_points(x: Any) -> int:
    """The number of points in an x already checked (:func:`batch_size`)."""
    return batch_size(x, "num_points")


def split_batch(batch: Any, where: str) -> Tuple[Any, Any]:
    """(x, y) of a batch; a TypeError naming ``where`` when it is not a pair."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"{where}: each batch must be a pair (x, y), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def model_args(x: Any) -> Tuple[tuple, Dict[str, Any]]:
    """(args, kwargs) with which the model is called on x: ``(x,), {}``, ``tuple(x), {}`` or
    ``(), dict(x)`` (for ``torch.func.functional_call``)."""
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    if isinstance(x, dict):
        return (), dict(x)
    return (x,), {}


def call_model(model: nn.Module, x: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the form of x."""
    args, kwargs = model_args(x)
    return model(*args, **kwargs)


def move_inputs(x: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    """x with every tensor on ``device`` and, when ``dtype`` is given, every floating tensor in it."""
    if dtype is None:
        return map_inputs(lambda t: t.to(device), x)
    return map_inputs(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device), x)


def detached(x: Any) -> Any:
    """x with every tensor detached."""
    return map_inputs(lambda t: t.detach(), x)


def floating_inputs(x: Any) -> List[torch.Tensor]:
    """The floating-point tensors of x, in order (those a derivative in x is taken for)."""
    return [t for _, t in input_tensors(x) if t.is_floating_point()]


def index_batch(x: Any, index: Any) -> Any:
    """Points ``index`` of x (a slice, or an int64 tensor of positions): its tensors with a batch
    dimension indexed, other leaves (0-d tensors, flags) unchanged."""
    if isinstance(x, torch.Tensor):
        return x[index]
    return map_inputs(lambda t: t[index] if t.dim() > 0 else t, x)


def slice_batch(x: Any, start: int, stop: int) -> Any:
    """Points ``start:stop`` of x (views: :func:`index_batch` with a slice)."""
    return index_batch(x, slice(start, stop))


def vmap_dims(x: Any) -> Any:
    """``in_dims`` for ``torch.func.vmap`` over the points of x: 0 for a tensor x; for a structure,
    the same structure with 0 at every tensor with a batch dimension and None elsewhere."""
    if isinstance(x, torch.Tensor):
        return 0

    def dim(v):
        if isinstance(v, (tuple, list, dict)):
            return vmap_dims(v)
        return 0 if isinstance(v, torch.Tensor) and v.dim() > 0 else None

    if isinstance(x, (tuple, list)):
        return _rebuild(x, [dim(v) for v in x])
    if isinstance(x, dict):
        return {k: dim(v) for k, v in x.items()}
    return None


def per_point(x_i: Any, dims: Any) -> Any:
    """One point of x inside ``vmap(..., in_dims=vmap_dims(x))`` as a batch of one: the tensors
    vmap took a point of get their leading dimension back (``unsqueeze(0)``)."""
    if isinstance(x_i, torch.Tensor):
        return x_i.unsqueeze(0) if dims == 0 else x_i
    if isinstance(x_i, (tuple, list)):
        return _rebuild(x_i, [per_point(v, d) for v, d in zip(x_i, dims)])
    if isinstance(x_i, dict):
        return {k: per_point(v, dims[k]) for k, v in x_i.items()}
    return x_i


# ---- checking a batch -----------------------------------------------------------------------------


def checked_batch(x, y, dtype: torch.dtype, device: torch.device, where: str) -> Tuple[Any, torch.Tensor]:
    """(x, y) on ``device`` after checking x's form (see the module docstring), that its tensors agree
    on the batch size and that y holds as many points, and that x's floating tensors have the
    parameters' ``dtype``; integer labels of another width become int64.

    Raises:
        TypeError: x not one of the forms; y not a tensor; a floating tensor of x of another dtype.
        ValueError: the tensors of x disagree on the batch size, or x and y on the number of points.
    """
    _check_form(x, where)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{where}: y must be a torch.Tensor, got {type(y).__name__}")
    B = batch_size(x, where)
    # A batch of several points needs as many targets; a single point, x [1, D] or [D], takes a
    # y of any shape (y [K] for a K-dimensional target), as pyDVL 0.7.1 does: the loss then
    # compares squeeze(model(x)) with squeeze(y).
    if isinstance(x, torch.Tensor):
        if x.dim() > 1 and x.shape[0] > 1 and y.dim() > 0 and x.shape[0] != y.shape[0]:
            raise ValueError(f"{where}: x and y must hold the same number of points (first dimension), got "
                             f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}")
    elif B > 1 and y.dim() > 0 and y.shape[0] != B:
        raise ValueError(f"{where}: x and y must hold the same number of points (first dimension), got "
                         f"{B} in x ({describe_inputs(x)}) and y of shape {tuple(y.shape)}")
    for name, t in input_tensors(x):
        if t.is_floating_point() and t.dtype != dtype:
            raise TypeError(f"{where}: {name} has dtype {t.dtype} but the model's parameters are {dtype}; "
                            f"convert one of them ({name}.to({dtype}) or model.to(...))")
    if not (y.is_floating_point() or y.is_complex()) and y.dtype not in (torch.int64, torch.bool):
        # Class labels stored as int32 / int16 / uint8 (numpy's default on some platforms, compact
        # datasets): torch's losses take int64 class indices only.
        y = y.long()
    return move_inputs(x, device), y.to(device)


def check_vectors(v, P: int, dtype: torch.dtype, device: torch.device, where: str, name: str = "v",
                  rows: str = "D", dims: Tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """``v`` as [P] or [rows, P] vectors in parameter space (``dims`` says which of the two are
    allowed), on ``device``; a TypeError or ValueError naming ``where`` and ``name`` otherwise."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() not in dims or v.shape[-1] != P:
        form = " or ".join({1: "[P]", 2: f"[{rows}, P]"}[d] for d in sorted(dims, reverse=True))
        raise ValueError(f"{where}: {name} must be {form} with P = {P} (the model's number of "
                         f"trainable parameters), got shape {tuple(v.shape)}")
    if v.dtype != dtype:
        raise TypeError(f"{where}: {name} has dtype {v.dtype} but the model's parameters are {dtype}")
    return v.to(device)


def check_training_data(training_data, where: str) -> Optional[int]:
    """TypeError / ValueError for a loader that is None, not iterable, or has length 0; its number
    of batches where it has a length, else None. With a process group, raised on every rank when
    it holds on one (:func:`twicediff.distributed.guarded`)."""
    from .. import distributed

    return distributed.guarded(distributed.current_group(), where,
                                lambda: _check_training_data(training_data, where))


def check_reread(data, where: str, name: str, why: str) -> None:
    """A TypeError for a one-shot iterator (a generator, ``iter(loader)``) that ``where`` must read
    more than once: the second reading found it exhausted, and an influence came out of the wrong
    points or failed with "holds no points" for data that held some. With a process group, raised
    on every rank when it holds on one."""
    from .. import distributed

    def check() -> None:
        if isinstance(data, collections.abc.Iterator):
            raise TypeError(f"{where}: {name} is a one-shot iterator ({type(data).__name__}), but {why}: pass a "
                            "DataLoader or a list of (x, y) batches")

    distributed.guarded(distributed.current_group(), where, check)


def _check_training_data(training_data, where: str) -> Optional[int]:
    if training_data is None or not hasattr(training_data, "__iter__"):
        raise TypeError(f"{where}: training_data must be an iterable of (x, y) batches (e.g. a DataLoader), "
                        f"got {type(training_data).__name__}")
    try:
        n = len(training_data)
    except TypeError:
        return None
    if n == 0:
        raise ValueError(f"{where}: training_data must not be empty (a loader of (x, y) batches), got 0 batches")
    return n
