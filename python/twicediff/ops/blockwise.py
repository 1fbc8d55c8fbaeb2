"""Contractions over a parameter list taken block by block, without packing
(csrc/cpu/blockwise.cpp, csrc/cuda/blockwise.cu): one GEMM or GEMV per block."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _build  # noqa: F401  (loads twicediff._C, which registers the ops)
from ._checks import block_pairs, tensor_list

__all__ = ["blockwise_contract", "blockwise_dot"]

_native = torch.ops.twicediff


def blockwise_contract(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """C [T, V] = Σ_k a[k].reshape(T, n_k) @ b[k].reshape(V, n_k)ᵀ for a[k] [T, *shape_k] and
    b[k] [V, *shape_k].

    ``einsum("ta,va->tv", pack(a), pack(b))`` without packing (one GEMM per block): the influence
    contraction of test and training gradients. Differentiable in a and b.
    """
    return _native.blockwise_contract(tensor_list("blockwise_contract", "a", a),
                                      tensor_list("blockwise_contract", "b", b))


def blockwise_dot(v: Sequence[torch.Tensor], g: Sequence[torch.Tensor]) -> torch.Tensor:
    """z [D] = Σ_k <v[k][d], g[k]> for v[k] [D, *shape_k] and g[k] [*shape_k].

    The D directions dotted with one parameter-shaped vector (one GEMV per block). Differentiable in
    v and g, twice (the backward is made of differentiable torch ops).
    """
    return _native.blockwise_dot(tensor_list("blockwise_dot", "v", v), tensor_list("blockwise_dot", "g", g))


@torch.library.register_fake("twicediff::blockwise_contract")
def _blockwise_contract_fake(a, b):
    block_pairs("blockwise_contract", "a", a, "b", b)
    return a[0].new_empty((a[0].shape[0], b[0].shape[0]))


def _pairs_setup(ctx, inputs, output):
    lhs, rhs = inputs
    ctx.num_blocks = len(lhs)
    ctx.save_for_backward(*lhs, *rhs)


def _blockwise_contract_backward(ctx, grad):
    # dC/da[k] = grad @ b[k] (rows V), dC/db[k] = grad^T @ a[k] (rows T), both reshaped to the block.
    saved = ctx.saved_tensors
    a, b = saved[:ctx.num_blocks], saved[ctx.num_blocks:]
    need_a, need_b = ctx.needs_input_grad
    grad_a = [(grad @ bk.reshape(bk.shape[0], bk.shape[1:].numel())).reshape(ak.shape) if need else None
              for ak, bk, need in zip(a, b, need_a)]
    grad_b = [(grad.mT @ ak.reshape(ak.shape[0], ak.shape[1:].numel())).reshape(bk.shape) if need else None
              for ak, bk, need in zip(a, b, need_b)]
    return grad_a, grad_b


torch.library.register_autograd("twicediff::blockwise_contract", _blockwise_contract_backward,
                                setup_context=_pairs_setup)


@torch.library.register_fake("twicediff::blockwise_dot")
def _blockwise_dot_fake(v, g):
    block_pairs("blockwise_dot", "v", v, "g", g)
    return v[0].new_empty((v[0].shape[0],))


def _blockwise_dot_backward(ctx, grad):
    # dz/dv[k][d] = grad[d] * g[k]; dz/dg[k] = sum_d grad[d] * v[k][d].
    saved = ctx.saved_tensors
    v, g = saved[:ctx.num_blocks], saved[ctx.num_blocks:]
    need_v, need_g = ctx.needs_input_grad
    grad_v = [torch.outer(grad, gk.reshape(-1)).reshape(vk.shape) if need else None
              for vk, gk, need in zip(v, g, need_v)]
    grad_g = [(grad @ vk.reshape(vk.shape[0], gk.numel())).reshape(gk.shape) if need else None
              for vk, gk, need in zip(v, g, need_g)]
    return grad_v, grad_g


torch.library.register_autograd("twicediff::blockwise_dot", _blockwise_dot_backward, setup_context=_pairs_setup)
