"""Two of torch's activations as second derivatives need them.

- ``F.hardsigmoid`` (``nn.Hardsigmoid``, in MobileNetV3's squeeze-excitation blocks): torch (2.14)
  has no derivative of its backward and no forward-mode rule of it, so every engine failed on a
  model with one. :func:`hardsigmoid` is ``hardtanh(x + 3, 0, 6) / 6``, torch's own arithmetic,
  whose derivatives torch has in both modes (piecewise linear: the second is 0 almost everywhere).
- ``F.rrelu`` (``nn.RReLU``) in eval mode is a leaky ReLU of slope (lower + upper) / 2, but torch
  computes it with an op that has no vmap rule, so the batched engines (func, compiled) failed.
  :func:`rrelu` computes it as ``F.leaky_relu``; in training mode (random slopes) it is torch's.

:func:`twicediff.torch.guard.model_call` routes the model's calls to them when a module of the
model is an ``nn.Hardsigmoid`` or ``nn.RReLU`` (:mod:`twicediff.torch.derivative_routes`). Both
return a new tensor where torch's ``inplace=True`` writes to the input: the same values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hardsigmoid", "rrelu"]


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid``: 0 below −3, 1 above 3, ``x / 6 + 1/2`` between."""
    return F.hardtanh(input + 3, 0.0, 6.0) / 6


def rrelu(input: torch.Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
          inplace: bool = False) -> torch.Tensor:
    """``F.rrelu``: in eval mode the leaky ReLU of slope (lower + upper) / 2; in training mode torch's."""
    if training:
        return F.rrelu(input, lower, upper, training, inplace)
    return F.leaky_relu(input, (lower + upper) / 2)
