"""Class labels of any integer width give what int64 labels give, on every entry point and engine."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twicediff import TorchTwiceDifferentiable
from twicediff.influence import compute_influences


@pytest.mark.parametrize("native", [True, False])
def test_narrow_integer_labels_match_int64(native):
    torch.manual_seed(0)
    if native:
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
        x = torch.randn(12, 6)
    else:
        model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).eval()
        x = torch.randn(12, 1, 6)
    y = torch.randint(0, 3, (12,))
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    v = torch.randn(2, td.num_params)
    for dtype in (torch.int16, torch.uint8):
        torch.testing.assert_close(td.grad(x, y.to(dtype)), td.grad(x, y))
    yn = y.to(torch.int32)
    torch.testing.assert_close(td.grad(x, yn), td.grad(x, y))
    for engine in ("auto", "func", "autograd"):
        torch.testing.assert_close(td.hvp(x, yn, v, engine=engine), td.hvp(x, y, v, engine=engine))
    torch.testing.assert_close(td.hessian(x, yn), td.hessian(x, y))
    narrow = DataLoader(TensorDataset(x, yn), batch_size=4)
    wide = DataLoader(TensorDataset(x, y), batch_size=4)
    for kind in ("up", "perturbation"):
        torch.testing.assert_close(
            compute_influences(td, narrow, influence_type=kind, hessian_regularization=0.1),
            compute_influences(td, wide, influence_type=kind, hessian_regularization=0.1))
