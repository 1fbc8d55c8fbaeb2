"""Influence functions on batches whose x is a tuple (``model(*x)``) or a dict (``model(**x)``):
factors, up-weighting influences and self-influences of every inversion method equal those of the
same model spelled with one tensor x; the up-weighting influences also equal the float64 reference
(per-point gradients and the dense solve); perturbation influence asks for a single tensor x."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import twicediff
from twicediff.torch.batch import model_args, per_point, vmap_dims

from structured_models import DT, PROBLEMS, batches, reference, stacked_x

SPELLINGS = {"tuple": lambda x: torch.cat(x, 1), "dict": stacked_x}
LAMBDA = {"tuple": 1.1, "dict": 1.7}  # H + λI positive definite for both problems
OPTIONS = {"direct": {}, "cg": dict(rtol=1e-10, atol=0.0), "arnoldi": {}, "ekfac": {}, "kfac": {}}


def point_gradients(model, x, y) -> torch.Tensor:
    """[N, P]: ∇θ loss(squeeze(model(x_i)), squeeze(y_i)) for every point, in float64 torch.func."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    dims = vmap_dims(x)

    def loss(p, xi, yi):
        args, kwargs = model_args(per_point(xi, dims))
        return F.cross_entropy(torch.squeeze(functional_call(model, p, args, kwargs)), yi)

    g = vmap(grad(loss), in_dims=(None, dims, 0))(params, x, y)
    return torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1)


def problem(name):
    model, spelled, x, y = PROBLEMS[name]()
    return (twicediff.TorchTwiceDifferentiable(model, F.cross_entropy),
            twicediff.TorchTwiceDifferentiable(spelled, F.cross_entropy), x, y)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_up_influences_match_the_float64_reference(name):
    model, _, x, y = problem(name)
    _, H = reference(name)
    lam = LAMBDA[name]
    assert float(torch.linalg.eigvalsh(H)[0]) + lam > 0.3
    G = point_gradients(model.model, x, y)
    want = G @ torch.linalg.solve(H + lam * torch.eye(model.num_params, dtype=DT), G.T)
    data = batches(x, y, 4)
    got = twicediff.compute_influences(model, data, hessian_regularization=lam)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(twicediff.compute_self_influences(model, data, hessian_regularization=lam),
                               want.diagonal(), rtol=1e-9, atol=1e-11)
    factors = twicediff.compute_influence_factors(model, data, data[:1], "direct", hessian_perturbation=lam).x
    torch.testing.assert_close(factors @ G.T, want[:4], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name, method", [(name, method) for name in PROBLEMS for method in OPTIONS
                                          if (name, method) != ("dict", "arnoldi")])  # slow; in the solver tests
def test_every_method_equals_the_tensor_x_spelling(name, method):
    model, spelled, x, y = problem(name)
    lam = LAMBDA[name]
    data, test = batches(x, y, 4), batches(x, y, 3)[:2]
    tensor_data = batches(SPELLINGS[name](x), y, 4)
    tensor_test = batches(SPELLINGS[name](x), y, 3)[:2]
    options = dict(OPTIONS[method], rank_estimate=12) if method == "arnoldi" else OPTIONS[method]
    got = twicediff.compute_influences(model, data, test_data=test, inversion_method=method,
                                       hessian_regularization=lam, **options)
    want = twicediff.compute_influences(spelled, tensor_data, test_data=tensor_test, inversion_method=method,
                                        hessian_regularization=lam, **options)
    assert got.shape == (6, 10)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    if method in ("direct", "ekfac"):
        torch.testing.assert_close(
            twicediff.compute_self_influences(model, data, inversion_method=method, hessian_regularization=lam),
            twicediff.compute_self_influences(spelled, tensor_data, inversion_method=method,
                                              hessian_regularization=lam), rtol=1e-8, atol=1e-10)


def test_up_influences_streamed_under_a_small_budget_equal_the_unstreamed():
    model, _, x, y = problem("dict")
    data = batches(x, y, 4)
    factors = twicediff.compute_influence_factors(model, data, data[:1], "direct", hessian_perturbation=1.7).x
    whole = twicediff.compute_influences_up(model, data, factors)
    with twicediff.memory_budget(20_000):  # below N_input · P · 8 bytes: streamed, in chunks of samples
        streamed = twicediff.compute_influences_up(model, data, factors)
    torch.testing.assert_close(streamed, whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_perturbation_influence_asks_for_a_single_tensor_x(name):
    model, _, x, y = problem(name)
    form = "a tuple" if name == "tuple" else "a dict"
    with pytest.raises(TypeError) as info:
        twicediff.compute_influences(model, batches(x, y, 5), hessian_regularization=LAMBDA[name],
                                     influence_type="perturbation")
    message = str(info.value)
    assert message.startswith("compute_influences_pert: perturbation influence differentiates the loss in the "
                              "input x and needs x to be a single floating-point tensor")
    assert f"input_data batch 0 gives x as {form}" in message and "influence_type='up'" in message
    assert "(5, " in message  # the shapes of x's entries


def test_bad_test_data_is_named():
    model, _, x, y = problem("dict")
    bad = [({**x, "attention_mask": x["attention_mask"][:3]}, y)]
    with pytest.raises(ValueError, match=r"compute_influences: the inputs disagree on the batch size.*"
                                         r"x\['attention_mask'\] has shape \(3, 5\)"):
        twicediff.compute_influences(model, batches(x, y, 4), test_data=bad, hessian_regularization=1.7)
    with pytest.raises(TypeError, match=r"compute_influences_up: x\['input_ids'\] has dtype torch.float32"):
        twicediff.compute_influences(model, batches(x, y, 4), input_data=[({**x, "input_ids": x["input_ids"].float()},
                                                                            y)], hessian_regularization=1.7)
