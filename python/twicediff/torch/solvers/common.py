"""Argument checks every solver shares: right-hand sides, initial guesses, non-negative options."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..twice_differentiable import TorchTwiceDifferentiable



def check_rhs(model: TorchTwiceDifferentiable, b, where: str, name: str = "b") -> Tuple[torch.Tensor, bool]:
    """b as [N, P] (one right-hand side per row) on the model's device, and whether it was one [P]."""
    b = model.check_vectors(b, where, name=name, rows="N")
    one = b.dim() == 1
    return (b.unsqueeze(0) if one else b), one


def check_nonnegative(value, name: str, where: str) -> float:
    """``value`` as a float, or a ValueError naming ``where`` and ``name`` unless finite and >= 0."""
    v = float(value)
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return v


def initial_guess(x0: Optional[torch.Tensor], B: torch.Tensor, model, where: str, name: str) -> torch.Tensor:
    """x0 as [N, P] (a [P] vector is used for every row), else a copy of b (pyDVL's default)."""
    if x0 is None:
        return B.clone()
    X, _ = check_rhs(model, x0, where, name)
    if X.shape[0] == 1 and B.shape[0] != 1:
        return X.expand_as(B).clone()
    if X.shape != B.shape:
        raise ValueError(f"{where}: {name} must be [P] or b's shape {tuple(B.shape)}, got {tuple(x0.shape)}")
    return X.clone()
