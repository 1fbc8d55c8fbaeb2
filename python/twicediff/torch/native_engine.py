"""The native HVP engine: recognises a model and loss that twicediff's fused R-operator op
(:func:`twicediff._ops.mlp_hvp`) can take, and computes exact Hessian- (or Gauss-Newton-) vector
products of their loss with it.

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
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ops

__all__ = ["BadBatchError", "NativeHvpEngine", "build_native_engine"]

MODES = ("hessian", "gauss_newton")

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
_IGNORE_INDEX = -100  # cross-entropy's default ignore_index: rows with that target do not count


class BadBatchError(ValueError):
    """A batch no engine can take (a wrong feature count, a class index out of range): unlike the
    engine's other ValueErrors, which mean "use a generic engine", this one is the caller's to see."""


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
    """[(qualified name, module)] of a Sequential with nested Sequentials expanded, in call order."""
    out = []
    for name, child in model.named_children():
        qualified = f"{prefix}{name}"
        if type(child) is nn.Sequential and not _has_hooks(child):
            out.extend(_flatten_sequential(child, qualified + "."))
        else:
            out.append((qualified, child))
    return out


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _describe(name: str, module: nn.Module) -> str:
    return f"module '{name}' ({type(module).__name__})"


def _is_active_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0


def _parse_loss(loss: Callable) -> Tuple[Optional[str], str, str]:
    """(loss kind, reduction, "") when the loss is native, else (None, "", reason)."""
    if isinstance(loss, functools.partial):
        kind = _LOSS_FUNCTIONS.get(loss.func)
        if kind is None:
            return None, "", f"loss functools.partial({getattr(loss.func, '__name__', loss.func)!r}) is not one of " \
                             "F.mse_loss, F.cross_entropy, F.binary_cross_entropy_with_logits"
        if loss.args:
            return None, "", f"loss partial({loss.func.__name__}) binds positional arguments {loss.args!r}"
        options = dict(loss.keywords)
        reduction = options.pop("reduction", "mean")
    elif type(loss) in _LOSS_MODULES:
        kind = _LOSS_MODULES[type(loss)]
        if _has_hooks(loss):
            return None, "", f"loss {type(loss).__name__} has forward hooks"
        reduction = loss.reduction
        options = {k: getattr(loss, k) for k in ("weight", "pos_weight", "ignore_index", "label_smoothing")
                   if hasattr(loss, k)}
    else:
        kind = _LOSS_FUNCTIONS.get(loss) if _hashable(loss) else None
        if kind is None:
            name = getattr(loss, "__name__", type(loss).__name__)
            return None, "", f"loss {name!r} is not MSE, cross-entropy or BCE-with-logits (as an F function, " \
                             "a functools.partial of one with reduction=, or an nn loss module)"
        reduction, options = "mean", {}
    name = {"mse": "MSE", "cross_entropy": "cross-entropy", "bce_with_logits": "BCE-with-logits"}[kind]
    if reduction not in ("mean", "sum"):
        return None, "", f"{name} loss option reduction={reduction!r} is not native (only 'mean' and 'sum')"
    defaults = _LOSS_DEFAULTS[kind]
    for option, value in options.items():
        if option not in defaults:
            return None, "", f"{name} loss option {option}={value!r} is not native"
        default = defaults[option]
        if not (value is default if default is None else (not isinstance(value, torch.Tensor) and value == default)):
            return None, "", f"{name} loss option {option}={_short(value)} is not native (only the default " \
                             f"{option}={default!r})"
    return kind, reduction, ""


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


class NativeHvpEngine:
    """Exact batched products H v (or JᵀH_ℓJ v) for a model and loss that
    :func:`build_native_engine` accepted. Reads the model's current weights at every call."""

    def __init__(self, model: nn.Module, prefix: Sequence[nn.Module], linears: Sequence[nn.Linear],
                 chains: Sequence[List[tuple]], loss_kind: str, reduction: str):
        self.model = model
        self.prefix = list(prefix)
        self.linears = list(linears)
        self.chains = [list(c) for c in chains]
        self.loss_kind = loss_kind
        self.reduction = reduction
        self.num_params = sum(p.numel() for lin in self.linears for p in lin.parameters())

    def bytes_per_direction(self, n_rows: int) -> int:
        """Working memory one direction costs for a batch of ``n_rows`` rows: R(a), R(h) and R(g)
        of every layer ([N, out] each) and a few [P] copies of the direction (the input, its two
        layouts for the GEMMs, the weight-gradient workspace and the result)."""
        elem = self.linears[0].weight.element_size()
        width = sum(lin.out_features for lin in self.linears)
        return elem * (4 * int(n_rows) * width + 5 * self.num_params)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in] rows entering the first trainable Linear: the frozen prefix applied under no_grad."""
        with torch.no_grad():
            h = x
            for module in self.prefix:
                h = module(h)
        return h.detach()

    def unsupported_input_reason(self, x: torch.Tensor, y: torch.Tensor) -> str:
        """"" when :meth:`hvp` can take (x, y) as they are shaped, else why not."""
        try:
            self.prepare(x, y)
        except ValueError as exc:
            return str(exc)
        return ""

    def hvp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, mode: str = "hessian") -> torch.Tensor:
        """v [D, P] -> [D, P]: rows H v_d with H = ∂²L/∂θ² of ``L = loss(squeeze(model(x)),
        squeeze(y))`` (``mode="hessian"``), or the generalized Gauss-Newton JᵀH_ℓJ v_d
        (``mode="gauss_newton"``, J = ∂model(x)/∂θ, H_ℓ = ∂²loss/∂output²). Detached."""
        return self.hvp_prepared(self.prepare(x, y), v, mode)

    def hvp_prepared(self, prepared: Tuple[torch.Tensor, torch.Tensor], v: torch.Tensor,
                     mode: str = "hessian") -> torch.Tensor:
        """:meth:`hvp` on the output of :meth:`prepare`, so that the frozen prefix runs once for
        all chunks of directions."""
        if mode not in MODES:
            raise ValueError(f"NativeHvpEngine.hvp: mode must be one of {MODES}, got {mode!r}")
        weight = self.linears[0].weight
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[1] != self.num_params:
            shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"NativeHvpEngine.hvp: v must have shape [D, {self.num_params}], got {shape}")
        if v.dtype != weight.dtype or v.device != weight.device:
            raise TypeError(f"NativeHvpEngine.hvp: v must be {weight.dtype} on {weight.device} like the "
                            f"parameters, got {v.dtype} on {v.device}")
        features, target = prepared
        return _ops.mlp_hvp(features, target, [lin.weight for lin in self.linears],
                            [lin.bias for lin in self.linears], v, self.chains, self.loss_kind, self.reduction,
                            gauss_newton=mode == "gauss_newton")

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features [N, in], target) in the op's form, after pyDVL's squeeze convention: the
        frozen prefix applied to x, rows with an ignored target dropped. ValueError or TypeError
        when the engine cannot take (x, y); BadBatchError when the batch is wrong for the model."""
        where = "NativeHvpEngine.hvp"
        active = [name for name, m in self.model.named_modules() if _is_active_dropout(m)]
        if active:
            raise ValueError(f"{where}: Dropout module '{active[0]}' is in training mode (random); call "
                             "model.eval() first")
        weight = self.linears[0].weight
        h = self.features(x)
        if h.dim() == 1:
            h = h.unsqueeze(0)
        if h.dim() != 2:
            raise ValueError(f"{where}: the input of the first trainable Linear has shape {list(h.shape)}; the "
                             "native engine needs [N, in_features] rows (add an nn.Flatten)")
        if h.shape[1] != weight.shape[1]:
            raise BadBatchError(f"{where}: the first trainable Linear takes {weight.shape[1]} features, but x "
                                f"(after the frozen prefix) has {h.shape[1]}")
        if h.dtype != weight.dtype or h.device != weight.device:
            raise TypeError(f"{where}: x (after the frozen prefix) is {h.dtype} on {h.device} but the parameters are "
                            f"{weight.dtype} on {weight.device}")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{where}: y must be a torch.Tensor, got {type(y).__name__}")
        N, C = h.shape[0], self.linears[-1].out_features
        out_shape = torch.Size([N, C])
        squeezed = tuple(s for s in out_shape if s != 1)
        y_squeezed = tuple(s for s in y.shape if s != 1)
        y = y.to(weight.device)
        if self.loss_kind == "cross_entropy":
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"{where}: cross-entropy with {y.dtype} targets (class probabilities) is not "
                                 "native; the engine takes class-index targets")
            if C < 2:
                raise ValueError(f"{where}: cross-entropy over an output with {C} class(es) is not native")
            if y.numel() != N or len(y_squeezed) > 1:
                raise ValueError(f"{where}: cross-entropy needs one class index per row, {N} in all; y has shape "
                                 f"{list(y.shape)}")
            target = y.reshape(N).to(torch.long)
            keep = target != _IGNORE_INDEX
            out_of_range = keep & ((target < 0) | (target >= C))  # a mask: no sync until the test
            if bool(out_of_range.any()):
                bad = target[out_of_range]
                raise BadBatchError(f"{where}: cross-entropy class indices must lie in [0, {C}) (or equal "
                                    f"ignore_index={_IGNORE_INDEX}), got {int(bad.min())}..{int(bad.max())} "
                                    "out of range")
            if not bool(keep.all()):
                if self.reduction == "mean" and not bool(keep.any()):
                    raise ValueError(f"{where}: every target equals ignore_index={_IGNORE_INDEX}; the mean "
                                     "cross-entropy is undefined")
                h, target = h[keep], target[keep]
            return h, target
        if y_squeezed != squeezed:
            raise ValueError(f"{where}: squeeze(y) has shape {list(y_squeezed)} but squeeze(model(x)) has shape "
                             f"{list(squeezed)}; the native engine needs them equal")
        return h, y.reshape(N, C).to(weight.dtype)


def build_native_engine(model: nn.Module, loss: Callable) -> Tuple[Optional[NativeHvpEngine], str]:
    """(engine, "") when the native engine can take ``model`` and ``loss`` (see the module
    docstring), else (None, reason) naming the module, loss or loss option it cannot handle."""
    loss_kind, reduction, reason = _parse_loss(loss)
    if loss_kind is None:
        return None, reason
    if type(model) is nn.Linear:
        modules = [("", model)]
    elif type(model) is nn.Sequential:
        if _has_hooks(model):
            return None, "the model has forward hooks"
        modules = _flatten_sequential(model)
    else:
        return None, f"the model is a {type(model).__name__}, not an nn.Sequential (nested Sequentials are " \
                     "flattened) or an nn.Linear"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None, "global module forward hooks are registered"
    for name, m in model.named_modules():
        if _is_active_dropout(m):
            return None, f"{_describe(name, m)} is in training mode (random); call model.eval() first"

    first = next((i for i, (_, m) in enumerate(modules) if any(p.requires_grad for p in m.parameters())), None)
    if first is None:
        return None, "the model has no parameter that requires grad"
    prefix = [m for _, m in modules[:first]]
    linears: List[nn.Linear] = []
    chains: List[List[tuple]] = []
    for name, m in modules[first:]:
        if _has_hooks(m):
            return None, f"{_describe(name, m)} has forward hooks"
        if type(m) is nn.Linear:
            params = list(m.parameters())
            if not all(p.requires_grad for p in params):
                frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
                return None, f"{_describe(name, m)} after the first trainable module has frozen parameter(s) " \
                             f"{frozen}; only a frozen prefix is native"
            linears.append(m)
            chains.append([])
            continue
        act = _activation(m)
        if act is not None:
            chains[-1].append(act)
            continue
        if type(m) in _PASSTHROUGH:
            if type(m) is nn.Flatten and (m.start_dim not in (1, -1) or m.end_dim not in (1, -1)):
                return None, f"{_describe(name, m)} with start_dim={m.start_dim}, end_dim={m.end_dim} after the " \
                             "first trainable Linear is not a no-op on [N, F] rows"
            continue
        if type(m) is nn.GELU:
            return None, f"{_describe(name, m)} with approximate={m.approximate!r} is not native"
        return None, f"{_describe(name, m)} is not native after the frozen prefix (native: {_SUPPORTED})"
    if any(len(c) > 8 for c in chains):
        return None, "more than 8 activations in a row between two Linear layers"
    # The op's parameter layout must be the caller's: model.parameters() order, trainable only,
    # each tensor once (a Linear used twice or tied weights would change it).
    ours = [p for lin in linears for p in lin.parameters()]
    theirs = [p for p in model.parameters() if p.requires_grad]
    if len(ours) != len(theirs) or any(a is not b for a, b in zip(ours, theirs)):
        return None, "the trainable parameters are shared between layers or not in model.parameters() order"
    dtypes = {p.dtype for p in ours}
    devices = {p.device for p in ours}
    if len(dtypes) > 1 or len(devices) > 1:
        return None, f"the trainable parameters mix dtypes {sorted(map(str, dtypes))} or devices " \
                     f"{sorted(map(str, devices))}"
    dtype, device = dtypes.pop(), devices.pop()
    if dtype not in (torch.float32, torch.float64) and not (device.type == "cuda" and dtype in
                                                             (torch.float16, torch.bfloat16)):
        return None, f"parameters of dtype {dtype} on {device.type} are not native (float32, float64; " \
                     "float16 / bfloat16 on CUDA)"
    return NativeHvpEngine(model, prefix, linears, chains, loss_kind, reduction), ""
