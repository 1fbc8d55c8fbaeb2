r"""The K-FAC ops: typed wrappers over ``torch.ops.twicediff.kfac_*`` and their fake kernels.

- :func:`covariance_accumulate`: ``out [D, D] += Σ_r w_r ā_r ā_rᵀ`` over rows x [R, d], ā_r = [x_r, 1]
  with a bias (the 1 implied, never stored), D = d + bias.
- :func:`eigen_correction_accumulate`: ``out [O, I'] += Σ_n (Q_Sᵀ G_n Q_A)²`` with
  ``G_n = Σ_t w_{n,t} g_{n,t} ā_{n,t}ᵀ``, without forming more than a bounded chunk of the
  per-sample [O, I'] matrices (one token per sample: one GEMM of squares, no per-sample matrix).

Both accumulate in ``out``'s dtype (float32, or float64 on request) whatever the inputs' floating
dtype (float16, bfloat16, float32, float64). Values only: not differentiable. The pure-torch
references are ``kfac_covariance_`` and ``kfac_eigen_correction_`` in :mod:`twicediff.ops.reference`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _build  # noqa: F401  (loads twicediff._C, which registers the ops)

__all__ = ["covariance_accumulate", "eigen_correction_accumulate"]

_native = torch.ops.twicediff


def _tensor(op: str, name: str, value, optional: bool = False) -> Optional[torch.Tensor]:
    if optional and value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor{' or None' if optional else ''}, got {type(value).__name__}")
    return value


def _not_tracked(op: str, out: torch.Tensor) -> None:
    if torch.is_grad_enabled() and out.requires_grad:
        raise ValueError(f"{op}: out requires grad, but {op} writes into it outside autograd; pass a tensor that "
                         "does not require grad")


def covariance_accumulate(out: torch.Tensor, x: torch.Tensor, weights: Optional[torch.Tensor] = None,
                          bias: bool = False) -> torch.Tensor:
    """``out [D, D] += Σ_r w_r ā_r ā_rᵀ`` in place for x [R, d] (D = d + bias); returns ``out``.

    Args:
        out: float32 or float64 accumulator [D, D].
        x: rows [R, d], float16 / bfloat16 / float32 / float64 (read in chunks converted to out's dtype).
        weights: [R] row weights or a bool mask (padding tokens), or None for ones.
        bias: append an implied 1 to every row (the bias column of a layer's input).
    """
    op = "covariance_accumulate"
    _tensor(op, "out", out)
    _tensor(op, "x", x)
    _tensor(op, "weights", weights, optional=True)
    _not_tracked(op, out)
    _native.kfac_covariance_(out, x.detach(), None if weights is None else weights.detach(), bool(bias))
    return out


def eigen_correction_accumulate(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, q_s: torch.Tensor,
                                q_a: torch.Tensor, weights: Optional[torch.Tensor] = None, bias: bool = False,
                                chunk: int = 0) -> torch.Tensor:
    """``out [O, I'] += Σ_n (Q_Sᵀ G_n Q_A)²`` in place, G_n = Σ_t w_{n,t} g_{n,t} ā_{n,t}ᵀ; returns ``out``.

    Args:
        out: float32 or float64 accumulator [O, I'], I' = I + bias.
        g: output gradients [N, T, O] (N samples of T tokens).
        a: layer inputs [N, T, I] (without the bias column).
        q_s: [O, O] eigenvectors of S (columns); q_a: [I', I'] eigenvectors of A (columns).
        weights: [N, T] token weights or a bool mask, or None for ones.
        bias: the inputs carry an implied trailing 1.
        chunk: at most this many samples' [O, I'] matrices at once (0: a bounded automatic chunk).
    """
    op = "eigen_correction_accumulate"
    for name, t in (("out", out), ("g", g), ("a", a), ("q_s", q_s), ("q_a", q_a)):
        _tensor(op, name, t)
    _tensor(op, "weights", weights, optional=True)
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"{op}: chunk must be an int, got {type(chunk).__name__}")
    _not_tracked(op, out)
    _native.kfac_eigen_correction_(out, g.detach(), a.detach(), q_s.detach(), q_a.detach(),
                                None if weights is None else weights.detach(), bool(bias), int(chunk))
    return out


def _same_device(op, out, **named):
    for name, t in named.items():
        if t is not None and t.device != out.device:
            raise ValueError(f"{op}: {name} must be on the device of out ({out.device}), got {t.device}")


@torch.library.register_fake("twicediff::kfac_covariance_")
def _covariance_fake(out, x, weights, bias):
    op = "kfac_covariance_"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-d [rows, d] tensor, got shape {tuple(x.shape)}")
    D = x.shape[1] + int(bias)
    if tuple(out.shape) != (D, D):
        raise ValueError(f"{op}: out must have shape [{D}, {D}], got {tuple(out.shape)}")
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: out (the accumulator) must be float32 or float64, got {out.dtype}")
    _same_device(op, out, x=x, weights=weights)


@torch.library.register_fake("twicediff::kfac_eigen_correction_")
def _eigen_correction_fake(out, g, a, q_s, q_a, weights, bias, chunk=0):
    op = "kfac_eigen_correction_"
    if g.dim() != 3 or a.dim() != 3:
        raise ValueError(f"{op}: g and a must be 3-d [N, T, ·] tensors, got {tuple(g.shape)} and {tuple(a.shape)}")
    O, Ip = g.shape[2], a.shape[2] + int(bias)
    if tuple(out.shape) != (O, Ip):
        raise ValueError(f"{op}: out must have shape [{O}, {Ip}], got {tuple(out.shape)}")
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: out (the accumulator) must be float32 or float64, got {out.dtype}")
    _same_device(op, out, g=g, a=a, q_s=q_s, q_a=q_a, weights=weights)
