"""The native engine's reading of a model (engines/native_model.py) and its proof on every batch
(NativeEngine.verify): model spellings the reading must walk as forward does, and models it must
refuse rather than misread."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twicediff import TorchTwiceDifferentiable


def _batch(n=12, features=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


def _products(model, x, y, engine):
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(4, td.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return td.hvp(x, y, V, engine=engine)


@pytest.mark.parametrize("spelling", ["shared activation", "shared in a nested Sequential", "listed twice"])
def test_a_module_instance_in_several_places_is_read_at_each(spelling):
    torch.manual_seed(0)
    act = nn.Tanh()
    if spelling == "shared activation":
        model = nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 6), act, nn.Linear(6, 3))
    elif spelling == "shared in a nested Sequential":
        model = nn.Sequential(nn.Linear(5, 7), act, nn.Sequential(nn.Linear(7, 6), act), nn.Linear(6, 3))
    else:
        model = nn.Sequential(nn.Linear(5, 7), act, act, nn.Linear(7, 3))
    model = model.double().eval()
    x, y = _batch()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    assert td.native_unsupported_reason(x, y) == ""
    torch.testing.assert_close(_products(model, x, y, "native"), _products(model, x, y, "autograd"),
                               rtol=1e-10, atol=1e-12)


def test_a_replaced_instance_forward_is_not_native():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    plain = model[0].forward
    model[0].forward = lambda h: torch.sin(plain(h))
    x, y = _batch()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    assert "module '0' (Linear) has its forward replaced" in td.native_unsupported_reason(x, y)
    torch.testing.assert_close(_products(model, x, y, "auto"), _products(model, x, y, "autograd"),
                               rtol=1e-10, atol=1e-12)


def test_a_model_the_reading_misses_is_refused_with_the_reason(caplog, monkeypatch):
    """A module whose class computes something else than its type's usual function (here Tanh
    patched to sine) looks right to the reading: the batch proves otherwise, auto warns once and
    uses a generic engine, native raises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    monkeypatch.setattr(nn.Tanh, "forward", lambda self, h: torch.sin(h))
    x, y = _batch()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    assert "differs from the native engine's reading" in td.native_unsupported_reason(x, y)
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        auto = _products(model, x, y, "auto")
        _products(model, x, y, "auto")
    assert len([r for r in caplog.records if "native engine does not take" in r.getMessage()]) == 1
    torch.testing.assert_close(auto, _products(model, x, y, "autograd"), rtol=1e-10, atol=1e-12)
    ones = torch.ones(td.num_params, dtype=torch.float64)
    torch.testing.assert_close(td.hessian(x, y) @ ones, td.hvp(x, y, ones, engine="autograd"),
                               rtol=1e-10, atol=1e-12)  # the explicit Hessian falls back too
    with pytest.raises(ValueError, match="engine='native' cannot take this model.*differs"):
        _products(model, x, y, "native")


def test_a_batch_with_nan_is_not_taken_for_a_misread_model(caplog):
    """NaN in a row reaches the model's output and the reading's alike: the reading stands, no
    warning, and the native engine's products are what the generic engines give (NaN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    x, y = _batch()
    x[3, 1] = float("nan")
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    assert td.native_unsupported_reason(x, y) == ""
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        native = _products(model, x, y, "native")
        auto = _products(model, x, y, "auto")
    assert not [r for r in caplog.records if "native engine does not take" in r.getMessage()]
    generic = _products(model, x, y, "autograd")
    assert torch.isnan(generic).all() and torch.isnan(native).all() and torch.isnan(auto).all()


class _Doubled(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_sequential_subclass_with_its_own_forward_is_not_native():
    model = _Doubled(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    x, y = _batch()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    assert "not an nn.Sequential" in td.native_unsupported_reason(x, y)
    torch.testing.assert_close(_products(model, x, y, "auto"), _products(model, x, y, "autograd"),
                               rtol=1e-10, atol=1e-12)


def test_a_training_mode_batchnorm_prefix_is_not_native_and_keeps_its_statistics():
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[0].requires_grad_(False)
    model.train()
    model[0].running_mean.fill_(0.5)
    x, y = _batch()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    assert "training mode" in td.native_unsupported_reason(x, y)
    assert torch.equal(model[0].running_mean, torch.full((5,), 0.5, dtype=torch.float64))
    model.eval()
    assert TorchTwiceDifferentiable(model, F.cross_entropy).native_unsupported_reason(x, y) == ""
