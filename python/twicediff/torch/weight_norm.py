"""Weight normalisation as second derivatives need it.

``nn.utils.parametrizations.weight_norm`` (and the older ``nn.utils.weight_norm``) computes a
module's weight as ``torch._weight_norm(v, g, dim)``: v rescaled to norm g. torch (2.14) computes it
with a fused kernel whose second derivative is wrong (``torch.autograd.gradgradcheck`` fails on it
for dim 0 and 1: the Hessian of a weight-normalised model's loss, taken reverse over reverse, was off
by about 10% of its norm) and which has no forward-mode rule. :func:`weight_norm` computes the same
values as ``v · g / ‖v‖`` in ops torch differentiates correctly, to any order, in both modes;
:func:`twicediff.torch.guard.model_call` routes the model's ``torch._weight_norm`` calls to it
whenever :func:`uses_weight_norm` finds one of those two spellings in the model.

The older spelling also keeps the computed weight as a plain attribute of the module, a tensor
with a graph, which ``copy.deepcopy`` refuses to copy: :func:`deep_copy` copies such a model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["deep_copy", "uses_weight_norm", "weight_norm"]


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm(v, g, dim)``: v scaled to norm g along ``dim``, the norm taken over every
    other dimension (over all of v where ``dim`` is -1, as torch's ``norm_except_dim`` does)."""
    if dim == -1:
        norm = torch.linalg.vector_norm(v)
    else:
        keep = dim % v.dim()
        norm = torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != keep], keepdim=True)
    return v * (g / norm)


def uses_weight_norm(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) has a weight-norm parametrization or the older
    weight-norm forward pre-hook (a check made on every module of every call: no more than two
    dictionary walks)."""
    hooks = module._forward_pre_hooks
    if hooks and any(isinstance(h, WeightNorm) for h in hooks.values()):
        return True
    tables = module._modules.get("parametrizations")  # where nn.utils.parametrize registers them
    return tables is not None and isinstance(tables, nn.ModuleDict) and any(
        isinstance(p, parametrizations._WeightNorm) for table in tables.values() for p in table)


def deep_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also where ``nn.utils.weight_norm`` left its computed weight in a
    module (set aside during the copy and put back; the copy's hook computes its own at its first
    forward, as the original's does at each)."""
    aside = [(m, h.name, m.__dict__.pop(h.name)) for m in model.modules() for h in m._forward_pre_hooks.values()
             if isinstance(h, WeightNorm) and h.name in m.__dict__]
    try:
        return copy.deepcopy(model)
    finally:
        for m, name, value in aside:
            setattr(m, name, value)
