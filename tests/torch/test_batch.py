"""What a batch is (twicediff.torch.batch): x a tensor, a tuple (``model(*x)``) or a dict
(``model(**x)``). The model wrapper's grad, hvp (every engine), hessian, mean_hessian and mvp on a
two-input model (tuple x) and a small transformer (dict x with input_ids, attention_mask and a bool
flag), against float64 torch.func references; the native engine's refusal; the errors, which name
the function, the key of x and the shapes."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twicediff.errors import EngineChoiceError
from twicediff.torch import TorchTwiceDifferentiable
from twicediff.torch import batch as tb

from structured_models import (DT, PROBLEMS, TOKENS, batches, flat_theta, mean_loss_of_theta, reference,
                               transformer_problem, two_inputs_problem)


@pytest.fixture(params=list(PROBLEMS))
def problem(request):
    """(model, x, y, its float64 reference (∇θ L, ∇²θ L)) for the tuple and the dict problem."""
    model, _, x, y = PROBLEMS[request.param]()
    return (model, x, y) + reference(request.param)


def close(a, b, tol=1e-10):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


# ---- the batch module --------------------------------------------------------------------------------


def test_structure_helpers_keep_the_structure_and_pass_other_leaves():
    u, w = torch.randn(6, 3), torch.randn(6, 2)
    ids = torch.zeros(6, 4, dtype=torch.long)
    scale = torch.tensor(2.0)
    x = {"input_ids": ids, "extra": (u, {"w": w}), "scale": scale, "flag": True}
    assert tb.batch_size(x, "f") == 6
    assert tb.batch_size(torch.randn(3, 2), "f") == 3 and tb.batch_size(torch.tensor(1.0), "f") == 1
    assert [n for n, _ in tb.input_tensors(x)] == ["x['input_ids']", "x['extra'][0]", "x['extra'][1]['w']",
                                                   "x['scale']"]
    part = tb.slice_batch(x, 1, 3)
    assert part["input_ids"].shape == (2, 4) and part["extra"][1]["w"].shape == (2, 2)
    torch.testing.assert_close(part["extra"][0], u[1:3])
    assert part["scale"] is scale and part["flag"] is True  # 0-d tensors and flags are not sliced
    assert tb.vmap_dims(x) == {"input_ids": 0, "extra": (0, {"w": 0}), "scale": None, "flag": None}
    args, kwargs = tb.model_args(x)
    assert args == () and list(kwargs) == list(x)
    args, kwargs = tb.model_args((u, w))
    assert args[0] is u and args[1] is w and kwargs == {}
    moved = tb.move_inputs(x, torch.device("cpu"), DT)
    assert moved["extra"][0].dtype == DT and moved["scale"].dtype == DT and moved["input_ids"].dtype == torch.long
    assert moved["flag"] is True
    assert [t.dtype for t in tb.floating_inputs(moved)] == [DT, DT, DT]
    Pair = collections.namedtuple("Pair", "u w")
    assert isinstance(tb.slice_batch(Pair(u, w), 0, 2), Pair) and tb.batch_size(Pair(u, w), "f") == 6
    assert tb.call_model(lambda a, b: a.shape[1] + b.shape[1], (u, w)) == 5
    assert tb.call_model(lambda input_ids, **rest: input_ids.shape, {"input_ids": ids, "flag": 1}) == (6, 4)


@pytest.mark.parametrize("x, y, error, words", [
    ((torch.randn(5, 3, dtype=DT), torch.randn(4, 2, dtype=DT)), torch.zeros(5, dtype=torch.long), ValueError,
     ["grad", "disagree on the batch size", "x[0] has shape (5, 3)", "x[1] has shape (4, 2)"]),
    ({"u": torch.randn(5, 3, dtype=DT), "w": torch.randn(3, 2, dtype=DT)}, torch.zeros(5, dtype=torch.long),
     ValueError, ["grad", "disagree on the batch size", "x['u'] has shape (5, 3)", "x['w'] has shape (3, 2)"]),
    ({"u": torch.randn(5, 3), "w": torch.randn(5, 2, dtype=DT)}, torch.zeros(5, dtype=torch.long), TypeError,
     ["grad", "x['u'] has dtype torch.float32", "torch.float64"]),
    ((torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)), torch.zeros(4, dtype=torch.long), ValueError,
     ["grad", "same number of points", "5 in x", "y of shape (4,)"]),
    ({0: torch.randn(5, 3, dtype=DT)}, torch.zeros(5, dtype=torch.long), TypeError,
     ["grad", "string keys", "key 0"]),
    ({"flag": True, "scale": torch.tensor(2.0, dtype=DT)}, torch.zeros(5, dtype=torch.long), ValueError,
     ["grad", "no tensor with a batch dimension", "'scale': () torch.float64"]),
    ([1.0, 2.0], torch.zeros(2, dtype=torch.long), TypeError, ["grad", "x must be a torch.Tensor", "holds no tensor"]),
    ({1, 2}, torch.zeros(5, dtype=torch.long), TypeError, ["grad", "x must be a torch.Tensor", "dict", "got set"]),
    ((torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)), [0, 1], TypeError,
     ["grad", "y must be a torch.Tensor", "list"]),
])
def test_bad_batches_name_the_function_the_key_and_the_shapes(x, y, error, words):
    model, _, _, _ = two_inputs_problem()
    with pytest.raises(error) as info:
        TorchTwiceDifferentiable(model, F.cross_entropy).grad(x, y)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_every_entry_point_checks_the_batch():
    model, _, x, y = transformer_problem()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    bad = {**x, "attention_mask": x["attention_mask"][:7]}
    V = torch.zeros(2, td.num_params, dtype=DT)
    for where, call in [("grad", lambda: td.grad(bad, y)), ("hvp", lambda: td.hvp(bad, y, V)),
                        ("hvp", lambda: td.hvp_function(bad, y)), ("hessian", lambda: td.hessian(bad, y)),
                        ("mean_hessian", lambda: td.mean_hessian([(bad, y)])),
                        ("native_unsupported_reason", lambda: td.native_unsupported_reason(bad, y))]:
        with pytest.raises(ValueError, match=rf"^{where}: the inputs disagree on the batch size.*"
                                             r"x\['attention_mask'\] has shape \(7, 5\)"):
            call()
    with pytest.raises(TypeError, match=r"hvp: x\['scale'\] has dtype torch.float32 but the model's parameters are "
                                        "torch.float64"):
        td.hvp({**x, "scale": torch.ones(10)}, y, V)


# ---- derivatives against float64 torch.func ---------------------------------------------------------------


def test_grad_hvp_and_hessian_match_float64_torch_func(problem):
    model, x, y, g_ref, H = problem
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    close(td.grad(x, y), g_ref)
    V = torch.randn(4, td.num_params, dtype=DT, generator=torch.Generator().manual_seed(3))
    for engine in ("auto", "func", "autograd"):
        close(td.hvp(x, y, V, engine=engine), V @ H)
    close(td.hvp(x, y, V[0]), H @ V[0])
    bound = td.hvp_function(x, y)  # auto: measured among the generic engines, never native
    close(bound(V), V @ H)
    assert "native" not in bound.engine.engines and bound.engine.chosen in ("func", "autograd", "loop", "compiled")
    close(td.hessian(x, y), H)
    close(td.hessian(x, y, method="columns"), H)
    gn = [td.hvp(x, y, V, mode="gauss_newton", engine=e) for e in ("func", "autograd")]
    close(gn[0], gn[1])
    assert float((gn[0] - V @ H).abs().max()) > 1e-6  # the Gauss-Newton matrix is another matrix here


def test_mean_hessian_weights_batches_by_their_size(problem):
    model, x, y, _, H = problem
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    close(td.mean_hessian(batches(x, y, 4)), H)  # batches of 4, 4 and 2 points


def test_a_dataloader_over_a_dict_dataset_is_collated_into_dict_batches():
    model, _, x, y = transformer_problem()

    class Tokens(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i]}, y[i]

    loader = DataLoader(Tokens(), batch_size=4)
    x0, _ = next(iter(loader))
    assert list(x0) == ["input_ids", "attention_mask"] and x0["input_ids"].shape == (4, TOKENS)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    close(td.mean_hessian(loader), reference("dict")[1])


def test_a_sequential_called_with_a_tuple_or_dict_goes_to_a_generic_engine_with_the_native_values():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT).eval()
    td = TorchTwiceDifferentiable(mlp, F.cross_entropy)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    V = torch.randn(3, td.num_params, dtype=DT)
    assert td.native_unsupported_reason(x, y) == ""
    native = td.hvp(x, y, V, engine="native")
    for form, shown in [((x,), "a tuple (model(*x))"), ({"input": x}, "a dict (model(**x))")]:
        reason = td.native_unsupported_reason(form, y)
        assert "native engine takes x as one tensor" in reason and shown in reason and "(8, 3)" in reason
        bound = td.hvp_function(form, y)
        close(bound(V), native)
        assert "native" not in bound.engine.engines and bound.engine.chosen in ("func", "autograd", "loop", "compiled")
        close(td.hessian(form, y), td.hessian(x, y))
        with pytest.raises(EngineChoiceError, match="^hvp: engine='native' cannot take this model, loss or batch: "
                                                    "the native engine takes x as one tensor"):
            td.hvp(form, y, V, engine="native")


def test_grad_with_create_graph_gives_mixed_products_in_the_floating_inputs():
    model, _, (u, w), y = two_inputs_problem(n=5)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    u, w = u.clone(), w.clone()
    g = td.grad((u, w), y, create_graph=True)
    assert u.requires_grad and w.requires_grad  # in place, as for a tensor x
    V = torch.randn(2, td.num_params, dtype=DT)
    mixed = td.mvp(g, V, backprop_on=[u, w])
    theta = flat_theta(model)

    def directional(uw):
        f = mean_loss_of_theta(model, F.cross_entropy, [((uw[:, :3], uw[:, 3:]), y)])
        return V @ torch.func.grad(f)(theta)

    J = torch.func.jacrev(directional)(torch.cat([u, w], 1).detach())  # [D, 5, 5]
    close(mixed, torch.cat([J[:, :, :3].reshape(2, -1), J[:, :, 3:].reshape(2, -1)], 1))
    model, _, x, y = transformer_problem(n=4)
    g = TorchTwiceDifferentiable(model, F.cross_entropy).grad(x, y, create_graph=True)
    assert g.requires_grad and not x["input_ids"].requires_grad  # integer inputs stay as they are


def test_batches_move_to_the_models_device(device):
    model, _, x, y = transformer_problem(n=6)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(2, td.num_params, dtype=DT)
    on_cpu = td.hvp(x, y, V)
    moved = TorchTwiceDifferentiable(transformer_problem(n=6)[0].to(device), F.cross_entropy)
    got = moved.hvp(x, y, V.to(device))  # x and y on the CPU
    assert got.device.type == device.type
    close(got.cpu(), on_cpu, 1e-9)
    assert x["attention_mask"].shape == (6, TOKENS)


@pytest.mark.parametrize("engine", ["auto", "func", "autograd", "loop", "compiled"])
def test_a_loss_of_one_element_is_taken_as_its_scalar(engine):
    """A loss returning a [1] tensor (a custom loss with keepdim) gives every engine the products of
    the scalar loss: autograd takes a one-element output, torch.func's grad does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 3)).double().eval()
    x, y = torch.randn(5, 1, 10, dtype=torch.float64), torch.randint(0, 3, (5,))
    scalar = TorchTwiceDifferentiable(model, F.cross_entropy)
    one = TorchTwiceDifferentiable(model, lambda o, t: F.cross_entropy(o, t).reshape(1))
    V = torch.randn(3, scalar.num_params, dtype=torch.float64)
    torch.testing.assert_close(one.hvp(x, y, V, engine=engine), scalar.hvp(x, y, V, engine="loop"))
    torch.testing.assert_close(one.grad(x, y), scalar.grad(x, y))


# Losses written for batches, as most are: they index the class dimension as dim 1 or take a
# column, so they fail on the [C] that pyDVL's squeeze leaves of a batch of one point. The last
# one checks its variance with data-dependent control flow, which vmap does not run.
BATCH_LOSSES = {
    "log_softmax(dim=1)": lambda o, t: F.nll_loss(F.log_softmax(o, dim=1), t.long()),
    "a column": lambda o, t: F.mse_loss(o[:, 0], t.double()) + (o[:, 1:] ** 2).mean(),
    "gaussian_nll of columns": lambda o, t: F.gaussian_nll_loss(o[:, 0], t.double(), F.softplus(o[:, 1])),
}


@pytest.mark.parametrize("name", list(BATCH_LOSSES))
def test_a_loss_written_for_batches_takes_single_points_as_batches_of_one(name):
    """Gradients and products of a one-point batch, and influences (per-point gradients), of a loss
    that fails on a squeezed point: each point is then the batch of one the loss was written for,
    against float64 autograd on ``loss(model(x[i:i+1]), y[i:i+1])``."""
    from twicediff.influence import compute_influences
    torch.manual_seed(0)
    loss = BATCH_LOSSES[name]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises((IndexError, RuntimeError)):
        loss(model(x[:1]).squeeze(), y[:1].squeeze())  # pyDVL's convention alone fails on one point
    td = TorchTwiceDifferentiable(model, loss)
    params = list(model.parameters())

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in ts])

    def point_grad(i, create_graph=False):
        return flat(torch.autograd.grad(loss(model(x[i:i + 1]), y[i:i + 1]), params, create_graph=create_graph))

    V = torch.randn(2, td.num_params, dtype=torch.float64)
    g0 = point_grad(0, create_graph=True)
    H0V = torch.stack([flat(torch.autograd.grad(g0 @ v, params, retain_graph=True)) for v in V])
    close(td.grad(x[:1], y[:1]), g0.detach())
    for engine in ("auto", "func", "autograd", "loop"):
        close(td.hvp(x[:1], y[:1], V, engine=engine), H0V)
    # Influences of the points on one another: g_i · (H + λI)⁻¹ g_j, H the batch's Hessian
    G = torch.stack([point_grad(i) for i in range(6)])
    H = td.hessian(x, y) + 0.5 * torch.eye(td.num_params, dtype=torch.float64)
    loader = DataLoader(list(zip(x, y)), batch_size=6)
    got = compute_influences(td, loader, inversion_method="direct", hessian_regularization=0.5)
    close(got, G @ torch.linalg.solve(H, G.T), 1e-9)


def test_a_loss_failing_on_a_batch_of_one_too_raises_that_error_caused_by_the_first():
    """The error is the loss's on the [1, 3] batch of one, the squeezed point's [3] its cause."""
    model = nn.Sequential(nn.Linear(4, 3)).double().eval()
    td = TorchTwiceDifferentiable(model, lambda o, t: F.cross_entropy(o[:, :, 0], t))
    with pytest.raises(IndexError, match=r"grad: the model or loss failed on x \(1, 4\).*tensor of dimension 2") as info:
        td.grad(torch.randn(1, 4, dtype=torch.float64), torch.tensor([1]))
    causes, exc = [], info.value
    while exc is not None:
        causes.append(str(exc))
        exc = exc.__cause__
    assert "tensor of dimension 1" in causes[-1], causes
