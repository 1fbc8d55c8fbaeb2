"""Influence functions: closed forms for linear least squares, a slow float64 autograd reference for
an MLP, streamed against unstreamed, self-influence against the diagonal, errors, CPU against CUDA."""
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import twicediff
from twicediff import influence as inf
from twicediff.torch import per_sample
from twicediff.torch.per_sample import per_sample_grads, per_sample_mixed_products

F64 = torch.float64


def loader(x, y, batch_size, **kwargs):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kwargs)


def make_mlp(in_shape=(3,), hidden=5, out=2, seed=0, dtype=F64):
    torch.manual_seed(seed)
    n_in = int(torch.Size(in_shape).numel())
    layers = ([nn.Flatten()] if len(in_shape) > 1 else []) + [nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, out)]
    return nn.Sequential(*layers).to(dtype).eval()


# ---- slow references: one point at a time, plain autograd, float64 -----------------------------------


def point_loss(module, loss, x_i, y_i):
    return loss(torch.squeeze(module(x_i[None])), torch.squeeze(y_i[None]))


def reference_grads(module, loss, x, y):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(point_loss(module, loss, x[i], y[i]), params)])
                        for i in range(x.shape[0])])


def reference_mixed(module, loss, x, y, factors):
    """out[t, i] = ∇x_i (factors[t] · ∇θℓ(z_i)), one point and one factor at a time."""
    params = [p for p in module.parameters() if p.requires_grad]
    out = torch.zeros(factors.shape[0], *x.shape, dtype=x.dtype)
    for i in range(x.shape[0]):
        xi = x[i].clone().requires_grad_(True)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(point_loss(module, loss, xi, y[i]), params,
                                                                   create_graph=True)])
        for t in range(factors.shape[0]):
            out[t, i] = torch.autograd.grad(factors[t] @ g, xi, retain_graph=True)[0]
    return out


def reference_factors(module, loss, train_x, train_y, test_x, test_y, lam):
    """(H + λI)⁻¹ ∇θℓ(z_t) with H the explicit Hessian of the mean training loss."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    shapes = [params[n].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def mean_loss(flat):
        ps = {n: c.reshape(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}
        out = torch.func.functional_call(module, ps, (train_x,))
        return loss(torch.squeeze(out), torch.squeeze(train_y))

    flat = torch.cat([params[n].reshape(-1) for n in names])
    H = torch.autograd.functional.hessian(mean_loss, flat)
    G = reference_grads(module, loss, test_x, test_y)
    return torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), G.T).T


# ---- per-sample derivatives ---------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape,out,loss", [((3,), 2, nn.functional.cross_entropy),
                                               ((2, 3), 1, nn.functional.mse_loss),
                                               ((4,), 3, nn.functional.mse_loss)])
@pytest.mark.parametrize("B", [1, 2, 7])
def test_per_sample_grads_and_mixed_products_match_one_point_autograd(in_shape, out, loss, B):
    module = make_mlp(in_shape, out=out)
    model = twicediff.TorchTwiceDifferentiable(module, loss)
    x = torch.randn(B, *in_shape, dtype=F64)
    y = torch.randint(0, out, (B,)) if loss is nn.functional.cross_entropy else torch.randn(B, out, dtype=F64)
    blocks = per_sample_grads(model, x, y)
    assert [tuple(b.shape) for b in blocks] == [(B, *p.shape) for p in model.parameters]
    packed = torch.cat([b.reshape(B, -1) for b in blocks], 1)
    torch.testing.assert_close(packed, reference_grads(module, loss, x, y), rtol=1e-12, atol=1e-12)
    # the single-point loss is exactly grad's on a batch of one
    torch.testing.assert_close(packed[0], model.grad(x[:1], y[:1]), rtol=1e-13, atol=1e-14)
    v = torch.randn(3, model.num_params, dtype=F64)
    torch.testing.assert_close(per_sample_mixed_products(model, x, y, v), reference_mixed(module, loss, x, y, v),
                               rtol=1e-10, atol=1e-12)


class _NoVmapSquare(torch.autograd.Function):
    """x², as an old-style autograd.Function: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _NoVmapModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return _NoVmapSquare.apply(self.lin(x))


def test_per_sample_falls_back_to_autograd_when_torch_func_cannot_run_the_model(caplog):
    per_sample._logged_fallback.clear()  # the notice is logged once per process
    torch.manual_seed(1)
    module = _NoVmapModel().eval()
    model = twicediff.TorchTwiceDifferentiable(module, nn.functional.mse_loss)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    with caplog.at_level(logging.WARNING):
        packed = torch.cat([b.reshape(4, -1) for b in per_sample_grads(model, x, y)], 1)
    torch.testing.assert_close(packed, reference_grads(module, nn.functional.mse_loss, x, y))
    assert "per_sample_grads: torch.func cannot run this model" in caplog.text
    v = torch.randn(2, model.num_params, dtype=F64)
    # mixed products need the double backward; the old-style function is once differentiable in
    # x through its backward (2·x·grad), so the reference agrees
    with caplog.at_level(logging.WARNING):
        mixed = per_sample_mixed_products(model, x, y, v)
    assert "per_sample_mixed_products: torch.func cannot run this model" in caplog.text
    torch.testing.assert_close(mixed, reference_mixed(module, nn.functional.mse_loss, x, y, v))


def test_per_sample_handles_an_empty_block():
    model = twicediff.TorchTwiceDifferentiable(make_mlp(), nn.functional.cross_entropy)
    x, y = torch.zeros(0, 3, dtype=F64), torch.zeros(0, dtype=torch.long)
    assert per_sample_mixed_products(model, x, y, torch.ones(2, model.num_params, dtype=F64)).shape == (2, 0, 3)


# ---- linear least squares: closed forms -----------------------------------------------------------


class LeastSquares:
    """ℓ(z) = (w·x + b − y)² for nn.Linear(d, 1) and MSE, in closed form (θ = [w; b]):
    ∇θℓ = 2r[x; 1] with r = w·x + b − y, H = (2/N) Σ [x; 1][x; 1]ᵀ, and for a factor f = [f_w; f_b]
    ∇x(f·∇θℓ) = 2w(f_w·x + f_b) + 2r f_w."""

    def __init__(self, N=12, d=3, seed=2):
        torch.manual_seed(seed)
        self.module = nn.Linear(d, 1).double().eval()
        self.model = twicediff.TorchTwiceDifferentiable(self.module, nn.functional.mse_loss)
        self.x, self.y = torch.randn(N, d, dtype=F64), torch.randn(N, 1, dtype=F64)
        self.test_x, self.test_y = self.x[:4] + 0.1, self.y[:4]
        self.w, self.b = self.module.weight.detach()[0], self.module.bias.detach()[0]
        A = self.augmented(self.x)
        self.H = 2 * A.T @ A / N

    @staticmethod
    def augmented(x):
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1)

    def grads(self, x, y):
        return 2 * (x @ self.w + self.b - y[:, 0])[:, None] * self.augmented(x)

    def factors(self, lam, rank=None):
        """(H + λI)⁻¹ g_t, or with only the top ``rank`` eigenpairs of H + λI (what Arnoldi inverts)."""
        evals, evecs = torch.linalg.eigh(self.H + lam * torch.eye(self.H.shape[0], dtype=F64))
        if rank is not None:
            evals, evecs = evals[-rank:], evecs[:, -rank:]
        return self.grads(self.test_x, self.test_y) @ evecs @ torch.diag(1 / evals) @ evecs.T

    def up(self, factors):
        return factors @ self.grads(self.x, self.y).T

    def pert(self, factors):
        fw, fb = factors[:, :-1], factors[:, -1]
        r = self.x @ self.w + self.b - self.y[:, 0]
        return (2 * self.w[None, None, :] * (fw @ self.x.T + fb[:, None])[:, :, None]
                + 2 * r[None, :, None] * fw[:, None, :])


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_least_squares_up_and_perturbation_match_the_closed_form(lam):
    ls = LeastSquares()
    factors = ls.factors(lam)
    torch.testing.assert_close(reference_factors(ls.module, nn.functional.mse_loss, ls.x, ls.y, ls.test_x, ls.test_y,
                                                 lam), factors)
    data = loader(ls.x, ls.y, 5)
    torch.testing.assert_close(inf.compute_influences_up(ls.model, data, factors), ls.up(factors),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inf.compute_influences_pert(ls.model, data, factors), ls.pert(factors),
                               rtol=1e-12, atol=1e-12)


# Each inversion method with options that make it converge on the least-squares problem (P = 4), the
# loader batch it is run with, the factors it should reach, and a tolerance that fits it.
METHODS = {
    "direct": ({}, 5, None, 1e-10),
    "cg": ({"maxiter": 50, "rtol": 1e-13, "atol": 1e-14}, 5, None, 1e-8),
    # one batch: LiSSA's batch Hessians are then exact; contraction 1 − λ_min/scale per step
    "lissa": ({"maxiter": 20000, "scale": 10.0, "rtol": 1e-14}, 12, None, 1e-5),
    # the top 3 of the 4 eigenpairs of H + λI
    "arnoldi": ({"rank_estimate": 3}, 5, 3, 1e-6),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_compute_influences_matches_least_squares_closed_form_for_every_inversion_method(method):
    kwargs, batch, rank, tol = METHODS[method]
    lam = 0.5
    ls = LeastSquares()
    train, test = loader(ls.x, ls.y, batch), loader(ls.test_x, ls.test_y, 3)
    expected = ls.factors(lam, rank)
    factors, _ = inf.compute_influence_factors(ls.model, train, test, method, hessian_perturbation=lam, **kwargs)
    torch.testing.assert_close(factors, expected, rtol=tol, atol=tol)
    up = inf.compute_influences(ls.model, train, test_data=test, inversion_method=method,
                                      hessian_regularization=lam, **kwargs)
    torch.testing.assert_close(up, ls.up(expected), rtol=tol, atol=tol)
    pert = inf.compute_influences(ls.model, train, test_data=test, input_data=loader(ls.x, ls.y, 7),
                                        inversion_method=method, influence_type="perturbation",
                                        hessian_regularization=lam, progress=True, **kwargs)
    torch.testing.assert_close(pert, ls.pert(expected), rtol=tol, atol=tol)


def test_compute_influences_defaults_test_and_input_data_to_the_training_data():
    ls = LeastSquares()
    train = loader(ls.x, ls.y, 5)
    full = inf.compute_influences(ls.model, train, hessian_regularization=0.5)
    g = ls.grads(ls.x, ls.y)
    expected = g @ torch.linalg.solve(ls.H + 0.5 * torch.eye(4, dtype=F64), g.T)
    torch.testing.assert_close(full, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_self_influence_is_the_diagonal_of_the_full_matrix(method):
    kwargs = METHODS[method][0]
    module, model, x, y, _ = mlp_problem(N=11)
    train = loader(x, y, 11)  # one batch: a pass over the data is one product
    full = inf.compute_influences(model, train, inversion_method=method, hessian_regularization=1.0, **kwargs)
    assert full.shape == (11, 11)
    self_inf = inf.compute_self_influences(model, train, inversion_method=method, hessian_regularization=1.0,
                                                 progress=True, **kwargs)
    torch.testing.assert_close(self_inf, torch.diagonal(full), rtol=1e-8, atol=1e-10)


def test_self_influence_under_a_small_budget_solves_in_several_blocks():
    ls = LeastSquares()
    train = loader(ls.x, ls.y, 5)
    g = ls.grads(ls.x, ls.y)
    expected = torch.einsum("ip,ip->i", g, torch.linalg.solve(ls.H + 0.5 * torch.eye(4, dtype=F64), g.T).T)
    # 9 buffered rows of P = 4 (6·P·8 bytes a row): the 12 points are solved as 9 + 3, Direct's
    # Hessian assembly in the rest of the budget beside the 9 gradients held during the solve
    with twicediff.memory_budget(1800):
        self_inf = inf.compute_self_influences(ls.model, train, hessian_regularization=0.5)
    torch.testing.assert_close(self_inf, expected, rtol=1e-10, atol=1e-12)


# ---- MLP against the slow reference; streaming ------------------------------------------------------


def mlp_problem(N=13, in_shape=(3,), T=4, seed=3):
    module = make_mlp(in_shape, seed=seed)
    model = twicediff.TorchTwiceDifferentiable(module, nn.functional.cross_entropy)
    torch.manual_seed(seed + 1)
    x = torch.randn(N, *in_shape, dtype=F64)
    y = torch.randint(0, 2, (N,))
    factors = torch.randn(T, model.num_params, dtype=F64)
    return module, model, x, y, factors


@pytest.mark.parametrize("in_shape", [(3,), (2, 2)])
def test_mlp_up_and_perturbation_match_the_slow_reference(in_shape):
    module, model, x, y, factors = mlp_problem(in_shape=in_shape)
    data = loader(x, y, 4)  # batches 4, 4, 4, 1
    up = inf.compute_influences_up(model, data, factors)
    torch.testing.assert_close(up, factors @ reference_grads(module, nn.functional.cross_entropy, x, y).T,
                               rtol=1e-12, atol=1e-12)
    pert = inf.compute_influences_pert(model, data, factors, progress=True)
    assert pert.shape == (4, 13, *in_shape)
    torch.testing.assert_close(pert, reference_mixed(module, nn.functional.cross_entropy, x, y, factors),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 10, 12, 15, 21])  # LSTM, tied, RNN ×2 (one not batch-first), GRU, tied
@pytest.mark.parametrize("method", ["direct", "cg"])
def test_up_influences_of_recurrent_and_tied_weight_models_match_the_slow_reference(seed, method):
    """RNN / GRU / LSTM and tied-embedding models (tests/generated_models.py) in float64: the
    per-sample gradients (torch.func, or one point at a time where it cannot run the model) and the
    solve, against the explicit Hessian and one-point autograd."""
    from generated_models import float64_copy, generate_recurrent, reference_hessian

    case = generate_recurrent(seed)
    model, x, y = float64_copy(case)
    H = reference_hessian(case)
    lam = 1.0 + abs(float(torch.linalg.eigvalsh(H).min()))  # H + λI well conditioned
    G = reference_grads(model, case.loss, x, y)
    want = G @ torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=F64), G.T)
    td = twicediff.TorchTwiceDifferentiable(model, case.loss)
    options = {"rtol": 1e-12} if method == "cg" else {}
    got = twicediff.compute_influences(td, loader(x, y, x.shape[0]), inversion_method=method,
                                       hessian_regularization=lam, **options)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()), msg=case.description)


def test_streamed_and_unstreamed_up_influence_agree_and_chunks_follow_the_budget():
    module, model, x, y, factors = mlp_problem(N=40)
    data = loader(x, y, 16)
    whole = inf.compute_influences_up(model, data, factors)
    P = model.num_params
    # Budget below 40 rows of P: streamed; and so small that each loader batch is cut in chunks.
    with twicediff.memory_budget(8 * (3 * P + 6 * 20) * 3):
        streamed = inf.compute_influences_up(model, data, factors, progress=True)
        pert_small_chunks = inf.compute_influences_pert(model, data, factors)
    torch.testing.assert_close(streamed, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pert_small_chunks, inf.compute_influences_pert(model, data, factors),
                               rtol=1e-12, atol=1e-12)
    # non-contiguous factors and inputs
    factors_t = factors.T.contiguous().T
    x_t = x.T.contiguous().T
    assert not factors_t.is_contiguous() and not x_t.is_contiguous()
    with twicediff.memory_budget(8 * (3 * P + 6 * 20) * 3):
        torch.testing.assert_close(inf.compute_influences_up(model, [(x_t, y)], factors_t), whole,
                                   rtol=1e-12, atol=1e-12)
    # data whose size cannot be known up front streams as well: a list of batches and a generator
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    torch.testing.assert_close(inf.compute_influences_up(model, batches, factors), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inf.compute_influences_up(model, iter(batches), factors), whole,
                               rtol=1e-12, atol=1e-12)


def test_memory_budget_too_small_for_one_sample_raises_the_budget_error():
    _, model, x, y, factors = mlp_problem()
    with twicediff.memory_budget(64), pytest.raises(twicediff.MemoryBudgetError, match="set_memory_budget"):
        inf.compute_influences_up(model, loader(x, y, 4), factors)


# ---- errors -------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    module, model, x, y, factors = mlp_problem()
    data = loader(x, y, 4)
    empty = loader(x[:0], y[:0], 4)
    with pytest.raises(TypeError, match="model must be a TorchTwiceDifferentiable, got Sequential"):
        inf.compute_influences_up(module, data, factors)
    with pytest.raises(ValueError, match="input_data holds no points"):
        inf.compute_influences_up(model, empty, factors)
    with pytest.raises(ValueError, match="input_data holds no points"):
        inf.compute_influences_pert(model, [], factors)
    with pytest.raises(TypeError, match="input_data must be an iterable of \\(x, y\\) batches.*got Tensor"):
        inf.compute_influences_up(model, x, factors)
    with pytest.raises(TypeError, match="must yield \\(x, y\\) pairs; batch 0 is a list of length 1"):
        inf.compute_influences_up(model, [[x]], factors)
    with pytest.raises(ValueError, match=f"influence_factors must be \\[N_test, P\\] with P = {model.num_params}.*"
                                         f"got shape \\({model.num_params},\\)"):
        inf.compute_influences_up(model, data, factors[0])
    with pytest.raises(TypeError, match="influence_factors have dtype torch.float32"):
        inf.compute_influences_pert(model, data, factors.float())
    with pytest.raises(TypeError, match="influence_factors must be a torch.Tensor"):
        inf.compute_influences_up(model, data, factors.tolist())
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        inf.compute_influences_up(model, loader(x.float(), y, 4), factors)
    with pytest.raises(ValueError, match="influence_type must be one of \\['up', 'perturbation'\\], got 'down'"):
        inf.compute_influences(model, data, influence_type="down")
    with pytest.raises(ValueError, match="inversion_method must be one of .*got 'newton'"):
        inf.compute_influences(model, data, inversion_method="newton")


def test_data_the_model_cannot_take_names_the_argument_and_batch(caplog):
    module, model, x, y, factors = mlp_problem()
    good = loader(x, y, 4)
    bad_labels = loader(x, torch.full_like(y, 7), 4)
    wide = loader(torch.randn(x.shape[0], x.shape[1] + 1, dtype=F64), y, 4)
    per_sample._logged_fallback.clear()  # the notice is logged once per process
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        # the per-sample gradients' fallback fails too: its error, not a fallback notice
        with pytest.raises(IndexError, match="compute_influences: the model or loss failed on test_data "
                                             "batch 0 \\(x \\(4, 3\\) torch.float64, y \\(4,\\) torch.int64\\): "
                                             "Target 7 is out of bounds") as caught:
            inf.compute_influences(model, good, test_data=bad_labels)
    assert "one sample at a time" not in caplog.text
    assert caught.value.__cause__ is not None  # the model's own error stays attached
    for method in ("direct", "cg"):  # the training data: the Hessian's batches, native engine
        with pytest.raises(ValueError, match="training_data batch 0 .*cross-entropy class indices must lie in \\[0, 2\\)"):
            inf.compute_influences(model, bad_labels, test_data=good, inversion_method=method)
    with pytest.raises(RuntimeError, match="compute_influences_up: the model or loss failed on input_data batch 0"):
        with twicediff.memory_budget(4096):  # streamed
            inf.compute_influences_up(model, wide, factors)
    with pytest.raises(RuntimeError, match="compute_self_influences: the model or loss failed on training_data batch 0"):
        inf.compute_self_influences(model, wide)


def test_perturbation_needs_floating_inputs():
    module = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(2, 2)).double().eval()
    model = twicediff.TorchTwiceDifferentiable(module, nn.functional.cross_entropy)
    x, y = torch.randint(0, 5, (3, 1)), torch.randint(0, 2, (3,))
    factors = torch.ones(1, model.num_params, dtype=F64)
    assert inf.compute_influences_up(model, loader(x, y, 2), factors).shape == (1, 3)
    with pytest.raises(TypeError, match="x, which must be floating point; input_data yields x of dtype torch.int64"):
        inf.compute_influences_pert(model, loader(x, y, 2), factors)


# ---- devices ------------------------------------------------------------------------------------------


def test_device_results_match_the_cpu(device):
    module, model, x, y, factors = mlp_problem(N=9)
    up_cpu = inf.compute_influences_up(model, loader(x, y, 4), factors)
    pert_cpu = inf.compute_influences_pert(model, loader(x, y, 4), factors)
    on_device = twicediff.TorchTwiceDifferentiable(module.to(device), nn.functional.cross_entropy)
    with twicediff.memory_budget(8 * (3 * model.num_params + 6 * 20)):  # streamed, a point a chunk
        up = inf.compute_influences_up(on_device, loader(x, y, 4), factors)
    pert = inf.compute_influences_pert(on_device, loader(x, y, 4), factors.to(device))
    assert up.device.type == device.type and pert.device.type == device.type
    torch.testing.assert_close(up.cpu(), up_cpu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pert.cpu(), pert_cpu, rtol=1e-10, atol=1e-12)


def test_influence_api_is_exported_at_the_top_level():
    for name in inf.__all__:
        assert getattr(twicediff, name) is getattr(inf, name)
    assert inf.InfluenceType("up") is inf.InfluenceType.Up and inf.InfluenceType.Perturbation == "perturbation"
