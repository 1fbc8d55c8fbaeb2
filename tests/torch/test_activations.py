"""twicediff.torch.activations against torch's: the same values and gradients (the kinks at ±3 and 0
included), second derivatives and a vmap rule where torch has none, and RReLU's training mode left
to torch."""
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp, vmap

from twicediff.torch.activations import hardsigmoid, rrelu


def _points():
    x = torch.cat([torch.linspace(-5, 5, 41, dtype=torch.float64), torch.tensor([-3.0, 3.0, 0.0], dtype=torch.float64)])
    return x.requires_grad_(True)


def test_hardsigmoid_values_and_gradients_are_torchs_at_and_off_its_kinks():
    x = _points()
    torch.testing.assert_close(hardsigmoid(x), F.hardsigmoid(x), rtol=0, atol=0)
    ours, = torch.autograd.grad(hardsigmoid(x).sum(), x)
    theirs, = torch.autograd.grad(F.hardsigmoid(x).sum(), x)
    exact = torch.where((x > -3) & (x < 3), torch.full_like(x, 1 / 6), torch.zeros_like(x)).detach()
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)
    # torch's float64 backward multiplies by a float32 1/6 (torch 2.14): 3e-8 relative
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=0)


def test_rrelu_in_eval_mode_is_torchs_and_training_mode_is_torch_itself():
    x = _points()
    for lower, upper in ((1 / 8, 1 / 3), (0.1, 0.1), (0.0, 0.5)):
        torch.testing.assert_close(rrelu(x, lower, upper), F.rrelu(x, lower, upper, training=False), rtol=0, atol=0)
        ours, = torch.autograd.grad(rrelu(x, lower, upper).sum(), x)
        theirs, = torch.autograd.grad(F.rrelu(x, lower, upper, training=False).sum(), x)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.manual_seed(3)
    drawn = rrelu(x.detach(), training=True)
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, F.rrelu(x.detach(), training=True))


def test_second_derivatives_in_both_modes_and_under_vmap():
    x = torch.randn(7, dtype=torch.float64) * 4
    directions = torch.randn(3, 7, dtype=torch.float64)
    for f in (lambda z: (hardsigmoid(z) * z).sum(), lambda z: (rrelu(z) * z).sum()):
        _, pullback = vjp(grad(f), x)
        reverse = torch.stack([pullback(d)[0] for d in directions])
        torch.testing.assert_close(vmap(lambda d: pullback(d)[0])(directions), reverse)
        torch.testing.assert_close(vmap(lambda d: jvp(grad(f), (x,), (d,))[1])(directions), reverse)
