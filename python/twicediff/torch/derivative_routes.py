"""Ops whose derivatives torch lacks or gets wrong, computed by equivalent ones that have them.

Some of torch's ops (2.14) break second-order products: ``F.embedding_bag`` has no derivative of its
backward and no forward-mode rule (:mod:`twicediff.torch.embedding_bag`), ``torch._weight_norm``
has a wrong second derivative and no forward-mode rule (:mod:`twicediff.torch.weight_norm`),
``F.hardsigmoid`` has no derivative of its backward and ``F.rrelu`` no vmap rule
(:mod:`twicediff.torch.activations`), and three losses have no derivative of their backward
(:data:`LOSSES`, :mod:`twicediff.torch.losses`, :mod:`twicediff.torch.ctc`).
:func:`routes_for_derivatives` is a context under which calls of them compute with those modules'
functions instead: the same values, correct derivatives of every order. :func:`needed` says which
routes a module needs (from the modules that make such calls); :func:`twicediff.torch.guard.model_call`
enters the context only for models that need it (a function mode sees every op of the forward, a
cost the other models do not pay), pyDVL's functional ``hvp`` around every product (it is given
a function, not a model). :func:`loss_routes` routes the losses alone: the engines enter it
around each evaluation of the loss (:func:`twicediff.torch.batch.squeezed_loss`), a few ops.
Other ops go wrong only in batched forward-mode or compiled products (:data:`FORWARD_MODE_ROUTES`,
which says which and why): the context of those products routes them
(:mod:`twicediff.torch.forward_mode`); :func:`batched_routes` routes the recurrent layers alone,
for per-sample gradients (:mod:`twicediff.torch.per_sample`).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import activations, losses, recurrent
from .cdist import cdist, pdist
from .ctc import ctc_loss
from .embedding_bag import embedding_bag
from .grid_sample import grid_sample
from .weight_norm import uses_weight_norm, weight_norm

__all__ = ["FORWARD_MODE_ROUTES", "LOSSES", "MODEL_ROUTES", "batched_routes", "loss_routes", "needed",
           "routes_for_derivatives"]

#: torch's losses without a derivative of their backward (and without forward-mode rules), and the
#: functions of the same parameters that compute them.
LOSSES = {F.multi_margin_loss: losses.multi_margin_loss, F.multilabel_margin_loss: losses.multilabel_margin_loss,
          F.ctc_loss: ctc_loss}
#: Ops that reverse mode differentiates twice but batched forward-mode products do not: two losses
#: whose backward has no forward-mode rule, ``torch.cdist`` (no forward-mode rule, and a wrong
#: batching rule of its backward's derivative: :mod:`twicediff.torch.cdist`), ``F.pdist`` and
#: ``F.grid_sample`` (no forward-mode rule: :mod:`twicediff.torch.grid_sample`), and the recurrent
#: layers' fused ops (no forward-mode rule of oneDNN's LSTM: :mod:`twicediff.torch.recurrent`).
FORWARD_MODE_ROUTES = {F.huber_loss: losses.huber_loss, F.soft_margin_loss: losses.soft_margin_loss,
                       torch.cdist: cdist, F.pdist: pdist, F.grid_sample: grid_sample, **recurrent.ROUTED}

# embedding_bag's parameters in order: the call's positional arguments bound by hand, which dynamo
# traces (inspect.signature's binding it does not, in the compiled engine's graphs).
_BAG = tuple(inspect.signature(embedding_bag).parameters)


def _bag(*args, **kwargs):
    return embedding_bag(**dict(zip(_BAG, args)), **kwargs)


#: The routes of a model's ops, by name, and the ops each takes: a route is taken when a module of
#: the model makes such calls (:func:`needed`).
_MODEL_OPS = {"bags": {F.embedding_bag: _bag}, "norms": {torch._weight_norm: weight_norm},
              "hardsigmoid": {F.hardsigmoid: activations.hardsigmoid}, "rrelu": {F.rrelu: activations.rrelu}}
MODEL_ROUTES = tuple(_MODEL_OPS)
# The module types whose own calls need a route (weight normalisation is found by its hooks).
_MODULE_ROUTES = ((nn.EmbeddingBag, "bags"), (nn.Hardsigmoid, "hardsigmoid"), (nn.RReLU, "rrelu"))
_ROUTED_MODULES = tuple(kind for kind, _ in _MODULE_ROUTES)
_NONE: frozenset = frozenset()


class _Routes(TorchFunctionMode):
    """Calls of the ops in ``table`` computed by its functions (of the same parameters)."""

    def __init__(self, table: dict):
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.table.get(func, func)(*args, **(kwargs or {}))


def needed(module: nn.Module) -> frozenset:
    """The :data:`MODEL_ROUTES` that ``module`` itself needs: "bags" for an ``nn.EmbeddingBag``,
    "norms" where it normalises its weight (:func:`~twicediff.torch.weight_norm.uses_weight_norm`),
    "hardsigmoid" and "rrelu" for ``nn.Hardsigmoid`` and ``nn.RReLU``."""
    norms = uses_weight_norm(module)
    if not norms and not isinstance(module, _ROUTED_MODULES):
        return _NONE  # most modules: no allocation (the guard asks of every module on every call)
    return frozenset([name for kind, name in _MODULE_ROUTES if isinstance(module, kind)] + (["norms"] if norms else []))


def routes_for_derivatives(routes=MODEL_ROUTES, losses: bool = True) -> TorchFunctionMode:
    """A context routing the model ops named in ``routes`` (of :data:`MODEL_ROUTES`) and, with
    ``losses``, the :data:`LOSSES` to the functions above."""
    table = {op: fn for name in routes for op, fn in _MODEL_OPS[name].items()}
    return _Routes({**table, **LOSSES} if losses else table)


def loss_routes() -> TorchFunctionMode:
    """A context routing the :data:`LOSSES` alone."""
    return _Routes(LOSSES)


def batched_routes() -> TorchFunctionMode:
    """A context routing the recurrent layers' fused ops alone (:data:`twicediff.torch.recurrent.ROUTED`):
    per-sample gradients vmap the model's forward over the points, which those ops do not batch."""
    return _Routes(recurrent.ROUTED)
