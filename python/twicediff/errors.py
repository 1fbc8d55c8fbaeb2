"""Every exception twicediff raises on purpose, and the wrapper that names the data a model or loss
failed on.

- :class:`MemoryBudgetError`: even the smallest chunk of a computation does not fit the budget.
- :class:`NotNativeError`: the native engine cannot take a model, loss or batch. A signal to use a
  generic engine, distinct from ValueError so that a bug inside the native engine's reading of a
  model is never silently turned into a fallback.
- :class:`ModelMisreadError`: the native engine's reading of a model disagrees with its forward.
- :class:`GraphInputError`: ``mvp``'s ``backprop_on`` holds a tensor that ``grad_xy`` does not depend on.
- :class:`BadBatchError`: a batch no engine can take (wrong feature count, class index out of range).
- :class:`EngineChoiceError`: ``engine=`` names an engine that cannot take the model, loss or batch.
- :class:`DistributedError`: under a process group, the local work of some ranks failed (raised on
  every rank, naming them), or the ranks' iterates diverged (:mod:`twicediff.distributed`).
- :func:`data_errors`: re-raises what a model or loss raised on a batch with the function and batch named.
"""
from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterator, Optional

import torch

__all__ = ["BadBatchError", "DistributedError", "EngineChoiceError", "GraphInputError", "MemoryBudgetError",
           "ModelChangedError", "ModelMisreadError", "NotNativeError", "data_errors", "describe_inputs"]


class MemoryBudgetError(MemoryError):
    """Raised when even the smallest chunk of a computation does not fit the memory budget."""


class NotNativeError(Exception):
    """The native engine cannot take this model, loss or batch; ``str(exc)`` says why (the module,
    loss option or input it cannot take). ``engine="auto"`` then uses a generic engine."""


class ModelMisreadError(NotNativeError):
    """The native engine read a model's modules but its own forward disagrees with the model's on a
    batch: the model does something the reading missed. ``engine="auto"`` warns once per model and
    uses a generic engine; ``engine="native"`` raises."""


class BadBatchError(ValueError):
    """A batch no engine can take (a wrong feature count, a class index out of range): the caller's
    error, raised whatever the engine."""


class EngineChoiceError(ValueError):
    """``engine=`` names an engine that cannot take this model, loss or batch (``engine="native"`` on
    a convolutional model, say); ``str(exc)`` says why. The caller's choice, not the data, so
    :func:`data_errors` passes it through as it is."""


class ModelChangedError(RuntimeError):
    """The model's forward changed one of its parameters in place during a call (a forward that
    writes to its own weights), which twicediff cannot undo; ``str(exc)`` names the parameter. Not
    a failure on the data, so :func:`data_errors` passes it through as it is."""


class DistributedError(RuntimeError):
    """Raised on every rank of a process group when the local work of some ranks failed, or when the
    ranks' iterates diverged. ``failures`` maps each failing rank to its error message."""

    def __init__(self, message: str, failures: Optional[Dict[int, str]] = None):
        super().__init__(message)
        self.failures = dict(failures or {})


class GraphInputError(RuntimeError, ValueError):
    """``mvp``'s ``backprop_on`` holds a tensor that ``grad_xy`` does not depend on (it does not
    require grad, or grad_xy's graph does not reach it). A RuntimeError, as autograd and pyDVL
    0.7.1's ``mvp`` raise, and a ValueError, as twicediff's other argument errors."""


# What a model or loss raises on data it cannot take: a shape mismatch in a layer, a class index
# out of range, a target of the wrong dtype or length.
_DATA_ERRORS = (RuntimeError, IndexError, ValueError, TypeError)


def describe_inputs(x, limit: int = 6) -> str:
    """A model input for error messages: ``(B, ...) dtype`` for a tensor; for a tuple, list or dict
    its entries the same way (``{'input_ids': (4, 8) torch.int64, ...}``), the first ``limit`` of them."""
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {x.dtype}"
    if isinstance(x, (tuple, list, dict)):
        items = list(x.items()) if isinstance(x, dict) else list(enumerate(x))
        parts = [(f"{k!r}: " if isinstance(x, dict) else "") + describe_inputs(v, limit) for k, v in items[:limit]]
        if len(items) > limit:
            parts.append(f"... {len(items) - limit} more")
        left, right = ("{", "}") if isinstance(x, dict) else ("[", "]") if isinstance(x, list) else ("(", ")")
        return left + ", ".join(parts) + right
    return type(x).__name__


def batch_summary(x, y) -> str:
    """``x (B, ...) dtype, y (B, ...) dtype``, for error messages (x's entries for a tuple, list or
    dict x)."""
    return f"x {describe_inputs(x)}, y {describe_inputs(y)}"


# torch's words when the model or loss does something torch.func cannot transform: calls an op
# without a forward-mode derivative, a custom autograd.Function without jvp, vmap rule or
# setup_context, saved-tensor hooks (activation checkpointing), or a module in training mode that
# updates a buffer or draws random numbers. The data is fine; the engines built
# on torch.func are not, and the message should say so.
_NO_FORWARD_AD = re.compile(r"forward AD with (\S+) that does not support it")
_NO_CUSTOM_JVP = "implement the jvp function for custom autograd.Function"
_NO_VMAP = re.compile(r"You tried to vmap over (\S+), but it does not have vmap support")
_BUFFER_UPDATE = "mutate a captured Tensor"
_RANDOM = "called random operation while in randomness error mode"
_SAVED_TENSOR_HOOKS = "support saved tensor hooks"
_NO_SETUP_CONTEXT = "it must override the setup_context staticmethod"


# Ops twicediff computes itself for the modules that call them (twicediff.torch.derivative_routes),
# which a model can call without such a module: the name in torch's errors of either mode, the
# error type it comes with, the function, the modules that are routed and the function to call.
_UNROUTED = (("_embedding_bag", (NotImplementedError,), "F.embedding_bag", "nn.EmbeddingBag",
              "twicediff.torch.embedding_bag.embedding_bag"),
             ("hardsigmoid_backward", (NotImplementedError, RuntimeError), "F.hardsigmoid", "nn.Hardsigmoid",
              "twicediff.torch.activations.hardsigmoid"))


def _untransformable(error: BaseException, where: str, data: str) -> str:
    """The prefix for an error named above (a torch.func transform's, or that of an op of
    ``_UNROUTED`` in any engine), or "" for any other error."""
    message = str(error)
    for op, types, function, modules, instead in _UNROUTED:
        if isinstance(error, types) and op in message:
            return (f"{where}: torch has no second derivative of {function} (met running the model and loss on "
                    f"{data}); twicediff computes it for {modules} modules, and a model that calls {function} "
                    f"itself can call {instead} instead (the same arguments and values). torch says: ")
    op, vmap = _NO_FORWARD_AD.search(message), _NO_VMAP.search(message)
    forward_mode, first = "the engines that differentiate in forward mode", ""
    if op:
        what, engines = f"torch has no forward-mode derivative of {op.group(1)}", forward_mode
    elif _NO_CUSTOM_JVP in message:
        what, engines = "a custom autograd.Function has no jvp", forward_mode
    elif vmap:
        what = f"the custom autograd.Function {vmap.group(1)} has no vmap rule"
        engines = "the engines that batch the directions with torch.func.vmap"
    elif _SAVED_TENSOR_HOOKS in message:
        what = ("the model uses saved-tensor hooks (activation checkpointing with torch.utils.checkpoint, or "
                "torch.autograd.graph.saved_tensors_hooks)")
        engines = "torch.func cannot trace those, so the engines built on it"
    elif _NO_SETUP_CONTEXT in message:
        what = ("a custom autograd.Function has no setup_context (an old-style one, as "
                "torch.utils.checkpoint(use_reentrant=True) uses)")
        engines = "torch.func cannot transform it, so the engines built on it"
    elif _BUFFER_UPDATE in message or _RANDOM in message:
        # A module in training mode: BatchNorm updates its running statistics in place, Dropout draws
        # a mask. The other engines run it, every product then random or normalised by the batch's
        # statistics, so eval() comes first in the advice.
        what = ("a module updates a buffer in place (BatchNorm's running statistics in training mode, say), or "
                "the forward writes to a tensor it is given (x.mul_(...), x += ...)"
                if _BUFFER_UPDATE in message else "a module draws random numbers (a Dropout in training mode, say, or "
                                                  "a draw made in eval mode too, such as LayerDrop's)")
        engines, first = "torch.func cannot trace that, so the engines built on it", "call model.eval() first, or "
    else:
        return ""
    # The compiled engine's eager fallback computes in reverse mode where forward mode lacks a rule.
    which = "engine='func'" if engines == forward_mode else "engine='func', and 'compiled' where it falls back to eager"
    return (f"{where}: {what} (met running the model and loss on {data}); {engines} ({which}) cannot take this "
            f"model: {first}use engine='autograd' or 'loop', or 'auto', which uses the engines that run. torch says: ")


@contextlib.contextmanager
def data_errors(where: str, name: str = "", x=None, y=None) -> Iterator[None]:
    """Re-raises an error of the model or loss (or a native kernel's check) on a batch as the same
    exception type, with ``"{where}: the model or loss failed on {name} (x ..., y ...): "`` before
    its message. Where torch says the model calls something torch.func cannot transform (no
    forward-mode derivative, no vmap rule), the prefix says that instead, and which engines take it.

    torch's own messages (e.g. ``mat1 and mat2 shapes cannot be multiplied``) name neither the
    function nor the data. Nothing is formatted unless something fails. Nested uses keep the
    outermost ``where`` and ``name`` (the user's argument) and the innermost batch shapes (the batch
    that failed); out-of-memory errors, :class:`EngineChoiceError` and :class:`ModelChangedError` pass
    unchanged.
    """
    from .torch.batch import input_tensors  # (errors is imported by batch)

    versions = [(key, t, t._version) for key, t in input_tensors(x) + input_tensors(y, "y")]
    try:
        yield
    except _DATA_ERRORS as exc:
        if isinstance(exc, (torch.OutOfMemoryError, EngineChoiceError, ModelChangedError)):
            raise
        _check_inputs_unchanged(versions, where, exc)
        original = getattr(exc, "_twicediff_original", exc)
        batch = getattr(exc, "_twicediff_batch", "") or (batch_summary(x, y) if x is not None else "")
        data = f"{name} ({batch})" if name and batch else name or batch
        prefix = _untransformable(original, where, data) or f"{where}: the model or loss failed on {data}: "
        message = prefix + str(original)
        if isinstance(x, dict) and isinstance(original, TypeError) and "unexpected keyword argument" in str(original):
            message += ("; a dict x is passed as keyword arguments, model(**x): for a model whose forward takes "
                        "the dict itself, pass x as a one-element tuple, (x,)")
        try:
            wrapped = type(original)(message)
        except Exception:  # a type that takes other arguments: the builtin one it derives from
            wrapped = next(t for t in _DATA_ERRORS if isinstance(original, t))(message)
        wrapped._twicediff_original, wrapped._twicediff_batch = original, batch
        raise wrapped from original
    _check_inputs_unchanged(versions, where)


def _check_inputs_unchanged(versions: list, where: str, cause: Optional[BaseException] = None) -> None:
    """A ModelChangedError when the model or loss wrote to a tensor of the batch in place (its
    version counter moved): twicediff runs the forward more than once per call (preparing, probing,
    each chunk of products), so each run saw other data, and products, gradients and influences
    would mix them. Under torch.func the write fails instead, with an error about buffers: this
    names the cause."""
    changed = [key for key, t, version in versions if t._version != version]
    if changed:
        raise ModelChangedError(f"{where}: the model or loss writes to the batch's {changed[0]} in place (its forward "
                                "changes the tensor it is given, e.g. x.mul_(...) or x += ...); twicediff runs the "
                                "forward several times per call, so each run saw other data, and the tensor you "
                                "passed has been changed: clone it inside forward before changing it (x = x.clone()) "
                                "or change it out of place") from cause
