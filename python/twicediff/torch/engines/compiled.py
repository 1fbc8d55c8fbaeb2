"""The compiled engine: ``torch.compile`` of the batched curvature product, for any model.

The product of one chunk of directions, written with torch.func (forward-over-reverse
``vmap(jvp(grad(L)))``, reverse-over-reverse ``vmap(vjp(grad(L)))``, or the Gauss-Newton
``vmap(Jᵀ H_ℓ J)``), is compiled as one function of (trainable parameters, buffers and frozen
parameters, directions, x, y): the weights are inputs, so training steps between calls do not
recompile. One compiled function is kept per (model, mode, variant, input shapes, chunk of
directions); chunks are padded with zero directions to a power of two, so a solver that applies
the operator to blocks of one size compiles once or twice. With inductor, two settings differ from
its defaults: the graph pass of :mod:`.gemm_fold`, and on CPU its channels-last layout only for
models whose convolutions are all wide (:func:`channels_last`).

Compiling costs seconds to a minute of CPU (tracing, then generating and compiling C++ kernels),
so ``engine="auto"`` uses this engine only when the caller expects enough products to repay it
(:mod:`twicediff.torch.engines.amortise`); ``engine="compiled"`` asks for it outright. When
compilation fails (an op dynamo or the backend cannot take, a Python construct it cannot trace,
no C++ compiler), on the first call or on a later one that dynamo traces again because one of its
guards failed (an attribute the forward branches on changed), the engine says so in one log line per
model and computes eagerly from then on, for that model and shape: with the torch.func engine, or
the autograd engine where torch has no forward-mode rule for one of the model's ops (dynamo does not
compile RNN, GRU or LSTM). The products are the same, only slower. So it does where the first
compiled product differs from the eager one (:func:`_check_against_eager`: torch.compile
differentiates some models otherwise, with no error).

``TWICEDIFF_COMPILE_BACKEND`` names the ``torch.compile`` backend (default ``"inductor"``;
``"aot_eager"`` traces without generating kernels: quick to compile, slower to run).
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..batch import input_tensors, model_args, squeezed_loss
from ..forward_mode import reverse_mode_constants
from ..guard import model_call
from ..stateless import functional_call, slot_names, split_params
from .agreement import gap_and_scale
from .autograd import autograd_hvp
from .base import PreparedBatch, generic_directions_per_chunk
from .func import _FORWARD_AD_LOCK, forward_over_reverse, func_hvp, vmap_randomness
from .gemm_fold import FoldBroadcastBmm
from .generic import GenericEngine, _shape_key, product_scope

__all__ = ["COMPILED_CHUNK", "VARIANTS", "CompiledEngine", "CompiledMismatch", "channels_last", "compiled_functions",
           "forget_compiled"]

logger = logging.getLogger(__name__)

#: How the Hessian product is differentiated: ``"forward"`` (forward-over-reverse) or
#: ``"reverse"`` (reverse-over-reverse). The Gauss-Newton product has one form.
VARIANTS = ("forward", "reverse")
#: The most directions one compiled call takes (chunks are padded to a power of two up to this).
COMPILED_CHUNK = 32
# Inductor lays a CPU graph with convolutions out channels-last, for oneDNN. In a batched product
# every direction's tangents enter and leave each convolution through vmap's permutes, and where the
# convolutions are narrow the elementwise kernels between them mix layouts, copy short runs of a
# pixel's channels and lose vectorisation: d_cnn (8 and 16 channels) ran 1.3–1.6x faster without it.
# With every convolution 32 channels wide or more it was about 10% faster with it in most runs on
# the AVX2 EPYC the rule was measured on, so it is kept there; on a Zen 5 it was slower at every
# width, so the best layout of wide convolutions depends on the CPU, and measuring it would take a
# second compilation (NOTE: the layout rows of benchmarks/results/compiled_cpu.md). Off the CPU
# inductor decides (not measured there).
CPU_CHANNELS_LAST_MIN_CHANNELS = 32
# Compiled functions kept (least recently used dropped first); each holds its model alive.
MAX_FUNCTIONS = 32

_names = itertools.count()
_lock = threading.Lock()


@dataclass
class _Compiled:
    """One compiled product: ``make(variant)`` builds its plain torch.func function; ``fn`` is the
    compiled one (None before the first call and once compilation failed); what it is for, the
    seconds its first call took (checking, tracing and compiling included), why it failed."""
    make: Callable[[str], Callable]
    variant: str
    description: str
    fn: Optional[Callable] = None
    seconds: Optional[float] = None
    error: str = ""


_functions: "OrderedDict[Tuple, _Compiled]" = OrderedDict()
_failed_models: set = set()  # ids of models whose compilation failure was logged


def compiled_functions() -> List[Dict]:
    """What this process compiled: one dict per function, {description, compile_seconds,
    status ("compiled", "not yet called" or "eager fallback: <reason>")}, oldest first."""
    with _lock:
        entries = list(_functions.values())
    return [{"description": e.description, "compile_seconds": e.seconds,
             "status": ("eager fallback: " + e.error) if e.error else
                       ("compiled" if e.seconds is not None else "not yet called")} for e in entries]


def forget_compiled() -> None:
    """Drop every compiled function of this process (and the models they hold)."""
    with _lock:
        _functions.clear()
        _failed_models.clear()


def _eager_product(model: nn.Module, loss: Callable, x, y: torch.Tensor, V: torch.Tensor, mode: str) -> torch.Tensor:
    """The product without compiling: torch.func's, the faster eager one, or autograd's where torch
    has no forward-mode rule for an op of the model (the same product); where neither runs, the
    func engine's error."""
    try:
        return func_hvp(model, loss, x, y, V, mode)
    except NotImplementedError as missing:
        try:
            return autograd_hvp(model, loss, x, y, V, mode)
        except Exception:  # noqa: BLE001 - the call itself is wrong: say what the first engine met
            raise missing from None


class CompiledMismatch(RuntimeError):
    """The compiled product of a first call differs from the same product computed eagerly."""


def _check_against_eager(compiled: torch.Tensor, eager: torch.Tensor) -> None:
    """:class:`CompiledMismatch` where the compiled product of the first direction is not the eager
    one to within half the dtype's digits (√eps of the row's largest entry; reordered sums differ
    by far less). torch.compile differentiates some models otherwise than eager autograd, with no
    error: the backward of a custom ``autograd.Function`` traced as if it had no derivative, and
    torch's own weight normalisation (whose second derivative is wrong) where eager calls are
    routed to twicediff's (:mod:`twicediff.torch.derivative_routes`: dynamo does not route it).
    Every compiled function is checked so on its first call; such a model is then computed eagerly."""
    gap, scale = gap_and_scale(compiled, eager)
    if not gap <= torch.finfo(eager.dtype).eps ** 0.5 * scale:
        raise CompiledMismatch(f"the compiled product differs from the eager one by {gap:.3g} (of {scale:.3g}): "
                               "torch.compile differentiated the model otherwise (a custom autograd.Function's "
                               "backward, or an op twicediff routes, say)")


def _bucket(D: int, cap: int) -> int:
    """Rows a compiled call of D ≤ cap directions takes: the next power of two, at most cap."""
    return min(cap, 1 << max(0, D - 1).bit_length())


def _fresh_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own: torch.compile keeps its cache and guards per code
    object, so every (model, shape) gets its own instead of piling up on one shared code object
    (where the recompile limit would send later models to eager)."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _product(model: nn.Module, loss: Callable, names: List[str], shapes: List[torch.Size], mode: str,
             variant: str) -> Callable:
    """(params, fixed, V [D, P], x, y) → [D, P]: the chunk's products in plain torch.func; x a tensor,
    tuple, list or dict (:mod:`twicediff.torch.batch`)."""
    from torch.func import grad, jvp, vjp, vmap

    sizes = [s.numel() for s in shapes]
    slots = slot_names(model)  # a constant of the compiled function

    def product(params, fixed, V, x, y):
        D = V.shape[0]
        tangents = {n: t.reshape(D, *s) for n, t, s in zip(names, torch.split(V, sizes, dim=1), shapes)}

        def output_of(p):
            return functional_call(model, (p, fixed), *model_args(x), slots)

        randomness = vmap_randomness(model)
        with reverse_mode_constants():  # what reverse mode holds constant (padding rows, no_grad values)
            if mode == "hessian" and variant == "forward":
                blocks = forward_over_reverse(lambda p, target: squeezed_loss(loss, output_of(p), target), params, y,
                                              tangents, randomness)
            elif mode == "hessian":
                _, pullback_grad = vjp(grad(lambda p: squeezed_loss(loss, output_of(p), y)), params)
                blocks = vmap(lambda t: pullback_grad(t)[0], randomness=randomness)(tangents)
            else:  # Gauss-Newton: J t forward, H_ℓ as the pullback of ∇_z ℓ (symmetric), then Jᵀ
                z, pullback = vjp(output_of, params)
                _, loss_hessian = vjp(grad(lambda o: squeezed_loss(loss, o, y)), z.detach())
                blocks = vmap(lambda t: pullback(loss_hessian(jvp(output_of, (params,), (t,))[1])[0])[0])(tangents)
        return torch.cat([blocks[n].reshape(D, -1) for n in names], dim=1)

    return product


def channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether the compiled products of ``model`` on ``device`` keep inductor's channels-last layout
    (its ``layout_optimization``): on CPU only where every convolution module has at least
    ``CPU_CHANNELS_LAST_MIN_CHANNELS`` output channels; elsewhere inductor decides."""
    if device.type != "cpu":
        return True
    return all(m.out_channels >= CPU_CHANNELS_LAST_MIN_CHANNELS
               for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))


def _inductor_options(model: nn.Module, device: torch.device) -> Dict:
    """``torch.compile`` options of the compiled products of ``model`` on ``device`` (inductor)."""
    return {"post_grad_custom_post_pass": FoldBroadcastBmm(),  # see gemm_fold
            "layout_optimization": channels_last(model, device)}


def _backend() -> str:
    return os.environ.get("TWICEDIFF_COMPILE_BACKEND", "inductor")


class CompiledEngine(GenericEngine):
    """Compiled batched products (see the module docstring).

    Args:
        variant: ``"forward"`` or ``"reverse"`` for the Hessian product.
    """

    name = "compiled"

    def __init__(self, model: nn.Module, loss: Callable, variant: str = "forward"):
        super().__init__(model, loss)
        if variant not in VARIANTS:
            raise ValueError(f"CompiledEngine: variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant

    def max_directions(self, batch: PreparedBatch) -> int:
        """The generic engines' chunk (sized by a direction's working memory), at most
        ``COMPILED_CHUNK``, rounded down to a power of two so that full chunks need no padding."""
        fit = min(generic_directions_per_chunk(self.bytes_per_direction(batch)), COMPILED_CHUNK)
        return 1 << (fit.bit_length() - 1)

    def _key(self, batch: PreparedBatch, mode: str, rows: int, names, params, fixed) -> Tuple:
        def sig(t: torch.Tensor):
            return (tuple(t.shape), t.dtype, t.device, t.stride())
        return (id(self.model), id(self.loss), self.model.training, mode, self.variant if mode == "hessian" else "",
                rows, _shape_key(batch.inputs), tuple(sig(t) for _, t in input_tensors(batch.inputs)),
                sig(batch.target), tuple((n, sig(params[n])) for n in names),
                tuple(sorted((n, sig(t)) for n, t in fixed.items())), _backend())

    def _entry(self, key: Tuple, names, params, mode: str, rows: int, batch: PreparedBatch) -> _Compiled:
        with _lock:
            entry = _functions.get(key)
            if entry is not None:
                _functions.move_to_end(key)
                return entry
            shapes = [params[n].shape for n in names]
            inputs = ",".join(f"{n}{tuple(t.shape)}" for n, t in input_tensors(batch.inputs))
            first = input_tensors(batch.inputs)[0][1]
            what = (f"{type(self.model).__name__} {mode}{'/' + self.variant if mode == 'hessian' else ''} "
                    f"{inputs} D={rows} {first.dtype} {first.device.type}")
            entry = _functions[key] = _Compiled(
                lambda variant: _product(self.model, self.loss, names, shapes, mode, variant), self.variant, what)
            while len(_functions) > MAX_FUNCTIONS:
                _functions.popitem(last=False)
            return entry

    def _first_call(self, entry: _Compiled, mode: str, args) -> torch.Tensor:
        """Check the product eagerly on one direction, then compile and run it (the first call of
        ``entry``). A forward-over-reverse product that fails eagerly — torch lacks some
        forward-mode rules and has broken ones (F.mse_loss with mean reduction raises "ZeroTensors
        are immutable" eagerly, and crashes the process when compiled) — is compiled
        reverse-over-reverse instead; what fails eagerly either way is not compiled at all."""
        params, fixed, V, x, y = args
        variants = [entry.variant] + (["reverse"] if mode == "hessian" and entry.variant == "forward" else [])
        for i, variant in enumerate(variants):
            fn = entry.make(variant)
            try:
                eager = fn(params, fixed, V[:1], x, y)
            except Exception:  # noqa: BLE001 - whatever fails eagerly is not compiled
                if i + 1 == len(variants):
                    raise
                continue
            if variant != entry.variant:
                entry.variant, entry.description = variant, entry.description.replace("/forward", "/reverse")
            backend = _backend()
            options = _inductor_options(self.model, V.device) if backend == "inductor" else None
            entry.fn = torch.compile(_fresh_code(fn, f"twicediff_product_{next(_names)}"), backend=backend,
                                     dynamic=False, fullgraph=True, options=options)
            with product_scope(V):  # as its later calls run
                out = entry.fn(params, fixed, V, x, y)
            _check_against_eager(out[:1], eager)
            return out
        raise AssertionError("unreachable")

    def is_compiled(self, batch: PreparedBatch, mode: str, D: int) -> bool:
        """Whether a chunk of D directions on ``batch`` runs compiled code without compiling first
        (False also where compilation failed)."""
        names, params, fixed = split_params(self.model)
        cap = self.max_directions(batch)
        key = self._key(batch, mode, _bucket(min(D, cap), cap), names, params, fixed)
        with _lock:
            entry = _functions.get(key)
        return entry is not None and not entry.error and entry.seconds is not None

    def apply(self, batch: PreparedBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        cap = self.max_directions(batch)
        if V.shape[0] > cap:
            return torch.cat([self.apply(batch, V[s:s + cap], mode) for s in range(0, V.shape[0], cap)])
        # Under the model's guard, as every engine's product (also where the engine is called without
        # one around it, as the benchmarks do): among the rest, attention as derivatives need it. Traced
        # by dynamo under torch.func's transforms, torch's attention layers would otherwise take their
        # inference fast path, which has no derivatives; checking, tracing and every later call see the
        # same settings, so dynamo's guards on them hold and a later call does not recompile.
        with model_call(self.model, "hvp"):
            return self._apply_chunk(batch, V, mode, cap)

    def _apply_chunk(self, batch: PreparedBatch, V: torch.Tensor, mode: str, cap: int) -> torch.Tensor:
        names, params, fixed = split_params(self.model)
        rows = _bucket(V.shape[0], cap)
        key = self._key(batch, mode, rows, names, params, fixed)
        entry = self._entry(key, names, params, mode, rows, batch)
        if entry.error:
            return _eager_product(self.model, self.loss, batch.inputs, batch.target, V, mode)
        padded = V if rows == V.shape[0] else torch.cat([V, V.new_zeros(rows - V.shape[0], V.shape[1])])
        args = (params, fixed, padded, batch.inputs, batch.target)
        if entry.seconds is not None:
            try:
                with product_scope(V):
                    return entry.fn(*args)[:V.shape[0]].detach()
            except torch._dynamo.exc.TorchDynamoException as exc:
                # A guard failed (say, an attribute the model's forward branches on changed) and
                # the new trace could not be compiled: eager from then on, as on a first call.
                return self._eager_after(entry, key, batch, V, mode, exc, compiled_before=True)
        with _FORWARD_AD_LOCK:  # checking and tracing run torch.func's forward-mode AD (process-wide state)
            start = time.perf_counter()
            try:
                out = self._first_call(entry, mode, args)
            except Exception as exc:  # noqa: BLE001 - a failure of the first call may be the compiler's
                failure = exc
            else:
                failure = None
                entry.seconds = time.perf_counter() - start
                logger.info("twicediff: compiled the %s product in %.1f s", entry.description, entry.seconds)
        if failure is None:
            return out[:V.shape[0]].detach()
        return self._eager_after(entry, key, batch, V, mode, failure, compiled_before=False)

    def _eager_after(self, entry: _Compiled, key: Tuple, batch: PreparedBatch, V: torch.Tensor, mode: str,
                     failure: BaseException, compiled_before: bool) -> torch.Tensor:
        """The eager product after the compiled call failed with ``failure``, and ``entry`` marked
        as failed; if the eager product fails too, the call itself is wrong (bad data), not the
        compiler: its error is raised, and an entry that never compiled is forgotten, so that a
        corrected call of this shape is compiled again."""
        try:
            result = _eager_product(self.model, self.loss, batch.inputs, batch.target, V, mode)
        except Exception:
            if not compiled_before:
                with _lock:
                    _functions.pop(key, None)
            raise
        self._fall_back(entry, failure)
        return result

    def _fall_back(self, entry: _Compiled, exc: BaseException) -> None:
        """Mark ``entry`` as not compilable and say so once per model (a warning)."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        head = lines[0] if lines else ""
        if head.endswith(":") and len(lines) > 1:  # "backend='inductor' raised:", the cause on the next line
            head += " " + lines[1]
        reason = type(exc).__name__ + (": " + head[:300] if head else "")
        entry.fn, entry.error = None, reason
        with _lock:
            first = id(self.model) not in _failed_models
            _failed_models.add(id(self.model))
        if first:
            logger.warning("twicediff: torch.compile could not compile the products of %s (%s); computing "
                           "them eagerly", type(self.model).__name__, reason)
