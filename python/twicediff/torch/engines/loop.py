"""The per-direction loop engine: one gradient with its graph, then one plain backward pass per
direction (pyDVL 0.7's way). No batching layer at all, so it is the fastest engine where batching
has nothing to amortise: a single direction, or a few, on models whose passes are dominated by
per-op overhead rather than by arithmetic."""
from __future__ import annotations

import torch

from ..batch import call_model, squeezed_loss
from ..guard import model_call
from ..mvp import flat_grads, mvp_loop
from .base import PreparedBatch
from .generic import GenericEngine, product_scope

__all__ = ["LoopEngine", "loop_hvp"]


class LoopEngine(GenericEngine):
    """Reverse-over-reverse products, one backward pass per direction."""

    name = "loop"

    def bytes_per_direction(self, batch: PreparedBatch) -> int:
        # One direction at a time: the graph is kept once, a direction costs its result row.
        first = next(p for p in self.model.parameters() if p.requires_grad)
        return first.element_size() * 2 * self.num_params

    def apply(self, batch: PreparedBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        return loop_hvp(self.model, self.loss, batch.inputs, batch.target, V, mode)


def loop_hvp(model, loss, x, y: torch.Tensor, v: torch.Tensor, mode: str = "hessian") -> torch.Tensor:
    """H v (or JᵀH_ℓJ v) for v [D, P], one backward pass per direction; [D, P], detached. x: a
    tensor, tuple, list or dict (:mod:`twicediff.torch.batch`)."""
    if mode != "hessian":
        # The autograd engine's Gauss-Newton product is already a loop over the directions.
        from .autograd import autograd_hvp

        return autograd_hvp(model, loss, x, y, v, mode)
    with model_call(model, "hvp"), product_scope(v):
        params = [p for p in model.parameters() if p.requires_grad]
        flat = flat_grads(torch.autograd.grad(squeezed_loss(loss, call_model(model, x), y), params, create_graph=True,
                                              allow_unused=True), params)  # a parameter not reached: zeros
        out = torch.empty_like(v)
        if flat.requires_grad:
            mvp_loop(flat, v, params, out)
        else:  # the loss is linear in every parameter: a zero Hessian
            out.zero_()
        return out.detach()
