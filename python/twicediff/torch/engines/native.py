"""The native engine: exact Hessian- (or Gauss-Newton-) vector products of a model and loss that
:func:`~twicediff.torch.engines.native_model.read_native_model` accepted, by the fused R-operator
op :func:`twicediff.ops.mlp_hvp`. It reads the model's current weights at every call."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ..._build import _C
from . import probe
from ...ops.mlp_hvp import ACTIVATIONS
from ...errors import BadBatchError, ModelMisreadError, NotNativeError, describe_inputs
from .base import MAX_DIRECTIONS_PER_CHUNK, MODES, PreparedBatch
from .native_model import IGNORE_INDEX, NativeModel, is_active_dropout, read_native_model, updates_in_training

__all__ = ["NativeEngine", "single_tensor_input"]


def _rounding(dtype: torch.dtype) -> float:
    """The relative gap two evaluations of one model in ``dtype`` may show (different GEMM
    blockings, fused or not)."""
    return 64 * torch.finfo(dtype).eps


def _on_blas(call):
    """``call()`` with the native op's float32 GEMMs on ATen's BLAS: a setting of this thread only
    (the op's worker threads take it from the caller), so that calls in other threads, and torch's
    own use of oneDNN, keep theirs."""
    was = _C.set_blas_in_thread(True)
    try:
        return call()
    finally:
        _C.set_blas_in_thread(was)


def single_tensor_input(x: Any) -> None:
    """NotNativeError (the reason) for an x that is not one tensor: the native engine reads the rows
    entering a stack of Linear layers, ``model(x)``, and calls no model with ``*x`` or ``**x``."""
    if not isinstance(x, torch.Tensor):
        form = "a dict (model(**x))" if isinstance(x, dict) else f"a {type(x).__name__} (model(*x))"
        raise NotNativeError(f"the native engine takes x as one tensor (the rows entering a stack of Linear "
                             f"layers); x is {form}: {describe_inputs(x)}; the generic engines take it "
                             "(engine='auto', 'func' or 'autograd')")


class NativeEngine:
    """The :class:`~twicediff.torch.engines.base.Engine` of the native op.

    Every batch it prepares proves the engine's reading of the model: the output the op would
    compute from the batch equals the model's own forward on it (:meth:`verify`), else the batch is
    refused with NotNativeError and ``engine="auto"`` uses a generic engine.

    Args:
        model, loss: the user's; :class:`~twicediff.errors.NotNativeError` when the op cannot take them.
    """

    name = "native"

    def __init__(self, model: nn.Module, loss: Callable):
        plan: NativeModel = read_native_model(model, loss)
        self.model = plan.model
        self.prefix = plan.prefix
        self.linears = plan.linears
        self.chains = plan.chains
        self.loss_kind = plan.loss_kind
        self.reduction = plan.reduction
        self.suffix = plan.suffix
        self.num_params = sum(p.numel() for lin in self.linears for p in lin.parameters())

    def bytes_per_direction(self, batch: PreparedBatch) -> int:
        """R(a), R(h) and R(g) of every layer ([N, out] each), the direction's row of the result
        ([P]) and the op's temporaries, which it gives back layer by layer: at most two blocks of
        the largest layer's weights (its weight-gradient GEMM's output and second-order term; one
        when a part of the op has one direction)."""
        elem = self.linears[0].weight.element_size()
        width = sum(lin.out_features for lin in self.linears)
        largest = max(lin.out_features * (lin.in_features + 1) for lin in self.linears)
        return elem * (4 * batch.rows * width + self.num_params + 2 * largest)

    def max_directions(self, batch: PreparedBatch) -> int:
        return MAX_DIRECTIONS_PER_CHUNK

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in] rows entering the first trainable Linear: the frozen prefix applied under no_grad."""
        with torch.no_grad():
            h = x
            for module in self.prefix:
                h = module(h)
        return h.detach()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The output the op computes from ``features``: the trainable layers and their activation
        chains as the engine read them, in plain torch ops."""
        with torch.no_grad():
            h = features
            for lin, chain in zip(self.linears, self.chains):
                h = F.linear(h, lin.weight, lin.bias)
                for name, p0, p1 in chain:
                    h = ACTIVATIONS[name].apply(h, p0, p1)
        return h

    def verify(self, features: torch.Tensor) -> None:
        """The engine's reading of the model, checked on this batch: the output it computes from
        ``features`` must equal, to rounding, what the model's own modules after the frozen prefix
        compute from them, each called as the model's forward calls it (so an instance whose
        forward was replaced, or anything else the reading missed, shows). Otherwise
        :class:`~twicediff.errors.ModelMisreadError`, and the op would compute another model's
        products. The prefix is not run again: its output is ``features``."""
        with torch.no_grad():
            theirs = features
            for module in self.suffix:
                theirs = module(theirs)
        ours = self.logits(features)
        if not isinstance(theirs, torch.Tensor) or theirs.numel() != ours.numel():
            got = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise ModelMisreadError(f"the model's output {got} is not what its layers as read compute "
                                 f"{tuple(ours.shape)}")
        theirs = theirs.reshape(ours.shape).to(ours.dtype)
        # A NaN or inf in the batch reaches both outputs alike; only the finite entries are compared
        # (the others set to 0, with no data-dependent shapes), so such a batch is not taken for a
        # misread model.
        finite = torch.isfinite(theirs)
        if not torch.equal(finite, torch.isfinite(ours)):
            raise ModelMisreadError("the model's forward gives NaN or inf in other places than the native engine's "
                                    "reading of it: it computes something its modules as listed do not")
        theirs, ours = theirs.where(finite, 0), ours.where(finite, 0)
        tol = _rounding(ours.dtype) * (1.0 + float(theirs.abs().max()) if theirs.numel() else 1.0)
        gap = float((ours - theirs).abs().max()) if ours.numel() else 0.0
        if not gap <= tol:
            raise ModelMisreadError(f"the model's forward differs from the native engine's reading of it by up to "
                                 f"{gap:.3g} (rounding allows {tol:.3g}): it computes something its modules as "
                                 "listed do not")

    def apply(self, batch: PreparedBatch, V: torch.Tensor, mode: str = "hessian") -> torch.Tensor:
        """V [D, P] → [D, P]: rows H V_d with H = ∂²L/∂θ² of ``L = loss(squeeze(model(x)),
        squeeze(y))`` (``mode="hessian"``), or the generalized Gauss-Newton JᵀH_ℓJ V_d
        (``"gauss_newton"``, J = ∂model(x)/∂θ, H_ℓ = ∂²loss/∂output²). Detached."""
        if mode not in MODES:
            raise ValueError(f"NativeEngine.apply: mode must be one of {MODES}, got {mode!r}")
        weight = self.linears[0].weight
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.num_params:
            shape = list(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"NativeEngine.apply: V must have shape [D, {self.num_params}], got {shape}")
        if V.dtype != weight.dtype or V.device != weight.device:
            raise TypeError(f"NativeEngine.apply: V must be {weight.dtype} on {weight.device} like the "
                            f"parameters, got {V.dtype} on {V.device}")
        def call():
            return ops.mlp_hvp(batch.inputs, batch.target, [lin.weight for lin in self.linears],
                               [lin.bias for lin in self.linears], V, self.chains, self.loss_kind, self.reduction,
                               gauss_newton=mode == "gauss_newton")

        return _on_blas(call) if self._gemm_library(batch, V, mode, call) == "blas" else call()

    def gemm_library(self, batch: PreparedBatch, V: torch.Tensor, mode: str = "hessian") -> str:
        """Which library runs the float32 GEMMs of ``apply(batch, V, mode)``: ``"onednn"`` or
        ``"blas"`` (probed on first use of the shape class, see engines/probe.py), or
        ``"default"`` where nothing is chosen (not a float32 CPU call, or oneDNN unavailable)."""
        return self._gemm_library(batch, V, mode, lambda: self.apply(batch, V, mode))

    def _gemm_library(self, batch: PreparedBatch, V: torch.Tensor, mode: str, call) -> str:
        if V.device.type != "cpu" or V.dtype != torch.float32 or _C.cpu_gemm() != "onednn":
            return "default"
        # The float32 GEMMs' library (oneDNN or ATen's BLAS) is picked by a timed probe per shape
        # class (torch.backends.mkldnn.enabled = False sends them all to ATen).
        key = (f"N={batch.inputs.shape[0]} widths={[tuple(lin.weight.shape) for lin in self.linears]} "
               f"D<={1 << max(0, V.shape[0] - 1).bit_length()} {mode} threads={torch.get_num_threads()}")
        return probe.choose("cpu_gemm", key, {"onednn": call, "blas": lambda: _on_blas(call)})

    def prepare(self, x: Any, y: torch.Tensor) -> PreparedBatch:
        """(features [N, in], target) in the op's form, after pyDVL's squeeze convention: the frozen
        prefix applied to x, rows with an ignored target dropped.

        Raises:
            NotNativeError: the op cannot take this batch (a generic engine may), e.g. a tuple or
                dict x (:func:`single_tensor_input`).
            BadBatchError: the batch is wrong for the model itself.
            TypeError: x (after the prefix) or y of a dtype or device the parameters do not have.
        """
        where = "NativeEngine.prepare"
        single_tensor_input(x)
        active = [name for name, m in self.model.named_modules() if is_active_dropout(m) or updates_in_training(m)]
        if active:
            raise NotNativeError(f"{where}: module '{active[0]}' is in training mode (random, or it updates its "
                                 "running statistics); call model.eval() first")
        weight = self.linears[0].weight
        h = self.features(x)
        if h.dim() == 1:
            h = h.unsqueeze(0)
        if h.dim() != 2:
            raise NotNativeError(f"{where}: the input of the first trainable Linear has shape {list(h.shape)}; "
                                 "the native engine needs [N, in_features] rows (add an nn.Flatten)")
        if h.shape[1] != weight.shape[1]:
            raise BadBatchError(f"{where}: the first trainable Linear takes {weight.shape[1]} features, but x "
                                f"(after the frozen prefix) has {h.shape[1]}")
        if h.dtype != weight.dtype or h.device != weight.device:
            raise TypeError(f"{where}: x (after the frozen prefix) is {h.dtype} on {h.device} but the parameters "
                            f"are {weight.dtype} on {weight.device}")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{where}: y must be a torch.Tensor, got {type(y).__name__}")
        self.verify(h)
        N, C = h.shape[0], self.linears[-1].out_features
        squeezed = tuple(s for s in (N, C) if s != 1)
        y_squeezed = tuple(s for s in y.shape if s != 1)
        y = y.to(weight.device)
        if self.loss_kind == "cross_entropy":
            return PreparedBatch(*self._class_targets(where, h, y, y_squeezed, N, C))
        if y_squeezed != squeezed:
            raise NotNativeError(f"{where}: squeeze(y) has shape {list(y_squeezed)} but squeeze(model(x)) has "
                                 f"shape {list(squeezed)}; the native engine needs them equal")
        return PreparedBatch(h, y.reshape(N, C).to(weight.dtype))

    def _class_targets(self, where: str, h: torch.Tensor, y: torch.Tensor, y_squeezed: tuple, N: int, C: int):
        """(rows, class indices [n]) for cross-entropy, rows whose target is ignore_index dropped."""
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise NotNativeError(f"{where}: cross-entropy with {y.dtype} targets (class probabilities) is not "
                                 "native; the engine takes class-index targets")
        if C < 2:
            raise NotNativeError(f"{where}: cross-entropy over an output with {C} class(es) is not native")
        if y.numel() != N or len(y_squeezed) > 1:
            raise NotNativeError(f"{where}: cross-entropy needs one class index per row, {N} in all; y has "
                                 f"shape {list(y.shape)}")
        target = y.reshape(N).to(torch.long)
        keep = target != IGNORE_INDEX
        out_of_range = keep & ((target < 0) | (target >= C))  # a mask: no sync until the test
        if bool(out_of_range.any()):
            bad = target[out_of_range]
            raise BadBatchError(f"{where}: cross-entropy class indices must lie in [0, {C}) (or equal "
                                f"ignore_index={IGNORE_INDEX}), got {int(bad.min())}..{int(bad.max())} "
                                "out of range")
        if not bool(keep.all()):
            if self.reduction == "mean" and not bool(keep.any()):
                raise NotNativeError(f"{where}: every target equals ignore_index={IGNORE_INDEX}; the mean "
                                     "cross-entropy is undefined")
            h, target = h[keep], target[keep]
        return h, target
