"""Engines: "apply one batch's curvature to [D, P] directions".

=====================  =============================================================
module                 what it holds
=====================  =============================================================
``base``               the :class:`Engine` protocol, :class:`PreparedBatch`, MODES, chunk caps
``select``             the one place that picks an engine (:func:`prepare`, ENGINES)
``bound_hvp``          :class:`BoundHvp`: an engine bound to one batch, chunking directions
``native_model``       reading a model and loss for the native op (:func:`read_native_model`)
``native``             :class:`NativeEngine`: the fused R-operator op
``hessian_assembly``   the native engine's blockwise explicit Hessian
``generic``            what the generic engines share (any model)
``func``               :class:`FuncEngine`: torch.func forward-over-reverse
``autograd``           :class:`AutogradEngine`: double backward
=====================  =============================================================
"""
from .autograd import AutogradEngine
from .base import MODES, Engine, PreparedBatch
from .bound_hvp import BoundHvp
from .func import FuncEngine
from .native import NativeEngine
from .select import ENGINES, native_engine, prepare

__all__ = ["ENGINES", "MODES", "AutogradEngine", "BoundHvp", "Engine", "FuncEngine", "NativeEngine",
           "PreparedBatch", "native_engine", "prepare"]
