"""Typed Python wrappers over ``torch.ops.twicediff.*``, with a fake (meta) kernel for every op and
an autograd formula for every op that can be called on tensors requiring grad.

Each wrapper is the documented entry to its op; ``_reference.py`` holds the pure-torch twin that
tests compare against.
"""
from __future__ import annotations

import operator
from typing import List, Sequence

import torch

from . import _build  # noqa: F401  (loads twicediff._C, which registers the ops)

_ops = torch.ops.twicediff

# ---- parameter-space ops ------------------------------------------------------------------------
# A parameter list is K blocks; "rows" of a block are its leading dimension, and n_k = numel of one
# row of block k. Packed, a row of the blocks is one row of a [B, P] matrix, P = sum_k n_k, block k at
# columns [col_k, col_k + n_k), col_k = sum_{j<k} n_j.


def _tensor_list(op: str, name: str, value) -> List[torch.Tensor]:
    """``value`` as a non-empty list of tensors, or a TypeError / ValueError naming ``name`` (a lone
    tensor is refused: it would silently be iterated over its first dimension)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(value).__name__}")
    for k, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{k}] must be a tensor, got {type(t).__name__}")
    if len(value) == 0:
        raise ValueError(f"{op}: {name} must hold at least one tensor, got an empty list")
    return list(value)


def _tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
    return value


def _not_tracked(op: str, named: Sequence[tuple]) -> None:
    """The in-place ops write values outside autograd: refuse a destination that is part of a graph
    (its graph would silently go stale), as torch refuses in-place writes into such leaves."""
    if torch.is_grad_enabled():
        for name, t in named:
            if t.requires_grad:
                raise ValueError(f"{op}: {name} requires grad, but {op} writes into it outside autograd; "
                                 f"pass a tensor that does not require grad")


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Write ``blocks[k]`` ([B, *shape_k]) into ``out[row_offset:row_offset+B, col_k:col_k+n_k]``
    of the preallocated ``out`` ([N, P], P = sum_k n_k) in one launch; returns ``out``.
    Copies values only: ``out`` gets no autograd graph (blocks that require grad are read as
    detached); see :func:`pack` for the differentiable form."""
    blocks = _tensor_list("pack_into", "blocks", blocks)
    _tensor("pack_into", "out", out)
    if isinstance(row_offset, bool):
        raise TypeError("pack_into: row_offset must be an int, got bool")
    try:
        row_offset = operator.index(row_offset)
    except TypeError:
        raise TypeError(f"pack_into: row_offset must be an int, got {type(row_offset).__name__}") from None
    _not_tracked("pack_into", [("out", out)])
    _ops.pack_into(blocks, out, row_offset)
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The inverse of :func:`pack_into`: ``outs[k]`` ([B, *shape_k]) = ``rows[:, col_k:col_k+n_k]``
    for ``rows`` of shape [B, P]; returns ``outs``. Copies values only (no autograd graph)."""
    outs = _tensor_list("unpack_into", "outs", outs)
    _tensor("unpack_into", "rows", rows)
    _not_tracked("unpack_into", _named("outs", outs))
    _ops.unpack_into(rows, outs)
    return outs


def pack(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The packed rows of ``blocks[k]`` ([B, *shape_k]) as a fresh [B, P] matrix,
    ``out[b] = cat_k(blocks[k][b].flatten())`` (what ``torch.cat([x.reshape(B, -1) for x in
    blocks], 1)`` gives, in one pass). Differentiable: the gradient of block k is
    ``grad[:, col_k:col_k+n_k].reshape(blocks[k].shape)``."""
    return _ops.pack(_tensor_list("pack", "blocks", blocks))


def blockwise_contract(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """C [T, V] = sum_k a[k].reshape(T, n_k) @ b[k].reshape(V, n_k)^T for a[k] [T, *shape_k] and
    b[k] [V, *shape_k]: ``einsum("ta,va->tv", pack(a), pack(b))`` without packing (one GEMM per
    block). Differentiable in a and b."""
    return _ops.blockwise_contract(_tensor_list("blockwise_contract", "a", a),
                                   _tensor_list("blockwise_contract", "b", b))


def blockwise_dot(v: Sequence[torch.Tensor], g: Sequence[torch.Tensor]) -> torch.Tensor:
    """z [D] = sum_k <v[k][d], g[k]> for v[k] [D, *shape_k] and g[k] [*shape_k]: the D directions
    dotted with one parameter-shaped vector (one GEMV per block). Differentiable in v and g, twice
    (the backward is made of differentiable torch ops)."""
    return _ops.blockwise_dot(_tensor_list("blockwise_dot", "v", v), _tensor_list("blockwise_dot", "g", g))


def _check_one_device(op: str, named: Sequence[tuple]) -> None:
    """Fake kernels: every (name, tensor) on the device of the first, else a ValueError naming it."""
    first_name, first = named[0]
    for name, t in named:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"they must be on the same device")


def _named(name: str, tensors: Sequence[torch.Tensor]) -> List[tuple]:
    return [(f"{name}[{k}]", t) for k, t in enumerate(tensors)]


def _row_width(op: str, name: str, blocks: Sequence[torch.Tensor]) -> tuple:
    """(B, P) of the blocks [B, *shape_k], as the native checks see it."""
    if len(blocks) == 0:
        raise ValueError(f"{op}: {name} must hold at least one tensor, got an empty list")
    for k, t in enumerate(blocks):
        if t.dim() == 0 or t.shape[0] != blocks[0].shape[0]:
            raise ValueError(f"{op}: every tensor in {name} must have the same leading size B; {name}[0] has "
                             f"shape {list(blocks[0].shape)} but {name}[{k}] has shape {list(t.shape)}")
    return blocks[0].shape[0], sum(t.shape[1:].numel() for t in blocks)


@torch.library.register_fake("twicediff::pack_into")
def _pack_into_fake(blocks, out, row_offset):
    _check_one_device("pack_into", [("out", out)] + _named("blocks", blocks))
    return None


@torch.library.register_fake("twicediff::unpack_into")
def _unpack_into_fake(rows, outs):
    _check_one_device("unpack_into", [("rows", rows)] + _named("outs", outs))
    return None


@torch.library.register_fake("twicediff::pack")
def _pack_fake(blocks):
    _check_one_device("pack", _named("blocks", blocks))
    rows, width = _row_width("pack", "blocks", blocks)
    return blocks[0].new_empty((rows, width))


def _pack_setup(ctx, inputs, output):
    ctx.shapes = [t.shape for t in inputs[0]]


def _pack_backward(ctx, grad):
    widths = [s[1:].numel() for s in ctx.shapes]
    return [piece.reshape(s) for piece, s in zip(grad.split(widths, dim=1), ctx.shapes)]


torch.library.register_autograd("twicediff::pack", _pack_backward, setup_context=_pack_setup)


def _check_block_pairs(op: str, first: str, a, second: str, b) -> None:
    """One device for all blocks, and the two lists of the same length (>= 1)."""
    _check_one_device(op, _named(first, a) + _named(second, b))
    if len(a) == 0 or len(a) != len(b):
        raise ValueError(f"{op}: {first} and {second} must hold the same number (>= 1) of blocks, "
                         f"got {len(a)} and {len(b)}")


@torch.library.register_fake("twicediff::blockwise_contract")
def _blockwise_contract_fake(a, b):
    _check_block_pairs("blockwise_contract", "a", a, "b", b)
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
    _check_block_pairs("blockwise_dot", "v", v, "g", g)
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
            biases: Sequence[torch.Tensor | None], directions: torch.Tensor,
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

    On the CPU the D directions are split into one part per thread (``torch.get_num_threads()``),
    each part's GEMMs single-threaded; on CUDA one pass covers all D. Results agree to rounding
    whatever the thread count, not bit for bit across thread counts.
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



# ---- GEMM ---------------------------------------------------------------------------------------


def gemm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
    """``out = beta * out + alpha * a @ b`` in place for a [M, K], b [K, N], out [M, N] of one
    floating dtype and device; returns out. ``beta = 0``: out's contents are not read (NaN there
    does not spread).

    The GEMM the native kernels use: on the CPU, float32 goes through torch's bundled oneDNN where it
    can (its AVX-512 kernels; MKL takes its AVX2 path on non-Intel CPUs), everything else through
    ATen (see ``twicediff.build_info()["cpu_gemm"]``). Values only: out gets no autograd graph."""
    for name, t in (("out", out), ("a", a), ("b", b)):
        _tensor("gemm_", name, t)
    _not_tracked("gemm_", [("out", out)])
    for name, value in (("beta", beta), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"gemm_: {name} must be a number, got {type(value).__name__}")
    with torch.no_grad():
        _ops.gemm_(out, a, b, float(beta), float(alpha))
    return out


@torch.library.register_fake("twicediff::gemm_")
def _gemm_fake(out, a, b, beta, alpha):
    return None


# ---- solver ops ---------------------------------------------------------------------------------


def cg_step(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    r"""One conjugate-gradient update of D systems at once, in place and in one pass:
    ``x += alpha[:, None] * p``, ``r -= alpha[:, None] * Ap``; returns ``‖r[d]‖²`` per row.

    x, r, p, Ap: [D, P], one dtype (float32 / float64) and device; alpha: float64 [D].
    Returns: float64 [D]. Not differentiable (it writes into x and r)."""
    return _ops.cg_step(x, r, p, Ap, alpha)


def cg_direction(p: torch.Tensor, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The next CG search directions, in place: ``p = z + beta[:, None] * p`` for p, z [D, P] and
    float64 beta [D]; returns p."""
    _ops.cg_direction(p, z, beta)
    return p


def lissa_step(h: torch.Tensor, b: torch.Tensor, Hh: torch.Tensor, dampen: float, scale: float,
               hessian_perturbation: float):
    r"""One LiSSA update of D right-hand sides at once, in place and in one pass:
    ``h' = b + (1 - dampen)·h - (Hh + λ·h) / scale`` with λ = ``hessian_perturbation``.

    h, b, Hh: [D, P] (Hh = H h without λ). Returns ``(max_rel, sum_rel)``, float64 [D]:
    ``max_j |h'-h| / |h'|`` and ``sum_j |h'-h| / |h'|`` per row (0/0 counted as 0), both NaN in
    rows where h' holds a non-finite value."""
    return _ops.lissa_step(h, b, Hh, float(dampen), float(scale), float(hessian_perturbation))


@torch.library.register_fake("twicediff::cg_step")
def _cg_step_fake(x, r, p, Ap, alpha):
    return x.new_empty(x.shape[0], dtype=torch.float64)


@torch.library.register_fake("twicediff::cg_direction")
def _cg_direction_fake(p, z, beta):
    return None


@torch.library.register_fake("twicediff::lissa_step")
def _lissa_step_fake(h, b, Hh, dampen, scale, hessian_perturbation):
    return h.new_empty(h.shape[0], dtype=torch.float64), h.new_empty(h.shape[0], dtype=torch.float64)
