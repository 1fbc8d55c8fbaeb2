"""The one place that picks an engine for a model, loss and batch.

``"auto"``: the native engine when it takes the model, loss and batch (x one tensor); otherwise
torch.func forward-over-reverse, falling back to autograd for a model with an op that has no
torch.func rule. A tuple or dict x (``model(*x)``, ``model(**x)``) always goes to a generic engine.
``"native"``, ``"func"``, ``"autograd"``: that engine (``"native"`` raises where it cannot take the model).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Tuple

import torch
from torch import nn

from ...errors import ModelMisreadError, NotNativeError
from .autograd import AutogradEngine
from .base import Engine, PreparedBatch
from .func import FuncEngine
from .native import NativeEngine, single_tensor_input

__all__ = ["ENGINES", "native_engine", "prepare"]

logger = logging.getLogger(__name__)
_warned: set = set()  # ids of models whose misreading was reported

#: The engine names ``hvp`` and ``hvp_function`` take.
ENGINES = ("auto", "native", "func", "autograd")


def native_engine(model: nn.Module, loss: Callable, x: Any, y: torch.Tensor
                  ) -> Tuple[NativeEngine, PreparedBatch]:
    """The native engine and the batch it prepared; :class:`~twicediff.errors.NotNativeError`
    (the reason) where it cannot take the model, loss or batch (a tuple or dict x among them)."""
    single_tensor_input(x)
    engine = NativeEngine(model, loss)
    return engine, engine.prepare(x, y)


def prepare(engine: str, model: nn.Module, loss: Callable, x: Any, y: torch.Tensor
            ) -> Tuple[Engine, PreparedBatch]:
    """(the engine ``engine`` names, the batch it prepared) for ``model`` and ``loss`` on (x, y).

    Raises:
        ValueError: an unknown engine name, or ``engine="native"`` for a model it cannot take
            (the message gives the reason).
    """
    if engine not in ENGINES:
        raise ValueError(f"hvp: engine must be one of {ENGINES}, got {engine!r}")
    if engine in ("auto", "native"):
        try:
            return native_engine(model, loss, x, y)
        except NotNativeError as exc:
            if engine == "native":
                raise ValueError(f"hvp: engine='native' cannot take this model: {exc}") from None
            if isinstance(exc, ModelMisreadError) and id(model) not in _warned:
                _warned.add(id(model))
                logger.warning("twicediff: the native engine does not take %s (%s); using the generic engines",
                               type(model).__name__, exc)
    chosen: Engine = AutogradEngine(model, loss) if engine == "autograd" else \
        FuncEngine(model, loss, fallback=engine == "auto")
    return chosen, chosen.prepare(x, y)
