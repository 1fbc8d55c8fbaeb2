"""Thick-restart block Lanczos with full reorthogonalisation in torch: the eigenpairs of a symmetric
operator largest in absolute value, in a preallocated float64 basis sized by the memory budget (the
eigen computation behind :mod:`twicediff.torch.solvers.low_rank`)."""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ... import distributed as _distributed
from ...distributed import collectives as _collectives
from ...errors import MemoryBudgetError
from ...memory import get_memory_budget, reserved
from ...progress import close_bar, progress_bar
from ..engines import probe as _probe

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_SIZE_CHOICES", "check_block_size", "lanczos_top_eigenpairs"]

#: What ``block_size="auto"`` chooses between: single-vector Lanczos, or blocks of 4.
BLOCK_SIZE_CHOICES = (1, 4)

#: ``"auto"`` takes blocks of 4 when a product with 4 rows costs less than this many products with
#: one. Block Lanczos needs fewer passes for its wider blocks; on the problems of
#: ``benchmarks/results/lanczos_cpu.md`` block 4 took 0.6–0.7 of block 1's passes, so it wins while
#: a 4-row pass costs under about 1.5–1.6 single ones.
BLOCK_PASS_RATIO = 1.6

# The clock of the block-size probe (tests replace it to give an operator a known cost).
_clock = time.perf_counter
_PROBE_KIND = "lanczos_block"


def check_block_size(block_size, where: str) -> Union[int, str]:
    """``block_size`` if it is an int ≥ 1 or ``"auto"``; else ValueError naming ``where``."""
    if block_size == "auto" and isinstance(block_size, str):
        return block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size must be an int >= 1 or 'auto', got {block_size!r}")
    return block_size

def _basis_rows(P: int, k: int, bs: int, krylov_dimension: Optional[int], device: torch.device) -> int:
    """How many basis vectors Lanczos keeps: ``krylov_dimension`` when given, else max(2k + 2·block,
    20), at most P. Everything it holds must fit the memory budget: the float64 basis
    ([rows + block, P]) and, beside it, four [block, P] blocks for a product (its float64 result,
    the block in the product dtype and the engine's own rows) and the orthonormalisation's two work
    blocks, or the k eigenvectors being copied out at the end. A default that does not fit shrinks
    (down to k + 2·block); an explicit one that does not fit, or a minimum that does not, raises
    MemoryBudgetError."""
    lowest = min(P, k + 2 * bs)
    wanted = krylov_dimension if krylov_dimension is not None else max(2 * k + 2 * bs, 20)
    wanted = min(P, max(int(wanted), lowest))
    row = 8 * P
    budget = get_memory_budget(device)
    extra = bs + max(4 * bs, k)  # the basis' extra block; the product's blocks or the eigenvectors
    fits = budget // row - extra
    if fits >= wanted:
        return wanted
    if krylov_dimension is None and fits >= lowest:
        return int(fits)
    need = (max(lowest, wanted if krylov_dimension is not None else lowest) + extra) * row
    raise MemoryBudgetError(
        f"lanczos: a float64 basis of {wanted if krylov_dimension is not None else lowest} vectors of P = {P} "
        f"and its work blocks need about {need:,} bytes but the memory budget is {budget:,} bytes; raise it "
        f"with twicediff.set_memory_budget(nbytes), or lower krylov_dimension or rank_estimate")


def _orthonormalize_block(Q: torch.Tensor, m: int, b: int, cap: int, gen: torch.Generator,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor, int]:
    r"""Make rows [m, m + b) of Q (a block R) orthonormal to rows [0, m) and to each other, in place.

    Two passes of classical Gram-Schmidt against Q[:m] in three or four reads of the basis (see
    the code), then a rank-revealing orthonormalisation inside the block
    (:func:`_qr_orthonormalize`): directions of singular value below 1e-10·``scale`` (``scale``
    the largest ‖A q‖ seen) are dropped and, while the space has room (``cap`` rows in all),
    replaced by random directions orthogonal to everything: an invariant subspace was found, and
    the Krylov space continues elsewhere.

    Returns:
        (C [m, b], B [g, b], g): R = Cᵀ Q[:m] + Bᵀ Q[m:m + g] with g ≤ b new orthonormal rows
        (of which the random ones have zero rows in B); C and B float64 on the CPU.
    """
    R = Q[m:m + b]
    basis = Q[:m]
    C = torch.zeros(m, b, dtype=torch.float64)
    if m:
        # Classical Gram-Schmidt twice: c = Q R^T, R -= c^T Q, then the second pass' projections
        # c2 = Q R^T; the second subtraction is skipped when c2 is already at rounding level (R is
        # then orthogonal to the basis as two full passes would leave it). Whole-basis GEMMs: a
        # column-chunked form that keeps a chunk in cache reads the basis once less, but torch's
        # CPU GEMM on such strided [b, chunk] slices takes a slow path for b > 1 that costs far
        # more than the read it saves.
        c = basis @ R.T
        R.addmm_(c.T, basis, alpha=-1.0)
        c2 = basis @ R.T
        C += c.cpu()
        if bool((c2.norm(dim=0) > 1e-13 * R.norm(dim=1)).any()):
            R.addmm_(c2.T, basis, alpha=-1.0)
            C += c2.cpu()
    B, g = _qr_orthonormalize(R, 1e-10 * scale, min(b, cap - m))
    want = min(b, cap - m)
    tries = 0
    while g < want and tries < 3:  # an invariant subspace was found: continue in a random direction
        tries += 1
        fill = Q[m + g:m + want]
        fill.copy_(torch.randn(fill.shape, generator=gen, dtype=torch.float64, device=Q.device))
        done = Q[:m + g]
        for _ in range(2):
            if m + g:
                fill.addmm_(fill @ done.T, done, alpha=-1.0)
        fill.div_(fill.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))
        _, got = _qr_orthonormalize(fill, 1e-8, want - g)
        g += got
        B = torch.cat([B, torch.zeros(got, b, dtype=torch.float64)])
    return C, B, g


def _qr_orthonormalize(R: torch.Tensor, threshold: float, cap: int) -> Tuple[torch.Tensor, int]:
    """Rows of R ([b, P]) → g ≤ cap orthonormal rows written to R[:g], and B [g, b] (CPU) with
    R_in = Bᵀ R[:g] up to the dropped directions, those of singular value ≤ ``threshold``
    (Householder QR of Rᵀ, then the SVD of its [b, b] triangle: rank-revealing and backward
    stable, so tiny but genuine residual directions are kept to rounding)."""
    b = R.shape[0]
    Qh, Rf = torch.linalg.qr(R.T)
    Us, sig, VsT = torch.linalg.svd(Rf.cpu())
    g = int(min(cap, int((sig > threshold).sum())))
    if g == 0:
        return torch.zeros(0, b, dtype=torch.float64), 0
    R[:g] = (Qh @ Us[:, :g].to(R.device)).T
    return sig[:g, None] * VsT[:g], g


def _start_block(P: int, bs: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """The first Lanczos block: the first ``bs`` of max(``bs``, 4) random rows orthonormalised (at
    most P), drawn alike for every block size up to 4, so that a block size chosen by the probe
    starts where the same block size given explicitly starts."""
    n = min(P, max(bs, max(BLOCK_SIZE_CHOICES)))
    S = torch.randn(n, P, generator=gen, dtype=torch.float64, device=device)
    _, _, g = _orthonormalize_block(S, 0, n, n, gen, 1.0)
    return S[:min(bs, g)]


def _timed(apply_rows: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor) -> Tuple[torch.Tensor, float]:
    t0 = _clock()
    W = apply_rows(V)
    if W.device.type == "cuda":
        torch.cuda.synchronize(W.device)
    return W, _clock() - t0


def _probe_block_size(apply_rows: Callable[[torch.Tensor], torch.Tensor], P: int, device: torch.device,
                      gen: torch.Generator, starts: Dict[str, list]) -> Dict[str, float]:
    """The timings behind ``block_size="auto"``, as seconds per pass over one vector's worth of
    work (the 4-vector pass divided by :data:`BLOCK_PASS_RATIO`, so the smaller wins).

    The start block S is 4 orthonormal random rows. A·S and A·S[:1] are each applied twice and the
    second calls timed: a first call of a shape pays for what an operator does once (a first pass
    that keeps batches, an engine probe per shape) and would bias the choice. Under a process group
    the timings are summed over the ranks, so every rank takes the same block size (their Lanczos
    steps are collectives and must match). ``starts`` gets, per block size, its start block and
    that block's product, so that the chosen one starts the iteration."""
    b = max(BLOCK_SIZE_CHOICES)
    S = _start_block(P, b, gen, device)
    apply_rows(S)
    apply_rows(S[:1])
    W1, t1 = _timed(apply_rows, S[:1])
    Wb, tb = _timed(apply_rows, S)
    times = torch.tensor([t1, tb], dtype=torch.float64)
    group = _distributed.current_group()
    if group is not None:
        _collectives.all_reduce_sum_(group, times)
    starts.update({"1": [S[:1].clone(), W1], str(b): [S, Wb]})
    return {"1": float(times[0]), str(b): float(times[1]) / BLOCK_PASS_RATIO}


def _auto_block_size(apply_rows: Callable[[torch.Tensor], torch.Tensor], P: int, k: int, device: torch.device,
                     gen: torch.Generator) -> Tuple[int, Optional[list]]:
    """``block_size="auto"``: (block size, [start block, its product] or None for a random start).

    1 where k < 4; 4 under ``TWICEDIFF_PROBE=0``; else the decision ``"lanczos_block"`` of
    :mod:`twicediff.torch.engines.probe` for P and the device (an override by
    ``probe.set_choice("lanczos_block", "1")``, this process' earlier decision or the disk cache,
    else :func:`_probe_block_size`), reported in ``build_info()["probe"]``. Under a process group the
    probe runs every time: a cache that one rank has and another has not would desynchronise them."""
    b = max(BLOCK_SIZE_CHOICES)
    if k < b:
        return 1, None
    if not _probe.enabled():
        return b, None
    names = [str(c) for c in BLOCK_SIZE_CHOICES]
    starts: Dict[str, list] = {}
    if _distributed.current_group() is not None:
        seconds = _probe_block_size(apply_rows, P, device, gen, starts)
        choice = min(names, key=seconds.get)
    else:
        choice = _probe.choose(_PROBE_KIND, f"P={P} {device.type}", names,
                               measure=lambda: _probe_block_size(apply_rows, P, device, gen, starts))
    logger.info("lanczos: block_size='auto' chose %s (%s)", choice,
                "timed now" if starts else "decided before in this process, on disk or by set_choice")
    return int(choice), starts.get(choice)


def lanczos_top_eigenpairs(apply_rows: Callable[[torch.Tensor], torch.Tensor], P: int, k: int, *,
                            device: torch.device, krylov_dimension: Optional[int] = None, tol: float = 1e-6,
                            max_iter: Optional[int] = None, block_size: Union[int, str] = 1, seed: int = 0,
                            progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The k eigenpairs of a symmetric A ([P, P], given by ``apply_rows`` on [D, P] row blocks)
    largest in absolute value, by thick-restart block Lanczos with full reorthogonalisation, in
    float64 on ``device``.

    One preallocated basis Q ([m + b, P], orthonormal rows; m from ``krylov_dimension`` and the
    memory budget, b = ``block_size``) holds everything of size P: each step applies A to the
    current block once (W = A Q_j, one call of ``apply_rows``), writes W into the rows after the
    basis and orthogonalises it there in place against the whole basis (two classical
    Gram-Schmidt passes in three or four reads of the basis). Their coefficients give the new columns of the small
    projected matrix T = Q A Qᵀ (kept on the CPU), so no product of A with the basis is stored:
    the Ritz pairs (θ_i, Qᵀ s_i) of T have residual norms ‖B s_i[last block]‖, B the coupling of
    the last block to the next. When the basis is full it is restarted in place from the Ritz
    vectors of the largest |θ| (a thick restart: T becomes their θ's, bordered by their coupling to
    the next block). Pair i has converged when ‖A y_i − θ_i y_i‖ ≤ tol·|θ_i| (ARPACK's rule).
    ``block_size="auto"`` picks 1 or 4 by timing the operator (:func:`_auto_block_size`).

    Returns:
        (θ [k] ascending, V [P, k]) float64, V a view of the basis' first k rows (its memory is the
        basis'); ``max_iter`` caps the calls of ``apply_rows`` (default 10·P); on reaching it the
        best pairs found are returned with a warning.
    """
    k = min(int(k), P)
    if k <= 0:
        return (torch.zeros(0, dtype=torch.float64, device=device),
                torch.zeros(P, 0, dtype=torch.float64, device=device))
    block_size = check_block_size(block_size, "lanczos_top_eigenpairs")
    gen = torch.Generator(device=device).manual_seed(seed)
    start = None
    if block_size == "auto":
        bs, start = _auto_block_size(apply_rows, P, k, device, gen)
    else:
        bs = max(1, min(block_size, k))
    m_max = _basis_rows(P, k, bs, krylov_dimension, device)
    tol = tol if tol > 0 else torch.finfo(torch.float64).eps
    max_iter = max(1, 10 * P if max_iter is None else int(max_iter))
    cap = min(P, m_max + bs)
    Q = torch.empty(m_max + bs, P, dtype=torch.float64, device=device)
    with reserved(Q.numel() * 8):  # the products are chunked against what the basis leaves
        return _lanczos_iterate(apply_rows, Q, P, k, bs, m_max, cap, gen, tol, max_iter, progress, device, start)


def _lanczos_iterate(apply_rows: Callable[[torch.Tensor], torch.Tensor], Q: torch.Tensor, P: int, k: int, bs: int,
                     m_max: int, cap: int, gen: torch.Generator, tol: float, max_iter: int, progress: bool,
                     device: torch.device, start: Optional[list] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The iteration of :func:`lanczos_top_eigenpairs` in the preallocated basis Q; ``start``: a list
    [orthonormal start block [bs, P], its product], emptied here so that neither outlives its use,
    else a random block is drawn."""
    T = torch.zeros(m_max + bs, m_max + bs, dtype=torch.float64)
    first = None
    if start is None:
        block = _start_block(P, bs, gen, device)
    else:
        first = start.pop()
        block = start.pop()
    cur = block.shape[0]
    Q[:cur].copy_(block)
    del block
    m = 0  # rows [0, m) are the basis before the current block, rows [m, m + cur) the current block
    bar = progress_bar(range(max_iter), progress, desc="lanczos", unit="pass", count_only=True)
    theta = S = sel = Q_final = None
    anorm = 0.0  # the largest ‖A q‖ seen: the scale below which a residual direction counts as zero
    converged = False
    chunk = max(1, (1 << 24) // (8 * m_max))  # columns per step of the in-place restart
    for _ in bar:
        blk = slice(m, m + cur)
        W = apply_rows(Q[blk]) if first is None else first
        first = None
        end = m + cur
        Q[end:end + cur].copy_(W)
        anorm = max(anorm, float(Q[end:end + cur].norm(dim=1).max()))
        del W
        C, B, g = _orthonormalize_block(Q, end, cur, P, gen, anorm)
        T[:end, m:end] = C
        T[m:end, :end] = C.T
        T[m:end, m:end] = 0.5 * (C[m:end] + C[m:end].T)
        theta, S = torch.linalg.eigh(T[:end, :end])
        order = torch.argsort(theta.abs(), descending=True)
        sel = order[:k]
        res = (B @ S[m:end, sel]).norm(dim=0) if g else torch.zeros(sel.numel(), dtype=torch.float64)
        ok = res <= tol * theta[sel].abs()
        if progress:
            bar.set_postfix(basis=end, converged=int(ok.sum()))
        if (bool(ok.all()) and sel.numel() == k) or g == 0:
            converged = True
            Q_final = Q[:end]
            break
        Q_final = Q[:end]
        T[end:end + g, m:end] = B
        T[m:end, end:end + g] = B.T
        if end + g > m_max:
            # Thick restart: the basis becomes the Ritz vectors of the largest |θ|, in place.
            keep = order[:max(k, min(end - g, (end + k) // 2))]
            Sk = S[:, keep].to(device)
            for c0 in range(0, P, chunk):
                cols = slice(c0, min(P, c0 + chunk))
                Q[:keep.numel(), cols] = Sk.T @ Q[:end, cols]
            n = keep.numel()
            Q[n:n + g] = Q[end:end + g].clone()
            coupling = B @ S[m:end, keep]
            T.zero_()
            T[:n, :n] = torch.diag(theta[keep])
            T[n:n + g, :n] = coupling
            T[:n, n:n + g] = coupling.T
            theta, S, sel = theta[keep], torch.eye(n, dtype=torch.float64), torch.arange(k)
            Q_final = Q[:n]
            m, cur = n, g
        else:
            m, cur = end, g
    close_bar(bar)
    if not converged:
        logger.warning("lanczos: the %d eigenpairs did not converge to tol=%g within max_iter=%d products; "
                       "returning the best approximation found; raise max_iter or krylov_dimension", k, tol, max_iter)
    sel = sel[torch.argsort(theta[sel])]
    # The eigenvectors Q_finalᵀ s_i, formed in place in the first k rows of the basis, column chunk
    # by column chunk (each chunk's product is taken before its rows are written).
    Sk = S[:, sel].to(device)
    n = sel.numel()
    for c0 in range(0, P, chunk):
        cols = slice(c0, min(P, c0 + chunk))
        Q[:n, cols] = Sk.T @ Q_final[:, cols]
    return theta[sel].to(device), Q[:n].T
