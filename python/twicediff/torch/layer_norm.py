"""LayerNorm whose forward-mode rules are twicediff's fused native ops.

The func engine's forward-over-reverse products (``vmap(jvp(grad(L)))``) push a batch of tangents
through the forward pass and through the backward pass. torch's forward-mode formulas for
``layer_norm`` and ``native_layer_norm_backward`` recompute the primal's row statistics and make a
dozen passes over the batched tangents; on a small transformer block the two LayerNorms took
about a third of the product. :func:`layer_norm` computes
what ``F.layer_norm`` computes, with the same values and gradients, but its jvp and the jvp of its
backward are one call each of :func:`twicediff.ops.layer_norm_tangent` and
:func:`twicediff.ops.layer_norm_backward_tangent`, one pass per row over all directions at once.

:func:`twicediff.torch.forward_mode.reverse_mode_constants` routes a model's ``F.layer_norm`` calls
(``nn.LayerNorm`` included) here during those products when :func:`applies`; anything else (half
precision, an unusual device, shapes torch would refuse) goes to torch as it was. The func engine
asks for it on chunks of at least :data:`MIN_DIRECTIONS` directions: on fewer, the two
``autograd.Function`` layers cost more than the passes they save.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.autograd import Function

from ..ops.layer_norm import layer_norm_backward_tangent, layer_norm_tangent

__all__ = ["MIN_DIRECTIONS", "applies", "layer_norm"]

#: Directions per product from which the fused rules pay (NOTE: measured in
#: benchmarks/results/curvlinops_cpu.md: slower at 1 direction, even at 4 and 8, faster from 16).
#: The func engine's chunks below it keep torch's rules.
MIN_DIRECTIONS = 8


def _one(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A tangent as the ops' single direction (the leading dimension of 1 that vmap's rule folds into)."""
    return None if t is None else t.unsqueeze(0)


class _LayerNormBackward(Function):
    """(grad_x, grad_weight, grad_bias) of layer_norm over the last dimension of x [R, d]; its jvp is
    the fused op. Differentiated only forward (by the products above)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, x, weight, bias, xhat, mean, rstd):
        mask = [True, weight is not None, bias is not None]
        return torch.ops.aten.native_layer_norm_backward(grad_out, x, [x.shape[-1]], mean.unsqueeze(-1),
                                                         rstd.unsqueeze(-1), weight, bias, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, bias, xhat, mean, rstd = inputs
        ctx.affine = (weight is not None, bias is not None)
        ctx.save_for_forward(grad_out, xhat, rstd, weight)

    @staticmethod
    def jvp(ctx, grad_out_t, x_t, weight_t, bias_t, xhat_t, mean_t, rstd_t):
        # xhat, mean and rstd are functions of x: x_t carries their tangents (the op derives them).
        grad_out, xhat, rstd, weight = ctx.saved_tensors
        if grad_out_t is None and x_t is None and weight_t is None:
            return None, None, None
        gx_t, gw_t, gb_t = layer_norm_backward_tangent(grad_out, _one(grad_out_t), _one(x_t), xhat, rstd, weight,
                                                       _one(weight_t))
        has_weight, has_bias = ctx.affine
        return gx_t[0], gw_t[0] if has_weight else None, gb_t[0] if has_bias else None

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("twicediff's fused LayerNorm rules take forward-mode derivatives of LayerNorm's backward, "
                           "not reverse-mode ones: differentiate the gradient with jvp (forward over reverse), or "
                           "outside twicediff.torch.forward_mode.reverse_mode_constants()")


class _LayerNorm(Function):
    """layer_norm over the last dimension of x [R, d]: (y, xhat, mean, rstd), only y differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        xhat, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], None, None, eps)
        y = xhat if weight is None else xhat * weight
        y = y if bias is None else y + bias
        return y, xhat, mean.squeeze(-1), rstd.squeeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, xhat, mean, rstd = output
        ctx.mark_non_differentiable(xhat, mean, rstd)
        ctx.save_for_backward(x, weight, bias, xhat, mean, rstd)
        ctx.save_for_forward(xhat, rstd, weight)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, eps_t):
        xhat, rstd, weight = ctx.saved_tensors
        if x_t is None and weight_t is None and bias_t is None:
            return None, None, None, None
        y_t = layer_norm_tangent(_one(x_t), xhat, rstd, weight, _one(weight_t), _one(bias_t))
        return y_t[0], None, None, None

    @staticmethod
    def backward(ctx, grad_out, _xhat, _mean, _rstd):
        x, weight, bias, xhat, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _LayerNormBackward.apply(grad_out, x, weight, bias, xhat, mean, rstd)
        return gx, gw, gb, None


def _shape(normalized_shape) -> tuple:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def applies(input, normalized_shape, weight=None, bias=None) -> bool:
    """Whether :func:`layer_norm` takes this call: a float32 or float64 CPU or CUDA input whose
    trailing dimensions are ``normalized_shape``, weight and bias None or of that shape, dtype and
    device. Everything else stays with torch."""
    if not isinstance(input, torch.Tensor) or input.dtype not in (torch.float32, torch.float64):
        return False
    if input.device.type not in ("cpu", "cuda") or input.numel() == 0:
        return False
    shape = _shape(normalized_shape)
    if not shape or input.dim() < len(shape) or tuple(input.shape[-len(shape):]) != shape:
        return False
    for t in (weight, bias):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape
                              or t.dtype != input.dtype or t.device != input.device):
            return False
    return True


def layer_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(input, normalized_shape, weight, bias, eps)`` with fused forward-mode rules, for
    calls where :func:`applies`."""
    shape = _shape(normalized_shape)
    d = math.prod(shape)
    y = _LayerNorm.apply(input.reshape(-1, d), None if weight is None else weight.reshape(d),
                         None if bias is None else bias.reshape(d), float(eps))[0]
    return y.view(input.shape)
