"""pyDVL's ``mvp``: second derivatives through an existing first-order graph,
``out[d] = ∂(v[d] · grad_xy)/∂backprop_on`` for D directions, chunked by the memory budget.

With ``backprop_on`` the parameters these are Hessian-vector products; with an input x, the mixed
products ∇x∇θ L of perturbation influence. The autograd engine uses the same passes.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Union

import torch

from .. import ops
from ..errors import GraphInputError
from ..memory import chunk_size
from ..progress import progress_bar
from .engines.base import MAX_DIRECTIONS_PER_CHUNK

__all__ = ["MIN_BATCHED_DIRECTIONS", "batched_mvp", "flat_grads", "mvp_batched", "mvp_loop", "use_batched_backward"]

TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]

_warned_no_batching_rule = False


def _as_list(t: TensorOrTensors) -> List[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def flat_grads(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """[M] from per-tensor gradients; None (no dependence) becomes zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(tensors, like)])


def mvp_loop(grad_xy: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor], out: torch.Tensor) -> None:
    """One backward pass per direction (pyDVL 0.7's method): ``out[d] = ∂(v[d] · grad_xy)/∂inputs``."""
    for d in range(v.shape[0]):
        ops.pack_into([(g if g is not None else torch.zeros_like(p)).unsqueeze(0) for g, p in zip(
            torch.autograd.grad(grad_xy, inputs, grad_outputs=v[d], retain_graph=True, allow_unused=True),
            inputs)], out, d)


def mvp_batched(grad_xy: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor], out: torch.Tensor) -> None:
    """One backward pass vmapped over the D directions (``is_grads_batched``): all rows of ``out``."""
    grads = torch.autograd.grad(grad_xy, inputs, grad_outputs=v, retain_graph=True,
                                is_grads_batched=True, allow_unused=True)
    D = v.shape[0]
    ops.pack_into([g if g is not None else torch.zeros(D, *p.shape, dtype=p.dtype, device=p.device)
                    for g, p in zip(grads, inputs)], out, 0)


# Fewest directions for which one vmapped backward pass beats a loop of plain ones.
MIN_BATCHED_DIRECTIONS = 2


def use_batched_backward(num_directions: int) -> bool:
    """The mvp rule: a chunk of ``num_directions`` ≥ ``MIN_BATCHED_DIRECTIONS`` goes through one
    vmapped (``is_grads_batched``) backward pass, a single direction through a plain one.

    The same on CPU and CUDA: at one direction the batching layer only adds overhead; from two on,
    each GEMM of the vmapped pass covers all directions (NOTE: measured in
    benchmarks/results/mvp_rule.md by ``benchmarks/mvp_rule.py``). On CUDA the loop is worse still:
    it launches every kernel D times at sizes too small to fill the GPU.
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


def _check_reached(root: torch.Tensor, inputs: List[torch.Tensor]) -> None:
    """GraphInputError naming the first input that ``root``'s autograd graph does not reach: a
    backward pass from root leaves its gradient None, which autograd itself refuses ("appears to
    not have been used in the graph") unless told ``allow_unused``."""
    nodes, leaves, stack = set(), set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        stack.extend(f for f, _ in node.next_functions)
    for i, t in enumerate(inputs):
        if not (t.grad_fn in nodes if t.grad_fn is not None else id(t) in leaves):
            raise GraphInputError(f"mvp: backprop_on[{i}] (shape {tuple(t.shape)}) is not used in grad_xy's graph: "
                                  "grad_xy does not depend on it (autograd: \"One of the differentiated Tensors "
                                  "appears to not have been used in the graph\")")


def batched_mvp(grad_xy: torch.Tensor, v: torch.Tensor, backprop_on: TensorOrTensors, *,
                progress: bool = False, allow_unused: bool = False) -> torch.Tensor:
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
        allow_unused: a tensor of backprop_on that grad_xy's graph does not reach gets zeros
            (its second derivatives vanish) instead of a GraphInputError.

    Returns:
        [D, M], detached.

    Raises:
        GraphInputError: a tensor of backprop_on does not require grad, or (unless allow_unused)
            grad_xy does not depend on it, as autograd raises.
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
            raise GraphInputError(f"mvp: backprop_on[{i}] (shape {tuple(t.shape)}) does not require grad, so "
                                  "it is not part of grad_xy's graph")
    if not allow_unused:
        _check_reached(grad_xy, inputs)
    M = sum(t.numel() for t in inputs)
    D = v.shape[0]
    out = torch.empty(D, M, dtype=grad_xy.dtype, device=grad_xy.device)
    if D == 0:
        return out
    per_direction = grad_xy.element_size() * (2 * (grad_xy.numel() + M) + _graph_saved_numel(grad_xy))
    step = chunk_size(D, per_direction, grad_xy.device, most=MAX_DIRECTIONS_PER_CHUNK, what="mvp directions")
    batching_works = True
    for start in progress_bar(range(0, D, step), progress, desc="mvp", unit="chunk"):
        vc, oc = v[start:start + step], out[start:start + step]
        if batching_works and use_batched_backward(vc.shape[0]):
            try:
                mvp_batched(grad_xy, vc, inputs, oc)
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
        mvp_loop(grad_xy, vc, inputs, oc)
    return out.detach()
