"""CG's float64 product copy never fails where products in the model's dtype work: a loss module
holding float32 tensors is cast with the model, and a forward that builds float32 tensors makes the
operator fall back to the model's dtype with one warning."""
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twicediff import TorchTwiceDifferentiable
from twicediff.inversion import solve_hvp


class _FixedMix(nn.Module):
    """A forward that multiplies by a float32 tensor it holds as a plain attribute (not a buffer),
    so that casting the module does not cast it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.mix = torch.eye(3) * 0.5

    def forward(self, x):
        return self.lin(x) @ self.mix


def _data():
    torch.manual_seed(0)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    return DataLoader(TensorDataset(x, y), batch_size=8), torch.randn(2, 1)


def _solve(td, loader, **kw):
    b = torch.randn(3, td.num_params, generator=torch.Generator().manual_seed(1))
    return solve_hvp("cg", td, loader, b, hessian_perturbation=0.1, rtol=1e-6, atol=0.0, **kw).x


def test_weighted_cross_entropy_loss_module_is_cast_with_the_model():
    loader, _ = _data()
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    td = TorchTwiceDifferentiable(model, nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])))
    x64 = _solve(td, loader)
    x32 = _solve(td, loader, product_dtype=None)
    torch.testing.assert_close(x64, x32, rtol=1e-3, atol=1e-5)
    assert td.loss.weight.dtype == torch.float32  # the user's loss is not changed


def test_forward_with_fixed_float32_tensors_falls_back_to_the_model_dtype(caplog):
    loader, _ = _data()
    td = TorchTwiceDifferentiable(_FixedMix().eval(), F.cross_entropy)
    x32 = _solve(td, loader, product_dtype=None)
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        x = _solve(td, loader)
    torch.testing.assert_close(x, x32)
    assert sum("computing them in the model's dtype" in r.getMessage() for r in caplog.records) == 1
