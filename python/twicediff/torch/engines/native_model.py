"""Reading a model and loss for the native engine: does twicediff's fused R-operator op
(:func:`twicediff.ops.mlp_hvp`) compute exactly this model's loss, and with which layers?

What qualifies:

- the model: an ``nn.Sequential`` (nested Sequentials are flattened, a bare ``nn.Linear`` counts as
  one) made of a *frozen prefix* — leading modules of any type whose parameters all have
  ``requires_grad=False``, run once per call under ``no_grad`` as a feature extractor — followed by
  a *trainable suffix* of ``Linear`` (all its parameters trainable, bias or not), ``ReLU``,
  ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``GELU`` (both approximations), ``SiLU``, ``Softplus``,
  ``Identity``, ``Flatten`` (a no-op on [N, F] rows) and ``Dropout`` (evaluation mode);
- the loss: MSE, cross-entropy with class-index targets or BCE-with-logits, reduction ``"mean"``
  or ``"sum"`` and every other option at its default, given as the ``torch.nn.functional``
  function, a ``functools.partial`` of it with ``reduction=``, or the ``nn`` module.

The loss of a batch is pyDVL 0.7's ``loss(squeeze(model(x)), squeeze(y))`` and the parameter
vector θ [P] is ``cat([p.reshape(-1) for p in model.parameters() if p.requires_grad])``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import NotNativeError

__all__ = ["IGNORE_INDEX", "NativeModel", "is_active_dropout", "read_native_model", "updates_in_training"]

_LOSS_FUNCTIONS = {F.mse_loss: "mse", F.cross_entropy: "cross_entropy",
                   F.binary_cross_entropy_with_logits: "bce_with_logits"}
_LOSS_MODULES = {nn.MSELoss: "mse", nn.CrossEntropyLoss: "cross_entropy", nn.BCEWithLogitsLoss: "bce_with_logits"}
# Keyword options of the functional losses other than `reduction`, with the only values the engine takes.
_LOSS_DEFAULTS = {
    "mse": {"size_average": None, "reduce": None, "weight": None},
    "cross_entropy": {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
                      "label_smoothing": 0.0},
    "bce_with_logits": {"weight": None, "size_average": None, "reduce": None, "pos_weight": None},
}
IGNORE_INDEX = -100  # cross-entropy's default ignore_index: rows with that target do not count


@dataclass(frozen=True)
class NativeModel:
    """The native op's view of a model and loss.

    Attributes:
        model: the user's module (read, never changed).
        prefix: the frozen leading modules, run under no_grad as a feature extractor.
        linears: the trainable Linear layers, in call order.
        chains: per Linear, the elementwise activations after it, ``[(name, p0, p1), ...]``.
        loss_kind: ``"mse"``, ``"cross_entropy"`` or ``"bce_with_logits"``.
        reduction: ``"mean"`` or ``"sum"``.
        suffix: the modules after the prefix in the order forward calls them (what :meth:`NativeEngine.verify`
            runs to check the reading).
    """
    model: nn.Module
    prefix: Tuple[nn.Module, ...]
    linears: Tuple[nn.Linear, ...]
    chains: Tuple[Tuple[tuple, ...], ...]
    loss_kind: str
    reduction: str
    suffix: Tuple[nn.Module, ...] = ()


_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Flatten)
_SUPPORTED = "Linear, ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU, Softplus, Identity, Flatten, Dropout (eval)"


def _activation(module: nn.Module) -> Optional[tuple]:
    """(name, p0, p1) of an elementwise activation module the op knows, else None."""
    kind = type(module)
    if kind is nn.ReLU:
        return ("relu", 0.0, 0.0)
    if kind is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope), 0.0)
    if kind is nn.Tanh:
        return ("tanh", 0.0, 0.0)
    if kind is nn.Sigmoid:
        return ("sigmoid", 0.0, 0.0)
    if kind is nn.GELU and module.approximate in ("none", "tanh"):
        return ("gelu" if module.approximate == "none" else "gelu_tanh", 0.0, 0.0)
    if kind is nn.SiLU:
        return ("silu", 0.0, 0.0)
    if kind is nn.Softplus:
        return ("softplus", float(module.beta), float(module.threshold))
    return None


def _flatten_sequential(model: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """[(qualified name, module)] of a Sequential with nested Sequentials expanded, in the order its
    forward calls them: a module instance that stands in several places is listed at each of them
    (``named_children`` would list it once)."""
    out = []
    for name, child in model._modules.items():
        if child is None:
            continue
        qualified = f"{prefix}{name}"
        if type(child) is nn.Sequential and not _has_hooks(child):
            out.extend(_flatten_sequential(child, qualified + "."))
        else:
            out.append((qualified, child))
    return out


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks, or a forward replaced on the instance: either way the module does not compute
    what its type says."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)


def _hooks_reason(name: str, module: nn.Module) -> str:
    what = "has its forward replaced on the instance" if "forward" in vars(module) else "has forward hooks"
    return f"{_describe(name, module)} {what}" if name else f"the model {what}"


def _describe(name: str, module: nn.Module) -> str:
    return f"module '{name}' ({type(module).__name__})"


def is_active_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0


def updates_in_training(module: nn.Module) -> bool:
    """A module whose forward in training mode changes its buffers (BatchNorm's running statistics)."""
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.training and module.track_running_stats


def _parse_loss(loss: Callable) -> Tuple[str, str]:
    """(loss kind, reduction) of a native loss; NotNativeError naming what is not native otherwise."""
    if isinstance(loss, functools.partial):
        kind = _LOSS_FUNCTIONS.get(loss.func)
        if kind is None:
            raise NotNativeError(f"loss functools.partial({getattr(loss.func, '__name__', loss.func)!r}) is not one of "
                             "F.mse_loss, F.cross_entropy, F.binary_cross_entropy_with_logits")
        if loss.args:
            raise NotNativeError(f"loss partial({loss.func.__name__}) binds positional arguments {loss.args!r}")
        options = dict(loss.keywords)
        reduction = options.pop("reduction", "mean")
    elif type(loss) in _LOSS_MODULES:
        kind = _LOSS_MODULES[type(loss)]
        if _has_hooks(loss):
            raise NotNativeError(f"loss {type(loss).__name__} has forward hooks")
        reduction = loss.reduction
        options = {k: getattr(loss, k) for k in ("weight", "pos_weight", "ignore_index", "label_smoothing")
                   if hasattr(loss, k)}
    else:
        kind = _LOSS_FUNCTIONS.get(loss) if _hashable(loss) else None
        if kind is None:
            name = getattr(loss, "__name__", type(loss).__name__)
            raise NotNativeError(f"loss {name!r} is not MSE, cross-entropy or BCE-with-logits (as an F function, "
                             "a functools.partial of one with reduction=, or an nn loss module)")
        reduction, options = "mean", {}
    name = {"mse": "MSE", "cross_entropy": "cross-entropy", "bce_with_logits": "BCE-with-logits"}[kind]
    if reduction not in ("mean", "sum"):
        raise NotNativeError(f"{name} loss option reduction={reduction!r} is not native (only 'mean' and 'sum')")
    defaults = _LOSS_DEFAULTS[kind]
    for option, value in options.items():
        if option not in defaults:
            raise NotNativeError(f"{name} loss option {option}={value!r} is not native")
        default = defaults[option]
        if not (value is default if default is None else (not isinstance(value, torch.Tensor) and value == default)):
            raise NotNativeError(f"{name} loss option {option}={_short(value)} is not native (only the default "
                             f"{option}={default!r})")
    return kind, reduction


def _hashable(obj) -> bool:
    try:
        hash(obj)
        return True
    except TypeError:
        return False


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {list(value.shape)}>"
    return repr(value)


def read_native_model(model: nn.Module, loss: Callable) -> NativeModel:
    """The native op's view of ``model`` and ``loss`` (see the module docstring).

    Raises:
        NotNativeError: naming the module, loss or loss option the op cannot take.
    """
    loss_kind, reduction = _parse_loss(loss)
    if type(model) is nn.Linear:
        modules = [("", model)]
    elif type(model) is nn.Sequential:
        if _has_hooks(model):
            raise NotNativeError(_hooks_reason("", model))
        modules = _flatten_sequential(model)
    else:
        raise NotNativeError(f"the model is a {type(model).__name__}, not an nn.Sequential (nested Sequentials are "
                             "flattened) or an nn.Linear")
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        raise NotNativeError("global module forward hooks are registered")
    for name, m in model.named_modules():
        if is_active_dropout(m):
            raise NotNativeError(f"{_describe(name, m)} is in training mode (random); call model.eval() first")
        if updates_in_training(m):
            raise NotNativeError(f"{_describe(name, m)} is in training mode (its forward updates its running "
                                 "statistics and normalizes by the batch's); call model.eval() first")

    first = next((i for i, (_, m) in enumerate(modules) if any(p.requires_grad for p in m.parameters())), None)
    if first is None:
        raise NotNativeError("the model has no parameter that requires grad")
    prefix = [m for _, m in modules[:first]]
    linears: List[nn.Linear] = []
    chains: List[List[tuple]] = []
    for name, m in modules[first:]:
        if _has_hooks(m):
            raise NotNativeError(_hooks_reason(name, m))
        if type(m) is nn.Linear:
            params = list(m.parameters())
            if not all(p.requires_grad for p in params):
                frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
                raise NotNativeError(f"{_describe(name, m)} after the first trainable module has frozen parameter(s) "
                             f"{frozen}; only a frozen prefix is native")
            linears.append(m)
            chains.append([])
            continue
        act = _activation(m)
        if act is not None:
            chains[-1].append(act)
            continue
        if type(m) in _PASSTHROUGH:
            if type(m) is nn.Flatten and (m.start_dim not in (1, -1) or m.end_dim not in (1, -1)):
                raise NotNativeError(f"{_describe(name, m)} with start_dim={m.start_dim}, end_dim={m.end_dim} after the "
                             "first trainable Linear is not a no-op on [N, F] rows")
            continue
        if type(m) is nn.GELU:
            raise NotNativeError(f"{_describe(name, m)} with approximate={m.approximate!r} is not native")
        raise NotNativeError(f"{_describe(name, m)} is not native after the frozen prefix (native: {_SUPPORTED})")
    if any(len(c) > 8 for c in chains):
        raise NotNativeError("more than 8 activations in a row between two Linear layers")
    # The op's parameter layout must be the caller's: model.parameters() order, trainable only,
    # each tensor once (a Linear used twice or tied weights would change it).
    ours = [p for lin in linears for p in lin.parameters()]
    theirs = [p for p in model.parameters() if p.requires_grad]
    if len(ours) != len(theirs) or any(a is not b for a, b in zip(ours, theirs)):
        raise NotNativeError("the trainable parameters are shared between layers or not in model.parameters() order")
    dtypes = {p.dtype for p in ours}
    devices = {p.device for p in ours}
    if len(dtypes) > 1 or len(devices) > 1:
        raise NotNativeError(f"the trainable parameters mix dtypes {sorted(map(str, dtypes))} or devices "
                     f"{sorted(map(str, devices))}")
    dtype, device = dtypes.pop(), devices.pop()
    if dtype not in (torch.float32, torch.float64) and not (device.type == "cuda" and dtype in
                                                             (torch.float16, torch.bfloat16)):
        raise NotNativeError(f"parameters of dtype {dtype} on {device.type} are not native (float32, float64; "
                     "float16 / bfloat16 on CUDA)")
    return NativeModel(model, tuple(prefix), tuple(linears), tuple(tuple(c) for c in chains), loss_kind, reduction,
                       tuple(m for _, m in modules[first:]))
