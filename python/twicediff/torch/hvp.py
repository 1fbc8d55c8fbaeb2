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

import threading
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
# The generic engines (torch.func, autograd) slow down when one chunk's working memory grows past a
# few hundred MiB, well before any memory budget binds: vmapped convolutions and attention then
# stream large fresh intermediates (the small CNN of benchmarks/results/func_chunks_cpu.md is 2.3x
# slower at 64 directions in one chunk than at 8-16). Their chunks are kept near this size...
GENERIC_CHUNK_BYTES = 256 * 2**20
# ... but hold at least this many directions (the budget permitting): every chunk recomputes the
# primal forward and backward pass, which on a large model costs as much as a direction's tangents
# (preset c of twicediff.bench, a 4096 -> 1000 head: 16 one-direction chunks took 2.5x one chunk
# of 16; benchmarks/results/mvp_cpu_preset_c.md).
MIN_GENERIC_DIRECTIONS = 16


def generic_directions_per_chunk(bytes_per_direction: int) -> int:
    """The most directions one chunk of the generic engines takes (before the memory budget):
    about ``GENERIC_CHUNK_BYTES`` of working memory, within [MIN_GENERIC_DIRECTIONS,
    MAX_DIRECTIONS_PER_CHUNK]."""
    fit = GENERIC_CHUNK_BYTES // max(int(bytes_per_direction), 1)
    return max(MIN_GENERIC_DIRECTIONS, min(MAX_DIRECTIONS_PER_CHUNK, fit))


_warned_no_batching_rule = False
# torch keeps forward-mode AD levels in one process-wide stack (torch/csrc/autograd/forward_grad.cpp),
# so two threads inside torch.func.jvp at once enter and leave each other's levels: measured here as
# "no level exists" errors, internal asserts and, worst, silently wrong products (tests/test_threads.py).
# Forward-mode work is therefore serialized across threads.
_FORWARD_AD_LOCK = threading.Lock()


def squeezed_loss(loss: Callable, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pyDVL 0.7's convention for the loss of a batch: ``loss(squeeze(output), squeeze(y))``."""
    return loss(torch.squeeze(output), torch.squeeze(y))


def _as_list(t: TensorOrTensors) -> List[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _flat(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """[M] from per-tensor gradients; None (no dependence) becomes zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(tensors, like)])


def _mvp_loop(grad_xy: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor], out: torch.Tensor) -> None:
    """One backward pass per direction (pyDVL 0.7's method): ``out[d] = ∂(v[d] · grad_xy)/∂inputs``."""
    for d in range(v.shape[0]):
        _ops.pack_into([(g if g is not None else torch.zeros_like(p)).unsqueeze(0) for g, p in zip(
            torch.autograd.grad(grad_xy, inputs, grad_outputs=v[d], retain_graph=True, allow_unused=True),
            inputs)], out, d)


def _mvp_batched(grad_xy: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor], out: torch.Tensor) -> None:
    """One backward pass vmapped over the D directions (``is_grads_batched``): all rows of ``out``."""
    grads = torch.autograd.grad(grad_xy, inputs, grad_outputs=v, retain_graph=True,
                                is_grads_batched=True, allow_unused=True)
    D = v.shape[0]
    _ops.pack_into([g if g is not None else torch.zeros(D, *p.shape, dtype=p.dtype, device=p.device)
                    for g, p in zip(grads, inputs)], out, 0)


# Fewest directions for which one vmapped backward pass beats a loop of plain ones.
MIN_BATCHED_DIRECTIONS = 2


def use_batched_backward(num_directions: int) -> bool:
    """The mvp rule: a chunk of ``num_directions`` ≥ ``MIN_BATCHED_DIRECTIONS`` goes through one
    vmapped (``is_grads_batched``) backward pass, a single direction through a plain one.

    The same on CPU and CUDA. Measured on a 2-thread CPU for Tanh MLPs of 0.9k, 26k and 400k
    parameters (benchmarks/results/mvp_rule.md, from ``benchmarks/mvp_rule.py``): at D = 1 the
    vmapped pass costs 0.7 to 2.1 loop iterations (the batching layer's overhead with nothing to
    batch); from D = 2 on it took 0.69 to 0.93 of the loop's time, and at D = 64 0.14 to 0.40,
    because each of its GEMMs covers all directions. On CUDA the loop is worse still: it launches
    every kernel D times at sizes too small to fill the GPU.
    """
    return num_directions >= MIN_BATCHED_DIRECTIONS


def _graph_saved_numel(root: torch.Tensor) -> int:
    """Elements of the distinct tensors saved in ``root``'s autograd graph (activations and
    operands the backward pass reads): per direction a backward pass through that graph creates
    intermediate gradients of about that total size."""
    seen_nodes, seen_tensors, total = set(), set(), 0
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                saved = getattr(node, name)
            except RuntimeError:  # freed, or not a tensor that can be unpacked
                continue
            for t in saved if isinstance(saved, (tuple, list)) else (saved,):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                    if key not in seen_tensors:
                        seen_tensors.add(key)
                        total += t.numel()
        stack.extend(f for f, _ in node.next_functions)
    return total


def batched_mvp(grad_xy: torch.Tensor, v: torch.Tensor, backprop_on: TensorOrTensors, *,
                progress: bool = False) -> torch.Tensor:
    """``out[d] = ∂(v[d] · grad_xy) / ∂backprop_on`` for v [D, P] (or [P], one direction).

    The D directions are taken in chunks sized by the memory budget (:mod:`twicediff.memory`; one
    direction is estimated at 2 (P + M) elements for the direction, the result and their
    intermediates, plus the tensors saved in grad_xy's graph, which its backward pass mirrors), at most ``MAX_DIRECTIONS_PER_CHUNK``; each
    chunk goes through one vmapped backward pass, or a plain one per direction as
    :func:`use_batched_backward` decides. When the vmapped pass fails (an op in the graph without
    a batching rule, e.g. a custom ``autograd.Function`` whose backward leaves torch), a warning is
    issued once per process and the directions go one by one from then on in this call.

    Args:
        grad_xy: [P] first derivative with a graph (``create_graph=True``).
        v: [D, P] directions (or [P]).
        backprop_on: a tensor or a list of tensors (parameters, or an input x), M elements in all.
        progress: show a bar over the chunks of directions.

    Returns:
        [D, M], detached.

    Raises:
        MemoryBudgetError: when one direction does not fit the budget.
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
    out = torch.empty(D, M, dtype=grad_xy.dtype, device=grad_xy.device)
    if D == 0:
        return out
    per_direction = grad_xy.element_size() * (2 * (grad_xy.numel() + M) + _graph_saved_numel(grad_xy))
    step = min(MAX_DIRECTIONS_PER_CHUNK, chunk_size(D, per_direction, grad_xy.device, what="mvp directions"))
    batching_works = True
    for start in progress_bar(range(0, D, step), progress, desc="mvp", unit="chunk"):
        vc, oc = v[start:start + step], out[start:start + step]
        if batching_works and use_batched_backward(vc.shape[0]):
            try:
                _mvp_batched(grad_xy, vc, inputs, oc)
                continue
            except RuntimeError as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                batching_works = False
                if not _warned_no_batching_rule:
                    _warned_no_batching_rule = True
                    warnings.warn(f"mvp: the vmapped backward pass failed ({exc}); an op in the graph has "
                                  "probably no vmap batching rule, so directions go one backward pass "
                                  "each (slower)", RuntimeWarning, stacklevel=3)
        _mvp_loop(grad_xy, vc, inputs, oc)
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
    vmapped over the D directions; returns [D, P] in the layout of ``grad``.

    Calls from several threads take turns (:data:`_FORWARD_AD_LOCK`)."""
    with _FORWARD_AD_LOCK:
        return _func_hvp_unlocked(model, loss, x, y, v, mode)


def _func_hvp_unlocked(model: nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
                       mode: str) -> torch.Tensor:
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
