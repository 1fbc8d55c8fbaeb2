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
- A Dropout in training mode makes every product random: said once per model (a warning).
- Stock attention: ``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer``) picks a fused CPU kernel that has no second derivative; inside
  the call only the math backend is allowed, which every derivative supports.
- Under ``torch.inference_mode()`` nothing can be differentiated: a RuntimeError naming it. Under
  ``torch.no_grad()`` gradients are enabled inside the call (twicediff's functions are derivatives).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Iterator

import torch
from torch import nn

__all__ = ["model_call", "model_lock"]

logger = logging.getLogger(__name__)

_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()
_dropout_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


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


@contextlib.contextmanager
def model_call(model: nn.Module, where: str) -> Iterator[None]:
    """Run a computation on ``model`` (see the module docstring): its lock held, gradients enabled,
    attention on the math backend, buffers restored when a module is in training mode, a warning
    once per model for a training-mode Dropout.

    Raises:
        RuntimeError: called under ``torch.inference_mode()``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{where}: called under torch.inference_mode(), where nothing can be differentiated; "
                           "call it outside the inference_mode block (torch.no_grad() is fine)")
    with model_lock(model):
        training = any(m.training for m in model.modules())
        saved = None
        if training:
            _warn_training_dropout(model, where)
            saved = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            with torch.enable_grad(), _math_attention():
                yield
        finally:
            if saved:
                with torch.no_grad():
                    for b, value in saved:
                        b.copy_(value)
