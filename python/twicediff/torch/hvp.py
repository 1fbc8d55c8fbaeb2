"""Generic batched Hessian-vector products for any torch model: the engines behind
:meth:`TorchTwiceDifferentiable.mvp` and :meth:`TorchTwiceDifferentiable.hvp` that do not need the
native engine.

- :func:`batched_mvp` — pyDVL's ``mvp``: second derivatives through an existing first-order graph,
  ``out[d] = ∂(v[d] · grad_xy)/∂backprop_on`` for D directions, chunked by the memory budget.
- :func:`func_hvp` — torch.func forward-over-reverse, ``vmap(jvp(grad(L)))`` over a chunk of D.
- :func:`autograd_hvp` — double backward through autograd (the most general; uses batched_mvp).
Each has a Gauss-Newton mode, ``JᵀH_ℓJ v`` with J the Jacobian of the model output and H_ℓ the
Hessian of the loss with respect to that output.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _ops
from ..memory import chunk_size
from ..progress import progress_bar

__all__ = ["autograd_hvp", "batched_mvp", "func_hvp", "squeezed_loss"]

TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]

# Directions per chunk above which bigger chunks stop paying off (GEMMs are already large) while
# memory keeps growing; the memory budget may make chunks smaller still.
MAX_DIRECTIONS_PER_CHUNK = 128
_warned_no_batching_rule = False


def squeezed_loss(loss: Callable, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pyDVL 0.7's convention for the loss of a batch: ``loss(squeeze(output), squeeze(y))``."""
    return loss(torch.squeeze(output), torch.squeeze(y))


def _as_list(t: TensorOrTensors) -> List[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _flat(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """[M] from per-tensor gradients; None (no dependence) becomes zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(tensors, like)])


def _mvp_loop(grad_xy: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor]) -> torch.Tensor:
    z = v @ grad_xy
    rows = [_flat(torch.autograd.grad(z[d], inputs, retain_graph=True, allow_unused=True), inputs)
            for d in range(v.shape[0])]
    return torch.stack(rows)


def _mvp_batched(grad_xy: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor]) -> torch.Tensor:
    # One backward pass vmapped over the D directions: d/dθ (v[d] · g) for all d at once.
    grads = torch.autograd.grad(grad_xy, inputs, grad_outputs=v, retain_graph=True,
                                is_grads_batched=True, allow_unused=True)
    D = v.shape[0]
    return torch.cat([(g if g is not None else torch.zeros(D, *p.shape, dtype=p.dtype, device=p.device))
                      .reshape(D, -1) for g, p in zip(grads, inputs)], dim=1)


def use_batched_backward(device: torch.device) -> bool:
    """The rule for mvp: vmapped (``is_grads_batched``) backward passes on CUDA, where they fill
    the GPU; the per-direction loop on CPU, where the batched pass was measured slower than the
    loop (see benchmarks/results/mvp_rule.md)."""
    return device.type == "cuda"


def batched_mvp(grad_xy: torch.Tensor, v: torch.Tensor, backprop_on: TensorOrTensors, *,
                progress: bool = False) -> torch.Tensor:
    """``out[d] = ∂(v[d] · grad_xy) / ∂backprop_on`` for v [D, P] (or [P], one direction).

    Args:
        grad_xy: [P] first derivative with a graph (``create_graph=True``).
        v: [D, P] directions (or [P]).
        backprop_on: a tensor or a list of tensors (parameters, or an input x), M elements in all.
        progress: show a bar over the chunks of directions.

    Returns:
        [D, M], detached.
    """
    global _warned_no_batching_rule
    if not isinstance(grad_xy, torch.Tensor):
        raise TypeError(f"mvp: grad_xy must be a torch.Tensor, got {type(grad_xy).__name__}")
    if grad_xy.dim() != 1:
        raise ValueError(f"mvp: grad_xy must be 1-d [P], got shape {tuple(grad_xy.shape)}")
    if not grad_xy.requires_grad:
        raise ValueError("mvp: grad_xy has no graph to differentiate; compute it with "
                         "grad(x, y, create_graph=True)")
    v = torch.as_tensor(v, device=grad_xy.device)
    if v.dim() == 1:
        v = v.unsqueeze(0)
    if v.dim() != 2 or v.shape[1] != grad_xy.shape[0]:
        raise ValueError(f"mvp: v must be [D, P] or [P] with P = {grad_xy.shape[0]} (the length of "
                         f"grad_xy), got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"mvp: v must be a floating-point tensor, got dtype {v.dtype}")
    v = v.to(grad_xy.dtype)
    inputs = _as_list(backprop_on)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mvp: backprop_on[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.requires_grad:
            raise ValueError(f"mvp: backprop_on[{i}] (shape {tuple(t.shape)}) does not require grad, so "
                             "it is not part of grad_xy's graph")
    M = sum(t.numel() for t in inputs)
    D = v.shape[0]
    elem = grad_xy.element_size()
    out = torch.empty(D, M, dtype=grad_xy.dtype, device=grad_xy.device)
    batched = use_batched_backward(grad_xy.device)
    # Per direction a batched backward holds about one copy of the graph's intermediate
    # gradients; 4 (P + M) elements is the estimate used.
    step = min(MAX_DIRECTIONS_PER_CHUNK,
               chunk_size(D, 4 * (grad_xy.numel() + M) * elem, grad_xy.device, what="mvp directions"))
    if not batched:
        step = D  # the loop holds one direction at a time whatever the chunk
    for start in progress_bar(range(0, D, step), progress, desc="mvp", unit="chunk"):
        vc = v[start:start + step]
        if batched:
            try:
                out[start:start + step] = _mvp_batched(grad_xy, vc, inputs)
                continue
            except RuntimeError as exc:
                if "batching rule" not in str(exc) and "vmap" not in str(exc):
                    raise
                if not _warned_no_batching_rule:
                    warnings.warn(f"mvp: an op in the graph has no vmap batching rule ({exc}); "
                                  "falling back to one backward pass per direction", RuntimeWarning)
                    _warned_no_batching_rule = True
                batched = False
        out[start:start + step] = _mvp_loop(grad_xy, vc, inputs)
    return out.detach()


def _split_params(model: nn.Module) -> Tuple[List[str], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    names, trainable, fixed = [], {}, {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            names.append(n)
            trainable[n] = p.detach()
        else:
            fixed[n] = p.detach()
    fixed.update({n: b for n, b in model.named_buffers()})
    return names, trainable, fixed


def _directions_as_params(v: torch.Tensor, names: List[str], params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """[D, P] -> {name: [D, *shape]} views (no copies)."""
    out, col, D = {}, 0, v.shape[0]
    for n in names:
        k = params[n].numel()
        out[n] = v[:, col:col + k].reshape(D, *params[n].shape)
        col += k
    return out


def func_hvp(model: nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
             mode: str = "hessian") -> torch.Tensor:
    """H v (or the Gauss-Newton JᵀH_ℓJ v) for v [D, P] by torch.func forward-over-reverse,
    vmapped over the D directions; returns [D, P] in the layout of ``grad``."""
    from torch.func import functional_call, grad, jvp, vjp, vmap

    names, params, fixed = _split_params(model)

    def output_of(p):
        return functional_call(model, (p, fixed), (x,))

    tangents = _directions_as_params(v, names, params)
    if mode == "hessian":
        grad_fn = grad(lambda p: squeezed_loss(loss, output_of(p), y))
        try:
            blocks = vmap(lambda t: jvp(grad_fn, (params,), (t,))[1])(tangents)
        except RuntimeError as exc:
            # Some forward-mode formulas in torch are broken (torch 2.14: F.mse_loss with mean
            # reduction raises "ZeroTensors are immutable"); reverse-over-reverse is exact too.
            if "ZeroTensor" not in str(exc):
                raise
            _, pullback_grad = vjp(grad_fn, params)
            blocks = vmap(lambda t: pullback_grad(t)[0])(tangents)
    else:
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
    return _ops.pack_into([blocks[n] for n in names], out, 0)


def autograd_hvp(model: nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
                 mode: str = "hessian") -> torch.Tensor:
    """H v (or JᵀH_ℓJ v) for v [D, P] by double backward through autograd; [D, P]."""
    params = [p for p in model.parameters() if p.requires_grad]
    output = model(x)
    value = squeezed_loss(loss, output, y)
    if mode == "hessian":
        g = torch.autograd.grad(value, params, create_graph=True)
        return batched_mvp(torch.cat([t.reshape(-1) for t in g]), v, params)
    # Gauss-Newton: J v by the double-vjp trick (Jᵀu is linear in u), then H_ℓ, then Jᵀ.
    g_out = torch.autograd.grad(value, output, create_graph=True)[0]
    u = torch.zeros_like(output, requires_grad=True)
    jt_u = torch.autograd.grad(output, params, u, create_graph=True)
    rows = []
    for d in range(v.shape[0]):
        vd = [b.reshape(p.shape) for b, p in zip(torch.split(v[d], [p.numel() for p in params]), params)]
        jv = torch.autograd.grad(jt_u, u, vd, retain_graph=True)[0]
        hjv = torch.autograd.grad(g_out, output, jv, retain_graph=True)[0]
        rows.append(_flat(torch.autograd.grad(output, params, hjv, retain_graph=True), params))
    return torch.stack(rows).detach()
