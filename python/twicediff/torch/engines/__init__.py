"""Engines: "apply one batch's curvature to [D, P] directions".

=====================  =============================================================
module                 what it holds
=====================  =============================================================
``base``               the :class:`Engine` protocol, :class:`PreparedBatch`, MODES, chunk caps
``select``             the one place that picks an engine (:func:`prepare`, ENGINES)
``auto``               :class:`AutoEngine`: ``engine="auto"``, the candidates' measured choice
``probe``              timed choices on first use, cached per shape class (and on disk)
``amortise``           when compiling pays: expected products against compile time
``bound_hvp``          :class:`BoundHvp`: an engine bound to one batch, chunking directions
``native_model``       reading a model and loss for the native op (:func:`read_native_model`)
``native``             :class:`NativeEngine`: the fused R-operator op
``hessian_assembly``   the native engine's blockwise explicit Hessian
``generic``            what the generic engines share (any model)
``func``               :class:`FuncEngine`: torch.func forward-over-reverse
``autograd``           :class:`AutogradEngine`: double backward
``loop``               :class:`LoopEngine`: one backward pass per direction
``compiled``           :class:`CompiledEngine`: torch.compile of the batched products
``gemm_fold``          the compiled engine's graph pass: broadcast batched matmuls as one GEMM
=====================  =============================================================
"""
from .amortise import expected_products
from .auto import AutoEngine
from .autograd import AutogradEngine
from .base import MODES, Engine, PreparedBatch
from .bound_hvp import BoundHvp
from .compiled import CompiledEngine
from .func import FuncEngine
from .loop import LoopEngine
from .native import NativeEngine
from .select import ENGINES, native_engine, prepare

__all__ = ["ENGINES", "MODES", "AutoEngine", "AutogradEngine", "BoundHvp", "CompiledEngine", "Engine", "FuncEngine",
           "LoopEngine", "NativeEngine", "PreparedBatch", "expected_products", "native_engine", "prepare"]
