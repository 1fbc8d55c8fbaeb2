r"""Streamed scoring: preconditioned query gradients contracted with training per-sample gradients.

    scores[q, n] = Σ_l ⟨Q̃_{q,l}, G_{n,l}⟩,   G_{n,l} = Σ_t g_{n,t} ā_{n,t}ᵀ   [O, I']

Q̃ is a batch of query gradients already preconditioned (e.g. ``factors.solve(query_grads)``),
G_n the per-sample gradient of the training loss ℓ_n (true labels; the loss convention of
:mod:`.batches`), restricted to the tracked layers. One forward/backward per training batch reads
each layer's inputs and output gradients; the contraction is taken layer by layer and chunk by
chunk of samples, so neither [N_train, P] nor a layer's [B, O, I'] for a whole large batch needs to
exist. Two ways to contract a layer, the cheaper chosen per layer (or as asked):

- "per_sample": G_n by a batched GEMM over tokens, then one GEMM with the flattened queries
  ([chunk, O·I'] elements);
- "tokens": Q̃ ā_t for every token, then a dot with g_t ([Q, chunk·T, O] elements).

Per sample the first costs (T + Q)·O·I' multiply-adds and the second Q·T·O·I': "auto" takes the
tokens path only for one query or one token per sample.

:func:`self_score` gives ``G_nᵀ (F + λI)⁻¹ G_n`` for every training sample in the same streamed way
(in the eigenbasis: Σ (Q_Sᵀ G_n Q_A)² ⊘ (Λ + λ), no back-rotation).

Many queries: ``query_rank=r`` replaces each query's layer block by its best rank-r approximation
U Vᵀ (truncated SVD, Kronfluence's query compression), and the contraction becomes
Σ_t (Uᵀ g_t)·(Vᵀ ā_t): [Q, chunk·T, r] elements per layer instead of [Q, O, I'] products.

Influence in pyDVL's sign convention is ``-scores`` for up-weighting (the caller applies it).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ...progress import progress_bar
from .inverse import GradsLike, _as_blocks, layer_blocks
from .layers import TrackedLayer

__all__ = ["score", "self_score", "CONTRACTIONS"]

CONTRACTIONS = ("auto", "per_sample", "tokens")
_CHUNK_ELEMENTS = 1 << 23


def _contract_layer(layer: TrackedLayer, qw: torch.Tensor, qb: Optional[torch.Tensor], a: torch.Tensor,
                    g: torch.Tensor, how: str) -> torch.Tensor:
    """[Q, B] = Σ_{o,i} q[:, o, i] G_n[o, i] for one layer whose query block q [Q, O, I'] is given
    as its weight columns qw [Q, O, I] and its bias column qb [Q, O] (None without a bias), so the
    queries are never copied into one [Q, O, I'] tensor; a [B, T, I], g [B, T, O]."""
    Qn, O, I = qw.shape
    Ip = I + int(qb is not None)
    B, T, _ = a.shape
    a = a.to(qw.dtype)
    g = g.to(qw.dtype)
    if how == "auto":
        # Multiply-adds per sample: per_sample T·O·I' (G_n) + Q·O·I' (the dot products); tokens
        # Q·T·O·I'. Both paths work in bounded chunks, so the cheaper in arithmetic wins: tokens
        # only when Q·T < T + Q, i.e. one query or one token per sample.
        how = "tokens" if Qn * T < Qn + T else "per_sample"
    out = qw.new_empty(Qn, B)
    if how == "per_sample":
        step = max(1, _CHUNK_ELEMENTS // max(O * Ip + T * (O + Ip), 1))
        qf = qw.reshape(Qn, O * I)
        for n0 in range(0, B, step):
            ac, gc = a[n0:n0 + step], g[n0:n0 + step]
            G = torch.bmm(gc.transpose(1, 2), ac)  # [n, O, I]
            part = qf @ G.reshape(G.shape[0], O * I).T
            if qb is not None:
                part += qb @ gc.sum(1).T  # the bias column of G_n is Σ_t g_t
            out[:, n0:n0 + step] = part
        return out
    # tokens: (Q̃ ā_t)_o for each query and token, dotted with g_t.
    step = max(1, _CHUNK_ELEMENTS // max(Qn * T * O, 1))
    for n0 in range(0, B, step):
        ac, gc = a[n0:n0 + step], g[n0:n0 + step]
        u = torch.einsum("qoi,nti->qnto", qw, ac)
        if qb is not None:
            u = u + qb[:, None, None, :]
        out[:, n0:n0 + step] = torch.einsum("qnto,nto->qn", u, gc)
    return out


def _low_rank(q: torch.Tensor, rank: int):
    """(U·σ [Q, O, r], V [Q, I', r]) of each query block's rank-r truncated SVD."""
    u, sv, vh = torch.linalg.svd(q, full_matrices=False)
    r = min(rank, sv.shape[1])
    return u[:, :, :r] * sv[:, None, :r], vh[:, :r, :].transpose(1, 2)


def _contract_low_rank(layer: TrackedLayer, us: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                       g: torch.Tensor) -> torch.Tensor:
    """[Q, B] = Σ_t (Uᵀ g_t)·(Vᵀ ā_t) summed over the rank, for us [Q, O, r], v [Q, I', r]."""
    Qn, O, r = us.shape
    B, T, I = a.shape
    a = a.to(us.dtype)
    g = g.to(us.dtype)
    out = us.new_empty(Qn, B)
    step = max(1, _CHUNK_ELEMENTS // max(Qn * T * r, 1))
    for n0 in range(0, B, step):
        ac, gc = a[n0:n0 + step], g[n0:n0 + step]
        gu = torch.einsum("nto,qor->qntr", gc, us)
        av = torch.einsum("nti,qir->qntr", ac, v[:, :I])
        if layer.has_bias:
            av = av + v[:, None, None, I, :]
        out[:, n0:n0 + step] = (gu * av).sum((2, 3))
    return out


def _per_batch(factors, model, loss, data, reduction, eval_mode, progress, where, desc):
    """Yield (B, capture) for each batch: the tracked layers' inputs and output gradients of the
    summed training loss (true labels)."""
    from .. import batch as _batch
    from . import batches as _b
    from .factors import _ModelState
    from .layers import LayerCapture

    reduction = factors.reduction if reduction is None else reduction
    if reduction not in _b.REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {_b.REDUCTIONS}, got {reduction!r}")
    factors.attach(model)
    device = next(model.parameters()).device
    with _ModelState(model, eval_mode):
        for batch in progress_bar(data, progress, desc=desc, unit="batch"):
            x, y = _batch.split_batch(batch, where)
            B = _batch.batch_size(x, where)
            x = _batch.move_inputs(x, device)
            cap = LayerCapture(factors.layers, B)
            with torch.enable_grad(), cap:
                output = _batch.call_model(model, x)
                total = _b.summed_loss(loss, output, _batch.move_inputs(y, device), reduction, B)
                if total.requires_grad:
                    cap.backward(total)
            yield B, cap, device
            del cap


def score(factors, model: nn.Module, loss: Callable, query_preconditioned: GradsLike, data: Iterable, *,
          reduction: Optional[str] = None, contraction: str = "auto", query_rank: Optional[int] = None,
          eval_mode: bool = True, progress: bool = False) -> torch.Tensor:
    """scores [N_q, N_train] of preconditioned queries against every training sample of ``data``.

    Args:
        factors: the fitted :class:`KFACFactors` (its tracked layers and parameter layout).
        model, loss: as for fitting; ``loss`` with the true labels of ``data``.
        query_preconditioned: [N_q, P] rows (or per-parameter blocks / a dict) in the model's layout,
            e.g. ``factors.solve(query_grads, damping)``; entries outside the tracked layers are ignored.
        data: iterable of ``(x, y)`` batches, iterated once, in order (columns follow it).
        reduction: the loss's batch reduction (default: the one the factors were fitted with).
        contraction: "auto", "per_sample" or "tokens" (see the module docstring).
        query_rank: compress each query's layer block to this rank (truncated SVD) first; None
            for the exact contraction. A rank of at least min(O, I') is exact.
        eval_mode: score with the model in eval mode (restored afterwards).
    """
    where = "KFACFactors.score"
    if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1):
        raise ValueError(f"{where}: query_rank must be a positive int or None, got {query_rank!r}")
    if contraction not in CONTRACTIONS:
        raise ValueError(f"{where}: contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    _, blocks, Nq = _as_blocks(query_preconditioned, factors.layout, where)
    # Each layer's queries as views of the caller's blocks (weight columns, bias column): no copy of
    # the [N_q, P] preconditioned queries, which at scale are as large as the factors.
    queries: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    for t in factors.layers:
        for name in (t.weight_name, t.bias_name):
            if name and name not in blocks:
                raise ValueError(f"{where}: grads lack the tracked parameter {name!r}")
        qw = blocks[t.weight_name].reshape(Nq, t.out_features, t.in_features)
        queries[t.name] = (qw, blocks[t.bias_name].reshape(Nq, t.out_features) if t.has_bias else None)
    compressed = None
    if query_rank is not None:
        compressed = {t.name: _low_rank(layer_blocks(t, blocks, Nq, where), query_rank) for t in factors.layers}
        queries = {}
    columns = []
    for B, cap, device in _per_batch(factors, model, loss, data, reduction, eval_mode, progress, where,
                                     "K-FAC scores"):
        col = None
        for t in factors.layers:
            if not cap.called(t.name):
                continue
            if compressed is not None:
                us, v = compressed[t.name]
                part = _contract_low_rank(t, us.to(device), v.to(device), cap.inputs(t.name), cap.grads(t.name))
            else:
                qw, qb = queries[t.name]
                part = _contract_layer(t, qw.to(device), None if qb is None else qb.to(device), cap.inputs(t.name),
                                       cap.grads(t.name), contraction)
            col = part if col is None else col + part
        columns.append(col if col is not None else torch.zeros(Nq, B, device=device))
    if not columns:
        return torch.zeros(Nq, 0)
    return torch.cat(columns, 1)


def self_score(factors, model: nn.Module, loss: Callable, data: Iterable, damping: float = 0.0,
               method: str = "ekfac", *, relative_damping: bool = False, reduction: Optional[str] = None,
               dtype: Optional[torch.dtype] = None, eval_mode: bool = True, progress: bool = False) -> torch.Tensor:
    """[N_train]: ``G_nᵀ (F + λI)⁻¹ G_n`` over the tracked layers for every sample of ``data``
    (pyDVL's self-influence is its negative), per-sample gradients formed one chunk at a time.

    Args:
        damping, method, relative_damping: as for :meth:`KFACFactors.solve`.
        dtype: arithmetic dtype (default: float64 for a float64 model, else float32).
    """
    where = "KFACFactors.self_score"
    method = factors._check_method(method)
    lam = {t.name: factors.damping_for(t.name, damping, method, relative_damping) for t in factors.layers}
    out = []
    for B, cap, device in _per_batch(factors, model, loss, data, reduction, eval_mode, progress, where,
                                     "K-FAC self-scores"):
        dt = dtype or (torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32)
        total = torch.zeros(B, dtype=dt, device=device)
        for t in factors.layers:
            if not cap.called(t.name):
                continue
            a, g = cap.inputs(t.name).to(dt), cap.grads(t.name).to(dt)
            q_s = factors.Q_S[t.name].to(device=device, dtype=dt)
            q_a = factors.Q_A[t.name].to(device=device, dtype=dt)
            ev = factors.eigenvalues(t.name, method).to(device=device, dtype=dt) + lam[t.name]
            inv = torch.where(ev > 0, 1.0 / torch.where(ev > 0, ev, torch.ones_like(ev)), torch.zeros_like(ev))
            T, O, Ip = a.shape[1], t.out_features, t.in_dim
            step = max(1, _CHUNK_ELEMENTS // max(O * Ip + T * (O + Ip), 1))
            # Q_Sᵀ G_n Q_A either by rotating G_n (O²·I' + O·I'² per sample, after T·O·I' for G_n) or
            # by rotating the tokens first, (Q_Sᵀ g_t)(Q_Aᵀ ā_t)ᵀ summed over t (T·(O² + I'² + O·I')),
            # whichever costs fewer multiply-adds: with few tokens and wide layers the second is
            # many times cheaper.
            tokens_first = T * (O * O + Ip * Ip) < O * Ip * (O + Ip)
            I = t.in_features
            for n0 in range(0, B, step):
                ac, gc = a[n0:n0 + step], g[n0:n0 + step]
                if tokens_first:
                    ar = torch.matmul(ac, q_a[:I])
                    if t.has_bias:
                        ar = ar + q_a[I]  # the implied 1 of ā_t picks Q_A's last row
                    R = torch.bmm(torch.matmul(gc, q_s).transpose(1, 2), ar)
                else:
                    G = torch.bmm(gc.transpose(1, 2), ac)
                    if t.has_bias:
                        G = torch.cat([G, gc.sum(1).unsqueeze(2)], 2)
                    R = torch.matmul(torch.matmul(q_s.T, G), q_a)
                total[n0:n0 + step] += (R * R * inv).sum((1, 2))
        out.append(total)
    return torch.cat(out) if out else torch.zeros(0)
