"""TorchTwiceDifferentiable.mvp (twicediff.torch.mvp.batched_mvp): products against the explicit float64 Hessian,
the rule choosing a vmapped backward pass or the per-direction loop, the loop fallback for graphs
without batching rules, and bad input."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twicediff import TorchTwiceDifferentiable
from twicediff.torch.batch import squeezed_loss
from twicediff.torch.mvp import MIN_BATCHED_DIRECTIONS, use_batched_backward


def _small(device, dtype=torch.float64, n=13):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(device=device, dtype=dtype).eval()
    x = torch.randn(n, 5, dtype=dtype, device=device)
    y = torch.randint(0, 3, (n,), device=device)
    return TorchTwiceDifferentiable(model, F.cross_entropy), x, y


def _explicit_hessian(td, x, y):
    from torch.func import functional_call, hessian

    names = [n for n, p in td.model.named_parameters()]
    shapes = [p.shape for p in td.model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in td.model.parameters()])

    def loss_of(w):
        params, col = {}, 0
        for n, s in zip(names, shapes):
            params[n] = w[col:col + s.numel()].reshape(s)
            col += s.numel()
        return squeezed_loss(td.loss, functional_call(td.model, params, (x,)), y)

    return hessian(loss_of)(flat)


@pytest.mark.parametrize("D", [0, 1, 2, 7, 64])
def test_mvp_matches_explicit_hessian(device, D):
    td, x, y = _small(device)
    H = _explicit_hessian(td, x, y)
    g = td.grad(x, y, create_graph=True)
    v = torch.randn(D, td.num_params, dtype=torch.float64, device=device)
    out = td.mvp(g, v, td.parameters)
    assert out.shape == (D, td.num_params) and not out.requires_grad
    torch.testing.assert_close(out, v @ H, rtol=1e-10, atol=1e-12)


def test_mvp_one_direction_and_non_contiguous_v(device):
    td, x, y = _small(device)
    H = _explicit_hessian(td, x, y)
    g = td.grad(x, y, create_graph=True)
    P = td.num_params
    v1 = torch.randn(P, dtype=torch.float64, device=device)
    torch.testing.assert_close(td.mvp(g, v1, td.parameters), (H @ v1).unsqueeze(0), rtol=1e-10, atol=1e-12)
    wide = torch.randn(5, 2 * P, dtype=torch.float64, device=device)
    v = wide[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(td.mvp(g, v, td.parameters), v @ H, rtol=1e-10, atol=1e-12)


def test_mvp_mixed_products_with_respect_to_x(device):
    """backprop_on = x gives ∂(v · ∇θL)/∂x, the mixed second derivatives, [D, N * features]."""
    td, x, y = _small(device, n=4)
    g = td.grad(x, y, create_graph=True)  # makes x require grad
    v = torch.randn(3, td.num_params, dtype=torch.float64, device=device)
    out = td.mvp(g, v, x)
    grads_theta = torch.autograd.functional.jacobian(
        lambda xx: torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            squeezed_loss(td.loss, td.model(xx), y), td.parameters, create_graph=True)]), x.detach())
    expected = v @ grads_theta.reshape(td.num_params, -1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


class _CubeNumpyBackward(torch.autograd.Function):
    """x³ whose second derivative is computed in numpy: there is no vmap batching rule for it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _SquareTimesThree.apply(x) * g


class _SquareTimesThree(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 3 * x ** 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.from_numpy(6 * x.detach().numpy() * g.numpy())


class _CubeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, dtype=torch.float64))

    def forward(self, x):
        return x * _CubeNumpyBackward.apply(self.w)


def _cube_problem():
    torch.manual_seed(1)
    td = TorchTwiceDifferentiable(_CubeModel().eval(), lambda out, y: (out * y).sum())
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randn(4, 6, dtype=torch.float64)
    # L = Σ y x w³ → H = diag(6 w Σ_n y x)
    H = torch.diag(6 * td.model.w.detach() * (x * y).sum(0))
    return td, td.grad(x, y, create_graph=True), H


def test_rule_batches_two_or_more_directions():
    """One direction goes through a plain backward pass, two or more through one vmapped pass: seen
    on a graph without a batching rule, where only the vmapped pass fails (and warns)."""
    assert not use_batched_backward(1)
    assert use_batched_backward(MIN_BATCHED_DIRECTIONS)
    td, g, H = _cube_problem()
    v = torch.randn(1, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain pass needs no batching rule: no warning
        torch.testing.assert_close(td.mvp(g, v, td.parameters), v @ H, rtol=1e-12, atol=1e-12)


_WARNS_ONCE = """
import warnings, torch, pytest
import test_mvp
td, g, H = test_mvp._cube_problem()
v = torch.randn(5, 6, dtype=torch.float64)
with pytest.warns(RuntimeWarning, match="batching rule"):
    out = td.mvp(g, v, td.parameters)
torch.testing.assert_close(out, v @ H, rtol=1e-12, atol=1e-12)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    torch.testing.assert_close(td.mvp(g, v, td.parameters), v @ H, rtol=1e-12, atol=1e-12)
print("ok")
"""


def test_fallback_to_loop_without_batching_rule_warns_once():
    """In a fresh process (the warning is once per process): the vmapped pass fails on a graph
    without a batching rule, the directions go one by one with the right values, and a second
    call does not warn again."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _WARNS_ONCE], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_progress_bar_over_chunks(capsys):
    td, x, y = _small("cpu")
    g = td.grad(x, y, create_graph=True)
    td.mvp(g, torch.randn(3, td.num_params, dtype=torch.float64), td.parameters, progress=True)
    assert "mvp" in capsys.readouterr().err


def test_mvp_bad_input():
    td, x, y = _small("cpu")
    g = td.grad(x, y, create_graph=True)
    P = td.num_params
    with pytest.raises(ValueError, match=rf"v must be \[D, P\].*P = {P}.*\(3, {P + 1}\)"):
        td.mvp(g, torch.randn(3, P + 1, dtype=torch.float64), td.parameters)
    with pytest.raises(ValueError, match="grad_xy has no graph"):
        td.mvp(g.detach(), torch.randn(3, P, dtype=torch.float64), td.parameters)
    with pytest.raises(TypeError, match="v must be a floating-point tensor"):
        td.mvp(g, torch.ones(3, P, dtype=torch.int64), td.parameters)
    with pytest.raises(ValueError, match=r"backprop_on\[0\].*does not require grad"):
        td.mvp(g, torch.randn(3, P, dtype=torch.float64), [torch.zeros(3)])
