"""Pure-torch references of every native op in ``twicediff.ops``: same arguments, same results.

Tests compare the native kernels with these (in float64 where the maths is checked); they are also
readable statements of what each op computes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .mlp_hvp import ACTIVATIONS

# ---- parameter-space ops ------------------------------------------------------------------------


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """out[row_offset:row_offset+B] = pack(blocks)."""
    out[row_offset:row_offset + blocks[0].shape[0]] = pack(blocks)
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """outs[k] = rows[:, col_k:col_k+n_k].reshape(outs[k].shape)."""
    col = 0
    for o in outs:
        n = o.shape[1:].numel()
        o.copy_(rows[:, col:col + n].reshape(o.shape))
        col += n
    return list(outs)


def pack(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, P] = cat_k(blocks[k].reshape(B, n_k)) along columns."""
    rows = blocks[0].shape[0]
    return torch.cat([b.reshape(rows, b.shape[1:].numel()) for b in blocks], dim=1)


def blockwise_contract(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """C [T, V] = pack(a) @ pack(b)^T = sum_k a[k].reshape(T, n_k) @ b[k].reshape(V, n_k)^T."""
    return pack(a) @ pack(b).mT


def blockwise_dot(v: Sequence[torch.Tensor], g: Sequence[torch.Tensor]) -> torch.Tensor:
    """z [D] = pack(v) @ cat_k(g[k].flatten()) = sum_k <v[k][d], g[k]>."""
    return pack(v) @ torch.cat([gk.reshape(-1) for gk in g])


# ---- HVP engine ops -----------------------------------------------------------------------------


def mlp_hvp(x: torch.Tensor, target: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[torch.Tensor | None], directions: torch.Tensor,
            activations: Sequence[Sequence[tuple]], loss: str, reduction: str = "mean",
            gauss_newton: bool = False) -> torch.Tensor:
    """directions [D, P] -> [D, P]: rows H v_d (or JᵀH_ℓJ v_d), by torch.func forward-over-reverse
    on the MLP written with torch ops (see ``twicediff.ops.mlp_hvp`` for the model and layout)."""
    import torch.nn.functional as F
    from torch.func import grad, jvp, vjp, vmap

    weights = [w.detach() for w in weights]
    biases = [None if b is None else b.detach() for b in biases]
    x, target, directions = x.detach(), target.detach(), directions.detach()
    params = tuple(t for wb in zip(weights, biases) for t in wb if t is not None)
    sizes = [p.numel() for p in params]

    def network(*flat_params: torch.Tensor) -> torch.Tensor:
        parts = iter(flat_params)
        h = x
        for b, chain in zip(biases, activations):
            w = next(parts)
            h = h @ w.t() + next(parts) if b is not None else h @ w.t()
            for name, p0, p1 in chain:
                h = ACTIVATIONS[name].apply(h, p0, p1)
        return h

    def objective(z: torch.Tensor) -> torch.Tensor:
        if loss == "mse":  # written out: F.mse_loss's double backward trips torch.func on [N, 1] outputs
            squares = (z - target) ** 2
            return squares.mean() if reduction == "mean" else squares.sum()
        if loss == "cross_entropy":
            return F.cross_entropy(z, target, reduction=reduction)
        if loss == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(z, target, reduction=reduction)
        raise ValueError(f"mlp_hvp: unknown loss {loss!r}")

    def split(v: torch.Tensor) -> tuple:
        return tuple(part.view(p.shape) for part, p in zip(torch.split(v, sizes), params))

    def flatten(parts) -> torch.Tensor:
        return torch.cat([part.reshape(-1) for part in parts])

    if directions.shape[0] == 0:
        return directions.new_zeros(directions.shape)
    if gauss_newton:
        z, pullback = vjp(network, *params)

        def ggn_product(v: torch.Tensor) -> torch.Tensor:
            _, jv = jvp(network, params, split(v))
            _, hjv = jvp(grad(objective), (z,), (jv,))
            return flatten(pullback(hjv))
        return vmap(ggn_product)(directions)

    def loss_gradient(*ps: torch.Tensor) -> tuple:
        return grad(lambda *q: objective(network(*q)), argnums=tuple(range(len(ps))))(*ps)

    def hessian_product(v: torch.Tensor) -> torch.Tensor:
        return flatten(jvp(loss_gradient, params, split(v))[1])
    return vmap(hessian_product)(directions)


# ---- GEMM ---------------------------------------------------------------------------------------


def gemm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
    """out = beta * out + alpha * a @ b in place (beta = 0: out is not read); returns out."""
    product = alpha * (a @ b)
    out.copy_(product if beta == 0 else torch.add(product, out, alpha=beta))
    return out


# ---- LayerNorm tangent ops ----------------------------------------------------------------------
# Stated by automatic differentiation, not by the hand-derived formulas the kernels use: a row x
# with mean 0 and a per-row eps that give back xhat and rstd (x = xhat / rstd, eps = (1 - mean(xhat²))
# / rstd²), layer_norm of it written in primitive ops, and torch.func's jvp (and vjp) of that.


def _layer_norm_rows(xhat: torch.Tensor, rstd: torch.Tensor):
    """(x, layer_norm) such that layer_norm(x, 1, 0) is xhat with 1 / sqrt(var + eps) = rstd per row."""
    r = rstd.unsqueeze(-1)
    x = xhat / r
    eps = (1 - (xhat * xhat).mean(-1, keepdim=True)) / (r * r)

    def layer_norm(x, weight, bias):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps) * weight + bias
    return x, layer_norm


def _each_direction(f, *tangents: Optional[torch.Tensor]):
    """vmap of f over the leading direction dimension of the tangents given (None passes through)."""
    B = next(t.shape[0] for t in tangents if t is not None)
    if B == 0:  # vmap maps no empty dimension: one zero direction, then none of it
        one = f(*(None if t is None else t.new_zeros(t.shape[1:]) for t in tangents))
        return torch.utils._pytree.tree_map(lambda o: o.unsqueeze(0)[:0], one)
    dims = tuple(None if t is None else 0 for t in tangents)
    return torch.func.vmap(f, in_dims=dims)(*tangents)


def layer_norm_tangent(x_t: Optional[torch.Tensor], xhat: torch.Tensor, rstd: torch.Tensor,
                       weight: Optional[torch.Tensor] = None, weight_t: Optional[torch.Tensor] = None,
                       bias_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, R, d]: jvp of y = layer_norm(x) · weight + bias in (x, weight, bias) along (x_t, weight_t,
    bias_t), None for zero."""
    x, layer_norm = _layer_norm_rows(xhat, rstd)
    w = weight if weight is not None else xhat.new_ones(xhat.shape[-1])
    b = xhat.new_zeros(xhat.shape[-1])

    def one(xt, wt, bt):
        tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in ((x, xt), (w, wt), (b, bt)))
        return torch.func.jvp(layer_norm, (x, w, b), tangents)[1]
    return _each_direction(one, x_t, weight_t, bias_t)


def layer_norm_backward_tangent(grad_out: torch.Tensor, grad_out_t: Optional[torch.Tensor],
                                x_t: Optional[torch.Tensor], xhat: torch.Tensor, rstd: torch.Tensor,
                                weight: Optional[torch.Tensor] = None, weight_t: Optional[torch.Tensor] = None):
    """([B, R, d], [B, d], [B, d]): jvp of layer_norm's vjp (grad_x, grad_weight, grad_bias) at
    grad_out, in (grad_out, x, weight) along (grad_out_t, x_t, weight_t), None for zero."""
    x, layer_norm = _layer_norm_rows(xhat, rstd)
    w = weight if weight is not None else xhat.new_ones(xhat.shape[-1])
    b = xhat.new_zeros(xhat.shape[-1])

    def backward(gy, x, w):
        return torch.func.vjp(layer_norm, x, w, b)[1](gy)

    def one(gyt, xt, wt):
        tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in ((grad_out, gyt), (x, xt), (w, wt)))
        return torch.func.jvp(backward, (grad_out, x, w), tangents)[1]
    return _each_direction(one, grad_out_t, x_t, weight_t)


# ---- solver ops ---------------------------------------------------------------------------------


def cg_step(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x += alpha[:, None] p; r -= alpha[:, None] Ap; returns (r ** 2).sum(1) in float64."""
    a = alpha.to(x.dtype)[:, None]
    x.add_(a * p)
    r.sub_(a * Ap)
    return r.double().square().sum(1)


def cg_direction(p: torch.Tensor, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """p = z + beta[:, None] p."""
    return p.copy_(z + beta.to(p.dtype)[:, None] * p)


def lissa_step(h: torch.Tensor, b: torch.Tensor, Hh: torch.Tensor, dampen: float, scale: float,
               hessian_perturbation: float):
    """h' = b + (1 - dampen - λ/scale) h - Hh/scale into h; per-row max and sum of |h'-h|/|h'|
    (0/0 = 0), NaN in rows where h' is not finite."""
    old = h.clone()
    h.copy_(b + (1.0 - dampen - hessian_perturbation / scale) * old - Hh / scale)
    delta = (h.double() - old.double()).abs()
    rel = torch.where(delta == 0, torch.zeros_like(delta), delta / h.double().abs())
    finite = torch.isfinite(h).all(1)
    nan = torch.full((h.shape[0],), float("nan"), dtype=torch.float64, device=h.device)
    max_rel = rel.amax(1) if h.shape[1] else rel.new_zeros(h.shape[0])
    return torch.where(finite, max_rel, nan), torch.where(finite, rel.sum(1), nan)


# ---- K-FAC ops -----------------------------------------------------------------------------------


def kfac_augment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """x with a trailing column of ones when ``bias`` (materialised: the reference may)."""
    if not bias:
        return x
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def kfac_covariance_(out: torch.Tensor, x: torch.Tensor, weights: Optional[torch.Tensor] = None,
                          bias: bool = False) -> torch.Tensor:
    """out [D, D] += Σ_r w_r ā_r ā_rᵀ (w_r = 1 without weights), computed in float64 and added to
    ``out`` in its dtype; returns ``out``."""
    a = kfac_augment(x.double(), bias)
    w = torch.ones(a.shape[0], dtype=torch.float64, device=x.device) if weights is None else weights.double()
    out.add_(((a * w[:, None]).T @ a).to(out.dtype))
    return out


def kfac_eigen_correction_(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, q_s: torch.Tensor,
                                q_a: torch.Tensor, weights: Optional[torch.Tensor] = None,
                                bias: bool = False) -> torch.Tensor:
    """out [O, I'] += Σ_n (Q_Sᵀ G_n Q_A)², G_n = Σ_t w_{n,t} g_{n,t} ā_{n,t}ᵀ [O, I'], for g [N, T, O],
    a [N, T, I], q_s [O, O], q_a [I', I'], weights [N, T] (1 without); float64 inside; returns out."""
    gd = g.double()
    if weights is not None:
        gd = gd * weights.double()[..., None]
    G = torch.einsum("nto,nti->noi", gd, kfac_augment(a.double(), bias))
    R = q_s.double().T @ G @ q_a.double()
    out.add_((R * R).sum(0).to(out.dtype))
    return out
