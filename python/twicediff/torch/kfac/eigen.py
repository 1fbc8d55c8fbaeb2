"""Eigendecompositions of the Kronecker factors: float64, symmetric, never a crash on a singular or
ill-conditioned covariance."""
from __future__ import annotations

import logging
from typing import Tuple

import torch

__all__ = ["symmetric_eigh"]

logger = logging.getLogger(__name__)


def symmetric_eigh(m: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [d] ascending, eigenvectors [d, d] as columns) of the symmetric part of ``m`` in
    float64, eigenvalues clamped at 0 (a covariance is positive semi-definite; rounding can make
    the smallest of a rank-deficient one slightly negative).

    LAPACK's ``syevd`` can fail to converge on badly conditioned input; then the decomposition is
    retried on ``m + εI`` for growing ε (relative to the mean diagonal) and ε subtracted again.
    Non-finite entries are an error naming ``what`` (they mean the data or the model produced NaN
    or inf)."""
    m = m.detach().to(torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"K-FAC: the {what} factor must be a square matrix, got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError(f"K-FAC: the {what} factor has non-finite entries (NaN or inf in the layer's inputs or "
                         "gradients); check the data and the loss")
    m = 0.5 * (m + m.T)
    d = m.shape[0]
    scale = float(m.diagonal().abs().mean()) if d else 0.0
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(d, dtype=m.dtype, device=m.device)
    for eps in (0.0, 1e-14, 1e-12, 1e-10, 1e-8, 1e-6):
        try:
            w, q = torch.linalg.eigh(m + (eps * scale) * eye if eps else m)
        except RuntimeError:  # torch.linalg.LinAlgError: no convergence
            continue
        if eps:
            logger.info("K-FAC: the eigendecomposition of the %s factor converged after a shift of %.1e (relative)",
                        what, eps)
            w = w - eps * scale
        return w.clamp_min(0.0), q
    # The last resort: an SVD of a symmetric PSD matrix gives its eigenpairs.
    u, s, _ = torch.linalg.svd(m)
    order = torch.argsort(s)
    return s[order], u[:, order]
