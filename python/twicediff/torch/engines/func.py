"""The torch.func engine: forward-over-reverse ``vmap(jvp(grad(L)))`` over a chunk of directions,
for any model whose ops have torch.func rules."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List

import torch
from torch import nn

from ... import ops
from ..batch import model_args, squeezed_loss
from .base import PreparedBatch
from .generic import GenericEngine, product_scope
from ..guard import model_call
from ..forward_mode import formula_failure, reverse_mode_constants
from ..layer_norm import MIN_DIRECTIONS as FUSED_LAYER_NORM_MIN_DIRECTIONS
from ..stateless import functional_call, slot_names, split_params

__all__ = ["FuncEngine", "forward_over_reverse", "func_hvp", "vmap_randomness"]

logger = logging.getLogger(__name__)

# torch keeps forward-mode AD levels in one process-wide stack (torch/csrc/autograd/forward_grad.cpp),
# so two threads inside torch.func.jvp at once enter and leave each other's levels: "no level exists"
# errors, internal asserts and, worst, silently wrong products. Forward-mode work is therefore
# serialized across threads.
_FORWARD_AD_LOCK = threading.Lock()


class FuncEngine(GenericEngine):
    """torch.func forward-over-reverse; with ``fallback=True`` (what ``engine="auto"`` uses for a
    model the native engine does not take) a model with an op lacking a torch.func rule goes to
    the autograd engine instead, with one log line."""

    name = "func"

    def __init__(self, model: nn.Module, loss: Callable, fallback: bool = False):
        super().__init__(model, loss)
        self.fallback = fallback

    def apply(self, batch: PreparedBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        if not self.fallback:
            return func_hvp(self.model, self.loss, batch.inputs, batch.target, V, mode)
        try:
            return func_hvp(self.model, self.loss, batch.inputs, batch.target, V, mode)
        except (RuntimeError, NotImplementedError) as exc:  # an op without a torch.func rule
            from .autograd import autograd_hvp

            logger.info("hvp: torch.func engine failed (%s); using autograd", exc)
            return autograd_hvp(self.model, self.loss, batch.inputs, batch.target, V, mode)


def _directions_as_params(v: torch.Tensor, names: List[str], params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """[D, P] -> {name: [D, *shape]} views (no copies)."""
    out, col, D = {}, 0, v.shape[0]
    for n in names:
        k = params[n].numel()
        out[n] = v[:, col:col + k].reshape(D, *params[n].shape)
        col += k
    return out


def forward_over_reverse(loss_of: Callable, params: Dict[str, torch.Tensor], y: torch.Tensor,
                         tangents: Dict[str, torch.Tensor], randomness: str = "error") -> Dict[str, torch.Tensor]:
    """{name: [D, *shape]}: H t_d for the D tangents, H the Hessian of ``loss_of(params, y)`` in
    params, as ``vmap(jvp(grad(loss_of)))`` (``randomness``: vmap's, for random draws in the forward).

    A floating target y gets an explicit zero tangent: with an implicit one, torch's forward-mode
    formula of ``mse_loss``'s backward writes into a ZeroTensor ("ZeroTensors are immutable"
    eagerly; under torch.compile the process crashes)."""
    from torch.func import grad, jvp, vmap

    if y.is_floating_point():
        grad_fn = grad(loss_of)  # in params; y is an input with a zero tangent
        zero = torch.zeros_like(y)
        return vmap(lambda t: jvp(grad_fn, (params, y), (t, zero))[1], randomness=randomness)(tangents)
    grad_fn = grad(lambda p: loss_of(p, y))
    return vmap(lambda t: jvp(grad_fn, (params,), (t,))[1], randomness=randomness)(tangents)


def vmap_randomness(model: nn.Module) -> str:
    """vmap's ``randomness`` for the Hessian products of ``model``. A model in eval mode may still
    draw random numbers, mostly unused (the LayerDrop draw of transformers' speech encoders): one
    draw shared by a chunk's directions is one function for all of them, as the reverse-mode
    engines' one forward pass is ("same"). In training mode (Dropout masks) torch.func's refusal
    stands ("error"), as it does in the Gauss-Newton products, whose output and Jacobian come from
    two forward passes, two draws."""
    return "error" if any(m.training for m in model.modules()) else "same"


def func_hvp(model: nn.Module, loss: Callable, x, y: torch.Tensor, v: torch.Tensor,
             mode: str = "hessian") -> torch.Tensor:
    """H v (or the Gauss-Newton JᵀH_ℓJ v) for v [D, P] by torch.func forward-over-reverse,
    vmapped over the D directions; returns [D, P] in the layout of ``grad``. x: a tensor, tuple,
    list or dict (:mod:`twicediff.torch.batch`).

    Calls from several threads take turns (forward-mode AD state is process-wide in torch). What
    torch.func refuses (a BatchNorm or Dropout in training mode, an op without a forward-mode
    derivative) is explained by :func:`twicediff.errors.data_errors`, which every caller runs it in."""
    with model_call(model, "hvp"), _FORWARD_AD_LOCK, product_scope(v):  # the model's lock first
        return _func_hvp_unlocked(model, loss, x, y, v, mode)


def _func_hvp_unlocked(model: nn.Module, loss: Callable, x, y: torch.Tensor, v: torch.Tensor,
                       mode: str) -> torch.Tensor:
    from torch.func import grad, jvp, vjp, vmap

    names, params, fixed = split_params(model)
    args, kwargs = model_args(x)
    slots = slot_names(model)

    def output_of(p):
        return functional_call(model, (p, fixed), args, kwargs, slots)

    tangents = _directions_as_params(v, names, params)
    # Forward mode holds constant what reverse mode does; its products take the fused LayerNorm
    # rules on enough directions, and the packed self-attention (torch.attention). The
    # reverse-over-reverse fallback differentiates LayerNorm's backward in reverse mode, which
    # those rules do not: it runs under torch's.
    forward = reverse_mode_constants(fused_layer_norm=v.shape[0] >= FUSED_LAYER_NORM_MIN_DIRECTIONS,
                                     packed_attention=True)
    if mode == "hessian":
        randomness = vmap_randomness(model)
        try:
            with forward:
                blocks = forward_over_reverse(lambda p, target: squeezed_loss(loss, output_of(p), target), params, y,
                                              tangents, randomness)
        except RuntimeError as exc:
            # A forward-mode formula of torch that fails where reverse mode works (an implicit zero
            # tangent, an integer regression target): reverse-over-reverse is exact too.
            if not formula_failure(exc):
                raise
            with reverse_mode_constants():
                _, pullback_grad = vjp(grad(lambda p: squeezed_loss(loss, output_of(p), y)), params)
                blocks = vmap(lambda t: pullback_grad(t)[0], randomness=randomness)(tangents)
    else:
        with forward:
            z, pullback = vjp(output_of, params)
            z = z.detach()
            # H_ℓ is symmetric, so H_ℓ u is the pullback of u through ∇_z ℓ (reverse-over-reverse in
            # the small output space; avoids forward-mode loss formulas, see above).
            _, loss_hessian = vjp(grad(lambda o: squeezed_loss(loss, o, y)), z)

            def ggn_one(t):
                jt = jvp(output_of, (params,), (t,))[1]
                return pullback(loss_hessian(jt)[0])[0]

            blocks = vmap(ggn_one)(tangents)
    out = torch.empty_like(v)
    return ops.pack_into([blocks[n] for n in names], out, 0)
