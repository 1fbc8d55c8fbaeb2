"""The fused vector updates of the iterative solvers (csrc/cpu/solver_step.cpp,
csrc/cuda/solver_step.cu): one pass over [D, P] blocks of right-hand sides."""
from __future__ import annotations

import torch

from .. import _build  # noqa: F401  (loads twicediff._C, which registers the ops)

__all__ = ["cg_direction", "cg_step", "lissa_step"]

_native = torch.ops.twicediff


def cg_step(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    r"""One conjugate-gradient update of D systems at once, in place and in one pass:
    ``x += alpha[:, None] * p``, ``r -= alpha[:, None] * Ap``.

    Args:
        x, r, p, Ap: [D, P], one dtype (float32 / float64) and device.
        alpha: float64 [D].

    Returns:
        ``‖r[d]‖²`` per row, float64 [D]. Not differentiable (it writes into x and r).
    """
    return _native.cg_step(x, r, p, Ap, alpha)


def cg_direction(p: torch.Tensor, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The next CG search directions, in place: ``p = z + beta[:, None] * p`` for p, z [D, P] and
    float64 beta [D]; returns p."""
    _native.cg_direction(p, z, beta)
    return p


def lissa_step(h: torch.Tensor, b: torch.Tensor, Hh: torch.Tensor, dampen: float, scale: float,
               hessian_perturbation: float):
    r"""One LiSSA update of D right-hand sides at once, in place and in one pass:
    ``h' = b + (1 - dampen)·h - (Hh + λ·h) / scale`` with λ = ``hessian_perturbation``.

    Args:
        h, b, Hh: [D, P] (Hh = H h without λ); h is overwritten by h'.

    Returns:
        ``(max_rel, sum_rel)``, float64 [D]: ``max_j |h'-h| / |h'|`` and ``Σ_j |h'-h| / |h'|`` per row
        (0/0 counted as 0), both NaN in rows where h' holds a non-finite value.
    """
    return _native.lissa_step(h, b, Hh, float(dampen), float(scale), float(hessian_perturbation))


@torch.library.register_fake("twicediff::cg_step")
def _cg_step_fake(x, r, p, Ap, alpha):
    return x.new_empty(x.shape[0], dtype=torch.float64)


@torch.library.register_fake("twicediff::cg_direction")
def _cg_direction_fake(p, z, beta):
    return None


@torch.library.register_fake("twicediff::lissa_step")
def _lissa_step_fake(h, b, Hh, dampen, scale, hessian_perturbation):
    return h.new_empty(h.shape[0], dtype=torch.float64), h.new_empty(h.shape[0], dtype=torch.float64)
