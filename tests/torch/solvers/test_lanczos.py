"""Thick-restart block Lanczos against float64 eigh on small symmetric matrices: restarts, blocks,
invariant subspaces, repeated eigenvalues, and the memory budget of its basis."""
import pytest
import torch

import twicediff
from twicediff.torch import lanzcos_low_rank_hessian_approx


def _top(A, k):
    ev = torch.linalg.eigvalsh(A)
    return ev[torch.argsort(ev.abs(), descending=True)[:k]].sort().values


def _check(A, k, **kw):
    P = A.shape[0]
    lr = lanzcos_low_rank_hessian_approx(lambda v: A @ v, (P, P), rank_estimate=k, tol=1e-10,
                                         torch_dtype=torch.float64, **kw)
    vals, V = lr.eigen_vals, lr.projections
    torch.testing.assert_close(vals, _top(A, k), rtol=1e-8, atol=1e-9 * A.abs().max())
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(A @ V, V * vals, atol=1e-7 * float(vals.abs().max()), rtol=0)


def _spectrum(P, values, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q @ torch.diag(values) @ Q.T


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("krylov_dimension", [None, 13])
@pytest.mark.parametrize("P", [7, 40, 150])
def test_lanczos_matches_eigh_with_restarts_and_blocks(P, krylov_dimension, block_size):
    # An indefinite spectrum whose top pairs (by |θ|) sit at both ends, with geometric decay so
    # that the wanted pairs are separated; krylov_dimension 13 forces thick restarts.
    g = torch.Generator().manual_seed(P)
    signs = torch.where(torch.rand(P, generator=g) < 0.4, -1.0, 1.0).double()
    values = signs * 0.8 ** torch.arange(P, dtype=torch.float64) * 10
    _check(_spectrum(P, values, seed=P + block_size), min(5, P - 1), krylov_dimension=krylov_dimension,
           block_size=block_size)


@pytest.mark.parametrize("block_size", [1, 3])
def test_lanczos_on_a_low_rank_matrix_continues_past_the_invariant_subspace(block_size):
    # rank 4: the Krylov space is exhausted after a few steps; the wanted pairs include zeros.
    g = torch.Generator().manual_seed(3)
    U = torch.randn(30, 4, generator=g, dtype=torch.float64)
    A = U @ U.T
    _check(A, 3, block_size=block_size)
    P = A.shape[0]
    lr = lanzcos_low_rank_hessian_approx(lambda v: A @ v, (P, P), rank_estimate=6, tol=1e-10,
                                         torch_dtype=torch.float64, block_size=block_size)
    torch.testing.assert_close(lr.eigen_vals[-4:], torch.linalg.eigvalsh(A)[-4:], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(lr.eigen_vals[:2], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-8)


def test_block_lanczos_finds_a_repeated_eigenvalue():
    values = torch.cat([torch.full((3,), 5.0), torch.tensor([-2.0]), torch.linspace(-1, 1, 36)]).double()
    A = _spectrum(40, values, seed=1)
    _check(A, 4, block_size=3, krylov_dimension=16)


def test_lanczos_whole_space():
    A = _spectrum(4, torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64), seed=2)
    _check(A, 4, block_size=2)


def test_lanczos_basis_respects_the_memory_budget():
    P = 1000
    A = _spectrum(P, 0.7 ** torch.arange(P, dtype=torch.float64), seed=4)
    # Basis rows of 8·P bytes: an explicit krylov_dimension of 40 needs about 44 rows.
    with twicediff.memory_budget(20 * 8 * P):
        with pytest.raises(twicediff.MemoryBudgetError, match="krylov_dimension"):
            lanzcos_low_rank_hessian_approx(lambda v: A @ v, (P, P), rank_estimate=3, krylov_dimension=40,
                                            torch_dtype=torch.float64)
        # The default shrinks to what fits and still converges.
        _check(A, 3)
    with twicediff.memory_budget(4 * 8 * P):
        with pytest.raises(twicediff.MemoryBudgetError, match="memory budget"):
            lanzcos_low_rank_hessian_approx(lambda v: A @ v, (P, P), rank_estimate=3, torch_dtype=torch.float64)
