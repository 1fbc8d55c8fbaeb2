r"""The explicit Hessian (or Gauss-Newton matrix) of a native-engine model, assembled block by block
from per-sample curvature instead of from P Hessian-vector products.

For a stack z_l = W_l h_{l-1} + b_l, h_l = σ_l(z_l) (σ_l an elementwise chain, possibly empty),
l = 1..L, and a loss ℓ(h_L) that is a sum of per-row terms, write h̃ = [h; 1] so that the
parameters of layer l are W̃_l = [W_l, b_l] and z_l = W̃_l h̃_{l-1}. Per row (index n omitted):

- g_l = ∂ℓ/∂z_l and G_l = ∂²ℓ/∂z_l², by backpropagating the loss's gradient and Hessian:
  G_l = D_l W_{l+1}ᵀ G_{l+1} W_{l+1} D_l + diag(σ_l'' ⊙ W_{l+1}ᵀ g_{l+1}), D_l = diag(σ_l');
- J_{m←l} = ∂z_m/∂z_l = W_m D_{m-1} ⋯ W_{l+1} D_l, and ∂h_{m-1}/∂z_l = D_{m-1} J_{m-1←l}.

Then the blocks of H, summed over rows, are

  H[(l; a, j), (l; b, i)] = Σ_n G_l[a, b] h̃_{l-1}[j] h̃_{l-1}[i]
  H[(m; a, j), (l; b, i)] = Σ_n h̃_{l-1}[i] ((G_m J_{m←l})[a, b] h̃_{m-1}[j] + g_m[a] (∂h_{m-1}/∂z_l)[j, b])  (m > l)

(the second term only for j < in_m: the bias column of h̃ is constant). Each is one GEMM over the
rows. For the Gauss-Newton matrix the σ'' terms and the g_m term are dropped. This takes several
times fewer flops than P Hessian-vector products (NOTE: measured in benchmarks/results/hessian_cpu.md).

The loss's per-row gradient and Hessian come from the closed forms of MSE, cross-entropy and
BCE-with-logits with mean or sum reduction (the losses the native engine takes), in the layout of
:meth:`twicediff.torch.engines.native.NativeEngine.apply` (pyDVL's squeeze convention included).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ... import ops
from ...ops.mlp_hvp import ACTIVATIONS
from ...memory import chunk_size, get_memory_budget
from ...progress import progress_bar
from .base import PreparedBatch
from .native import NativeEngine

__all__ = ["assemble_hessian", "assemble_hessian_batches"]

def _chain_derivatives(z: torch.Tensor, chain: List[tuple]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ(z), σ'(z), σ''(z)) of an elementwise chain of activations, by autograd (exact for any
    composition; an empty chain is the identity)."""
    if not chain:
        return z, torch.ones_like(z), torch.zeros_like(z)
    with torch.enable_grad():
        u = z.detach().requires_grad_(True)
        h = u
        for name, p0, p1 in chain:
            h = ACTIVATIONS[name].apply(h, p0, p1)
        d1, = torch.autograd.grad(h.sum(), u, create_graph=True)
        d2, = torch.autograd.grad(d1.sum(), u, allow_unused=True) if d1.requires_grad else (None,)
    return h.detach(), d1.detach(), (torch.zeros_like(z) if d2 is None else d2.detach())


def _loss_derivatives(out: torch.Tensor, target: torch.Tensor, kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(g [n, C], G [n, C, C]): gradient and Hessian of each row's loss term in the model output
    (the summed loss; :func:`_reduction_scale` gives the mean's factor)."""
    n, C = out.shape
    if kind == "cross_entropy":
        p = torch.softmax(out, dim=1)
        g = p.clone()
        g[torch.arange(n, device=out.device), target] -= 1
        G = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    elif kind == "mse":
        g = 2 * (out - target)
        G = 2 * torch.eye(C, dtype=out.dtype, device=out.device).expand(n, C, C).clone()
    else:  # bce_with_logits
        s = torch.sigmoid(out)
        g = s - target
        G = torch.diag_embed(s * (1 - s))
    return g, G


def _reduction_scale(engine: NativeEngine, rows: int) -> float:
    """The factor of the summed per-row terms in the loss of a batch of ``rows`` rows: 1 / rows for
    a mean cross-entropy, 1 / (rows · C) for a mean MSE or BCE, 1 for a sum."""
    if engine.reduction != "mean":
        return 1.0
    return 1.0 / rows if engine.loss_kind == "cross_entropy" else 1.0 / (rows * engine.linears[-1].out_features)


class _Place:
    """Where a Linear's W̃ = [W, b] sits in θ: weight row-major from ``offset``, then the bias."""

    def __init__(self, lin: torch.nn.Linear, offset: int):
        self.out, self.inn = lin.weight.shape
        self.w = offset
        self.b = offset + self.out * self.inn
        self.bias = lin.bias is not None
        self.size = self.out * self.inn + (self.out if self.bias else 0)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b through the native GEMM (the one the native op uses; see :func:`twicediff.ops.gemm_`)."""
    return ops.gemm_(torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device), a, b)


def _add_block(out: torch.Tensor, B: torch.Tensor, pm: _Place, pl: _Place, a0: int, b0: int) -> None:
    """out[(a, j), (b, i)] += B[a - a0, j, b - b0, i] for the rows a ∈ [a0, a0 + B.shape[0]) of layer
    m's W̃ (j ∈ [0, in_m], in_m being the bias) and the columns b ∈ [b0, b0 + B.shape[2]) of layer l's."""
    ca, cb = B.shape[0], B.shape[2]
    im, il = pm.inn, pl.inn
    Wm = slice(pm.w + a0 * im, pm.w + (a0 + ca) * im)
    Wl = slice(pl.w + b0 * il, pl.w + (b0 + cb) * il)
    Bm = slice(pm.b + a0, pm.b + a0 + ca)
    Bl = slice(pl.b + b0, pl.b + b0 + cb)
    out[Wm, Wl].view(ca, im, cb, il).add_(B[:, :im, :, :il])
    if pl.bias:
        out[Wm, Bl].view(ca, im, cb).add_(B[:, :im, :, il])
    if pm.bias:
        out[Bm, Wl].view(ca, cb, il).add_(B[:, im, :, :il])
        if pl.bias:
            out[Bm, Bl].add_(B[:, im, :, il])


def _rows_per_chunk(per_row_elems: int, total: int, elem: int, cap_bytes: int) -> int:
    """How many leading-index rows of a temporary of ``per_row_elems`` elements each fit in ``cap_bytes``."""
    return max(1, min(total, cap_bytes // max(1, per_row_elems * elem)))


def assemble_hessian(engine: NativeEngine, prepared: PreparedBatch, out: torch.Tensor, *,
                     alpha: float = 1.0, gauss_newton: bool = False, progress: bool = False) -> torch.Tensor:
    r"""out += alpha · ∂²L/∂θ² (or the Gauss-Newton matrix) of the engine's model and loss on a
    batch given as ``engine.prepare(x, y)``, [P, P], assembled blockwise (see the module
    docstring). Rows of the batch go in chunks within the memory budget and the temporaries of each
    block are cut to about 64 MiB; ``out`` must be [P, P] in the parameters' dtype and device."""
    return assemble_hessian_batches(engine, [(prepared, alpha)], out, gauss_newton=gauss_newton, progress=progress)


def assemble_hessian_batches(engine: NativeEngine, batches: List[Tuple[PreparedBatch, float]],
                             out: torch.Tensor, *, gauss_newton: bool = False, progress: bool = False) -> torch.Tensor:
    r"""out += Σ_b alpha_b · ∂²L_b/∂θ² for batches given as ``[(engine.prepare(x_b, y_b), alpha_b)]``,
    each L_b the loss of its batch (its own mean): every block is summed over the rows of all
    batches at once, each row's loss derivatives weighted by alpha_b times its batch's reduction
    factor. One call for many small batches passes over ``out`` once per block instead of once per
    batch and block."""
    if not batches:
        return out
    h0 = torch.cat([p.inputs for p, _ in batches])
    target = torch.cat([p.target for p, _ in batches])
    row_scale = torch.cat([torch.full((p.rows,), float(a) * _reduction_scale(engine, p.rows),
                                      dtype=torch.float64, device=h0.device) for p, a in batches])
    lins = engine.linears
    dtype, device = lins[0].weight.dtype, lins[0].weight.device
    # float16 / bfloat16 (CUDA) models: the products are taken in float32 and added into out
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weights = [(lin.weight.to(work), None if lin.bias is None else lin.bias.to(work)) for lin in lins]
    h0 = h0.to(work)
    row_scale = row_scale.to(work)
    if target.is_floating_point():
        target = target.to(work)
    N = h0.shape[0]
    places, offset = [], 0
    for lin in lins:
        places.append(_Place(lin, offset))
        offset += places[-1].size
    widths = [lins[0].in_features + 1] + [lin.out_features + 1 for lin in lins]
    elem = torch.finfo(work).bits // 8
    # per row: activations and derivatives, G_l, every J_{m<-l}, the h̃ products of the GEMMs
    per_row = elem * (4 * sum(widths) + sum(w * w for w in widths) * 3
                      + sum(widths[m] * widths[l] for m in range(len(widths)) for l in range(m)))
    cap = min(1 << 26, get_memory_budget(device) // 4)  # for the temporaries of each block
    step = chunk_size(max(N, 1), per_row, device, fixed_bytes=2 * cap, what="Hessian assembly rows")
    with torch.no_grad():
        for start in progress_bar(range(0, N, step), progress, desc="hessian", unit="chunk of rows"):
            _assemble_rows(engine, weights, places, h0[start:start + step], target[start:start + step],
                           row_scale[start:start + step], out, gauss_newton, cap)
    return out


def _assemble_rows(engine: NativeEngine, weights: List[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                   places: List[_Place], h0: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor,
                   out: torch.Tensor, gauss_newton: bool, cap: int) -> None:
    chains = engine.chains
    L = len(weights)
    n = h0.shape[0]
    elem = h0.element_size()
    ones = torch.ones(n, 1, dtype=h0.dtype, device=h0.device)
    # forward: h̃_{l-1} (with the constant 1) and σ', σ'' of each layer's chain
    ht, d1, d2 = [], [], []
    h = h0
    for (weight, bias), chain in zip(weights, chains):
        ht.append(torch.cat([h, ones], 1))
        h, s1, s2 = _chain_derivatives(F.linear(h, weight, bias), chain)
        d1.append(s1)
        d2.append(s2)
    g_h, G_h = _loss_derivatives(h, target, engine.loss_kind)
    g_h, G_h = g_h * row_scale[:, None], G_h * row_scale[:, None, None]
    # backward: g_l = ∂ℓ/∂z_l and G_l = ∂²ℓ/∂z_l² (list index l - 1)
    g: List[torch.Tensor] = [None] * L
    G: List[torch.Tensor] = [None] * L
    for l in range(L - 1, -1, -1):
        g[l] = d1[l] * g_h
        G[l] = d1[l][:, :, None] * G_h * d1[l][:, None, :]
        if not gauss_newton:
            G[l] = G[l] + torch.diag_embed(d2[l] * g_h)
        if l:
            W = weights[l][0]
            g_h, G_h = g[l] @ W, W.T @ G[l] @ W
    # J[(m, l)] = ∂z_m/∂z_l for m > l, [n, d_m, d_l]
    J: Dict[Tuple[int, int], torch.Tensor] = {}
    for l in range(L):
        for m in range(l + 1, L):
            inner = d1[m - 1][:, :, None] * J[(m - 1, l)] if m - 1 > l else torch.diag_embed(d1[l])
            J[(m, l)] = weights[m][0] @ inner
    for m in range(L):
        pm = places[m]
        dm, im = pm.out, pm.inn + 1
        # diagonal block Σ_n G_m[a, b] h̃[j] h̃[i]: h̃ h̃ᵀ on its upper triangle only, and for each chunk
        # of rows a only the columns b ≥ a0 (the rest mirrored)
        tj, ti = torch.triu_indices(im, im, device=h0.device)
        tri = torch.empty(im, im, dtype=torch.long, device=h0.device)
        tri[tj, ti] = torch.arange(tj.numel(), device=h0.device)
        tri[ti, tj] = tri[tj, ti]
        hh = ht[m][:, tj] * ht[m][:, ti]  # [n, im(im+1)/2]
        # at least 8 chunks of rows a, so that skipping b < a0 saves close to half the GEMM
        ca = min(_rows_per_chunk(dm * im * im, dm, elem, cap), -(-dm // 8))
        for a0 in range(0, dm, ca):
            a1 = min(dm, a0 + ca)
            T = _mm(G[m][:, a0:a1, a0:].reshape(n, -1).T, hh).reshape(a1 - a0, dm - a0, -1)
            B = T.index_select(2, tri.reshape(-1)).view(a1 - a0, dm - a0, im, im).permute(0, 2, 1, 3)  # [a, j, b, i]
            _add_block(out, B, pm, pm, a0, a0)
            if a1 < dm:  # the mirror image of the columns b ≥ a1: out[(b, i), (a, j)]
                _add_block(out, B[:, :, a1 - a0:].permute(2, 3, 0, 1), pm, pm, a1, a0)
        for l in range(m):
            pl = places[l]
            dl, il = pl.out, pl.inn + 1
            K = G[m] @ J[(m, l)]  # [n, dm, dl]
            hh = (ht[m][:, :, None] * ht[l][:, None, :]).reshape(n, im * il)
            adjacent = m - 1 == l
            M = None if adjacent else d1[m - 1][:, :, None] * J[(m - 1, l)]  # ∂h_{m-1}/∂z_l, [n, im - 1, dl]
            if not gauss_newton and adjacent:
                gd = (d1[l][:, :, None] * ht[l][:, None, :]).reshape(n, dl * il)  # M = diag(σ_l'): j = b
            ca = _rows_per_chunk(dl * im * il * (1 if adjacent or gauss_newton else n), dm, elem, cap)
            for a0 in range(0, dm, ca):
                a1 = min(dm, a0 + ca)
                # Σ_n K[a, b] h̃_m[j] h̃_l[i]
                B = _mm(K[:, a0:a1].reshape(n, -1).T, hh).reshape(a1 - a0, dl, im, il).permute(0, 2, 1, 3)
                if not gauss_newton:  # + Σ_n g_m[a] (∂h_{m-1}/∂z_l)[j, b] h̃_l[i], j < in_m
                    if adjacent:
                        # Σ_n g_m ⊗ σ_l' h̃_l cancels across rows (the mean gradient is far smaller than
                        # the rows'), so it is summed in float64: the float32 Hessian of the influence
                        # benchmark then carries 1.6e-7 of error at most instead of 4.3e-7, for 1% more work
                        T2 = (g[m][:, a0:a1].T.double() @ gd.double()).to(B.dtype).reshape(a1 - a0, dl, il)
                        diag = torch.arange(dl, device=B.device)
                        B[:, diag, diag, :] += T2
                    else:
                        gM = (g[m][:, a0:a1, None, None] * M[:, None]).reshape(n, -1)  # [n, (a, j, b)]
                        B[:, :im - 1] += (gM.T @ ht[l]).reshape(a1 - a0, im - 1, dl, il)
                _add_block(out, B, pm, pl, a0, 0)
                _add_block(out, B.permute(2, 3, 0, 1), pl, pm, 0, a0)
