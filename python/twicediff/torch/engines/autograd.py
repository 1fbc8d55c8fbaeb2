"""The autograd engine: double backward through autograd, the most general (any op with a
backward formula); Gauss-Newton products by the double-vjp trick."""
from __future__ import annotations

import torch

from ..batch import call_model, squeezed_loss
from ..mvp import batched_mvp, flat_grads
from .base import PreparedBatch
from .generic import GenericEngine, product_scope
from ..guard import model_call

__all__ = ["AutogradEngine", "autograd_hvp"]


class AutogradEngine(GenericEngine):
    """Reverse-over-reverse products (batched over directions by ``is_grads_batched``)."""

    name = "autograd"

    def apply(self, batch: PreparedBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        return autograd_hvp(self.model, self.loss, batch.inputs, batch.target, V, mode)


def autograd_hvp(model, loss, x, y: torch.Tensor, v: torch.Tensor,
                 mode: str = "hessian") -> torch.Tensor:
    """H v (or JᵀH_ℓJ v) for v [D, P] by double backward through autograd; [D, P]. x: a tensor,
    tuple, list or dict (:mod:`twicediff.torch.batch`)."""
    with model_call(model, "hvp"), product_scope(v):
        return _autograd_hvp(model, loss, x, y, v, mode)


def _autograd_hvp(model, loss, x, y: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    output = call_model(model, x)
    value = squeezed_loss(loss, output, y)
    if mode == "hessian":
        # A parameter the loss does not reach (unused, or used under torch.no_grad) has a zero
        # gradient and a zero Hessian block.
        g = flat_grads(torch.autograd.grad(value, params, create_graph=True, allow_unused=True), params)
        return batched_mvp(g, v, params, allow_unused=True)
    # Gauss-Newton: J v by the double-vjp trick (Jᵀu is linear in u), then H_ℓ, then Jᵀ.
    g_out = torch.autograd.grad(value, output, create_graph=True)[0]
    u = torch.zeros_like(output, requires_grad=True)
    jt_u = torch.autograd.grad(output, params, u, create_graph=True, allow_unused=True)
    reached = [k for k, t in enumerate(jt_u) if t is not None]  # J is zero in the other parameters
    rows = []
    for d in range(v.shape[0]):
        vd = [b.reshape(p.shape) for b, p in zip(torch.split(v[d], [p.numel() for p in params]), params)]
        if reached:
            jv = torch.autograd.grad([jt_u[k] for k in reached], u, [vd[k] for k in reached], retain_graph=True)[0]
        else:
            jv = torch.zeros_like(output)
        hjv = torch.autograd.grad(g_out, output, jv, retain_graph=True)[0]
        rows.append(flat_grads(torch.autograd.grad(output, params, hjv, retain_graph=True, allow_unused=True),
                               params))
    return torch.stack(rows).detach()
