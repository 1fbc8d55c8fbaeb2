"""TorchTwiceDifferentiable and TorchTensorUtilities against float64 autograd references."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from twicediff.torch import TorchTensorUtilities, TorchTwiceDifferentiable


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def mlp_ce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    return model.double().eval(), F.cross_entropy, torch.randn(13, 6), torch.randint(0, 4, (13,))


def linear_mse():
    torch.manual_seed(1)
    return nn.Linear(5, 1).double().eval(), F.mse_loss, torch.randn(17, 5), torch.randn(17, 1)


def small_cnn():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 3))
    return model.double().eval(), F.cross_entropy, torch.randn(7, 1, 8, 8), torch.randint(0, 3, (7,))


CASES = {"mlp_ce": mlp_ce, "linear_mse": linear_mse, "small_cnn": small_cnn}


def flat_loss(model, loss, x, y):
    """L(w) on a flat parameter vector, the squeezed convention, for autograd references."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def f(w, x=x):
        params, col = {}, 0
        for n, s in zip(names, shapes):
            params[n] = w[col:col + s.numel()].reshape(s)
            col += s.numel()
        return loss(torch.squeeze(functional_call(model, params, (x,))), torch.squeeze(y))

    return f, w0


@pytest.fixture(params=list(CASES))
def case(request):
    model, loss, x, y = CASES[request.param]()
    return model, loss, x.double(), y.double() if y.is_floating_point() else y


def test_grad_hessian_mvp_match_float64_autograd(case):
    model, loss, x, y = case
    td = TorchTwiceDifferentiable(model, loss)
    f, w0 = flat_loss(model, loss, x, y)
    g_ref = torch.autograd.functional.jacobian(f, w0)
    H_ref = torch.autograd.functional.hessian(f, w0)
    assert td.num_params == w0.numel()
    assert rel(td.grad(x, y), g_ref) <= 1e-10
    assert rel(td.hessian(x, y), H_ref) <= 1e-10

    v = torch.randn(5, td.num_params, dtype=torch.float64)
    gxy = td.grad(x, y, create_graph=True)
    assert rel(td.mvp(gxy, v, td.parameters), v @ H_ref) <= 1e-10
    one = td.mvp(gxy, v[0], td.parameters)
    assert one.shape == (1, td.num_params) and rel(one[0], H_ref @ v[0]) <= 1e-10
    for engine in ("func", "autograd", "auto"):
        assert rel(td.hvp(x, y, v, engine=engine), v @ H_ref) <= 1e-10
        assert rel(td.hvp(x, y, v[1], engine=engine), H_ref @ v[1]) <= 1e-10


def test_mixed_product_with_input_matches_autograd(case):
    model, loss, x, y = case
    td = TorchTwiceDifferentiable(model, loss)
    f, w0 = flat_loss(model, loss, x, y)
    # ∂/∂x of (v · ∇θ L): the mixed second derivative ∇x∇θ L applied to v.
    mixed = torch.autograd.functional.jacobian(
        lambda xx: torch.autograd.functional.jacobian(lambda w: f(w, xx), w0, create_graph=True), x)
    mixed = mixed.reshape(w0.numel(), -1)  # [P, numel(x)]
    v = torch.randn(3, td.num_params, dtype=torch.float64)
    xx = x.clone()
    gxy = td.grad(xx, y, create_graph=True)
    assert xx.requires_grad  # pyDVL's convention: grad(create_graph=True) makes x require grad
    out = td.mvp(gxy, v, xx)
    assert out.shape == (3, x.numel())
    assert rel(out, v @ mixed) <= 1e-10


def test_gauss_newton_is_the_same_on_every_engine(case):
    model, loss, x, y = case
    td = TorchTwiceDifferentiable(model, loss)
    v = torch.randn(4, td.num_params, dtype=torch.float64)
    ref = td.hvp(x, y, v, mode="gauss_newton", engine="autograd")
    assert rel(td.hvp(x, y, v, mode="gauss_newton", engine="func"), ref) <= 1e-10
    # JᵀH_ℓJ is positive semidefinite for convex losses.
    assert torch.all(torch.einsum("dp,dp->d", v, ref) >= -1e-12)


def test_attributes_and_training_mode_warning(caplog):
    model = nn.Sequential(nn.Linear(3, 2))
    with caplog.at_level(logging.WARNING):
        td = TorchTwiceDifferentiable(model, F.mse_loss)
    assert "evaluation mode" in caplog.text
    assert td.model is model and td.loss is F.mse_loss
    assert td.device == torch.device("cpu") and td.dtype == torch.float32
    assert td.tensor_type() is torch.Tensor
    model[0].bias.requires_grad_(False)
    assert td.num_params == 6 and len(td.parameters) == 1


@pytest.mark.parametrize("bad, match", [
    (lambda td: TorchTwiceDifferentiable("model", F.mse_loss), "model must be a torch.nn.Module"),
    (lambda td: TorchTwiceDifferentiable(nn.Linear(2, 1), 3), "loss must be callable"),
    (lambda td: TorchTwiceDifferentiable(nn.ReLU(), F.mse_loss), "has no parameters"),
    (lambda td: TorchTwiceDifferentiable(nn.Linear(2, 1).requires_grad_(False), F.mse_loss), "no parameter that requires grad"),
    (lambda td: td.grad(torch.randn(4, 2), torch.randn(5, 1)), "same number of points"),
    (lambda td: td.grad([1.0, 2.0], torch.randn(1, 1)), "x must be a torch.Tensor"),
    (lambda td: td.grad(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1)), "dtype"),
    (lambda td: td.hvp(torch.randn(4, 2), torch.randn(4, 1), torch.randn(2, 4)), r"P = 3"),
    (lambda td: td.hvp(torch.randn(4, 2), torch.randn(4, 1), torch.randn(3, dtype=torch.float64)), "dtype"),
    (lambda td: td.hvp(torch.randn(4, 2), torch.randn(4, 1), torch.randn(3), mode="newton"), "mode must be"),
    (lambda td: td.hvp(torch.randn(4, 2), torch.randn(4, 1), torch.randn(3), engine="fast"), "engine must be"),
    (lambda td: td.mvp(torch.randn(3), torch.randn(3), td.parameters), "no graph"),
    (lambda td: td.mvp(td.grad(torch.randn(4, 2), torch.randn(4, 1), create_graph=True), torch.randn(2, 5),
                       td.parameters), r"P = 3"),
    (lambda td: td.mvp(td.grad(torch.randn(4, 2), torch.randn(4, 1), create_graph=True), torch.randn(3),
                       torch.randn(2)), "does not require grad"),
])
def test_bad_input_raises_a_clear_error(bad, match):
    td = TorchTwiceDifferentiable(nn.Linear(2, 1).eval(), F.mse_loss)
    with pytest.raises((TypeError, ValueError), match=match):
        bad(td)


def test_tensor_utilities_methods():
    tu = TorchTensorUtilities
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(tu.einsum("ij,ij->i", a, b), (a * b).sum(1))
    assert tu.cat([a, b]).shape == (4, 3) and tu.stack([a, b]).shape == (2, 2, 3)
    assert tu.unsqueeze(a, 1).shape == (2, 1, 3)
    assert torch.equal(tu.get_element(a, 1), a[1])
    assert torch.equal(tu.slice(a, 1, 3, axis=1), a[:, 1:3])
    assert tu.shape(a) == (2, 3) and tu.reshape(a, (3, 2)).shape == (3, 2)


def test_cat_gen_tensors_and_parameter_blocks():
    model = TorchTwiceDifferentiable(nn.Linear(3, 2).double().eval(), F.mse_loss)
    chunks = [torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)]
    out = TorchTensorUtilities.cat_gen(iter(chunks), (5, 8), model)
    assert torch.equal(out, torch.cat(chunks)) and out.dtype == model.dtype
    cols = TorchTensorUtilities.cat_gen(iter([c.T for c in chunks]), (8, 5), model, axis=1)
    assert torch.equal(cols, torch.cat(chunks).T)
    # Per-parameter blocks [B, *shape_k] (as vmapped per-sample gradients come): list, tuple, dict.
    w1, b1 = torch.randn(2, 2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    w2, b2 = torch.randn(3, 2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    packed = TorchTensorUtilities.cat_gen(iter([[w1, b1], {"weight": w2, "bias": b2}]), (5, 8), model)
    ref = torch.cat([torch.cat([w1.reshape(2, -1), b1], 1), torch.cat([w2.reshape(3, -1), b2], 1)])
    assert torch.equal(packed, ref)
    with pytest.raises(ValueError, match="overflows"):
        TorchTensorUtilities.cat_gen(iter(chunks + chunks), (5, 8), model)
    with pytest.raises(ValueError, match="fill 5 of the 6"):
        TorchTensorUtilities.cat_gen(iter(chunks), (6, 8), model)
    with pytest.raises(ValueError, match="overflows"):
        TorchTensorUtilities.cat_gen(iter([[w2, b2], [w2, b2]]), (5, 8), model)


def test_data_errors_keeps_the_type_and_names_the_outermost_data():
    from twicediff.errors import data_errors

    with pytest.raises(IndexError, match="^outer: the model or loss failed on batch 3: boom$") as caught:
        with data_errors("outer", "batch 3"):
            with data_errors("inner", "x"):
                raise IndexError("boom")
    assert str(caught.value.__cause__) == "boom"
    # a ValueError subclass whose constructor takes other arguments becomes a plain ValueError
    with pytest.raises(ValueError, match="^w: the model or loss failed on d: 'utf-8' codec"):
        with data_errors("w", "d"):
            b"\xff".decode()
    with pytest.raises(KeyError), data_errors("w", "d"):  # not a data error: unchanged
        {}["a"]
    oom = torch.OutOfMemoryError("out of memory")
    with pytest.raises(torch.OutOfMemoryError) as caught, data_errors("w", "d"):
        raise oom
    assert caught.value is oom


def test_a_torch_compiled_model_is_read_as_its_module():
    """``model = torch.compile(model)`` is what training scripts do. Wrapped, the native engine
    refused it ("the model is a OptimizedModule") and auto ran torch.func over the compiled
    forward: 2.5× slower on an MLP. Its forward is its module's, so the module is what is read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    want = TorchTwiceDifferentiable(model, F.cross_entropy)
    v = torch.randn(2, want.num_params, dtype=torch.float64)
    for wrapped in (torch.compile(model), torch.compile(nn.DataParallel(model))):
        td = TorchTwiceDifferentiable(wrapped, F.cross_entropy)
        assert td.model is model and td.native_unsupported_reason(x, y) == ""
        torch.testing.assert_close(td.hvp(x, y, v, engine="native"), want.hvp(x, y, v, engine="autograd"))
