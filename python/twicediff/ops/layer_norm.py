r"""The LayerNorm tangent ops: typed wrappers over ``torch.ops.twicediff.layer_norm_*``, their fake
kernels and their batching rules.

They are the forward-mode rules of ``layer_norm`` over the last dimension that the eager
forward-over-reverse products use (:mod:`twicediff.torch.layer_norm`): torch's own rules make a
dozen passes over the batched tangents per LayerNorm, these make one per row. Rows: ``xhat [R, d]
= (x - mean) · rstd``, ``rstd [R]``, ``weight [d]`` or None; tangents carry a leading direction
dimension B and are None for zero (at least one given).

- :func:`layer_norm_tangent`: the tangent ``[B, R, d]`` of ``y = xhat · weight + bias``,

  ``ẏ = weight · rstd · (ẋ - mean(ẋ) - xhat · mean(xhat · ẋ)) + ẇ · xhat + ḃ``.
- :func:`layer_norm_backward_tangent`: the tangents of the backward ``(gx, gw, gb)`` at ``grad_out``
  (gy). With ``g = gy · weight``, ``u = g - mean(g) - xhat · mean(g · xhat)``, the backward is
  ``gx = rstd · u``, ``gw = Σ_rows gy · xhat``, ``gb = Σ_rows gy``; its tangents follow from
  ``ṙstd = -rstd² · mean(xhat · ẋ)``, ``x̂̇ = rstd · (ẋ - mean(ẋ) - xhat · mean(xhat · ẋ))`` and
  ``ġ = ġy · weight + gy · ẇ``:

  ``ġx = ṙstd · u + rstd · (ġ - mean(ġ) - x̂̇ · mean(g · xhat) - xhat · (mean(ġ · xhat) + mean(g · x̂̇)))``,
  ``ġw = Σ_rows ġy · xhat + gy · x̂̇``, ``ġb = Σ_rows ġy``.

float32 or float64, CPU and CUDA. Values only: not differentiable (the rules are first-order in the
tangents; nothing differentiates them again). Under ``torch.vmap`` a batched tangent's dimension joins
the direction dimension (one call, not one per direction); a batched primal falls back to the
call per slice. The pure-torch reference, :mod:`twicediff.ops.reference`, states the ops by
automatic differentiation of layer_norm written in primitive ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _build  # noqa: F401  (loads twicediff._C, which registers the ops)

__all__ = ["layer_norm_backward_tangent", "layer_norm_tangent"]

_native = torch.ops.twicediff


def _check(op: str, xhat, rstd, weight, rows_t, features_t, grad_out=None) -> int:
    """The ops' argument checks (the wrappers' and the fake kernels'): a TypeError or ValueError
    naming the argument; returns B, the number of directions."""
    for name, t in (("xhat", xhat), ("rstd", rstd)) + ((("grad_out", grad_out),) if grad_out is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("weight", weight),) + tuple(rows_t) + tuple(features_t):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if xhat.dim() != 2:
        raise ValueError(f"{op}: xhat must be [rows, features], got shape {tuple(xhat.shape)}")
    if xhat.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: xhat must be float32 or float64, got {xhat.dtype}")
    R, d = xhat.shape
    given = [(n, t) for n, t in tuple(rows_t) + tuple(features_t) if t is not None]
    if not given:
        raise ValueError(f"{op}: at least one tangent ({', '.join(n for n, _ in tuple(rows_t) + tuple(features_t))}) "
                         f"must be a tensor, got all None")
    B = given[0][1].shape[0] if given[0][1].dim() > 0 else -1
    expected = [("rstd", rstd, (R,)), ("weight", weight, (d,)), ("grad_out", grad_out, (R, d))]
    expected += [(n, t, (B, R, d)) for n, t in rows_t] + [(n, t, (B, d)) for n, t in features_t]
    for name, t, shape in expected:
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.dtype != xhat.dtype:
            raise TypeError(f"{op}: {name} must have xhat's dtype {xhat.dtype}, got {t.dtype}")
        if t.device != xhat.device:
            raise ValueError(f"{op}: {name} must be on xhat's device {xhat.device}, got {t.device}")
    return B


def layer_norm_tangent(x_t: Optional[torch.Tensor], xhat: torch.Tensor, rstd: torch.Tensor,
                       weight: Optional[torch.Tensor] = None, weight_t: Optional[torch.Tensor] = None,
                       bias_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tangent [B, R, d] of ``xhat · weight + bias`` for tangents ``x_t [B, R, d]``, ``weight_t``,
    ``bias_t [B, d]`` (None for zero), at the LayerNorm rows ``xhat [R, d]``, ``rstd [R]``."""
    _check("layer_norm_tangent", xhat, rstd, weight, [("x_t", x_t)], [("weight_t", weight_t), ("bias_t", bias_t)])
    return _native.layer_norm_tangent(x_t, xhat, rstd, weight, weight_t, bias_t)


def layer_norm_backward_tangent(grad_out: torch.Tensor, grad_out_t: Optional[torch.Tensor],
                                x_t: Optional[torch.Tensor], xhat: torch.Tensor, rstd: torch.Tensor,
                                weight: Optional[torch.Tensor] = None, weight_t: Optional[torch.Tensor] = None
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tangents ``(grad_x_t [B, R, d], grad_weight_t [B, d], grad_bias_t [B, d])`` of LayerNorm's
    backward at ``grad_out [R, d]``, for tangents ``grad_out_t``, ``x_t [B, R, d]`` and ``weight_t
    [B, d]`` (None for zero)."""
    _check("layer_norm_backward_tangent", xhat, rstd, weight, [("grad_out_t", grad_out_t), ("x_t", x_t)],
           [("weight_t", weight_t)], grad_out=grad_out)
    return _native.layer_norm_backward_tangent(grad_out, grad_out_t, x_t, xhat, rstd, weight, weight_t)


@torch.library.register_fake("twicediff::layer_norm_tangent")
def _tangent_fake(x_t, xhat, rstd, weight, weight_t, bias_t):
    B = _check("layer_norm_tangent", xhat, rstd, weight, [("x_t", x_t)], [("weight_t", weight_t), ("bias_t", bias_t)])
    return xhat.new_empty((B, *xhat.shape))


@torch.library.register_fake("twicediff::layer_norm_backward_tangent")
def _backward_tangent_fake(grad_out, grad_out_t, x_t, xhat, rstd, weight, weight_t):
    B = _check("layer_norm_backward_tangent", xhat, rstd, weight, [("grad_out_t", grad_out_t), ("x_t", x_t)],
               [("weight_t", weight_t)], grad_out=grad_out)
    d = xhat.shape[1]
    return xhat.new_empty((B, *xhat.shape)), xhat.new_empty((B, d)), xhat.new_empty((B, d))


# ---- batching rules -----------------------------------------------------------------------------
# vmap over the directions (the func engine's vmap(jvp(grad))) batches the tangents only: the rules
# fold vmap's dimension into the ops' own direction dimension and make one call. A tangent that this
# vmap level does not batch is expanded (another tangent of the call is batched); a batched primal
# (vmap over data, per-sample products) gets one call per slice.


def _fold(t: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _unfold(t: torch.Tensor, size: int) -> torch.Tensor:
    return t.view(size, t.shape[0] // size, *t.shape[1:])


def _per_slice(op, args, in_dims, size: int):
    """op on slice k of every batched argument, for k < size, stacked along dimension 0."""
    outs = [op(*(a if a is None or dim is None else a.select(dim, k) for a, dim in zip(args, in_dims)))
            for k in range(size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return tuple(torch.stack(parts) for parts in zip(*outs))


@torch.library.register_vmap("twicediff::layer_norm_tangent")
def _tangent_vmap(info, in_dims, x_t, xhat, rstd, weight, weight_t, bias_t):
    if any(dim is not None for dim in in_dims[1:4]):
        return _per_slice(_native.layer_norm_tangent, (x_t, xhat, rstd, weight, weight_t, bias_t), in_dims,
                          info.batch_size), 0
    n = info.batch_size
    out = _native.layer_norm_tangent(_fold(x_t, in_dims[0], n), xhat, rstd, weight,
                                     _fold(weight_t, in_dims[4], n), _fold(bias_t, in_dims[5], n))
    return _unfold(out, n), 0


@torch.library.register_vmap("twicediff::layer_norm_backward_tangent")
def _backward_tangent_vmap(info, in_dims, grad_out, grad_out_t, x_t, xhat, rstd, weight, weight_t):
    if any(in_dims[k] is not None for k in (0, 3, 4, 5)):
        return _per_slice(_native.layer_norm_backward_tangent, (grad_out, grad_out_t, x_t, xhat, rstd, weight, weight_t),
                          in_dims, info.batch_size), (0, 0, 0)
    n = info.batch_size
    outs = _native.layer_norm_backward_tangent(grad_out, _fold(grad_out_t, in_dims[1], n), _fold(x_t, in_dims[2], n),
                                               xhat, rstd, weight, _fold(weight_t, in_dims[6], n))
    return tuple(_unfold(t, n) for t in outs), (0, 0, 0)
