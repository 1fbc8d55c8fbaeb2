"""Inverse-HVP solvers, the Hessian operator and the inversion registry, on tiny float64 problems
checked against closed forms, the explicit (Direct) solution and scipy."""
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import twicediff
from twicediff import InverseHvpResult, InversionMethod, InversionRegistry, solve_hvp
from twicediff.torch import (
    LowRankProductRepresentation,
    TorchTwiceDifferentiable,
    hessian_operator,
    lanzcos_low_rank_hessian_approx,
    model_hessian_low_rank,
    solve_arnoldi,
    solve_batch_cg,
    solve_cg,
    solve_linear,
    solve_lissa,
)


def _loader(x, y, batch_size, device="cpu"):
    return DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=batch_size)


def linear_regression(device="cpu", n=30, d=3, seed=0):
    """Linear(d, 1) under MSE: H = (2/N) Σ z zᵀ with z = [x, 1] (weight first, then bias)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3], dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double().to(device).eval()
    z = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = 2.0 / n * z.T @ z
    return TorchTwiceDifferentiable(model, nn.functional.mse_loss), _loader(x, y, 7, device), H.to(device)


def tanh_classifier(dtype=torch.float64, device="cpu", n=24, seed=0, batch_size=10):
    """MLP 3-4-3 (P = 31) under cross-entropy at a random init: an indefinite Hessian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype).to(device).eval()
    return TorchTwiceDifferentiable(model, nn.functional.cross_entropy), _loader(x, y, batch_size, device)


def rhs(n, P, dtype=torch.float64, device="cpu", seed=1):
    return torch.randn(n, P, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- closed forms and agreement with Direct ----------------------------------------------------


def test_direct_cg_arnoldi_match_closed_form_least_squares():
    model, loader, H = linear_regression()
    lam = 0.05
    b = rhs(5, 4)
    want = torch.linalg.solve(H + lam * torch.eye(4, dtype=torch.float64), b.T).T
    direct = solve_linear(model, loader, b, lam)
    assert direct.info["solver"] == "cholesky"
    torch.testing.assert_close(direct.info["hessian"], H)
    torch.testing.assert_close(direct.x, want)
    cg = solve_batch_cg(model, loader, b, lam, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(cg.x, want, rtol=1e-8, atol=1e-10)
    assert all(cg.info[f"batch_{i}"]["optimal"] for i in range(5))
    # rank P: the low-rank inverse is the exact inverse
    arn = solve_arnoldi(model, loader, b, lam, rank_estimate=4)
    torch.testing.assert_close(arn.x, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(arn.info["eigenvalues"], torch.linalg.eigvalsh(H) + lam)


@pytest.mark.parametrize("method, kwargs, tol", [
    ("cg", dict(rtol=1e-10, atol=0.0), 1e-7),
    ("cg", dict(rtol=1e-10, atol=0.0, block_krylov=False), 1e-7),
    ("cg", dict(rtol=1e-10, atol=0.0, preconditioner="jacobi"), 1e-7),
    ("cg", dict(rtol=1e-10, atol=0.0, preconditioner="nystrom", preconditioner_rank=8), 1e-7),
    ("lissa", dict(maxiter=300, scale=2.0, rtol=1e-11), 1e-7),  # one batch: deterministic steps
    ("arnoldi", dict(rank_estimate=31), 1e-7),
    ("arnoldi", dict(rank_estimate=31, block_size=4), 1e-7),
])
def test_every_method_agrees_with_direct_on_indefinite_hessian_made_definite(method, kwargs, tol):
    model, loader = tanh_classifier(batch_size=24 if method == "lissa" else 10)
    direct = solve_hvp(InversionMethod.Direct, model, loader, rhs(3, 31), hessian_perturbation=1.0)
    ev = torch.linalg.eigvalsh(direct.info["hessian"])
    assert ev[0] < 0 < ev[0] + 1.0  # H indefinite, H + λI positive definite
    got = solve_hvp(method, model, loader, rhs(3, 31), hessian_perturbation=1.0, **kwargs)
    assert got.x.shape == (3, 31) and got.x.dtype == torch.float64
    assert rel(got.x, direct.x) < tol


def test_direct_falls_back_to_general_solve_when_not_positive_definite():
    model, loader = tanh_classifier()
    b = rhs(2, 31)
    res = solve_linear(model, loader, b, 0.01)
    A = res.info["hessian"] + 0.01 * torch.eye(31, dtype=torch.float64)
    assert torch.linalg.eigvalsh(A)[0] < 0 and res.info["solver"] == "lu"
    torch.testing.assert_close(A @ res.x.T, b.T, rtol=1e-8, atol=1e-8)


def test_cholesky_then_lu_on_a_matrix_positive_definite_only_in_its_leading_block(monkeypatch):
    """[[M1, C], [Cᵀ, −M2]] with M1, M2 positive definite: Cholesky covers the leading blocks up
    to the first that is indefinite, LU the Schur complement of the rest."""
    from twicediff.torch.solvers import direct

    monkeypatch.setattr(direct, "CHOLESKY_BLOCK", 8)
    g = torch.Generator().manual_seed(0)
    M1 = torch.randn(24, 24, generator=g, dtype=torch.float64)
    M2 = torch.randn(7, 7, generator=g, dtype=torch.float64)
    C = 0.1 * torch.randn(24, 7, generator=g, dtype=torch.float64)
    A = torch.cat([torch.cat([M1 @ M1.T + torch.eye(24, dtype=torch.float64), C], 1),
                   torch.cat([C.T, -(M2 @ M2.T) - torch.eye(7, dtype=torch.float64)], 1)])
    B = torch.randn(31, 3, generator=g, dtype=torch.float64)
    X, k = direct.cholesky_then_lu(A, B)
    assert k == 24
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-10, atol=1e-12)
    X, k = direct.cholesky_then_lu(A[:24, :24], B[:24])  # positive definite: Cholesky alone
    assert k == 24
    torch.testing.assert_close(X, torch.linalg.solve(A[:24, :24], B[:24]), rtol=1e-10, atol=1e-12)
    singular = A.clone()
    singular[24:, :] = 0
    singular[:, 24:] = 0
    assert direct.cholesky_then_lu(singular, B)[0] is None  # S singular: the caller falls back


@pytest.mark.parametrize("negative", [0, 10])
def test_cholesky_then_lu_refines_float32_solutions(negative, monkeypatch):
    """One refinement step with a float64 residual: a float32 solve of a system with condition
    number 1e4 lands near the exact solution of the float32 matrix (a plain float32 LU solve is
    about 4e-5 off); with negative eigenvalues too (Cholesky of a leading block, LU of the rest)."""
    from twicediff.torch.solvers import direct

    monkeypatch.setattr(direct, "CHOLESKY_BLOCK", 64)
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, -4, 300 - negative, dtype=torch.float64)
    ev = torch.cat([ev, -torch.logspace(-2, -3, negative, dtype=torch.float64)])
    A = ((Q * ev) @ Q.T).float()
    B = torch.randn(300, 5, generator=g)
    X, k = direct.cholesky_then_lu(A, B)
    assert X.dtype == torch.float32 and (k == 300) == (negative == 0)
    exact = torch.linalg.solve(A.double(), B.double())
    assert rel(X.double(), exact) < 1e-6
    assert rel(torch.linalg.solve(A, B).double(), exact) > 1e-5  # what refinement removes


def test_direct_reports_the_positive_definite_block(monkeypatch):
    from twicediff.torch.solvers import direct

    monkeypatch.setattr(direct, "CHOLESKY_BLOCK", 4)
    model, loader = tanh_classifier()
    b = rhs(2, 31)
    res = solve_linear(model, loader, b, 0.01)
    A = res.info["hessian"] + 0.01 * torch.eye(31, dtype=torch.float64)
    k = res.info["positive_definite_block"]
    assert 0 <= k < 31 and k % 4 == 0
    assert res.info["solver"] == ("lu" if k == 0 else "cholesky+lu")
    torch.testing.assert_close(A @ res.x.T, b.T, rtol=1e-8, atol=1e-8)
    pd = solve_linear(model, loader, b, 5.0)
    assert pd.info["solver"] == "cholesky" and pd.info["positive_definite_block"] == 31


def test_float32_model_matches_float64_direct():
    m32, l32 = tanh_classifier(torch.float32, batch_size=24)
    m64, l64 = tanh_classifier(torch.float64, batch_size=24)
    b = rhs(3, 31)
    want = solve_linear(m64, l64, b, 1.0).x
    cg = solve_batch_cg(m32, l32, b.float(), 1.0, rtol=1e-6, atol=0.0)
    assert cg.x.dtype == torch.float32 and rel(cg.x.double(), want) < 1e-5
    arn = solve_arnoldi(m32, l32, b.float(), 1.0, rank_estimate=31)
    assert arn.x.dtype == torch.float32 and rel(arn.x.double(), want) < 1e-4


# ---- CG behaviour ------------------------------------------------------------------------------


@pytest.mark.parametrize("k, P, rank", [(64, 300, 64), (9, 40, 5), (7, 4, 4), (1, 6, 1), (5, 1, 1), (4, 6, 0)],
                         ids=["tall", "rank_deficient", "more_rows_than_P", "one_row", "P1", "zero"])
def test_orthonormal_rows_basis_of_the_row_space(k, P, rank):
    """Block CG's search block: orthonormal rows spanning W's row space, with the numerically
    dependent directions dropped (the count is the rank an SVD of W gives)."""
    from twicediff.torch.solvers.block_cg import orthonormal_rows as _orthonormal_rows

    g = torch.Generator().manual_seed(k + P)
    W = torch.randn(k, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, P, generator=g, dtype=torch.float64)
    W = W * torch.logspace(0, -6, P, dtype=torch.float64)  # graded columns: an ill-conditioned block
    Q = _orthonormal_rows(W)
    assert Q.shape == (rank, P) and Q.dtype == torch.float64
    torch.testing.assert_close(Q @ Q.T, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-13)
    if rank:
        torch.testing.assert_close((W @ Q.T) @ Q, W, rtol=0, atol=1e-12 * float(W.abs().max()))


@pytest.mark.parametrize("block_krylov", [True, False])
def test_cg_stops_each_column_on_its_own(block_krylov):
    model, loader, H = linear_regression()
    lam = 0.01
    evals, evecs = torch.linalg.eigh(H + lam * torch.eye(4, dtype=torch.float64))
    b = torch.stack([evecs[:, 0], torch.zeros(4, dtype=torch.float64), rhs(1, 4)[0]])
    res = solve_batch_cg(model, loader, b, lam, x0=torch.zeros(4, dtype=torch.float64), rtol=1e-10, atol=1e-12,
                         block_krylov=block_krylov)
    niter = [res.info[f"batch_{i}"]["niter"] for i in range(3)]
    assert niter[0] == 1 and niter[1] == 0 and niter[2] > 1  # an eigenvector takes one step; 0 takes none
    # one pass per iteration of the longest column, no pass for the zero start; block CG checks the
    # rule on the true residual with one more pass
    assert res.info["num_passes"] == max(niter) + (1 if block_krylov else 0)
    for i in range(3):
        assert res.info[f"batch_{i}"]["optimal"]
        r = (H + lam * torch.eye(4, dtype=torch.float64)) @ res.x[i] - b[i]
        assert float(r.norm()) <= max(1e-10 * float(b[i].norm()), 1e-12) * 10


@pytest.mark.parametrize("block_krylov", [True, False])
def test_cg_honours_x0_and_maxiter(block_krylov):
    model, loader, H = linear_regression()
    b = rhs(2, 4)
    exact = torch.linalg.solve(H + 0.1 * torch.eye(4, dtype=torch.float64), b.T).T
    res = solve_batch_cg(model, loader, b, 0.1, x0=exact, rtol=1e-8, atol=1e-10, block_krylov=block_krylov)
    assert [res.info[f"batch_{i}"]["niter"] for i in range(2)] == [0, 0]
    torch.testing.assert_close(res.x, exact)
    capped = solve_batch_cg(model, loader, b, 0.1, maxiter=1, rtol=1e-14, atol=0.0, block_krylov=block_krylov)
    assert all(capped.info[f"batch_{i}"]["niter"] == 1 and not capped.info[f"batch_{i}"]["optimal"]
               for i in range(2))


def test_block_cg_converges_on_indefinite_system_and_dependent_rows():
    """H + λI indefinite but non-singular; b with a repeated row, a zero row and a row that is a
    combination of two others: the shared block loses rank and must drop directions, not break."""
    model, loader = tanh_classifier()
    lam = 0.05
    b = rhs(4, 31)
    b = torch.cat([b, b[:1], torch.zeros(1, 31, dtype=torch.float64), (b[1] - 2 * b[2])[None]])
    direct = solve_linear(model, loader, b, lam)
    A = direct.info["hessian"] + lam * torch.eye(31, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(A)
    assert ev[0] < 0 < ev[-1] and float(ev.abs().min()) > 1e-4  # indefinite, non-singular
    res = solve_batch_cg(model, loader, b, lam, rtol=1e-10, atol=1e-12, x0=torch.zeros(31, dtype=torch.float64))
    for i in range(b.shape[0]):
        info = res.info[f"batch_{i}"]
        assert info["optimal"]
        r = A @ res.x[i] - b[i]
        assert float(r.norm()) <= max(1e-10 * float(b[i].norm()), 1e-12) * 10
        assert info["gamma"] == pytest.approx(float(r.norm()) ** 2, rel=1e-3, abs=1e-24)  # the true residual
    assert rel(res.x[:4], direct.x[:4]) < 1e-8
    torch.testing.assert_close(res.x[4], res.x[0])


def test_block_cg_more_right_hand_sides_than_parameters_and_groups_under_the_budget():
    """N = 50 > P = 31: the search block is capped at rank P, one or two steps solve everything; a
    budget for about two rows at a time splits the rows into groups solved as blocks of their own."""
    model, loader = tanh_classifier()
    b = rhs(50, 31)
    direct = solve_linear(model, loader, b, 1.0)
    res = solve_batch_cg(model, loader, b, 1.0, rtol=1e-10, atol=0.0)
    assert all(res.info[f"batch_{i}"]["optimal"] for i in range(50))
    assert max(res.info[f"batch_{i}"]["niter"] for i in range(50)) <= 3
    assert rel(res.x, direct.x) < 1e-8
    # The budget bounds everything: the result x, the blocks of a group of two rows (7·2 − 2 rows of
    # P float64), the batches the operator keeps (x and y of 24 points) and one direction of the
    # products, whose size the operator tells.
    per_direction = hessian_operator(model, loader, dtype=torch.float64).bytes_per_direction()
    with twicediff.memory_budget(b.numel() * 8 + (7 * 2 - 2) * 31 * 8 + 24 * (3 + 1) * 8 + per_direction):
        grouped = solve_batch_cg(model, loader, b, 1.0, rtol=1e-10, atol=0.0)
    assert all(grouped.info[f"batch_{i}"]["optimal"] for i in range(50))
    assert rel(grouped.x, direct.x) < 1e-8
    assert grouped.info["num_passes"] > res.info["num_passes"]  # 25 blocks of 2 instead of one of 50


def test_cg_products_in_float64_meet_the_rule_for_a_float32_model():
    m32, l32 = tanh_classifier(torch.float32, batch_size=24)
    m64, l64 = tanh_classifier(torch.float64, batch_size=24)
    b = rhs(3, 31)
    lam = 0.05
    A = solve_linear(m64, l64, b, lam).info["hessian"] + lam * torch.eye(31, dtype=torch.float64)
    res = solve_batch_cg(m32, l32, b.float(), lam, rtol=1e-9, atol=0.0)  # product_dtype float64 (default)
    assert res.x.dtype == torch.float32 and all(res.info[f"batch_{i}"]["optimal"] for i in range(3))
    assert next(m32.model.parameters()).dtype == torch.float32  # the model itself is not converted
    # the float64 solution meets the rule; what is returned is it rounded to float32
    assert ((A @ res.x.double().T - b.T).norm(dim=0) / b.norm(dim=1)).max() < 1e-6
    in_f32 = solve_batch_cg(m32, l32, b.float(), lam, rtol=1e-9, atol=0.0, product_dtype=None)
    assert not all(in_f32.info[f"batch_{i}"]["optimal"] for i in range(3))  # float32 products cannot resolve 1e-9
    assert rel(in_f32.x.double(), res.x.double()) < 1e-3


def test_solve_cg_single_system_with_callable():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    res = solve_cg(lambda v: A @ v, b, rtol=1e-12, atol=0.0)
    assert set(res.info) == {"niter", "optimal", "gamma"} and res.info["optimal"]
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)


def test_nystrom_preconditioner_cuts_iterations_on_ill_conditioned_problem():
    model, loader, H = linear_regression(n=40)
    b = rhs(2, 4)
    plain = solve_batch_cg(model, loader, b, 1e-4, rtol=1e-10, atol=0.0, block_krylov=False)
    nys = solve_batch_cg(model, loader, b, 1e-4, rtol=1e-10, atol=0.0, preconditioner="nystrom",
                         preconditioner_rank=3)
    assert nys.info["preconditioner"] == "nystrom"
    torch.testing.assert_close(nys.x, plain.x, rtol=1e-7, atol=1e-9)
    assert nys.info["batch_0"]["niter"] < plain.info["batch_0"]["niter"]


# ---- LiSSA -------------------------------------------------------------------------------------


def test_lissa_honours_h0_and_reports_residuals():
    model, _, H = linear_regression()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(30, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3], dtype=torch.float64)
    ys = torch.randn(30, generator=g, dtype=torch.float64)
    one_batch = _loader(xs, ys, 30)  # deterministic H per step
    lam, scale = 0.1, 50.0
    b = rhs(2, 4)
    exact = torch.linalg.solve(H + lam * torch.eye(4, dtype=torch.float64), b.T).T
    res = solve_lissa(model, one_batch, b, lam, h0=scale * exact, scale=scale, rtol=1e-6)
    assert res.info["niter"] == [1, 1]
    assert res.info["max_perc_residual"] < 1e-4 and "mean_perc_residual" in res.info
    torch.testing.assert_close(res.x, exact)


def test_lissa_raises_when_the_iterate_diverges():
    model, loader, _ = linear_regression()
    with pytest.raises(RuntimeError, match="increase scale"):
        solve_lissa(model, loader, rhs(1, 4), 0.0, scale=0.01, maxiter=2000)


# ---- low rank ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 3])
def test_lanczos_matches_arpack_and_explicit_eigenvalues(block_size):
    model, loader = tanh_classifier(batch_size=24)
    H = solve_linear(model, loader, rhs(1, 31), 0.1).info["hessian"]
    ev = torch.linalg.eigvalsh(H + 0.1 * torch.eye(31, dtype=torch.float64))
    top = ev[torch.argsort(ev.abs(), descending=True)[:3]].sort().values
    lz = model_hessian_low_rank(model, loader, 0.1, rank_estimate=3, tol=1e-9, block_size=block_size)
    ar = model_hessian_low_rank(model, loader, 0.1, rank_estimate=3, tol=1e-9, eigen_solver="arpack")
    torch.testing.assert_close(lz.eigen_vals, top, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ar.eigen_vals, top, rtol=1e-8, atol=1e-10)
    A = H + 0.1 * torch.eye(31, dtype=torch.float64)
    V = lz.projections
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(A @ V, V * lz.eigen_vals, atol=1e-7, rtol=0)


def test_arnoldi_reuses_low_rank_representation_and_callable_approx():
    model, loader, H = linear_regression()
    lr = lanzcos_low_rank_hessian_approx(lambda v: H @ v, (4, 4), 0.2, rank_estimate=2,
                                         torch_dtype=torch.float64)
    assert isinstance(lr, LowRankProductRepresentation) and lr.projections.shape == (4, 2)
    b = rhs(3, 4)
    again = solve_arnoldi(model, [], b, low_rank_representation=lr.to("cpu"))
    V, d = lr.projections, lr.eigen_vals
    torch.testing.assert_close(again.x, b @ V @ torch.diag(1 / d) @ V.T)
    assert again.info["eigenvalues"] is lr.eigen_vals
    ev = torch.linalg.eigvalsh(H + 0.2 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(lr.eigen_vals, ev[-2:], rtol=1e-8, atol=1e-10)


# ---- the operator and scipy --------------------------------------------------------------------


def test_operator_matmat_and_scipy_cg_eigsh_agree_with_native():
    model, loader = tanh_classifier(batch_size=12)
    op = hessian_operator(model, loader, hessian_perturbation=1.0)
    H = model.mean_hessian(loader)  # (Direct with λ = 0 would refuse: cross-entropy makes H singular)
    A = H + torch.eye(31, dtype=torch.float64)
    X = rhs(5, 31).T
    torch.testing.assert_close(op.matmat(X), A @ X)
    torch.testing.assert_close(op.matvec(X[:, 0]), A @ X[:, 0])
    assert op.num_points == 24
    sp = op.to_scipy()
    assert sp.shape == (31, 31)
    np.testing.assert_allclose(sp.rmatvec(X[:, 0].numpy()), (A @ X[:, 0]).numpy(), rtol=1e-10)
    np.testing.assert_allclose(sp.matmat(X.numpy()), (A @ X).numpy(), rtol=1e-10)
    b = rhs(1, 31)
    native = solve_batch_cg(model, loader, b, 1.0, rtol=1e-9, atol=0.0)
    xs, status = sla.cg(sp, b[0].numpy(), rtol=1e-9, atol=0.0)
    assert status == 0
    np.testing.assert_allclose(native.x[0].numpy(), xs, rtol=1e-6, atol=1e-8)
    vals = sla.eigsh(sp, k=2, tol=1e-9, return_eigenvectors=False)
    lz = model_hessian_low_rank(model, loader, 1.0, rank_estimate=2, tol=1e-9)
    np.testing.assert_allclose(np.sort(vals), lz.eigen_vals.numpy(), rtol=1e-8)


def test_operator_keeps_small_data_and_rereads_large_data():
    model, loader = tanh_classifier(batch_size=7)
    V = rhs(3, 31)
    want = hessian_operator(model, loader).apply_rows(V)
    # A one-shot iterable (a generator) serves every pass once its batches are kept.
    op = hessian_operator(model, (batch for batch in loader))
    assert not op.cached
    first = op.apply_rows(V)
    assert op.cached and op.num_passes == 1
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(op.apply_rows(V), want, rtol=0, atol=0)
    # Batches over a quarter of the budget are read from the loader on every pass, same results
    # (to rounding: the small budget also splits the directions into chunks).
    with twicediff.memory_budget(3000):  # a quarter of it is under the 768 bytes of x and y
        op = hessian_operator(model, loader)
        torch.testing.assert_close(op.apply_rows(V), want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(op.apply_rows(V), want, rtol=1e-12, atol=1e-14)
    assert not op.cached and op.num_passes == 2


def test_operator_caches_prepared_batches_in_the_product_dtype(monkeypatch):
    # One engine for both operators: auto's timed choice may differ between them, and two engines
    # agree to rounding, not to the bit.
    monkeypatch.setenv("TWICEDIFF_ENGINE", "native")
    model, loader = tanh_classifier(dtype=torch.float32)
    op = hessian_operator(model, loader, dtype=torch.float64)
    V = rhs(2, 31)
    got = op.apply_rows(V)
    assert op.cached and [n for n, _ in op._products] == [10, 10, 4]
    assert all(p.nbytes == n * (3 * 8 + 8) for n, p in op._products)  # float64 rows of 3, int64 targets
    want = hessian_operator(model.with_dtype(torch.float64), loader).apply_rows(V)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(op.apply_rows(V), want, rtol=0, atol=0)


class _CountingTanh(nn.Module):
    calls = 0

    def forward(self, x):
        _CountingTanh.calls += 1
        return torch.tanh(x)


def test_operator_runs_a_frozen_prefix_once_per_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _CountingTanh(), nn.Linear(4, 3)).double().eval()
    model[0].requires_grad_(False)
    td = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    assert td.native_unsupported_reason(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])) == ""
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randint(0, 3, (24,))
    op = hessian_operator(td, _loader(x, y, 10))
    V = rhs(3, td.num_params)
    _CountingTanh.calls = 0
    first = op.apply_rows(V)
    assert _CountingTanh.calls == 3
    torch.testing.assert_close(op.apply_rows(V), first, rtol=0, atol=0)
    assert _CountingTanh.calls == 3



def test_gauss_newton_operator_equals_hessian_for_linear_model():
    model, loader, H = linear_regression()
    V = rhs(3, 4)
    gn = hessian_operator(model, loader, mode="gauss_newton").apply_rows(V)
    torch.testing.assert_close(gn, V @ H)


def test_solvers_on_device(device):
    model, loader, H = linear_regression(device=device)
    b = rhs(2, 4, device=device)
    want = torch.linalg.solve(H + 0.1 * torch.eye(4, dtype=torch.float64, device=device), b.T).T
    for method, kw in [("direct", {}), ("cg", dict(rtol=1e-10, atol=0.0)), ("arnoldi", dict(rank_estimate=4))]:
        got = solve_hvp(method, model, loader, b, hessian_perturbation=0.1, **kw)
        assert got.x.device.type == device.type
        torch.testing.assert_close(got.x, want, rtol=1e-7, atol=1e-9)


# ---- progress, registry, errors ----------------------------------------------------------------


def test_progress_bars(capsys):
    model, loader, _ = linear_regression()
    solve_batch_cg(model, loader, rhs(2, 4), 0.1, progress=True)
    solve_lissa(model, loader, rhs(2, 4), 0.1, maxiter=3, progress=True, on_failure="warn")
    model_hessian_low_rank(model, loader, 0.1, rank_estimate=2, progress=True)
    err = capsys.readouterr().err
    assert "cg" in err and "lissa" in err and "lanczos" in err


def test_registry():
    class Other(TorchTwiceDifferentiable):
        pass

    with pytest.raises(ValueError, match="no function registered"):
        InversionRegistry.get(Other, InversionMethod.Cg)
    assert InversionRegistry.get(TorchTwiceDifferentiable, InversionMethod.Cg) is solve_batch_cg
    with pytest.raises(TypeError, match="InversionMethod"):
        InversionRegistry.register(Other, "cg")
    try:
        @InversionRegistry.register(Other, InversionMethod.Cg)
        def first(model, data, b, hessian_perturbation, **kw):
            return InverseHvpResult(x=b, info={"which": 1})

        with pytest.warns(UserWarning, match="already registered"):
            @InversionRegistry.register(Other, InversionMethod.Cg)
            def replaced(model, data, b, hessian_perturbation, **kw):
                return InverseHvpResult(x=b, info={"which": 0})

        @InversionRegistry.register(Other, InversionMethod.Cg, overwrite=True)
        def second(model, data, b, hessian_perturbation, **kw):
            return InverseHvpResult(x=b * 2, info={"which": 2, "lam": hessian_perturbation, **kw})

        model, loader, _ = linear_regression()
        other = Other(model.model, model.loss)
        res = solve_hvp("cg", other, loader, torch.ones(1, 4, dtype=torch.float64), hessian_perturbation=0.5, k=1)
        assert res.info == {"which": 2, "lam": 0.5, "k": 1}
    finally:
        InversionRegistry.registry.pop((Other, InversionMethod.Cg), None)
    with pytest.raises(ValueError, match="inversion_method must be one of"):
        solve_hvp("newton", model, loader, torch.ones(1, 4, dtype=torch.float64))
    assert twicediff.solve_hvp is solve_hvp


def test_errors_name_argument_expected_and_given():
    model, loader, _ = linear_regression()
    with pytest.raises(ValueError, match=r"b must be \[N, P\].*P = 4.*\(2, 5\)"):
        solve_batch_cg(model, loader, torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="b has dtype torch.float32"):
        solve_lissa(model, loader, torch.zeros(2, 4))
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)),
                       batch_size=4)
    for method in ("direct", "cg", "lissa", "arnoldi"):
        with pytest.raises(ValueError, match="training_data must not be empty"):
            solve_hvp(method, model, empty, torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        solve_batch_cg(model, loader, rhs(1, 4), preconditioner="ilu")
    with pytest.raises(ValueError, match="x0 must be"):
        solve_batch_cg(model, loader, rhs(2, 4), x0=rhs(3, 4))
    with pytest.raises(ValueError, match=r"rank_estimate must be an int in \[1, P = 4\]"):
        solve_arnoldi(model, loader, rhs(1, 4), rank_estimate=5)
    with pytest.raises(ValueError, match="eigen_solver must be one of"):
        solve_arnoldi(model, loader, rhs(1, 4), eigen_solver="qr")
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        solve_lissa(model, loader, rhs(1, 4), scale=0.0)
    with pytest.raises(ValueError, match="hessian_perturbation must be a finite number >= 0"):
        solve_linear(model, loader, rhs(1, 4), -1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        hessian_operator(model, loader, mode="fisher")
    with pytest.raises(ValueError, match=r"projections must be \[P, r\] with P = 4"):
        solve_arnoldi(model, loader, rhs(1, 4), low_rank_representation=LowRankProductRepresentation(
            torch.ones(2, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="must be \\[r\\] and projections \\[P, r\\]"):
        LowRankProductRepresentation(torch.ones(2), torch.zeros(5, 3))


@pytest.mark.parametrize("block_krylov", [True, False])
def test_cg_says_when_rows_miss_the_stopping_rule(block_krylov, caplog):
    """pyDVL's CG returns such rows with optimal=False in info, which compute_influences never
    shows: a warning now names how many missed and their largest relative residual."""
    import logging

    model, data, _ = linear_regression()
    b = rhs(3, 4)
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        result = solve_hvp("cg", model, data, b, hessian_perturbation=0.1, maxiter=1, block_krylov=block_krylov)
    missed = sum(not result.info[f"batch_{i}"]["optimal"] for i in range(3))
    assert missed > 0 and f"{missed} of 3 system(s) did not meet the stopping rule in maxiter=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        result = solve_hvp("cg", model, data, b, hessian_perturbation=0.1, block_krylov=block_krylov)
    assert all(result.info[f"batch_{i}"]["optimal"] for i in range(3))
    assert "stopping rule" not in caplog.text


@pytest.mark.parametrize("method", ["direct", "cg", "cg-rows", "lissa", "arnoldi", "kfac", "ekfac"])
def test_no_right_hand_side_gives_an_empty_solution(method):
    """b [0, P] (an empty set of test points after filtering): CG failed in torch.cat and K-FAC with
    an IndexError from its layout code; every method now returns x [0, P]."""
    model, data = tanh_classifier()
    options = {"cg-rows": {"block_krylov": False}, "arnoldi": {"rank_estimate": 3}}.get(method, {})
    result = solve_hvp(method.split("-")[0], model, data, torch.zeros(0, model.num_params, dtype=torch.float64),
                       hessian_perturbation=0.5, **options)
    assert result.x.shape == (0, model.num_params) and result.x.dtype == torch.float64
