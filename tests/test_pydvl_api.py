"""twicediff as a drop-in for pyDVL 0.7.1's ``pydvl.influence``.

1. Every module of pyDVL 0.7.1, imported under its renamed path, has pyDVL's ``__all__`` and every
   public name with a signature that binds every pyDVL call the same way (the list:
   tests/pydvl_0_7_1_api.py, written from pyDVL's source).
2. The functional API (``twicediff.torch.functional``) and the helpers (``twicediff.torch.util``)
   against float64 references: explicit Hessians of ``loss(model(x), y)`` from torch.autograd.
3. pyDVL's conventions on single points and on ``mvp``'s ``backprop_on``.
"""
import importlib
import inspect
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import pydvl_0_7_1_api as api
import twicediff
from twicediff.torch import TorchTwiceDifferentiable
from twicediff.torch.functional import (
    batch_hvp_gen,
    batch_loss_function,
    empirical_loss_function,
    get_hvp_function,
    hvp,
)
from twicediff.torch.util import (
    align_structure,
    as_tensor,
    flatten_tensors_to_vector,
    reshape_vector_to_tensors,
    to_model_device,
)

# ---- 1. names and signatures ------------------------------------------------------------------

TARGETS = [(name, target) for name, entry in api.MODULES.items()
           for target in [entry["twicediff"]] + api.ALIASES.get(name, [])]


@pytest.mark.parametrize("pydvl_name, target", TARGETS, ids=[f"{a}->{b}" for a, b in TARGETS])
def test_module_has_pydvl_names_and_signatures(pydvl_name, target):
    entry = api.MODULES[pydvl_name]
    assert target == "twicediff" + pydvl_name[len("pydvl.influence"):] or target in api.ALIASES.get(pydvl_name, [])
    module = importlib.import_module(target)
    assert api.check(module, entry, all_superset=target != entry["twicediff"]) == []


def test_star_import_gives_pydvl_all():
    for name, entry in api.MODULES.items():
        if entry["all"] is None:
            continue
        namespace = {}
        exec(f"from {entry['twicediff']} import *", namespace)
        assert set(entry["all"]) <= set(namespace), name


def test_the_checker_finds_differences():
    """The signature rule: pyDVL's parameters in place, extras only with defaults."""
    ref = inspect.signature(lambda a, b=1, *, c=None, **kwargs: None)
    ok = inspect.signature(lambda a, b=1, d=2, *, c=None, e=3, **kwargs: None)
    assert api.check_signature(ok, ref, exact=False) == ""
    assert api.check_signature(ok, ref, exact=True) != ""
    for bad in (lambda a, b=2, *, c=None, **kwargs: None,       # another default
                lambda b, a=1, *, c=None, **kwargs: None,       # swapped positions
                lambda a, b=1, *, c=None: None,                 # no **kwargs
                lambda a, b=1, *, c=None, d, **kwargs: None,    # a new required argument
                lambda a, *, b=1, c=None, **kwargs: None):      # b no longer positional
        assert api.check_signature(inspect.signature(bad), ref, exact=False) != ""


def test_solvers_are_the_registered_ones():
    from twicediff.inversion import InversionMethod, InversionRegistry
    from twicediff.torch import torch_differentiable as td

    for method, func in [(InversionMethod.Direct, td.solve_linear), (InversionMethod.Cg, td.solve_batch_cg),
                         (InversionMethod.Lissa, td.solve_lissa), (InversionMethod.Arnoldi, td.solve_arnoldi)]:
        assert InversionRegistry.get(td.TorchTwiceDifferentiable, method) is func
    assert twicediff.general.compute_influences is twicediff.influence.compute_influences
    assert twicediff.torch.util.as_tensor is twicediff.torch.as_tensor


def test_registering_a_solver_of_the_wrong_signature_is_a_value_error():
    """pyDVL raises ValueError for a solver that does not fit (model, training_data, b, λ)."""
    from twicediff.inversion import InversionMethod, InversionRegistry

    class Other(TorchTwiceDifferentiable):
        pass

    with pytest.raises(ValueError, match="must take"):
        InversionRegistry.register(Other, InversionMethod.Cg)(lambda model, b: None)
    with pytest.raises(ValueError, match="must take"):
        InversionRegistry.register(Other, InversionMethod.Cg)(lambda model, data, b, lam, extra: None)
    assert (Other, InversionMethod.Cg) not in InversionRegistry.registry


def test_influence_type_registry_dispatches():
    """pyDVL's compute_influences dispatches through the public influence_type_registry."""
    from twicediff.general import InfluenceType, compute_influences, influence_type_registry

    torch.manual_seed(0)
    model = TorchTwiceDifferentiable(nn.Linear(3, 2).double().eval(), F.mse_loss)
    loader = DataLoader(TensorDataset(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)),
                        batch_size=3)
    saved = influence_type_registry[InfluenceType.Up]
    influence_type_registry[InfluenceType.Up] = lambda model, data, factors, progress=False: factors.shape
    try:
        assert compute_influences(model, loader, hessian_regularization=0.1) == (6, model.num_params)
    finally:
        influence_type_registry[InfluenceType.Up] = saved


# ---- 2. the functional API against float64 references -----------------------------------------


def _flat_params(model):
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def reference_hessian(model, loss, batches, weights):
    """Σ_b w_b ∇²θ loss(model(x_b), y_b) in float64 by torch.autograd.functional.hessian."""
    params = _flat_params(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    w0 = flatten_tensors_to_vector(params.values())

    def f(w):
        named = dict(zip(names, reshape_vector_to_tensors(w, shapes)))
        return sum(wb * loss(functional_call(model, named, (x,)), y) for (x, y), wb in zip(batches, weights))

    return torch.autograd.functional.hessian(f, w0)


def mlp_ce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    return model, F.cross_entropy, torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))


def mlp_mse_frozen_prefix():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2)).double().eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model, F.mse_loss, torch.randn(11, 4, dtype=torch.float64), torch.randn(11, 2, dtype=torch.float64)


def cnn_ce():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)).double().eval()
    return model, F.cross_entropy, torch.randn(7, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (7,))


def mse_broadcast():
    """Output [N, 1] and y [N]: the unsqueezed MSE broadcasts to [N, N] (what pyDVL's functional API
    computes, with torch's warning); the native engine's squeezed loss would differ."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    return model, F.mse_loss, torch.randn(9, 3, dtype=torch.float64), torch.randn(9, dtype=torch.float64)


FUNCTIONAL_CASES = {"mlp_ce": mlp_ce, "mlp_mse_frozen_prefix": mlp_mse_frozen_prefix, "cnn_ce": cnn_ce,
                    "mse_broadcast": mse_broadcast}


@pytest.fixture(params=list(FUNCTIONAL_CASES))
def functional_case(request):
    return FUNCTIONAL_CASES[request.param]()


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("reverse_only", [True, False])
def test_batch_hvp_gen_matches_float64_hessians(functional_case, reverse_only):
    model, loss, x, y = functional_case
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    v = torch.randn(P, dtype=torch.float64)
    products = list(batch_hvp_gen(model, loss, loader, reverse_only=reverse_only))
    assert len(products) == -(-x.shape[0] // 4)
    for (xb, yb), product in zip(_batches(x, y, 4), products):
        H = reference_hessian(model, loss, [(xb, yb)], [1.0])
        out = product(v)
        assert out.shape == (P,) and not out.requires_grad
        torch.testing.assert_close(out, H @ v, rtol=1e-10, atol=1e-12)
        # the direction also as a dict in the parameters' structure
        torch.testing.assert_close(product(align_structure(_flat_params(model), v)), H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_get_hvp_function_average_and_empirical(functional_case):
    model, loss, x, y = functional_case
    loader = DataLoader(TensorDataset(x, y), batch_size=4)   # 4, 4, 3 (or 3) points: uneven batches
    batches = _batches(x, y, 4)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    v = torch.randn(P, dtype=torch.float64)
    # use_hessian_avg=True: the batch Hessians with equal weights 1 / number of batches
    H_avg = reference_hessian(model, loss, batches, [1 / len(batches)] * len(batches))
    torch.testing.assert_close(get_hvp_function(model, loss, loader)(v), H_avg @ v, rtol=1e-10, atol=1e-12)
    # use_hessian_avg=False: the Hessian of the empirical loss Σ n_b L_b / N
    N = x.shape[0]
    H_emp = reference_hessian(model, loss, batches, [b[0].shape[0] / N for b in batches])
    for reverse_only in (True, False):
        out = get_hvp_function(model, loss, loader, use_hessian_avg=False, reverse_only=reverse_only)(v)
        torch.testing.assert_close(out, H_emp @ v, rtol=1e-10, atol=1e-12)
    # the same matrix as the empirical loss function's Hessian, by the functional hvp
    emp = empirical_loss_function(model, loss, loader)
    direct = hvp(emp, _flat_params(model), align_structure(_flat_params(model), v))
    torch.testing.assert_close(flatten_tensors_to_vector(direct.values()), H_emp @ v, rtol=1e-10, atol=1e-12)


def test_get_hvp_function_track_gradients_keeps_the_graph():
    model, loss, x, y = mlp_ce()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, dtype=torch.float64)
    for avg in (True, False):
        detached = get_hvp_function(model, loss, loader, use_hessian_avg=avg)(v)
        tracked = get_hvp_function(model, loss, loader, use_hessian_avg=avg, track_gradients=True)(v)
        assert not detached.requires_grad and tracked.requires_grad
        torch.testing.assert_close(tracked.detach(), detached, rtol=1e-10, atol=1e-12)
        # d(u · H v)/dθ exists: the third derivative pyDVL's track_gradients is for
        grads = torch.autograd.grad(tracked @ torch.ones(P, dtype=torch.float64), list(model.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)


def test_get_hvp_function_reads_the_parameters_at_each_call():
    model, loss, x, y = mlp_ce()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    product = get_hvp_function(model, loss, loader)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    before = product(v)
    with torch.no_grad():
        model[0].weight.mul_(2)
    after = product(v)
    batches = _batches(x, y, 6)
    H = reference_hessian(model, loss, batches, [0.5, 0.5])
    torch.testing.assert_close(after, H @ v, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(before, after)


def test_functional_hvp_on_plain_functions():
    def f(z):
        return torch.sum(z ** 3)

    z = torch.linspace(-1, 1, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, dtype=torch.float64)
    for reverse_only in (True, False):
        torch.testing.assert_close(hvp(f, z, v, reverse_only=reverse_only), 6 * z.detach() * v)
        params = {"a": z.detach()[:3], "b": z.detach()[3:].reshape(2, 2)}
        out = hvp(lambda p: (p["a"] ** 3).sum() + (p["b"] ** 2).sum() * p["a"].sum(), params,
                  {"a": v[:3], "b": v[3:].reshape(2, 2)}, reverse_only=reverse_only)
        assert set(out) == {"a", "b"} and out["b"].shape == (2, 2)
        a, b = params["a"], params["b"]
        ref_a = 6 * a * v[:3] + 2 * (b * v[3:].reshape(2, 2)).sum()
        ref_b = 2 * b * v[:3].sum() + 2 * v[3:].reshape(2, 2) * a.sum()
        torch.testing.assert_close(out["a"], ref_a)
        torch.testing.assert_close(out["b"], ref_b)


def test_loss_functions_values():
    model, loss, x, y = mlp_ce()
    params = _flat_params(model)
    torch.testing.assert_close(batch_loss_function(model, loss, x, y)(params), loss(model(x), y))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    ref = sum(loss(model(xb), yb) * xb.shape[0] for xb, yb in _batches(x, y, 4)) / x.shape[0]
    torch.testing.assert_close(empirical_loss_function(model, loss, loader)(params), ref)
    with pytest.raises(ValueError, match="data_loader"):
        empirical_loss_function(model, loss, [])(params)


def test_functional_api_does_not_change_the_model():
    model, loss, x, y = mlp_mse_frozen_prefix()
    state = {k: t.clone() for k, t in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    v = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad), dtype=torch.float64)
    for avg in (True, False):
        get_hvp_function(model, loss, loader, use_hessian_avg=avg)(v)
    for product in batch_hvp_gen(model, loss, loader):
        product(v)
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


# ---- util --------------------------------------------------------------------------------------


def test_flatten_and_reshape_round_trip():
    tensors = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    flat = flatten_tensors_to_vector(tensors)
    assert flat.shape == (12,)
    back = reshape_vector_to_tensors(flat, (t.shape for t in tensors))  # a generator of shapes
    assert isinstance(back, tuple) and all(torch.equal(a, b) for a, b in zip(back, tensors))
    # non-contiguous input
    flat2 = torch.stack([flat, flat], dim=1)[:, 0]
    assert all(torch.equal(a, b) for a, b in zip(reshape_vector_to_tensors(flat2, [t.shape for t in tensors]),
                                                  tensors))
    with pytest.raises(ValueError, match="1-d"):
        reshape_vector_to_tensors(flat.reshape(3, 4), [(12,)])
    with pytest.raises(ValueError, match="12"):
        reshape_vector_to_tensors(flat, [(2, 3)])
    with pytest.raises(ValueError, match="empty"):
        flatten_tensors_to_vector([])
    with pytest.raises(TypeError, match="element 1"):
        flatten_tensors_to_vector([torch.zeros(2), [1.0]])


def test_align_structure():
    source = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    flat = torch.arange(9.0)
    aligned = align_structure(source, flat)
    assert list(aligned) == ["w", "b"] and torch.equal(aligned["w"], flat[:6].reshape(2, 3))
    pair = (torch.ones(2, 3), torch.ones(3))
    assert torch.equal(align_structure(source, pair)["b"], pair[1])
    assert torch.equal(align_structure(source, list(pair))["w"], pair[0])
    same = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    assert align_structure(source, same) is same
    for bad, words in [({"b": torch.zeros(3), "w": torch.zeros(2, 3)}, "keys"),
                       ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, "shapes"),
                       ((torch.zeros(2, 3),), "shapes"),
                       (torch.zeros(8), "cannot be cut"),
                       (torch.zeros(3, 3), "cannot be cut"),
                       (3.0, "float")]:
        with pytest.raises(ValueError, match=words):
            align_structure(source, bad)


def test_to_model_device_and_as_tensor(caplog):
    x = torch.zeros(2)
    assert to_model_device(x, nn.Linear(2, 2)) is x   # a plain module has no .device: unchanged

    class WithDevice(nn.Linear):
        device = torch.device("meta")

    assert to_model_device(x, WithDevice(2, 2)).device.type == "meta"
    with caplog.at_level(logging.WARNING):
        t = as_tensor([1.0, 2.0], dtype=torch.float64)
    assert t.dtype == torch.float64 and "Converting" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert as_tensor(t) is t and as_tensor([1], warn=False).tolist() == [1]
    assert caplog.text == ""


# ---- 3. pyDVL's conventions -------------------------------------------------------------------


def _squeezed_reference(model, loss, x, y):
    """∇θ and ∇²θ of loss(squeeze(model(x)), squeeze(y)) in float64, and ∇x∇θ as [P, x.numel()]."""
    params = _flat_params(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    w0 = flatten_tensors_to_vector(params.values())

    def f(w, x=x):
        named = dict(zip(names, reshape_vector_to_tensors(w, shapes)))
        return loss(torch.squeeze(functional_call(model, named, (x,))), torch.squeeze(y))

    g = torch.autograd.functional.jacobian(f, w0)
    H = torch.autograd.functional.hessian(f, w0)
    mixed = torch.autograd.functional.jacobian(lambda xx: torch.autograd.functional.jacobian(
        lambda w: f(w, xx), w0, create_graph=True), x)
    return g, H, mixed.reshape(w0.numel(), -1)


SINGLE_POINTS = {
    "x[1,D] y[K] mse": lambda: (torch.randn(1, 4), torch.randn(3), F.mse_loss),
    "x[D] y[K] mse": lambda: (torch.randn(4), torch.randn(3), F.mse_loss),
    "x[1,D] y[1,K] mse": lambda: (torch.randn(1, 4), torch.randn(1, 3), F.mse_loss),
    "x[D] y[] ce": lambda: (torch.randn(4), torch.tensor(2), F.cross_entropy),
    "x[1,D] y[1] ce": lambda: (torch.randn(1, 4), torch.tensor([1]), F.cross_entropy),
}


@pytest.mark.parametrize("case", list(SINGLE_POINTS))
def test_single_point_conventions(case):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y, loss = SINGLE_POINTS[case]()
    x = x.double()
    y = y.double() if y.is_floating_point() else y
    g_ref, H_ref, mixed_ref = _squeezed_reference(model, loss, x, y)
    td = TorchTwiceDifferentiable(model, loss)
    torch.testing.assert_close(td.grad(x, y), g_ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(3, td.num_params, dtype=torch.float64)
    xg = x.clone()
    gxy = td.grad(xg, y, create_graph=True)
    torch.testing.assert_close(td.mvp(gxy, v, td.parameters), v @ H_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(td.mvp(gxy, v, xg), v @ mixed_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(td.hvp(x, y, v), v @ H_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(td.hessian(x, y), H_ref, rtol=1e-10, atol=1e-12)


def test_batch_with_a_different_number_of_targets_is_refused():
    """x [N, D] with N > 1 and y [M], M != N: pyDVL fails or broadcasts silently; twicediff refuses."""
    td = TorchTwiceDifferentiable(nn.Linear(4, 3).double().eval(), F.mse_loss)
    for y in (torch.randn(1, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)):
        with pytest.raises(ValueError, match="same number of points"):
            td.grad(torch.randn(5, 4, dtype=torch.float64), y)


def test_mvp_on_a_tensor_the_gradient_does_not_depend_on_raises_like_autograd():
    torch.manual_seed(5)
    td = TorchTwiceDifferentiable(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval(),
                                  F.mse_loss)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    g = td.grad(x, y, create_graph=True)
    unrelated = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    for v in (torch.randn(td.num_params, dtype=torch.float64), torch.randn(4, td.num_params, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match=r"backprop_on\[1\].*not used in grad_xy's graph"):
            td.mvp(g, v, [td.parameters[0], unrelated])
        with pytest.raises(RuntimeError, match=r"backprop_on\[0\].*does not require grad"):
            td.mvp(g, v, torch.zeros(3, dtype=torch.float64))
    # autograd's own verdict on the same call
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(g @ torch.ones(td.num_params, dtype=torch.float64), [unrelated])
