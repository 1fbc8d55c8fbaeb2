"""Ops whose derivatives torch lacks or gets wrong, computed by equivalent ones that have them.

Some of torch's ops (2.14) break second-order products: ``F.embedding_bag`` has no derivative of its
backward and no forward-mode rule (:mod:`twicediff.torch.embedding_bag`), ``torch._weight_norm``
has a wrong second derivative and no forward-mode rule (:mod:`twicediff.torch.weight_norm`), and
two losses have no derivative of their backward (:data:`LOSSES`, :mod:`twicediff.torch.losses`).
:func:`routes_for_derivatives` is a context under which calls of them compute with those modules'
functions instead: the same values, correct derivatives of every order. :func:`needed` says which
routes a module needs (from the modules that make such calls); :func:`twicediff.torch.guard.model_call`
enters the context only for models that need it (a function mode sees every op of the forward, a
cost the other models do not pay), pyDVL's functional ``hvp`` around every product (it is given
a function, not a model). :func:`loss_routes` routes the losses alone: the engines enter it
around each evaluation of the loss (:func:`twicediff.torch.batch.squeezed_loss`), a few ops.
Two more losses and ``torch.cdist`` go wrong only in batched forward-mode or compiled products
(:data:`FORWARD_MODE_ROUTES`): the context of those products routes them
(:mod:`twicediff.torch.forward_mode`).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import losses
from .cdist import cdist
from .embedding_bag import embedding_bag
from .weight_norm import uses_weight_norm, weight_norm

__all__ = ["FORWARD_MODE_ROUTES", "LOSSES", "loss_routes", "needed", "routes_for_derivatives"]

#: torch's losses without a derivative of their backward (and without forward-mode rules), and the
#: functions of the same parameters that compute them.
LOSSES = {F.multi_margin_loss: losses.multi_margin_loss, F.multilabel_margin_loss: losses.multilabel_margin_loss}
#: Ops that reverse mode differentiates twice but batched forward-mode products do not: two losses
#: whose backward has no forward-mode rule, and ``torch.cdist`` (no forward-mode rule, and a wrong
#: batching rule of its backward's derivative: :mod:`twicediff.torch.cdist`).
FORWARD_MODE_ROUTES = {F.huber_loss: losses.huber_loss, F.soft_margin_loss: losses.soft_margin_loss,
                       torch.cdist: cdist}

# embedding_bag's parameters in order: the call's positional arguments bound by hand, which dynamo
# traces (inspect.signature's binding it does not, in the compiled engine's graphs).
_BAG = tuple(inspect.signature(embedding_bag).parameters)


class _Routes(TorchFunctionMode):
    def __init__(self, bags: bool, norms: bool, losses: bool):
        super().__init__()
        self.bags, self.norms, self.losses = bags, norms, losses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding_bag and self.bags:
            return embedding_bag(**dict(zip(_BAG, args)), **kwargs)
        if func is torch._weight_norm and self.norms:
            return weight_norm(*args, **kwargs)
        if self.losses and func in LOSSES:
            return LOSSES[func](*args, **kwargs)
        return func(*args, **kwargs)


def needed(module: nn.Module) -> tuple:
    """(bags, norms): whether ``module`` itself is an ``nn.EmbeddingBag``, and whether it normalises
    its weight (:func:`~twicediff.torch.weight_norm.uses_weight_norm`)."""
    return isinstance(module, nn.EmbeddingBag), uses_weight_norm(module)


def routes_for_derivatives(bags: bool = True, norms: bool = True, losses: bool = True) -> TorchFunctionMode:
    """A context routing ``F.embedding_bag`` (``bags``), ``torch._weight_norm`` (``norms``) and the
    :data:`LOSSES` (``losses``) to the functions above."""
    return _Routes(bags, norms, losses)


def loss_routes() -> TorchFunctionMode:
    """A context routing the :data:`LOSSES` alone."""
    return _Routes(False, False, True)
