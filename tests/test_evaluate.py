"""twicediff.evaluate: the LDS on problems whose answer is known, its sign convention, the
retraining cache, and clear errors for bad arguments."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from twicediff import TorchTwiceDifferentiable
from twicediff.app.cli import main
from twicediff.evaluate import (METHODS, QUICK_METHODS, Problem, available_methods, bootstrap_ci, digits_problem, evaluate, lds,
                                describe, margin, point_gradients, predict_subsets, retrain_measurements, sample_subsets,
                                spearman_per_column)


# ---- problems (module level: worker processes import them) -------------------------------------
class RidgeTrainer:
    """Ridge regression solved exactly: argmin mean ½(wᵀx_i − y_i)² + μ/2 ‖w‖² over ``indices``
    (the seed changes nothing: the minimum is unique). Counts its calls and can fail on one, to
    stand for an interrupted run."""

    def __init__(self, x, y, mu, fail_on_call=None):
        self.x, self.y, self.mu, self.fail_on_call, self.calls = x, y, mu, fail_on_call, 0

    def __call__(self, indices, seed):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("an interrupted run")
        x, y = self.x[indices], self.y[indices]
        A = x.T @ x / len(indices) + self.mu * torch.eye(x.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(A, x.T @ y / len(indices))
        model = torch.nn.Linear(x.shape[1], 1, bias=False).to(x.dtype)
        with torch.no_grad():
            model.weight.copy_(w.reshape(1, -1))
        return model.eval()


def half_mse(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).mean()


def output(outputs, targets):
    """The model's prediction itself: linear in the weights, so influence is exact to first order."""
    return outputs.reshape(-1)


def ridge_problem(seed, n=200, d=5, T=30, mu=1e-2, **kwargs):
    """Least squares with feature scales from 10 to 0.03: H = XᵀX/n is far from a multiple of I,
    so plain gradient dot products (identity) rank the subsets worse than H⁻¹ does."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1.5, d, dtype=torch.float64)
    x = torch.randn(n + T, d, generator=g, dtype=torch.float64) * scales
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n + T, generator=g,
                                                                                   dtype=torch.float64)
    options = dict(train=RidgeTrainer(x[:n], y[:n], mu), x_train=x[:n], y_train=y[:n], x_test=x[n:],
                   y_test=y[n:], loss=half_mse, hessian_regularization=mu, name=f"ridge{seed}")
    options.update(kwargs)
    return Problem(**options)


class MeanTrainer:
    """θ = the mean of y over the subset, as a bias-free Linear(1, 1) on constant inputs."""

    def __init__(self, y):
        self.y = y

    def __call__(self, indices, seed):
        model = torch.nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            model.weight.fill_(float(self.y[indices].mean()))
        return model.eval()


# ---- the score on known answers ------------------------------------------------------------------
def test_sign_convention_on_a_mean_estimate():
    """θ_S = mean of y_S and the test target 5 lies above every y_i ~ N(0, 1): a subset's test loss
    ½(θ_S − 5)² falls strictly as its mean rises. Influence (pyDVL's sign) is
    up[t, i] = (θ − 5)(θ − y_i) with H = 1, positive for y_i > θ (up-weighting them lowers the
    loss), so the prediction −Σ_{i∈S} up = (5 − θ)·s·(θ − mean_S) falls with mean_S too: the
    ranking is exact and the LDS is 1 (the opposite sign would give −1)."""
    g = torch.Generator().manual_seed(0)
    n = 40
    y = torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.ones(n, 1, dtype=torch.float64)
    problem = Problem(train=MeanTrainer(y), x_train=x, y_train=y, x_test=torch.ones(1, 1, dtype=torch.float64),
                      y_test=torch.tensor([5.0], dtype=torch.float64), loss=half_mse, name="mean")
    ev = evaluate(problem, methods=["direct", "identity"], num_subsets=30, num_seeds=1)
    assert ev.methods["direct"]["lds"] == pytest.approx(1.0, abs=1e-12)
    assert ev.methods["identity"]["lds"] == pytest.approx(1.0, abs=1e-12)  # H = 1: identity is exact too
    theta = float(y.mean())
    up = ((theta - 5.0) * (theta - y)).numpy()[None, :]
    subsets = sample_subsets(n, 30, 0.5, 0)
    predicted = predict_subsets(up, subsets)
    assert np.allclose(predicted[:, 0], -up[0, subsets].sum(1))
    actual = np.array([[0.5 * (float(y[s].mean()) - 5.0) ** 2] for s in subsets])
    assert lds(predicted, actual)[0] == pytest.approx(1.0)
    assert lds(-predicted, actual)[0] == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_squares_direct_near_one_identity_lower(seed):
    """Ridge regression: H is constant, so Direct's influence is exact up to the linearisation of θ_S
    in the subset's weights (removing half the points is no infinitesimal step: the subset's
    Hessian X_SᵀX_S/s differs from XᵀX/n by O(√(d/s))). Measured over seeds 0-7 with M = 40,
    n = 200, d = 5: Direct's LDS of the model's output 0.983-0.99, of the test loss (also
    quadratic in θ) 0.91-0.99; identity's 0.39-0.62, at least 0.38 below Direct on every seed. The
    bounds asserted leave a margin below those."""
    out = evaluate(ridge_problem(seed, measurement=output), methods=["identity", "direct", "cg"],
                   num_subsets=40, num_seeds=1, seed=seed)
    assert out.methods["direct"]["lds"] >= 0.97
    assert out.methods["cg"]["lds"] == pytest.approx(out.methods["direct"]["lds"], abs=1e-6)
    assert out.methods["identity"]["lds"] <= out.methods["direct"]["lds"] - 0.25
    low, high = out.methods["direct"]["lds_ci"]
    assert low <= out.methods["direct"]["lds"] <= high
    loss = evaluate(ridge_problem(seed), methods=["identity", "direct"], num_subsets=40, num_seeds=1, seed=seed)
    assert loss.methods["direct"]["lds"] >= 0.85
    assert loss.methods["identity"]["lds"] <= loss.methods["direct"]["lds"] - 0.25
    summary = loss.summary()
    assert summary["subsets"] == sample_subsets(200, 40, 0.5, seed).tolist()
    assert summary["seeds"] == [seed + 1] and summary["config"]["seed"] == seed


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(30, 7)).astype(float)
    b = a + rng.normal(size=a.shape)
    b[:, 3] = rng.integers(0, 3, size=30)
    ours = spearman_per_column(a, b)
    for t in range(a.shape[1]):
        assert ours[t] == pytest.approx(stats.spearmanr(a[:, t], b[:, t]).statistic, abs=1e-12)
    constant = spearman_per_column(np.ones((5, 1)), np.arange(5.0)[:, None])
    assert np.isnan(constant[0])


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_points():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.5, 0.2, 20), rng.normal(0.5, 0.2, 2000)
    lo1, hi1 = bootstrap_ci(few)
    lo2, hi2 = bootstrap_ci(many)
    assert lo1 <= few.mean() <= hi1 and lo2 <= many.mean() <= hi2
    assert hi2 - lo2 < (hi1 - lo1) / 4


def test_subsets_are_prefix_stable_and_sorted():
    small, large = sample_subsets(50, 3, 0.4, 7), sample_subsets(50, 6, 0.4, 7)
    assert small.shape == (3, 20) and np.array_equal(large[:3], small)
    assert all(np.array_equal(np.sort(s), s) and len(set(s)) == 20 for s in large)


def test_point_gradients_match_the_library_and_margin():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    model = TorchTwiceDifferentiable(net, F.cross_entropy)
    rows = point_gradients(net, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y, chunk=4)
    expected = torch.stack([model.grad(x[i:i + 1], y[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(rows, expected)
    out = net(x)
    p = out.softmax(1)[torch.arange(6), y]
    torch.testing.assert_close(margin(out, y), torch.log(p / (1 - p)))


# ---- the retraining cache ------------------------------------------------------------------------
def test_interrupted_run_keeps_its_retrainings_and_resumes(tmp_path):
    problem = ridge_problem(0, n=60, T=8)
    subsets, seeds = sample_subsets(60, 4, 0.5, 0), [1, 2]
    args = (half_mse_point, problem.x_test, problem.y_test, subsets, seeds)
    key = {"problem_key": "ridge-test", "cache_dir": str(tmp_path)}
    failing = RidgeTrainer(problem.train.x, problem.train.y, problem.train.mu, fail_on_call=6)
    with pytest.raises(KeyboardInterrupt):
        retrain_measurements(failing, *args, **key)
    assert len(os.listdir(tmp_path)) == 5  # the five that finished, nothing half-written
    trainer = RidgeTrainer(problem.train.x, problem.train.y, problem.train.mu)
    resumed, stats = retrain_measurements(trainer, *args, **key)
    assert (stats.reused, stats.trained, trainer.calls) == (5, 3, 3)
    fresh, _ = retrain_measurements(RidgeTrainer(problem.train.x, problem.train.y, problem.train.mu), *args,
                                    problem_key="ridge-test")
    np.testing.assert_array_equal(resumed, fresh)
    # More subsets: the first four are reused. Another problem key: nothing is.
    more, stats = retrain_measurements(trainer, half_mse_point, problem.x_test, problem.y_test,
                                       sample_subsets(60, 5, 0.5, 0), seeds, **key)
    assert (stats.reused, stats.trained) == (8, 2)
    _, stats = retrain_measurements(trainer, *args, problem_key="another", cache_dir=str(tmp_path))
    assert stats.reused == 0


def half_mse_point(outputs, targets):
    return 0.5 * (outputs.reshape(-1) - targets) ** 2


def test_worker_processes_give_the_in_process_values():
    problem = ridge_problem(1, n=40, T=5)
    subsets = sample_subsets(40, 3, 0.5, 0)
    pooled, stats = retrain_measurements(problem.train, half_mse_point, problem.x_test, problem.y_test, subsets,
                                         [1], problem_key="p", workers=2)
    local, _ = retrain_measurements(problem.train, half_mse_point, problem.x_test, problem.y_test, subsets, [1],
                                    problem_key="p")
    assert stats.trained == 3
    np.testing.assert_allclose(pooled, local)


# ---- bad arguments -------------------------------------------------------------------------------
def test_bad_arguments_are_named():
    problem = ridge_problem(0, n=40, T=5)
    with pytest.raises(ValueError, match="methods must be names among .*unknown: \\['newton'\\]"):
        evaluate(problem, methods=["newton"])
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\).*got 1.5"):
        evaluate(problem, fraction=1.5)
    with pytest.raises(ValueError, match="num_subsets must be an int >= 2, got 1"):
        evaluate(problem, num_subsets=1)
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        evaluate(problem, workers=0)
    with pytest.raises(ValueError, match="measurement must be 'loss', 'margin' or a function"):
        evaluate(dataclasses.replace(problem, measurement="accuracy"))
    with pytest.raises(ValueError, match="x_test and y_test must hold the same number"):
        evaluate(dataclasses.replace(problem, y_test=problem.y_test[:3]))
    with pytest.raises(ValueError, match="flipped must be a bool mask of shape \\(40,\\)"):
        evaluate(dataclasses.replace(problem, flipped=np.zeros(39, dtype=bool)))
    with pytest.raises(ValueError, match="with workers=2, train must be picklable"):
        retrain_measurements(lambda i, s: None, half_mse_point, problem.x_test, problem.y_test,
                             sample_subsets(40, 2, 0.5, 0), [1], problem_key="p", workers=2)
    with pytest.raises(TypeError, match="must return a torch.nn.Module, got NoneType"):
        evaluate(dataclasses.replace(problem, train=lambda i, s: None))


@pytest.mark.parametrize("argv, message", [
    (["--subsets", "1"], "argument --subsets: expected an integer >= 2"),
    (["--seeds", "0"], "argument --seeds: expected a positive integer, got 0"),
    (["--fraction", "1"], "argument --fraction: expected a fraction in (0, 1), got 1"),
    (["--methods", "newton"], "argument --methods: expected comma-separated names among"),
    (["--measurement", "accuracy"], "argument --measurement: invalid choice"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--output", str(tmp_path)] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_help_explains_method_and_cost(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for phrase in ("Linear datamodeling score", "Spearman", "bootstrap", "Cost:", "--quick", "trainings"):
        assert phrase in text


def test_method_table_and_digits_problem():
    assert {"identity", "direct", "cg", "lissa", "arnoldi-10", "arnoldi-100"} <= set(available_methods())
    assert set(available_methods()) <= set(METHODS)
    # --quick: the same methods, CG and LiSSA cheaper, the rest identical.
    assert set(QUICK_METHODS) == set(METHODS) and available_methods(QUICK_METHODS) == available_methods()
    assert [n for n in METHODS if QUICK_METHODS[n] is not METHODS[n]] == ["cg", "lissa"]
    assert describe(QUICK_METHODS["lissa"]) == "lissa(batch_size=128, maxiter=100, on_failure='warn', rtol=0.001, scale=5.0)"
    assert describe(METHODS["cg"]) == "cg(atol=0.0, rtol=1e-06)" and describe(METHODS["identity"]) == "identity"
    problem = digits_problem()
    problem.validate()
    assert problem.x_train.shape == (1200, 64) and problem.x_test.shape == (297, 64)
    assert int(problem.flipped.sum()) == 120
    assert np.array_equal(problem.y_train.numpy()[~problem.flipped],
                          digits_problem().y_train.numpy()[~problem.flipped])


class SoftmaxTrainer:
    """Multinomial logistic regression (a Linear layer) with weight decay μ on weights and bias,
    minimised by Newton's method with the analytic gradient and Hessian: strictly convex, so the
    minimum is unique and the seed changes nothing."""

    def __init__(self, x, y, mu):
        self.x, self.y, self.mu = x, y, mu

    def __call__(self, indices, seed):
        X = torch.cat([self.x[indices], torch.ones(len(indices), 1, dtype=self.x.dtype)], dim=1)  # [n, d+1]
        Y = F.one_hot(self.y[indices], 3).to(X.dtype)
        n, e = X.shape
        V = torch.zeros(3, e, dtype=X.dtype)  # [W | b]
        for _ in range(50):
            P = torch.softmax(X @ V.T, dim=1)
            G = (P - Y).T @ X / n + self.mu * V
            if float(G.abs().max()) < 1e-13:
                break
            S = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
            H = torch.einsum("iab,ij,ik->ajbk", S, X, X).reshape(3 * e, 3 * e) / n
            V = V - torch.linalg.solve(H + self.mu * torch.eye(3 * e, dtype=X.dtype), G.reshape(-1)).reshape(3, e)
        model = torch.nn.Linear(e - 1, 3).double()
        with torch.no_grad():
            model.weight.copy_(V[:, :-1])
            model.bias.copy_(V[:, -1])
        return model.eval()


def test_margin_measurement_end_to_end_on_logistic_regression():
    """The margin is measured and predicted through its own gradients: on a strictly convex
    softmax regression (weight decay = λ, so H + λI is the objective's Hessian) Direct ranks the
    subsets well (measured 0.963-0.972 on data seeds 0-2, identity 0.79-0.86); self-influence finds
    the flipped labels (AUC 0.94-0.98)."""
    g = torch.Generator().manual_seed(0)
    n, T = 90, 12
    x = torch.randn(n + T, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3, 0.1],
                                                                              dtype=torch.float64)
    y = (x @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(1)
    flipped = np.zeros(n, dtype=bool)
    flipped[:9] = True
    y_train = y[:n].clone()
    y_train[:9] = (y_train[:9] + 1) % 3
    problem = Problem(train=SoftmaxTrainer(x[:n], y_train, 0.05), x_train=x[:n], y_train=y_train, x_test=x[n:],
                      y_test=y[n:], measurement="margin", hessian_regularization=0.05, flipped=flipped,
                      name="softmax")
    ev = evaluate(problem, methods=["identity", "direct"], num_subsets=16, num_seeds=1)
    assert ev.config["measurement"] == "margin"
    assert ev.methods["direct"]["lds"] >= 0.85
    assert ev.methods["identity"]["lds"] < ev.methods["direct"]["lds"]
    assert ev.methods["direct"]["self_influence"]["auc"] > 0.8
    assert ev.config["self_influence_points"] == n and ev.config["self_influence_flipped"] == 9
    # Self-influence on a sample: all n points drawn is the whole set again; 40 of them are scored
    # against the flipped labels among those 40, and that sample is recorded.
    every = evaluate(problem, methods=["direct"], num_subsets=2, num_seeds=1, self_influence_points=n)
    assert every.methods["direct"]["self_influence"] == ev.methods["direct"]["self_influence"]
    some = evaluate(problem, methods=["direct"], num_subsets=2, num_seeds=1, self_influence_points=40)
    assert some.config["self_influence_points"] == 40 and 0 < some.config["self_influence_flipped"] < 40
    assert some.methods["direct"]["self_influence"]["auc"] > 0.8
    with pytest.raises(ValueError, match="self_influence_points must be at most the 90 training points, got 91"):
        evaluate(problem, methods=["direct"], num_subsets=2, self_influence_points=91)


# ---- a method's own damping ----------------------------------------------------------------------
def test_methods_with_their_own_damping_ignore_lambda_and_say_so():
    from torch.utils.data import DataLoader, TensorDataset

    from twicediff import solve_hvp
    from twicediff.evaluate import solver
    from twicediff.evaluate.report import format_table

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = TorchTwiceDifferentiable(net, F.cross_entropy)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    rhs = torch.randn(3, model.num_params, dtype=torch.float64)
    for name, kind, fisher in (("ekfac-rel", "ekfac", "empirical"), ("ekfac-ggn-rel", "ekfac", "ggn"),
                               ("kfac-rel", "kfac", "empirical"), ("kfac-ggn-rel", "kfac", "ggn")):
        expected = solve_hvp(kind, model, loader, rhs, hessian_perturbation=0.1, relative_damping=True,
                             fisher_type=fisher).x
        for lam in (0.0, 0.03, 5.0):
            torch.testing.assert_close(METHODS[name](model, loader, rhs, lam), expected)
        assert describe(METHODS[name]) == f"{kind}(damping=0.1, fisher_type='{fisher}', relative_damping=True)"
        assert QUICK_METHODS[name] is METHODS[name]
    # The absolute rows are damped by λ, and differ from the relative ones.
    absolute = METHODS["ekfac"](model, loader, rhs, 0.03)
    torch.testing.assert_close(absolute, solve_hvp("ekfac", model, loader, rhs, hessian_perturbation=0.03,
                                                   relative_damping=False, fisher_type="empirical").x)
    assert not torch.allclose(absolute, METHODS["ekfac-rel"](model, loader, rhs, 0.03))
    # Any method can carry one: CG damped by 0.5 whatever λ is solves (H + 0.5 I) x = b.
    cg = solver("cg", damping=0.5, rtol=1e-12, atol=0.0)
    assert describe(cg) == "cg(atol=0.0, damping=0.5, rtol=1e-12)"
    torch.testing.assert_close(cg(model, loader, rhs, 0.0),
                               solve_hvp("direct", model, loader, rhs, hessian_perturbation=0.5).x, rtol=1e-6, atol=1e-8)
    for bad in (-1.0, "0.1", True):
        with pytest.raises(ValueError, match=f"solver: damping must be None or a float >= 0, got {bad!r}"):
            solver("cg", damping=bad)
    # An evaluation records the damping in its options, and its table prints them.
    ev = evaluate(ridge_problem(0, n=40, T=5), methods=["direct", "ekfac-rel"], num_subsets=3, num_seeds=1)
    assert ev.config["method_options"]["ekfac-rel"] == describe(METHODS["ekfac-rel"])
    assert "EK-FAC, 0.1 x mean eigenvalue: ekfac(damping=0.1, fisher_type='empirical'" in format_table(ev)


# ---- inputs in every batch form ------------------------------------------------------------------
class TwoInputs(torch.nn.Module):
    """A bias-free linear model over the two parts of x, called model(a, b) or model(a=a, b=b)."""

    def __init__(self, weight, split):
        super().__init__()
        self.linear, self.split = torch.nn.Linear(weight.shape[1], 1, bias=False).to(weight.dtype), split
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, a, b, scale=1.0):
        return self.linear(torch.cat([a, b], dim=1)) * scale


class SplitTrainer:
    """RidgeTrainer's model as TwoInputs: the same weights, the input in two parts."""

    def __init__(self, ridge, split):
        self.ridge, self.split = ridge, split

    def __call__(self, indices, seed):
        return TwoInputs(self.ridge(indices, seed).weight.detach(), self.split).eval()


def test_tuple_and_dict_inputs_score_as_the_tensor_does():
    from twicediff.evaluate import solver

    base = ridge_problem(2, n=60, T=8)
    k = 2
    trainer = SplitTrainer(base.train, k)
    forms = {
        "tuple": lambda x: (x[:, :k], x[:, k:]),
        "dict": lambda x: {"a": x[:, :k], "b": x[:, k:], "scale": 1.0},  # a leaf passed unchanged
    }
    # LiSSA re-batches the training loader (batches of 16): the batches keep x's form.
    methods = ["identity", "direct", "lissa"]
    table = dict(METHODS, lissa=solver("lissa", scale=500.0, maxiter=40, rtol=1e-3, batch_size=16,
                                       on_failure="warn"))
    reference = evaluate(base, methods=methods, num_subsets=6, num_seeds=1, method_table=table)
    for form, split in forms.items():
        problem = dataclasses.replace(base, train=trainer, x_train=split(base.x_train), x_test=split(base.x_test),
                                      name=f"ridge-{form}")
        ev = evaluate(problem, methods=methods, num_subsets=6, num_seeds=1, method_table=table)
        np.testing.assert_allclose(ev.measurements, reference.measurements)
        for name in methods:
            np.testing.assert_allclose(ev.methods[name]["lds_per_test"], reference.methods[name]["lds_per_test"])
        assert ev.config["n_train"] == 60 and ev.config["n_test"] == 8
    with pytest.raises(ValueError, match="Problem: x_train: the inputs disagree on the batch size"):
        dataclasses.replace(base, x_train=(base.x_train, base.x_train[:5])).validate()
    with pytest.raises(TypeError, match="Problem: x_test: x must be a torch.Tensor .*got str"):
        dataclasses.replace(base, x_test="points").validate()
