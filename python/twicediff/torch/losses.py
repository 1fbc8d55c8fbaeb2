"""Four of torch's losses as second derivatives need them.

torch (2.14) differentiates these losses once, but not as Hessian products need:

- ``F.multi_margin_loss`` (``nn.MultiMarginLoss``, the multi-class hinge loss) and
  ``F.multilabel_margin_loss`` (``nn.MultiLabelMarginLoss``) have no derivative of their backward
  and no forward-mode rule: every engine failed on them;
- ``F.huber_loss`` (``nn.HuberLoss``) and ``F.soft_margin_loss`` (``nn.SoftMarginLoss``) have no
  forward-mode rule of their backward: the forward-over-reverse engines (func, compiled) failed.

The functions here compute the same values from ops that torch differentiates to any order in
both modes and batches under vmap. :mod:`twicediff.torch.derivative_routes` routes the losses'
calls to them: the first two wherever a loss is evaluated
(:func:`twicediff.torch.batch.squeezed_loss`, pyDVL's functional ``hvp``), the last two only under
forward mode (:func:`twicediff.torch.forward_mode.reverse_mode_constants`), where torch's own fail.

Where values differ from torch's kernels, on purpose: ``soft_margin_loss`` is ``softplus(-y·x)``,
finite where torch's ``log1p(exp(-y·x))`` overflows to inf (float32, ``-y·x`` above about 88).
Elsewhere they agree to rounding. The derivatives are torch's almost everywhere; on a hinge's
kink (a margin met exactly), the one-sided derivative of ``relu`` is taken, as torch's backward does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn import _reduction

__all__ = ["huber_loss", "multi_margin_loss", "multilabel_margin_loss", "soft_margin_loss"]

REDUCTIONS = ("none", "mean", "sum")


def _reduction_of(where: str, size_average, reduce, reduction: str) -> str:
    """The reduction, from torch's deprecated ``size_average`` / ``reduce`` when either is given."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def _class_scores(where: str, input: torch.Tensor, target: torch.Tensor, target_shape) -> None:
    """Checks an input of scores [C] or [N, C] and an integer target of ``target_shape``."""
    if input.dim() not in (1, 2) or input.shape[-1] == 0:
        raise ValueError(f"{where}: input must be scores [C] or [N, C] with C > 0, got shape {tuple(input.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"{where}: target must hold class indices as torch.long, got {target.dtype}")
    if tuple(target.shape) != tuple(target_shape):
        raise ValueError(f"{where}: for input of shape {tuple(input.shape)}, target must have shape "
                         f"{tuple(target_shape)}, got {tuple(target.shape)}")


def _check_targets(valid: torch.Tensor, message: str) -> None:
    """Fails the call (asynchronously on a GPU: no sync) where ``valid`` is not all true. Not under
    vmap over the targets (per-sample gradients), which has no batching rule for the check: the
    batch's own calls check the same targets."""
    if not torch.compiler.is_compiling():
        functorch = torch._C._functorch
        t = valid
        while functorch.is_functorch_wrapped_tensor(t):  # transforms' wrappers, the outermost first
            if functorch.is_batchedtensor(t):
                return
            t = functorch.get_unwrapped(t)
    torch._assert_async(valid.all(), message)


def multi_margin_loss(input: torch.Tensor, target: torch.Tensor, p: int = 1, margin: float = 1.0,
                      weight: Optional[torch.Tensor] = None, size_average=None, reduce=None,
                      reduction: str = "mean") -> torch.Tensor:
    """``F.multi_margin_loss``: for scores x [C] and class y, ``Σ_{i≠y} w[y]·max(0, margin − x[y] + x[i])^p / C``."""
    where = "multi_margin_loss"
    reduction = _reduction_of(where, size_average, reduce, reduction)
    if p not in (1, 2):
        raise ValueError(f"{where}: p must be 1 or 2 (as in torch), got {p!r}")
    _class_scores(where, input, target, input.shape[:-1])
    classes = input.shape[-1]
    if weight is not None and tuple(weight.shape) != (classes,):
        raise ValueError(f"{where}: weight must have one entry per class, shape ({classes},), got "
                         f"{tuple(weight.shape)}")
    _check_targets((target >= 0) & (target < classes), f"{where}: every target must be a class index in [0, {classes})")
    at = target.unsqueeze(-1)
    hinge = F.relu(margin - input.gather(-1, at) + input)
    if p == 2:
        hinge = hinge * hinge
    if weight is not None:
        # index_select, not weight[target]: indexing by a 0-d target reads its value (dynamo cannot trace that)
        hinge = hinge * weight.index_select(0, target.reshape(-1)).reshape(at.shape)
    own = torch.arange(classes, device=input.device) == at  # the target's own column is not counted
    values = torch.where(own, hinge.new_zeros(()), hinge).sum(-1) / classes
    return _reduce(values, reduction)


def multilabel_margin_loss(input: torch.Tensor, target: torch.Tensor, size_average=None, reduce=None,
                           reduction: str = "mean") -> torch.Tensor:
    """``F.multilabel_margin_loss``: target holds a point's classes, ended by the first −1; the loss is
    ``Σ_j Σ_{i not a class} max(0, 1 − (x[y_j] − x[i])) / C`` over its classes y_j (a repeated class
    counts again, as in torch)."""
    where = "multilabel_margin_loss"
    reduction = _reduction_of(where, size_average, reduce, reduction)
    _class_scores(where, input, target, input.shape)
    classes = input.shape[-1]
    _check_targets((target >= -1) & (target < classes),
                   f"{where}: every target entry must be a class index in [0, {classes}) or -1")
    listed = torch.cumprod((target != -1).long(), dim=-1).bool()  # positions before the first -1
    labels = torch.where(listed, target, torch.zeros_like(target))
    is_label = torch.zeros_like(listed).scatter_reduce(-1, labels, listed, "amax")  # [.., C]
    hinge = F.relu(1 - input.gather(-1, labels).unsqueeze(-1) + input.unsqueeze(-2))  # [.., L, C]
    counted = listed.unsqueeze(-1) & ~is_label.unsqueeze(-2)
    values = torch.where(counted, hinge, hinge.new_zeros(())).sum((-2, -1)) / classes
    return _reduce(values, reduction)


def _broadcast(where: str, input: torch.Tensor, target: torch.Tensor):
    try:
        return torch.broadcast_tensors(input, target)
    except RuntimeError:
        raise ValueError(f"{where}: target of shape {tuple(target.shape)} does not broadcast with input of shape "
                         f"{tuple(input.shape)}") from None


def huber_loss(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.huber_loss``: ``d²/2`` where ``|d| < delta``, else ``delta·(|d| − delta/2)``, for d = input − target."""
    where = "huber_loss"
    reduction = _reduction_of(where, None, None, reduction)
    if not delta > 0:
        raise ValueError(f"{where}: delta must be positive, got {delta!r}")
    input, target = _broadcast(where, input, target)
    d = input - target
    size = d.abs()
    values = torch.where(size < delta, 0.5 * d * d, delta * (size - 0.5 * delta))
    if weight is not None:
        values = values * weight
    return _reduce(values, reduction)


def soft_margin_loss(input: torch.Tensor, target: torch.Tensor, size_average=None, reduce=None,
                     reduction: str = "mean") -> torch.Tensor:
    """``F.soft_margin_loss``: ``log(1 + exp(−y·x))``, as ``softplus(−y·x)``."""
    where = "soft_margin_loss"
    reduction = _reduction_of(where, size_average, reduce, reduction)
    input, target = _broadcast(where, input, target)
    return _reduce(F.softplus(-target * input), reduction)
