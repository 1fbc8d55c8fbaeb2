r"""K-FAC and EK-FAC as inversion methods: x = (F + λI)⁻¹ b with F the Kronecker-factored curvature
of the model's tracked layers (:mod:`twicediff.torch.kfac`), in place of the Hessian H.

The factors are fitted over ``training_data`` under the wrapped model's loss in pyDVL's convention
(``loss(squeeze(output), squeeze(y))``, the mean over a batch), or passed in with ``factors=`` to
skip refitting (the same object serves many solves). Parameters outside the tracked layers have no
curvature: their entries of x are zero, and one INFO log line names them.

Options (keyword arguments of :func:`twicediff.inversion.solve_hvp` and of the influence functions):

- ``factors``: a fitted :class:`~twicediff.torch.kfac.KFACFactors` (method "ekfac" needs one fitted
  with the EK-FAC pass);
- ``fisher_type``: "empirical" (default), "true" or "ggn", for fitting;
- ``layers``: which Linear / Conv1d / Conv2d modules (names or modules) to track, for fitting;
- ``relative_damping``: λ (``hessian_perturbation`` / ``hessian_regularization``) scales each
  layer's mean eigenvalue instead of being absolute;
- ``fit_options``: a dict of further :meth:`KFACFactors.fit` arguments (``seed``,
  ``token_mask``, ``max_factor_dim``, …).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from ...errors import data_errors
from ...twice_differentiable import InverseHvpResult
from ..batch import apply_loss, check_training_data
from ..kfac import KFACFactors
from ..twice_differentiable import TorchTwiceDifferentiable, check_model
from .common import check_nonnegative, check_rhs

logger = logging.getLogger(__name__)

__all__ = ["solve_ekfac", "solve_kfac", "kfac_factors", "pydvl_loss"]


def pydvl_loss(model: TorchTwiceDifferentiable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The wrapped model's loss of a batch as :class:`TorchTwiceDifferentiable` takes it:
    ``loss(squeeze(output), squeeze(y))`` (:func:`~twicediff.torch.batch.apply_loss`)."""
    loss = model.loss

    def batch_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return apply_loss(loss, output, target)

    return batch_loss


def kfac_factors(model: TorchTwiceDifferentiable, training_data: Iterable, method: str, where: str, *,
                 factors: Optional[KFACFactors] = None, fisher_type: str = "empirical", layers=None,
                 fit_options: Optional[Dict[str, Any]] = None, progress: bool = False) -> KFACFactors:
    """``factors`` checked against ``model`` and ``method``, or factors fitted over ``training_data``
    (with the EK-FAC pass only for ``method == "ekfac"``)."""
    if factors is not None:
        if not isinstance(factors, KFACFactors):
            raise TypeError(f"{where}: factors must be a twicediff.torch.kfac.KFACFactors, got "
                            f"{type(factors).__name__}")
        if method == "ekfac" and factors.corrected is None:
            raise ValueError(f"{where}: inversion method 'ekfac' needs factors fitted with the EK-FAC pass "
                             "(ekfac=True); the factors given have none (use 'kfac' or refit)")
        factors.attach(model.model)
        return factors
    options = dict(fit_options or {})
    for key in ("fisher_type", "layers", "ekfac", "progress"):
        if key in options:
            raise ValueError(f"{where}: fit_options must not set {key!r}; pass it as its own option")
    # The GGN needs the loss itself to know its Hessian; it takes [B, C] outputs, where pyDVL's
    # squeeze is a no-op for B > 1.
    loss = model.loss if fisher_type == "ggn" else pydvl_loss(model)
    with data_errors(where, "training_data"):  # a batch the model or loss fails on, named as the caller's argument
        return KFACFactors.fit(model.model, loss, training_data, layers=layers, fisher_type=fisher_type,
                               ekfac=method == "ekfac", progress=progress, **options)


def _solve(method: str, model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
           hessian_perturbation: float, factors: Optional[KFACFactors], fisher_type: str, layers,
           relative_damping: bool, fit_options: Optional[Dict[str, Any]], progress: bool) -> InverseHvpResult:
    where = f"solve_{method}"
    check_model(model, where)
    check_training_data(training_data, where)
    B, one = check_rhs(model, b, where)
    lam = check_nonnegative(hessian_perturbation, "hessian_perturbation", where)
    if not isinstance(relative_damping, bool):
        raise TypeError(f"{where}: relative_damping must be a bool, got {relative_damping!r}")
    fitted = kfac_factors(model, training_data, method, where, factors=factors, fisher_type=fisher_type,
                          layers=layers, fit_options=fit_options, progress=progress)
    x = fitted.solve(B, damping=lam, method=method, relative_damping=relative_damping).to(B.dtype).contiguous()
    info = {"factors": fitted, "method": method, "left_out": list(fitted.left_out),
            "damping": {t.name: fitted.damping_for(t.name, lam, method, relative_damping) for t in fitted.layers}}
    return InverseHvpResult(x=x[0] if one else x, info=info)


def solve_ekfac(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
                hessian_perturbation: float = 0.0, *, factors: Optional[KFACFactors] = None,
                fisher_type: str = "empirical", layers=None, relative_damping: bool = False,
                fit_options: Optional[Dict[str, Any]] = None, progress: bool = False) -> InverseHvpResult:
    r"""x = (F + λI)⁻¹ b with EK-FAC's F: the Kronecker eigenbasis with the per-sample second
    moments as eigenvalues. See the module docstring for the options.

    Returns:
        InverseHvpResult: x of b's shape (zero outside the tracked layers); info ``factors`` (the
        fitted :class:`KFACFactors`, to pass back as ``factors=``), ``method``, ``left_out`` (the
        parameter names without curvature) and ``damping`` (λ_l per layer).
    """
    return _solve("ekfac", model, training_data, b, hessian_perturbation, factors, fisher_type, layers,
                  relative_damping, fit_options, progress)


def solve_kfac(model: TorchTwiceDifferentiable, training_data: Iterable, b: torch.Tensor,
               hessian_perturbation: float = 0.0, *, factors: Optional[KFACFactors] = None,
               fisher_type: str = "empirical", layers=None, relative_damping: bool = False,
               fit_options: Optional[Dict[str, Any]] = None, progress: bool = False) -> InverseHvpResult:
    r"""x = (F + λI)⁻¹ b with K-FAC's F = A ⊗ S per layer (eigenvalues λ_S λ_Aᵀ). Options and
    result as for :func:`solve_ekfac`."""
    return _solve("kfac", model, training_data, b, hessian_perturbation, factors, fisher_type, layers,
                  relative_damping, fit_options, progress)
