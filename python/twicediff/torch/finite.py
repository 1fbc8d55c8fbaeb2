"""Whether tensors hold NaN or inf, checked without a mask as large as the tensor.

``torch.isfinite(t).all()`` makes a boolean tensor of t's shape first: for the [N, P] right-hand
sides of a solver, or the [P, P] Hessian, that is memory the budget did not plan for. A NaN or an
inf among t's entries makes its sum NaN or ±inf, so a finite sum proves them all finite; only when
the sum is not finite (also when finite entries overflow it) is the elementwise test run.
"""
from __future__ import annotations

import torch

__all__ = ["CAUSE", "all_finite", "nonfinite_rows"]

#: What makes a loss, gradient or curvature non-finite, as the errors that find one say it.
CAUSE = "NaN or inf in x, or a loss that overflows there"


def all_finite(t: torch.Tensor) -> bool:
    """Whether no entry of ``t`` is NaN or ±inf."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """The indices of the rows of a 2-d ``t`` that hold a NaN or an inf, empty when none does (the
    row mask is made only then: :func:`all_finite` first)."""
    if all_finite(t):
        return torch.empty(0, dtype=torch.long, device=t.device)
    return (~torch.isfinite(t).all(dim=1)).nonzero().flatten()
