"""What every call that runs or reads a user's model goes through: :func:`model_call`.

- One call at a time per model. ``torch.func.functional_call`` (the func engine, per-sample
  gradients) works by swapping the module's parameters and buffers for other tensors while it runs
  and putting the originals back afterwards; two threads doing that on one module at once put back
  each other's substitutes, leaving functorch wrappers in the user's model (every later call and
  ``copy.deepcopy(model)`` then fail) and computing with the wrong tensors meanwhile. Every call
  that runs the model's forward or reads its parameters therefore holds the model's lock (a
  re-entrant lock per module), so calls from several threads on one model are correct and take
  turns; calls on different models still run in parallel.
- The model's buffers are left as they were. A module in training mode may update its buffers in
  a forward pass (BatchNorm's running statistics, its ``num_batches_tracked``); twicediff's passes
  are not training steps, so when any module is in training mode the buffers are saved before and
  written back after the call.
- The model's parameters are left as they were. ``nn.Embedding(max_norm=...)`` (and
  ``nn.EmbeddingBag``) renormalizes the rows it looks up in place, in every forward pass: those
  weights are saved before the call and written back after it (the call differentiates at the
  renormalized values, as the model's own first forward would). Any other in-place change of a
  parameter shows in its version counter, and the call raises a RuntimeError naming it: it cannot
  be undone, and derivatives taken while the weights moved belong to no single point. (An RNN's
  weights are not watched: cuDNN re-seats them in place on CUDA, values unchanged.)
- The model's tensors stay its own: whatever sits in a module's parameter or buffer slot after a
  call is the tensor that sat there before it (``torch.func.functional_call`` left a substitute
  behind on a module registered under two names, see :mod:`twicediff.torch.stateless`; a forward
  may assign a new buffer). A parameter found swapped also raises a ModelChangedError naming it:
  what was computed after the swap may have used the other tensor.
- A sparse embedding (``nn.Embedding`` or ``nn.EmbeddingBag`` with ``sparse=True``, as recommender
  models train with ``SparseAdam``) gives sparse gradients, which no flat parameter vector holds;
  the layer's function is the same either way. Inside the call such modules have ``sparse=False``,
  and after it ``sparse=True`` again: the same values as the dense layer, and the user's training
  steps are unchanged.
- An embedding with ``scale_grad_by_freq=True`` is refused before anything runs, with a ValueError
  naming the module: torch's backward then returns the gradient scaled by each index's frequency in
  the batch, not the loss's, and differentiated again it gave a "Hessian" that is not symmetric.
- So is a gradient hook on a parameter (``p.register_hook``) or a module (a backward hook, or a
  global one): it changes what autograd returns as the gradient, which the reverse-mode engines
  then differentiate again, while forward mode and the native engine never see it; the engines
  would compute different matrices, and ``auto`` would pick one of them by speed.
- torch has no second derivative of ``nn.EmbeddingBag`` and ``nn.Hardsigmoid``, a wrong one of
  weight normalisation (``nn.utils.parametrizations.weight_norm``) and no vmap rule of an eval-mode
  ``nn.RReLU``: in a model with any, the call computes them with equivalent ops that have correct
  ones (:mod:`twicediff.torch.derivative_routes`).
- A Dropout in training mode makes every product random: said once per model (a warning).
- A module that keeps a tensor computed from the parameters, with its graph, in a public attribute
  after a call (a cache its forward reuses, as timm's LeViT keeps its attention biases in eval mode)
  is differentiated at stale values by the engines that swap the parameters: said once per model
  (a warning naming the module and the attribute). Weight and spectral normalisation's hooks
  recompute theirs at every forward and are not reported.
- Stock attention: ``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer``) picks a fused CPU kernel that has no second derivative; inside
  the call only the math backend is allowed, which every derivative supports. Those modules (and
  ``nn.TransformerEncoder``) also have an inference "fast path" (fused kernels, nested tensors for
  padded batches) that they take when no input seems to require grad: under torch.func's
  transforms and dynamo's tracing they can be wrong about that, and the fast path has no
  derivatives and no vmap rules. It is switched off inside the call. Both settings are
  process-wide (``torch.backends.mha``'s flag, SDPA's backend flags): they are set by the first call
  in flight and put back by the last, so calls in several threads do not undo each other's. Values
  are the same.
- Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): on a GPU torch runs them through cuDNN,
  whose backward has no derivative and no forward-mode rule and refuses to run outside training
  mode (``model.eval()``, which influence calls for). In a model with one, cuDNN is off inside the
  call (``torch.backends.cudnn.enabled``, process-wide and shared between calls as above), so torch
  takes its own recurrent kernels, which reverse mode differentiates twice. It changes nothing on
  the CPU. Not yet run on a GPU.
- Under ``torch.inference_mode()`` nothing can be differentiated: a RuntimeError naming it. Under
  ``torch.no_grad()`` gradients are enabled inside the call (twicediff's functions are derivatives).
- Autocast (``torch.autocast``, as around a mixed-precision training step) is off inside the call:
  the native engine computes in the model's dtype whatever autocast says, and the generic engines
  computed the same products in bfloat16 under it, 0.6% apart, so ``auto`` would have picked a
  precision by speed. Every engine computes in the model's dtype (cast the model to compute in a
  lower one).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..errors import ModelChangedError
from . import derivative_routes

__all__ = ["attention_for_derivatives", "model_call", "model_lock"]

logger = logging.getLogger(__name__)

_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()
_dropout_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# per model: its modules' public attributes that are (or may come to hold) a tensor with a graph
# (dicts, lists, tuples of tensors, tensors, None), and whether it was reported
_kept_graph_places: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_kept_graph_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_nesting = threading.local()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock of ``model`` (one per module object, created on first use)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


def _math_attention():
    """A context that restricts scaled-dot-product attention to its math backend (a no-op on a
    torch without ``torch.nn.attention``)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: no selection API, and no fused CPU kernel either
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class _SharedSetting:
    """A process-wide torch setting that the calls in flight share: the first context in sets it, the
    last one out puts back what the first found. Set and restored per call instead, a call ending in
    one thread restored the setting under a call still running in another, which then failed."""

    def __init__(self, enter, leave):
        self._enter, self._leave = enter, leave  # enter() sets it and returns what leave(saved) restores
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = self._enter()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._leave(self._saved)
                    self._saved = None


def _attention_enter():
    mha = getattr(torch.backends, "mha", None)  # older torch: no switch
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    math = _math_attention()  # the SDPA backend flags, set and restored by torch.nn.attention.sdpa_kernel
    math.__enter__()
    return fastpath, math


def _attention_leave(saved) -> None:
    fastpath, math = saved
    math.__exit__(None, None, None)
    if fastpath is not None:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _cudnn_enter() -> bool:
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    return enabled


def _cudnn_leave(enabled: bool) -> None:
    torch.backends.cudnn.enabled = enabled


_ATTENTION = _SharedSetting(_attention_enter, _attention_leave)
_CUDNN_OFF = _SharedSetting(_cudnn_enter, _cudnn_leave)


def attention_for_derivatives():
    """Attention as derivatives need it (the module docstring, "Stock attention"): scaled-dot-product
    attention on its math backend, and the MHA / transformer fast path off. Re-entrant and safe
    across threads: the settings are put back when the last context in flight exits."""
    return _ATTENTION.held()


def _without_autocast() -> contextlib.ExitStack:
    """A context with autocast off on every device type it is on for (none entered where it is off:
    naming a device type torch cannot use warns)."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda", "xpu", "mps"):
        try:
            on = torch.is_autocast_enabled(device_type)
        except (RuntimeError, ValueError, TypeError):  # a device type this torch does not know
            continue
        if on:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _depths() -> dict:
    """{id(model): how many model_call of it this thread is inside}."""
    if not hasattr(_nesting, "depth"):
        _nesting.depth = {}
    return _nesting.depth


def _name(model: nn.Module, obj) -> str:
    """The qualified name of a module or parameter of ``model``, for an error message."""
    pairs = model.named_parameters() if isinstance(obj, torch.Tensor) else model.named_modules()
    name = next(n for n, o in pairs if o is obj)
    return name or type(obj).__name__


def _refuse_hook(where: str, what: str):
    return ValueError(f"{where}: {what}, which changes the gradients autograd returns; twicediff's engines "
                      "differentiate the loss itself (forward mode and the native engine never see such a hook, "
                      "reverse mode would differentiate it again): remove the hook for these calls "
                      "(handle.remove(), and register it again after)")


@dataclass
class _Reading:
    """What a call must guard in a model (see the module docstring), from one walk over its modules.

    Attributes:
        training: a module is in training mode.
        renormed: the weights the forward renormalizes in place (embeddings with ``max_norm``).
        sparse: the embedding modules with ``sparse=True``, dense inside the call.
        versions: (parameter, version counter) of every parameter but an RNN's. On CUDA an RNN
            re-seats its weights into one flat cuDNN buffer whenever they are set (as
            ``functional_call`` does): an in-place ``set_`` that keeps their values but moves the
            version counter the swapped-in tensors share with the parameters.
        slots: (module, its ``_parameters`` or ``_buffers``, name, tensor) of every parameter and buffer.
        routes: the routes :func:`twicediff.torch.derivative_routes.needed` names, over all modules.
        rnn: the model has an ``nn.RNNBase`` module (RNN, LSTM, GRU).
    """
    training: bool
    renormed: List[torch.Tensor]
    versions: List[Tuple[torch.Tensor, int]]
    slots: List[Tuple[nn.Module, dict, str, torch.Tensor]]
    sparse: List[nn.Module]
    routes: frozenset = frozenset()
    rnn: bool = False


def _read(model: nn.Module, where: str) -> _Reading:
    """The model's :class:`_Reading`; a ValueError for a gradient hook or an embedding that scales its
    gradient by frequency. Names are looked up only for an error: building them costs more than the
    walk itself."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
        raise _refuse_hook(where, "a global module backward hook (register_module_full_backward_hook) is set")
    training, renormed, versions, rnn, slots, routes, sparse = False, [], {}, set(), [], set(), []
    for m in model.modules():
        training = training or m.training
        if m._backward_hooks or m._backward_pre_hooks:
            raise _refuse_hook(where, f"module '{_name(model, m)}' ({type(m).__name__}) has a backward hook")
        needs = derivative_routes.needed(m)
        if needs:
            routes |= needs
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            if m.sparse:
                sparse.append(m)
            if m.scale_grad_by_freq:
                raise ValueError(f"{where}: module '{_name(model, m)}' ({type(m).__name__}) has "
                                 "scale_grad_by_freq=True, which rescales the gradient torch's backward returns by "
                                 "each index's frequency in the batch: that is not the loss's derivative, and its "
                                 "Jacobian (the 'Hessian' reverse mode would give) is not symmetric; twicediff "
                                 "differentiates the loss: set scale_grad_by_freq=False for these calls")
            if m.max_norm is not None:
                renormed.append(m.weight)
        for p in m._parameters.values():
            if p is None:
                continue
            if p._backward_hooks:
                raise _refuse_hook(where, f"parameter '{_name(model, p)}' has a gradient hook (register_hook)")
            if isinstance(m, nn.RNNBase):
                rnn.add(id(p))
            versions[id(p)] = (p, p._version)
        slots += [(m, table, name, t) for table in (m._parameters, m._buffers) for name, t in table.items()]
    return _Reading(training, renormed, [pv for key, pv in versions.items() if key not in rnn], slots, sparse,
                    frozenset(routes), bool(rnn))  # every RNN module has parameters


def _warn_training_dropout(model: nn.Module, where: str) -> None:
    if model in _dropout_warned:
        return
    active = [name or type(m).__name__ for name, m in model.named_modules()
              if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if active:
        _dropout_warned.add(model)
        logger.warning("%s: module '%s' of %s is a Dropout in training mode: every gradient, product and "
                       "influence is then random; call model.eval() first", where, active[0],
                       type(model).__name__)


def _holds_graph(value) -> bool:
    """Whether a module attribute is, or holds (one level into a dict, list or tuple), a tensor with a graph."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
    return any(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in items)


def _graph_places(model: nn.Module) -> list:
    """(weak reference to the module, attribute) of the public attributes of ``model``'s modules that could hold a tensor
    with a graph: a dict, list, tuple with a tensor, tensor or None (the attributes weight or spectral
    normalisation's hooks recompute at every forward left out)."""
    places = []
    for m in model.modules():
        recomputed = {h.name for h in m._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))}
        for key, value in vars(m).items():
            if key.startswith("_") or key in recomputed:
                continue
            if value is None or isinstance(value, (dict, list, torch.Tensor)) or (
                    isinstance(value, tuple) and any(isinstance(t, torch.Tensor) for t in value)):
                places.append((weakref.ref(m), key))  # weak: the table must not keep its model alive
    return places


def _warn_kept_graphs(model: nn.Module, where: str) -> None:
    """A warning, once per model, where a module keeps a tensor computed from the parameters (with its
    graph) in a public attribute after a call: a forward that reuses it (a cache, as timm's LeViT
    keeps its attention biases in eval mode) computes from values the engines that swap the
    parameters (func, compiled) do not differentiate, and reverse mode may find its graph freed.
    Walking every attribute of every module costs about as much as the rest of the guard, so the
    places that could hold one are found once per model (:func:`_graph_places`) and only they are
    looked at after each call."""
    if model in _kept_graph_warned:
        return
    places = _kept_graph_places.get(model)
    if places is None:
        places = _kept_graph_places[model] = _graph_places(model)
    for ref, key in places:
        m = ref()
        if m is not None and _holds_graph(getattr(m, key, None)):
            _kept_graph_warned.add(model)
            logger.warning("%s: module '%s' (%s) keeps '%s', computed from the parameters with its graph, between "
                           "forward passes. If the forward reuses it (a cache, as timm's LeViT keeps its attention "
                           "biases in eval mode), derivatives through it are taken at stale values: the engines that "
                           "swap the parameters (func, compiled, per-sample) then disagree with reverse mode. Make "
                           "the forward recompute it for these calls", where, _name(model, m), type(m).__name__, key)
            return


@contextlib.contextmanager
def model_call(model: nn.Module, where: str) -> Iterator[None]:
    """Run a computation on ``model`` (see the module docstring): its lock held, gradients enabled,
    autocast off, attention on the math backend, buffers restored when a module is in training
    mode, embedding weights renormalized by ``max_norm`` restored, sparse embeddings dense inside,
    every parameter and buffer slot as found, a warning once per model for a training-mode Dropout.

    Raises:
        RuntimeError: called under ``torch.inference_mode()``.
        ValueError: the model has an embedding with ``scale_grad_by_freq``, or a gradient hook.
        ModelChangedError: the model's forward changed a parameter in place.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{where}: called under torch.inference_mode(), where nothing can be differentiated; "
                           "call it outside the inference_mode block (torch.no_grad() is fine)")
    with model_lock(model):
        depth = _depths()
        outermost = id(model) not in depth  # nested calls (a probe inside hvp) leave the checks to the first
        reading = _read(model, where) if outermost else _Reading(any(m.training for m in model.modules()), [], [], [], [])
        saved = []
        if reading.training:
            _warn_training_dropout(model, where)
            saved = [(b, b.detach().clone()) for b in model.buffers()]
        saved += [(w, w.detach().clone()) for w in reading.renormed]
        depth[id(model)] = depth.get(id(model), 0) + 1
        for m in reading.sparse:  # the lock is held: no other call sees the flag
            m.sparse = False
        try:
            with torch.enable_grad(), attention_for_derivatives(), _without_autocast(), \
                    (derivative_routes.routes_for_derivatives(reading.routes, losses=False) if reading.routes
                     else contextlib.nullcontext()), \
                    (_CUDNN_OFF.held() if reading.rnn else contextlib.nullcontext()):
                yield
        finally:
            for m in reading.sparse:
                m.sparse = True
            depth[id(model)] -= 1
            if not depth[id(model)]:
                del depth[id(model)]
            if saved:
                with torch.no_grad():
                    for t, value in saved:
                        t.copy_(value)
            changed = [(m, table, name, t) for m, table, name, t in reading.slots if table.get(name) is not t]
            for m, table, name, t in changed:
                table[name] = t
            swapped = [(m, name) for m, table, name, t in changed if table is m._parameters]
        if outermost:
            _warn_kept_graphs(model, where)
        if swapped:
            m, name = swapped[0]
            raise ModelChangedError(f"{where}: the call left another tensor in place of parameter '{name}' of module "
                                    f"'{_name(model, m)}' ({type(m).__name__}); the original is back, but what was "
                                    "computed after the swap may have used the other tensor: twicediff needs the "
                                    "model's parameters to stay its own (a forward that assigns a new parameter "
                                    "cannot be differentiated in them)")
        restored = {id(w) for w in reading.renormed}
        moved = [p for p, version in reading.versions if p._version != version and id(p) not in restored]
        if moved:
            raise ModelChangedError(f"{where}: the model changed its parameter '{_name(model, moved[0])}' in place "
                                    "during the call (its forward writes to its weights); derivatives need the "
                                    "parameters fixed, and twicediff cannot undo the change: take the in-place update "
                                    "out of the forward")
