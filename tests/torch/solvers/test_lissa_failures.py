"""LiSSA never returns a diverged or unconverged answer silently, and runs a frozen prefix once per
batch, not once per step."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twicediff import TorchTwiceDifferentiable
from twicediff.torch.solvers.lissa import solve_lissa


def _regression(dtype=torch.float64, batch_size=8):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(dtype)
    x = torch.randn(32, 3, dtype=dtype) * torch.tensor([1.0, 3.0, 0.3], dtype=dtype)
    y = torch.randn(32, dtype=dtype)
    td = TorchTwiceDifferentiable(model, F.mse_loss)
    return td, DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_divergence_without_overflow_raises_with_advice_or_warns_by_option(caplog):
    """scale below the largest eigenvalue (about 2·9 here): ‖h‖ grows every step but stays finite
    in 60 steps; LiSSA used to return it with an INFO log."""
    td, loader = _regression()
    b = torch.randn(2, td.num_params, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"diverges.*increase scale \(now 2.0\) or dampen"):
        solve_lissa(td, loader, b, 0.0, scale=2.0, maxiter=60)
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        res = solve_lissa(td, loader, b, 0.0, scale=2.0, maxiter=60, on_failure="warn")
    assert res.info["converged"] is False
    assert any("diverges" in r.getMessage() for r in caplog.records)


def test_too_few_steps_raise_naming_maxiter():
    td, loader = _regression()
    b = torch.randn(2, td.num_params, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"did not converge in 3 steps.*increase maxiter \(now 3\)"):
        solve_lissa(td, loader, b, 0.1, scale=50.0, maxiter=3)
    with pytest.raises(ValueError, match="on_failure"):
        solve_lissa(td, loader, b, 0.1, on_failure="ignore")


class _CountingPrefix(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("loader_kind", ["dataloader", "list"])
def test_frozen_prefix_runs_once_per_batch(loader_kind):
    torch.manual_seed(0)
    prefix = _CountingPrefix()
    prefix.requires_grad_(False)
    model = nn.Sequential(prefix, nn.Linear(6, 3)).eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8) if loader_kind == "dataloader" else \
        [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    b = torch.randn(2, td.num_params)
    prefix.calls = 0
    res = solve_lissa(td, loader, b, 0.1, scale=20.0, maxiter=60, rtol=0.0, on_failure="warn")
    assert res.info["niter"] == [60, 60]
    # each of the 3 batches is prepared once: its prefix pass, and the native engine's check of
    # its reading (at most one more forward per batch)
    assert prefix.calls <= 2 * 3, prefix.calls


def test_half_precision_model_iterates_in_float32():
    td, loader = _regression(torch.float32, batch_size=32)  # one batch: deterministic steps
    b = torch.randn(2, td.num_params)
    (x32, y32), = loader
    ref = torch.linalg.solve(td.hessian(x32, y32) + 0.1 * torch.eye(td.num_params), b.T).T
    model16 = TorchTwiceDifferentiable(td.model.to(torch.bfloat16), F.mse_loss)
    loader16 = [(x.to(torch.bfloat16), y.to(torch.bfloat16)) for x, y in loader]
    x = solve_lissa(model16, loader16, b.to(torch.bfloat16), 0.1, scale=20.0, maxiter=400, rtol=0.0,
                    on_failure="warn").x  # bfloat16 products: rtol is a poor stop rule, run all steps
    assert x.dtype == torch.bfloat16
    assert float((x.float() - ref).norm() / ref.norm()) < 0.1
