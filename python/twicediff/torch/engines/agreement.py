"""Engines that disagree: ``auto``'s check of its candidates against one another.

torch computes the engines' products with different rules: forward mode (func, compiled), batching
under vmap (func, autograd, compiled), fused kernels (native), reverse over reverse one direction at
a time (loop). Where one of those rules is wrong for a model, the products differ, with no error:
torch 2.14's batching rule of ``torch.cdist``'s derivative put func 13-166% off, before
:mod:`twicediff.torch.cdist` routed it. ``auto``'s probe computes every candidate's product of the
same first direction anyway (its warm-up); :func:`disagreeing` compares them with the loop's, the
product plain ``torch.autograd.functional.hvp`` gives, and auto leaves out the candidates that
differ, with a warning naming them. Where the probe's budget lets the loop warm up it costs no
product of its own; where the budget ran out first (a large model), the loop computes one direction
more for it. Where timing is off the deterministic rule decides, unchecked.
"""
from __future__ import annotations

import logging
import weakref
from typing import Dict, List, Tuple

import torch
from torch import nn

__all__ = ["AGREEMENT", "REFERENCES", "disagreeing", "gap_and_scale"]

logger = logging.getLogger(__name__)

#: The largest gap (relative to the reference's largest entry) a candidate's product may show. Far
#: above rounding: float32 engines differ from the loop by at most 5e-6 on the generated test
#: models, float64 ones by 1e-15 (1e-7 where the model computes in float32 inside, as transformers'
#: Llama RMSNorm does). Far below the faults it is there for. Other dtypes are not compared.
AGREEMENT = {torch.float64: 1e-6, torch.float32: 1e-3}
#: The references, the first of them that ran: reverse over reverse, one direction at a time (no
#: vmap, no forward mode); else the autograd engine's.
REFERENCES = ("loop", "autograd")

_reported: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models whose disagreement was logged


def gap_and_scale(got: torch.Tensor, want: torch.Tensor) -> Tuple[float, float]:
    """(max |got − want|, max |want|) of two products, in float64; (0, 0) for empty ones."""
    if want.numel() == 0:
        return 0.0, 0.0
    want = want.detach().double()
    return float((got.detach().double() - want).abs().max()), float(want.abs().max())


def disagreeing(first: Dict[str, torch.Tensor], model: nn.Module) -> List[str]:
    """The candidates whose product of one direction (``first``: name → [1, P]) is not the
    reference's, reported in a warning once per model; [] where no reference ran, the dtype is not
    compared or the reference is not finite."""
    reference = next((n for n in REFERENCES if n in first), None)
    if reference is None:
        return []
    want = first[reference]
    tolerance = AGREEMENT.get(want.dtype)
    if tolerance is None or want.numel() == 0 or not torch.isfinite(want).all():
        return []
    out = []
    for name, got in first.items():
        gap, scale = gap_and_scale(got, want)
        if name != reference and not gap <= tolerance * scale:
            out.append(name)
            if model not in _reported:
                logger.warning("twicediff: auto: engine %r gave another product than %r on %s (by %.3g of %.3g): one "
                               "of the derivative rules torch computes them with is wrong for this model; auto leaves "
                               "%r out (engine=%r gives its product all the same)", name, reference,
                               type(model).__name__, gap, scale, name, name)
    if out:
        _reported.add(model)
    return out
