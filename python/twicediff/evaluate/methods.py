"""The methods compared: one line each in :data:`METHODS`.

A method maps right-hand sides to influence factors: ``solve(model, training_data, rhs, λ)`` with
``rhs`` [R, P] gradients returns [R, P] rows ``x ≈ (H + λI)⁻¹ rhs`` (``model`` a
:class:`twicediff.TorchTwiceDifferentiable`, H the Hessian of its mean loss over ``training_data``).
Every score the evaluation reports follows from those factors: test influences
``x_t · ∇θℓ(z_i)`` (pyDVL's up-weighting influence, :func:`twicediff.compute_influences_up`),
validation harm and self-influence.

To add a method, add a line: ``"name": solver("method", option=value)`` for anything registered with
:class:`twicediff.InversionRegistry` (its options are those of :func:`twicediff.solve_hvp`), or any
function with the signature above. Methods whose inversion method this twicediff does not have are
left out of :func:`available_methods` (K-FAC and EK-FAC join the table once registered).

A method is damped by the evaluation's λ (``Problem.hessian_regularization``), passed to
:func:`twicediff.solve_hvp` as ``hessian_perturbation``, unless it carries a damping of its own:
``solver("ekfac", damping=0.1, relative_damping=True)`` always passes ``hessian_perturbation=0.1``
whatever λ is (here with ``relative_damping``: 0.1 × each layer's mean eigenvalue, the rule K-FAC
and EK-FAC are meant to be damped by). :func:`describe` names that damping with the options, and so
does every saved evaluation.

:data:`QUICK_METHODS` is the same table with cheaper options for ``evaluate --quick``: CG to a
looser tolerance and LiSSA with fewer steps. Their answers are then less accurate, and their LDS
may be lower than with :data:`METHODS`; the options used are recorded with every evaluation
(:func:`describe`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from ..inversion import InversionMethod, solve_hvp

__all__ = ["METHODS", "QUICK_METHODS", "Solve", "available_methods", "describe", "identity", "solver"]

Solve = Callable[[Any, Any, torch.Tensor, float], torch.Tensor]


def identity(model: Any, training_data: Any, rhs: torch.Tensor, regularization: float) -> torch.Tensor:
    """No inverse at all: the scores become plain gradient dot products ``∇θf(z_t) · ∇θℓ(z_i)``
    (the baseline every method must beat)."""
    return rhs


def solver(method: str, *, batch_size: Optional[int] = None, damping: Optional[float] = None,
           **options: Any) -> Solve:
    """The method ``solve_hvp(method, model, training_data, rhs, hessian_perturbation=λ, **options)``;
    ``method`` is an :class:`twicediff.InversionMethod` value (``"direct"``, ``"cg"``, ...).
    ``batch_size`` re-batches a DataLoader's dataset first (for methods that take one batch a step).
    ``damping`` (a float >= 0) is the method's own ``hessian_perturbation``, passed instead of the
    evaluation's λ (with ``relative_damping=True``, K-FAC's and EK-FAC's factor of each layer's mean
    eigenvalue); ``None`` (the default) passes λ."""
    if damping is not None and (isinstance(damping, bool) or not isinstance(damping, (int, float))
                                or not damping >= 0):
        raise ValueError(f"solver: damping must be None or a float >= 0, got {damping!r}")

    def solve(model: Any, training_data: Any, rhs: torch.Tensor, regularization: float) -> torch.Tensor:
        if batch_size is not None and isinstance(training_data, DataLoader):
            training_data = DataLoader(training_data.dataset, batch_size=batch_size,
                                       collate_fn=training_data.collate_fn)
        perturbation = regularization if damping is None else float(damping)
        return solve_hvp(method, model, training_data, rhs, hessian_perturbation=perturbation, **options).x

    solve.inversion_method = method  # type: ignore[attr-defined]
    solve.options = dict(options, **({} if batch_size is None else {"batch_size": batch_size}),  # type: ignore
                         **({} if damping is None else {"damping": damping}))
    return solve


def describe(solve: Solve) -> str:
    """One line naming a method's solver and options, e.g. ``cg(atol=0.0, rtol=1e-06)``."""
    method = getattr(solve, "inversion_method", None)
    if method is None:
        return getattr(solve, "__qualname__", repr(solve))
    options = getattr(solve, "options", {})
    return f"{method}(" + ", ".join(f"{k}={v!r}" for k, v in sorted(options.items())) + ")"


# Options: CG to a relative residual of 1e-6. LiSSA diverges unless its scale exceeds half the
# largest eigenvalue of a batch's H + λI (that of the whole digits training set is about 2.6); it
# converges in the direction of an eigenvalue e at the rate 1 − e/scale per step, so 300 steps
# leave the flattest directions (e near λ) far from converged: the usual cost/accuracy trade of
# LiSSA, measured as it is used. Batches of 128 halve the cost of a step. Its stopping rule (every
# entry's relative change below rtol) is rarely met in 300 steps, entries near zero keep it
# large, so the last iterate is taken with a warning (on_failure="warn"), as a user would.
# K-FAC and EK-FAC over every Linear layer (the default selection), with two curvatures: the
# empirical Fisher (the true labels' gradients, what works with any loss) and the Gauss-Newton
# matrix (exact in the loss Hessian, closer to the Hessian the other methods invert); each damped
# two ways. First by the same absolute λ as the others (relative_damping off): what the exact
# method's damping does to them. Then ("-rel") by their own rule, damping=0.1 with
# relative_damping: 0.1 × each layer's mean eigenvalue (Kronfluence's heuristic, the demo's
# default), whatever λ is: λ suits the exact Hessian, whose spectrum differs from a Kronecker
# factor's, and a λ chosen for one does not damp the other alike.
METHODS: Dict[str, Solve] = {
    "identity": identity,
    "direct": solver("direct"),
    "cg": solver("cg", rtol=1e-6, atol=0.0),
    "lissa": solver("lissa", scale=5.0, maxiter=300, rtol=1e-3, batch_size=128, on_failure="warn"),
    "arnoldi-10": solver("arnoldi", rank_estimate=10),
    "arnoldi-100": solver("arnoldi", rank_estimate=100),
    "kfac": solver("kfac", fisher_type="empirical", relative_damping=False),
    "ekfac": solver("ekfac", fisher_type="empirical", relative_damping=False),
    "kfac-ggn": solver("kfac", fisher_type="ggn", relative_damping=False),
    "ekfac-ggn": solver("ekfac", fisher_type="ggn", relative_damping=False),
    "kfac-rel": solver("kfac", fisher_type="empirical", relative_damping=True, damping=0.1),
    "ekfac-rel": solver("ekfac", fisher_type="empirical", relative_damping=True, damping=0.1),
    "kfac-ggn-rel": solver("kfac", fisher_type="ggn", relative_damping=True, damping=0.1),
    "ekfac-ggn-rel": solver("ekfac", fisher_type="ggn", relative_damping=True, damping=0.1),
}

# --quick: CG stops at a relative residual of 1e-4 (or 100 steps) and LiSSA after 100 steps, a
# third of their cost in METHODS; every other method is the same.
QUICK_METHODS: Dict[str, Solve] = dict(
    METHODS,
    cg=solver("cg", rtol=1e-4, atol=0.0, maxiter=100),
    lissa=solver("lissa", scale=5.0, maxiter=100, rtol=1e-3, batch_size=128, on_failure="warn"),
)


def available_methods(table: Optional[Dict[str, Solve]] = None) -> List[str]:
    """The names in ``table`` (default :data:`METHODS`) that this twicediff can run (its inversion
    method exists)."""
    known = {m.value for m in InversionMethod}
    return [name for name, solve in (METHODS if table is None else table).items()
            if getattr(solve, "inversion_method", None) in (None, *known)]
