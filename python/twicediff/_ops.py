"""Typed Python wrappers over ``torch.ops.twicediff.*``, with a fake (meta) kernel for every op and
an autograd formula for every op that can be called on tensors requiring grad.

Each wrapper is the documented entry to its op; ``_reference.py`` holds the pure-torch twin that
tests compare against.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import _build  # noqa: F401  (loads twicediff._C, which registers the ops)

_ops = torch.ops.twicediff

# ---- parameter-space ops ------------------------------------------------------------------------


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Write ``blocks[k]`` ([B, *shape_k]) into ``out[row_offset:row_offset+B, col_k:col_k+n_k]``
    of the preallocated ``out`` ([N, P], P = sum_k n_k) in one launch; returns ``out``.
    Not differentiable (it writes into ``out``)."""
    _ops.pack_into(list(blocks), out, int(row_offset))
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The inverse of :func:`pack_into`: ``outs[k]`` ([B, *shape_k]) = ``rows[:, col_k:col_k+n_k]``
    for ``rows`` of shape [B, P]; returns ``outs``."""
    outs = list(outs)
    _ops.unpack_into(rows, outs)
    return outs


@torch.library.register_fake("twicediff::pack_into")
def _pack_into_fake(blocks, out, row_offset):
    return None


@torch.library.register_fake("twicediff::unpack_into")
def _unpack_into_fake(rows, outs):
    return None


# ---- HVP engine ops -----------------------------------------------------------------------------

#: Activation names understood by :func:`mlp_hvp`, with their codes in csrc/mlp_hvp_common.h.
MLP_ACTIVATIONS = {"relu": 0, "leaky_relu": 1, "tanh": 2, "sigmoid": 3, "gelu": 4, "gelu_tanh": 5, "silu": 6,
                   "softplus": 7}
MLP_LOSSES = {"mse": 0, "cross_entropy": 1, "bce_with_logits": 2}
MLP_REDUCTIONS = {"mean": 0, "sum": 1}


def encode_mlp_activations(activations: Sequence[Sequence[tuple]]) -> tuple:
    """Per-layer activation chains ``[[(name, p0, p1), ...], ...]`` -> (counts, codes, params) as the
    op takes them. p0 is LeakyReLU's negative_slope or Softplus's beta, p1 Softplus's threshold."""
    counts, codes, params = [], [], []
    for layer, chain in enumerate(activations):
        counts.append(len(chain))
        for name, p0, p1 in chain:
            if name not in MLP_ACTIVATIONS:
                raise ValueError(f"mlp_hvp: activations[{layer}] has unknown activation {name!r}; "
                                 f"expected one of {sorted(MLP_ACTIVATIONS)}")
            codes.append(MLP_ACTIVATIONS[name])
            params.extend([float(p0), float(p1)])
    return counts, codes, params


def _mlp_code(table: dict, value: str, arg: str) -> int:
    if value not in table:
        raise ValueError(f"mlp_hvp: {arg} must be one of {sorted(table)}, got {value!r}")
    return table[value]


def mlp_hvp(x: torch.Tensor, target: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[Optional[torch.Tensor]], directions: torch.Tensor,
            activations: Sequence[Sequence[tuple]], loss: str, reduction: str = "mean",
            gauss_newton: bool = False) -> torch.Tensor:
    """Exact batched Hessian-vector products of an MLP's loss, all D directions in one call.

    The MLP: ``h_{-1} = x`` [N, in], ``a_l = h_{l-1} W_l^T + b_l``, ``h_l = act_l(a_l)`` (the chain
    ``activations[l]``, a list of ``(name, p0, p1)``, possibly empty), ``z = h_{L-1}`` [N, C]. Loss
    ``L = loss(z, target)``: "mse" (target [N, C]), "cross_entropy" (class indices [N]) or
    "bce_with_logits" (target [N, C]), ``reduction`` "mean" or "sum". Parameters θ = (W_0, b_0, W_1,
    ...) flattened row-major in that order, P entries (no b_l where ``biases[l]`` is None).

    Returns ``directions @ H`` as [D, P] for ``directions`` [D, P], H = ∂²L/∂θ² (or, with
    ``gauss_newton``, the generalized Gauss-Newton matrix JᵀH_ℓJ, J = ∂z/∂θ, H_ℓ = ∂²L/∂z²).
    Not differentiable: the inputs are detached.
    """
    counts, codes, params = encode_mlp_activations(activations)
    return _ops.mlp_hvp(x.detach(), target.detach(), [w.detach() for w in weights],
                        [None if b is None else b.detach() for b in biases], directions.detach(), counts, codes,
                        params, _mlp_code(MLP_LOSSES, loss, "loss"), _mlp_code(MLP_REDUCTIONS, reduction, "reduction"),
                        bool(gauss_newton))


@torch.library.register_fake("twicediff::mlp_hvp")
def _mlp_hvp_fake(x, target, weights, biases, directions, activation_counts, activation_codes, activation_params,
                  loss, reduction, gauss_newton):
    return directions.new_empty(directions.shape)



# ---- solver ops ---------------------------------------------------------------------------------
