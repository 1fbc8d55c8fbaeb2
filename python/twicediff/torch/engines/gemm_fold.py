"""Folding batched matmuls with a broadcast operand into one GEMM, a graph pass for the compiled engine.

Vmapped over D directions, a Linear layer's tangent terms come out of torch.func's batching rules
as ``bmm`` over D with one operand the same for every direction, broadcast by ``expand`` (stride
0): the activations times each direction's weight tangent, a weight-shaped tangent times the
same activations. D small GEMMs ([N, K] x [K, out] each) run far below the rate of one large
one; the pass rewrites them as that large GEMM (the arrangement the native engine uses too):

- ``bmm(expand(A), B)`` with A [M, K]: ``A @ B.permute(1, 0, 2).reshape(K, D·N)``, reshaped to
  [M, D, N] and permuted back to [D, M, N];
- ``bmm(A, expand(B))`` with B [K, N]: ``A.reshape(D·M, K) @ B``, reshaped to [D, M, N].

The results are the same products, summed in another order (float rounding may differ). The pass
runs on inductor's post-grad graph (``post_grad_custom_post_pass``) of the compiled engine's
functions only; any graph with FakeTensor values in its nodes' meta works.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import fx

__all__ = ["FoldBroadcastBmm", "fold_broadcast_bmm"]

aten = torch.ops.aten


def _nothing():
    return contextlib.nullcontext()


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _broadcast_2d(node) -> Optional[fx.Node]:
    """The [R, C] tensor ``node`` broadcasts over the batch dimension (an ``expand`` with stride 0
    in dimension 0 of a 2-d, or of a 3-d tensor with one batch), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.expand.default):
        return None
    out, src = _val(node), node.args[0]
    inner = _val(src)
    if out is None or inner is None or out.dim() != 3 or out.stride(0) != 0:
        return None
    return src if inner.dim() == 2 or (inner.dim() == 3 and inner.shape[0] == 1) else None


def fold_broadcast_bmm(graph: fx.Graph) -> int:
    """Rewrite every foldable ``bmm`` of ``graph`` in place (see the module docstring); returns how
    many were folded."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.bmm.default:
            continue
        a, b = node.args[:2]
        out = _val(node)
        if out is None or _val(a) is None or _val(b) is None:
            continue
        fake_mode = out.fake_mode if hasattr(out, "fake_mode") else None
        A, B = _broadcast_2d(a), _broadcast_2d(b)
        if A is None and B is None:
            continue
        D, M, N = out.shape
        K = _val(a).shape[2]

        def add(target, *args, **kwargs):
            new = graph.call_function(target, args, kwargs)
            vals = [_val(x) if isinstance(x, fx.Node) else x for x in args]
            with fake_mode if fake_mode is not None else _nothing():
                new.meta["val"] = target(*vals, **kwargs)
            return new

        def contiguous(x):
            return add(aten.clone.default, x, memory_format=torch.contiguous_format)

        with graph.inserting_before(node):
            A, B = (x if x is None or _val(x).dim() == 2 else add(aten.view.default, x, list(_val(x).shape[1:]))
                    for x in (A, B))
            if A is not None:  # out[d] = A @ b[d]
                bt = contiguous(add(aten.permute.default, b, [1, 0, 2]))
                prod = add(aten.mm.default, A, add(aten.view.default, bt, [K, D * N]))
                result = contiguous(add(aten.permute.default, add(aten.view.default, prod, [M, D, N]), [1, 0, 2]))
            else:  # out[d] = a[d] @ B
                flat = add(aten.view.default, contiguous(a), [D * M, K])
                result = add(aten.view.default, add(aten.mm.default, flat, B), [D, M, N])
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        folded += 1
    if folded:
        graph.eliminate_dead_code()
    return folded


def _custom_pass_base():
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # an older inductor takes a plain callable
        return object
    return CustomGraphPass


class FoldBroadcastBmm(_custom_pass_base()):
    """:func:`fold_broadcast_bmm` as an inductor custom graph pass (with the cache key inductor's
    FX graph cache asks of one)."""

    def __call__(self, graph: fx.Graph) -> None:
        if fold_broadcast_bmm(graph):
            graph.lint()

    def uuid(self):
        return "twicediff.fold_broadcast_bmm.1"
