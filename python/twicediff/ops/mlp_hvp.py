"""Exact batched Hessian-vector products of an MLP's loss in one call (csrc/cpu/mlp_hvp.cpp,
csrc/cuda/mlp_hvp.cu): Pearlmutter's R-operator for all D directions at once.

The tables below are the Python side of the op's codes; the C++ enums in csrc/ are the native side,
and a test checks the two agree.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .. import _build  # noqa: F401  (loads twicediff._C, which registers the ops)

__all__ = ["ACTIVATIONS", "LOSSES", "REDUCTIONS", "Activation", "activation_codes", "encode_activations",
           "mlp_hvp", "native_codes"]

_native = torch.ops.twicediff


class Activation(NamedTuple):
    """An elementwise activation of the op: its code, and the function it computes,
    ``apply(a, p0, p1)`` (p0 is LeakyReLU's negative_slope or Softplus's beta, p1 Softplus's threshold)."""
    code: int
    apply: Callable[[torch.Tensor, float, float], torch.Tensor]


#: The activations the op understands: the one table the reference, the Hessian assembly and the
#: engine's reading of a model use.
ACTIVATIONS: Dict[str, Activation] = {
    "relu": Activation(0, lambda a, p0, p1: F.relu(a)),
    "leaky_relu": Activation(1, lambda a, p0, p1: F.leaky_relu(a, p0)),
    "tanh": Activation(2, lambda a, p0, p1: torch.tanh(a)),
    "sigmoid": Activation(3, lambda a, p0, p1: torch.sigmoid(a)),
    "gelu": Activation(4, lambda a, p0, p1: F.gelu(a)),
    "gelu_tanh": Activation(5, lambda a, p0, p1: F.gelu(a, approximate="tanh")),
    "silu": Activation(6, lambda a, p0, p1: F.silu(a)),
    "softplus": Activation(7, lambda a, p0, p1: F.softplus(a, beta=p0, threshold=p1)),
}
#: Loss names and codes.
LOSSES = {"mse": 0, "cross_entropy": 1, "bce_with_logits": 2}
#: Reductions and codes.
REDUCTIONS = {"mean": 0, "sum": 1}


def encode_activations(activations: Sequence[Sequence[tuple]]) -> tuple:
    """Per-layer activation chains ``[[(name, p0, p1), ...], ...]`` -> (counts, codes, params) as the
    op takes them. p0 is LeakyReLU's negative_slope or Softplus's beta, p1 Softplus's threshold."""
    counts, codes, params = [], [], []
    for layer, chain in enumerate(activations):
        counts.append(len(chain))
        for name, p0, p1 in chain:
            if name not in ACTIVATIONS:
                raise ValueError(f"mlp_hvp: activations[{layer}] has unknown activation {name!r}; "
                                 f"expected one of {sorted(ACTIVATIONS)}")
            codes.append(ACTIVATIONS[name].code)
            params.extend([float(p0), float(p1)])
    return counts, codes, params


def activation_codes() -> Dict[str, int]:
    """{activation name: code}, as the C++ enum numbers them."""
    return {name: a.code for name, a in ACTIVATIONS.items()}


def native_codes() -> Dict[str, Dict[str, int]]:
    """The C++ side's code tables (op ``twicediff::mlp_hvp_codes``): ``{"activations": {...},
    "losses": {...}, "reductions": {...}}``, which tests hold equal to :data:`ACTIVATIONS`'s codes,
    :data:`LOSSES` and :data:`REDUCTIONS`."""
    import json

    return json.loads(_native.mlp_hvp_codes())


def _code(table: dict, value: str, arg: str) -> int:
    if value not in table:
        raise ValueError(f"mlp_hvp: {arg} must be one of {sorted(table)}, got {value!r}")
    return table[value]


def mlp_hvp(x: torch.Tensor, target: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[torch.Tensor | None], directions: torch.Tensor,
            activations: Sequence[Sequence[tuple]], loss: str, reduction: str = "mean",
            gauss_newton: bool = False) -> torch.Tensor:
    """Exact batched Hessian-vector products of an MLP's loss, all D directions in one call.

    The MLP: ``h_{-1} = x`` [N, in], ``a_l = h_{l-1} W_lᵀ + b_l``, ``h_l = act_l(a_l)`` (the chain
    ``activations[l]``, a list of ``(name, p0, p1)``, possibly empty), ``z = h_{L-1}`` [N, C]. Loss
    ``L = loss(z, target)``: "mse" (target [N, C]), "cross_entropy" (class indices [N]) or
    "bce_with_logits" (target [N, C]), ``reduction`` "mean" or "sum". Parameters θ = (W_0, b_0, W_1,
    ...) flattened row-major in that order, P entries (no b_l where ``biases[l]`` is None).

    Returns:
        ``directions @ H`` as [D, P] for ``directions`` [D, P], H = ∂²L/∂θ² (or, with
        ``gauss_newton``, the generalized Gauss-Newton matrix JᵀH_ℓJ, J = ∂z/∂θ, H_ℓ = ∂²L/∂z²).
        Not differentiable: the inputs are detached.

    On the CPU the D directions are split into one part per thread (``torch.get_num_threads()``),
    each part's GEMMs single-threaded; on CUDA one pass covers all D. Results agree to rounding
    whatever the thread count, not bit for bit across thread counts.
    """
    counts, codes, params = encode_activations(activations)
    return _native.mlp_hvp(x.detach(), target.detach(), [w.detach() for w in weights],
                           [None if b is None else b.detach() for b in biases], directions.detach(), counts,
                           codes, params, _code(LOSSES, loss, "loss"), _code(REDUCTIONS, reduction, "reduction"),
                           bool(gauss_newton))


@torch.library.register_fake("twicediff::mlp_hvp")
def _mlp_hvp_fake(x, target, weights, biases, directions, activation_counts, activation_codes, activation_params,
                  loss, reduction, gauss_newton):
    return directions.new_empty(directions.shape)
