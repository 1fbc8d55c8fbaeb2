"""Thick-restart block Lanczos against float64 eigh on small symmetric matrices: restarts, blocks,
invariant subspaces, repeated eigenvalues, and the memory budget of its basis."""
import re

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


class _Costed:
    """A symmetric operator on [D, P] blocks that records the rows of every call and advances a
    fake clock by its cost: ``per_row`` seconds a row, or ``per_call`` seconds a call."""

    def __init__(self, A, per_row=0.0, per_call=0.0):
        self.A, self.per_row, self.per_call = A, per_row, per_call
        self.now, self.rows = 0.0, []

    def __call__(self, R):
        self.rows.append(R.shape[0])
        self.now += self.per_call + self.per_row * R.shape[0]
        return R @ self.A

    def clock(self):
        return self.now


@pytest.fixture
def fresh_probe():
    from twicediff.torch.engines import probe
    probe.clear()
    yield probe
    probe.clear()


@pytest.mark.parametrize("cost, expected", [(dict(per_row=1.0), 1), (dict(per_call=1.0), 4),
                                            (dict(per_call=1.0, per_row=0.1), 4), (dict(per_call=0.3, per_row=1.0), 1)])
def test_auto_block_size_follows_the_operators_cost(monkeypatch, fresh_probe, cost, expected):
    from twicediff.torch.solvers import lanczos
    P, k = 60, 5
    A = _spectrum(P, 0.8 ** torch.arange(P, dtype=torch.float64) * 10, seed=5)
    op = _Costed(A, **cost)
    monkeypatch.setattr(lanczos, "_clock", op.clock)
    vals, V = lanczos.lanczos_top_eigenpairs(op, P, k, device=torch.device("cpu"), block_size="auto", tol=1e-10)
    torch.testing.assert_close(vals, _top(A, k), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(A @ V, V * vals, atol=1e-7 * float(vals.abs().max()), rtol=0)
    # The probe: 4 rows, 1, 1 timed, 4 timed; then the iteration's steps in blocks of the choice
    # (a step may add fewer rows when the space runs out, never more).
    assert op.rows[:4] == [4, 1, 1, 4]
    steps = op.rows[4:]
    assert max(steps) == expected and steps.count(expected) >= len(steps) - 1
    decided = twicediff.build_info()["probe"][f"lanczos_block: P={P} cpu"]
    assert decided["choice"] == str(expected) and decided["source"] == "probe"
    # A second solve of the same size reuses the decision: no probe calls.
    op.rows.clear()
    lanczos.lanczos_top_eigenpairs(op, P, k, device=torch.device("cpu"), block_size="auto", tol=1e-10)
    assert max(op.rows) == expected and op.rows[:4] != [4, 1, 1, 4]


def test_auto_block_size_override_fixed_rule_and_small_k(monkeypatch, fresh_probe):
    from twicediff.torch.solvers import lanczos
    P = 50
    A = _spectrum(P, 0.7 ** torch.arange(P, dtype=torch.float64), seed=6)
    cpu = torch.device("cpu")
    op = _Costed(A, per_row=1.0)  # a probe would choose 1
    monkeypatch.setattr(lanczos, "_clock", op.clock)
    fresh_probe.set_choice("lanczos_block", "4")
    lanczos.lanczos_top_eigenpairs(op, P, 4, device=cpu, block_size="auto", tol=1e-10)
    assert op.rows[0] == 4 and op.rows[:4] != [4, 1, 1, 4]
    fresh_probe.clear()
    op.rows.clear()
    monkeypatch.setenv("TWICEDIFF_PROBE", "0")  # the fixed rule: blocks of 4, nothing timed
    lanczos.lanczos_top_eigenpairs(op, P, 4, device=cpu, block_size="auto", tol=1e-10)
    assert op.rows[0] == 4 and op.rows[:4] != [4, 1, 1, 4] and twicediff.build_info()["probe"] == {}
    monkeypatch.delenv("TWICEDIFF_PROBE")
    op.rows.clear()
    _, V = lanczos.lanczos_top_eigenpairs(op, P, 3, device=cpu, block_size="auto", tol=1e-10)  # k < 4: single
    assert set(op.rows) == {1} and V.shape == (P, 3)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "fast", None])
def test_block_size_must_be_a_positive_int_or_auto(bad):
    A = _spectrum(10, torch.linspace(1, 2, 10, dtype=torch.float64), seed=7)
    with pytest.raises(ValueError, match=r"lanzcos_low_rank_hessian_approx: block_size must be an int >= 1 or "
                                         r"'auto', got " + re.escape(repr(bad))):
        lanzcos_low_rank_hessian_approx(lambda v: A @ v, (10, 10), rank_estimate=2, block_size=bad)
