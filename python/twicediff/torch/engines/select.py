"""The one place that picks an engine for a model, loss and batch.

``"auto"``: measured per shape class among the native engine (where it takes the model, loss and
batch: x one tensor), torch.func forward-over-reverse, autograd reverse-over-reverse and the
per-direction loop, with the compiled engine added where the expected products repay compiling
(engines/auto.py); the native engine without measuring for a model behind a frozen prefix with
weights (it runs the prefix once per batch, the others once per product). A tuple or dict x
(``model(*x)``, ``model(**x)``) always goes to a generic engine.
``"native"``, ``"func"``, ``"autograd"``, ``"loop"``, ``"compiled"``: that engine (``"native"``
raises where it cannot take the model). The environment variable ``TWICEDIFF_ENGINE`` names the
engine ``"auto"`` stands for in this process.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from ..._build import _C
from ...errors import EngineChoiceError, ModelMisreadError, NotNativeError
from .. import block_cache, matmul_route
from .auto import AutoEngine
from .autograd import AutogradEngine
from .base import Engine, PreparedBatch
from .compiled import CompiledEngine
from .func import FuncEngine
from .loop import LoopEngine
from .native import NativeEngine, single_tensor_input

__all__ = ["ENGINES", "native_engine", "prepare", "resolve"]

logger = logging.getLogger(__name__)
_warned: set = set()  # ids of models whose misreading was reported

#: The engine names ``hvp`` and ``hvp_function`` take.
ENGINES = ("auto", "native", "func", "autograd", "loop", "compiled")


def resolve(engine: str, where: str = "hvp") -> str:
    """``engine`` checked; ``"auto"`` replaced by ``TWICEDIFF_ENGINE`` where that is set. The
    engines' other environment settings are checked here too (``TWICEDIFF_CPU_BLOCK_CACHE``,
    ``TWICEDIFF_CPU_GEMM``, ``TWICEDIFF_MATMUL_ROUTE``): read later, inside a product, a bad value
    would be reported as the model failing on the batch."""
    if engine not in ENGINES:
        raise ValueError(f"{where}: engine must be one of {ENGINES}, got {engine!r}")
    block_cache.enabled()
    _C.cpu_gemm()
    matmul_route.mode()
    if engine == "auto":
        chosen = os.environ.get("TWICEDIFF_ENGINE", "").strip()
        if chosen and chosen not in ENGINES:
            raise ValueError(f"{where}: the environment variable TWICEDIFF_ENGINE must be one of {ENGINES}, "
                             f"got {chosen!r}")
        return chosen or "auto"
    return engine


def native_engine(model: nn.Module, loss: Callable, x: Any, y: torch.Tensor
                  ) -> Tuple[NativeEngine, PreparedBatch]:
    """The native engine and the batch it prepared; :class:`~twicediff.errors.NotNativeError`
    (the reason) where it cannot take the model, loss or batch (a tuple or dict x among them)."""
    single_tensor_input(x)
    engine = NativeEngine(model, loss)
    return engine, engine.prepare(x, y)


def prepare(engine: str, model: nn.Module, loss: Callable, x: Any, y: torch.Tensor, *,
            expected_products: Optional[int] = None) -> Tuple[Engine, PreparedBatch]:
    """(the engine ``engine`` names, the batch it prepared) for ``model`` and ``loss`` on (x, y).

    ``expected_products``: how many products the caller expects on this model and batch shape
    (``"auto"`` considers the compiled engine when they repay compiling, engines/amortise.py).

    Raises:
        ValueError: an unknown engine name; :class:`~twicediff.errors.EngineChoiceError` (a
            ValueError) for ``engine="native"`` and a model it cannot take (the message gives the reason).
    """
    engine = resolve(engine)
    native, native_batch = None, None
    if engine in ("auto", "native"):
        try:
            native, native_batch = native_engine(model, loss, x, y)
        except NotNativeError as exc:
            if engine == "native":
                raise EngineChoiceError(f"hvp: engine='native' cannot take this model, loss or batch: {exc}") from None
            if isinstance(exc, ModelMisreadError) and id(model) not in _warned:
                _warned.add(id(model))
                logger.warning("twicediff: the native engine does not take %s (%s); using the generic engines",
                               type(model).__name__, exc)
        if engine == "native" or (native is not None and any(True for m in native.prefix for _ in m.parameters())):
            # Behind a frozen prefix the native engine runs the prefix once per batch; every other
            # engine would run it again for every product: nothing to measure.
            return native, native_batch
        auto = AutoEngine(model, loss, native, expected_products)
        return auto, auto.batch(x, y, native_batch)
    chosen: Engine = {"func": FuncEngine, "autograd": AutogradEngine, "loop": LoopEngine,
                      "compiled": CompiledEngine}[engine](model, loss)
    return chosen, chosen.prepare(x, y)
