"""Argument checks every solver shares: right-hand sides, initial guesses, non-negative options."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..finite import nonfinite_rows
from ..twice_differentiable import TorchTwiceDifferentiable



def check_rhs(model: TorchTwiceDifferentiable, b, where: str, name: str = "b") -> Tuple[torch.Tensor, bool]:
    """b as [N, P] (one right-hand side per row) on the model's device, and whether it was one [P].
    A ValueError for NaN or inf in b: CG, Arnoldi and K-FAC returned NaN rows for it without a
    word, and Direct blamed a singular H + λI."""
    b = model.check_vectors(b, where, name=name, rows="N")
    one = b.dim() == 1
    B = b.unsqueeze(0) if one else b
    rows = nonfinite_rows(B)
    if rows.numel():
        raise ValueError(f"{where}: {name} must be finite, but {'it' if one else f'row {int(rows[0])}'} holds NaN or "
                         f"inf ({rows.numel()} of {B.shape[0]} row(s) do)")
    return B, one


#: How advice to raise λ names it: the solvers call it ``hessian_perturbation`` (pyDVL's
#: ``solve_hvp``), the influence functions ``hessian_regularization``.
LAMBDA = "λ (hessian_perturbation; hessian_regularization in compute_influences)"


def check_nonnegative(value, name: str, where: str) -> float:
    """``value`` as a float: a TypeError naming ``where`` and ``name`` unless it is a real number
    (a string or a bool is not), a ValueError unless it is finite and >= 0."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):  # None, a list, a tensor of several elements
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}") from None
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
