"""EmbeddingBag and weight normalisation, which torch differentiates twice not at all or wrongly:
twicediff's equivalents give torch's values, and every public path that takes second derivatives
(the engines, the compiled engine, pyDVL's functional API, per-sample gradients) goes through them.
The generated differential tests are in tests/test_differential.py (``generate_routed``)."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from generated_models import reference_hessian
from routed_models import generate_routed
from twicediff import TorchTwiceDifferentiable
from twicediff.torch.embedding_bag import embedding_bag
from twicediff.torch.functional import get_hvp_function
from twicediff.torch.per_sample import per_sample_grads
from twicediff.torch.weight_norm import weight_norm


def _bag_call(seed: int):
    """Arguments of a random F.embedding_bag call: 2D or flat input with offsets (empty bags, entries
    past include_last_offset's end), a padding index, per-sample weights, max_norm, float64."""
    r = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows, dim = r.choice([1, 4, 7]), r.choice([1, 3])
    weight = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    mode = r.choice(["sum", "mean", "max"])
    kwargs = {"mode": mode, "padding_idx": r.choice([None, 0, -1, rows - 1])}
    if r.random() < 0.2:
        kwargs.update(max_norm=0.5, norm_type=r.choice([1.0, 2.0]))
    if r.random() < 0.5:
        ids = torch.randint(0, rows, (r.choice([1, 3]), r.choice([1, 4])), generator=gen)
        offsets = None
    else:
        ids = torch.randint(0, rows, (r.choice([0, 1, 6]),), generator=gen)
        cuts = sorted(r.randint(0, ids.numel()) for _ in range(r.choice([1, 3])))
        offsets = torch.tensor([0] + cuts[1:] if cuts else [0])
        if r.random() < 0.5:
            kwargs["include_last_offset"] = True
            offsets = torch.cat([offsets, torch.tensor([r.randint(int(offsets[-1]), ids.numel())])])
    if mode == "sum" and r.random() < 0.5:
        kwargs["per_sample_weights"] = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    return ids, weight, offsets, kwargs


@pytest.mark.parametrize("seed", range(200))
def test_embedding_bag_gives_torchs_values(seed):
    ids, weight, offsets, kwargs = _bag_call(seed)
    ours_weight, torch_weight = weight.clone(), weight.clone()  # max_norm renormalizes in place
    want = F.embedding_bag(ids, torch_weight, offsets, **kwargs)
    got = embedding_bag(ids, ours_weight, offsets, **kwargs)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12), (kwargs, got, want)
    assert torch.equal(ours_weight, torch_weight)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_without_bags(mode):
    """No bags (offsets empty, or one offset with include_last_offset): an empty [0, E] result, still
    a function of the weight. (torch 2.14's own op gives [0, E] for sum and mean on a weight without
    grad, and crashes the process in max mode, or in any mode on a weight that requires grad: it is
    not called here.)"""
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for offsets, last in ((torch.tensor([], dtype=torch.long), False), (torch.tensor([0]), True)):
        got = embedding_bag(torch.tensor([1, 2]), weight, offsets, mode=mode, include_last_offset=last)
        assert got.shape == (0, 3) and got.requires_grad
        assert torch.autograd.grad(got.sum(), weight)[0].abs().sum() == 0


def test_embedding_bag_refuses_offsets_torch_refuses():
    weight = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be 0"):
        embedding_bag(torch.tensor([1, 2, 3]), weight, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="must not decrease"):
        embedding_bag(torch.tensor([1, 2, 3]), weight, torch.tensor([0, 2, 1]))
    with pytest.raises(RuntimeError, match=r"offsets\[-1\] must be at most"):
        embedding_bag(torch.tensor([1, 2, 3]), weight, torch.tensor([0, 2, 5]), include_last_offset=True)


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_weight_norm_gives_torchs_values(dim):
    v = torch.randn(4, 3, 2, dtype=torch.float64)
    g = torch.randn(() if dim == -1 else [v.shape[d] if d == dim else 1 for d in range(3)], dtype=torch.float64)
    assert torch.allclose(weight_norm(v, g, dim), torch._weight_norm(v, g, dim), atol=1e-14)


def _bag_model(**options):
    torch.manual_seed(0)
    return nn.Sequential(nn.EmbeddingBag(6, 3, **options), nn.Tanh(), nn.Linear(3, 2)).eval()


def test_embedding_bag_max_norm_products_at_the_renormalized_weights_model_restored():
    """max_norm renormalizes the rows looked up, in place, in every forward: the product is the
    Hessian at the renormalized weights (as the model's own forward would see them) and the
    model's weights are put back."""
    model = _bag_model(max_norm=0.3, mode="mean")
    with torch.no_grad():
        model[0].weight.mul_(3)
    before = model[0].weight.detach().clone()
    ids, y = torch.randint(0, 6, (5, 4), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1, 0, 1])
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(2, td.num_params, generator=torch.Generator().manual_seed(2))
    got = {e: td.hvp(ids, y, V, engine=e) for e in ("func", "autograd", "loop")}
    assert torch.equal(model[0].weight, before)
    renormed = _bag_model(max_norm=0.3, mode="mean")
    with torch.no_grad():
        renormed[0].weight.copy_(before)
        renormed(ids)  # renormalizes the rows of ids, as the call's forward did
        renormed[0].max_norm = None
    H = TorchTwiceDifferentiable(renormed.double(), F.cross_entropy).hessian(ids, y)
    for engine, product in got.items():
        assert torch.allclose(product.double(), V.double() @ H, atol=1e-5), engine


def test_functional_api_takes_both_ops():
    """pyDVL's functional API runs the model itself: its products, reverse over reverse and forward
    over reverse, go through the same equivalents."""
    case = generate_routed(7)  # an EmbeddingBag (max) and a weight-normalised Linear
    assert "bag mode=max" in case.description and "weight_norm=parametrization" in case.description
    H = reference_hessian(case)
    loader = DataLoader(TensorDataset(case.x, case.y), batch_size=len(case.y))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dtype = next(case.model.parameters()).dtype
    for reverse_only in (True, False):
        got = get_hvp_function(case.model, case.loss, loader, reverse_only=reverse_only)(v.to(dtype))
        assert torch.allclose(got.double(), H @ v, atol=1e-8), reverse_only


def test_per_sample_gradients_of_a_bag_model():
    model = _bag_model(mode="sum", padding_idx=0)
    ids, y = torch.randint(0, 6, (4, 3), generator=torch.Generator().manual_seed(4)), torch.tensor([0, 1, 1, 0])
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    got = torch.cat([g.reshape(4, -1) for g in per_sample_grads(td, ids, y)], dim=1)
    want = torch.stack([td.grad(ids[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("seed, status", [(34, "compiled"), (18, "eager fallback")])
def test_compiled_engine(seed, status, monkeypatch):
    """A bag model compiles (the routing is traced); weight normalisation does not (dynamo does not
    route torch._weight_norm, whose fused kernel has no forward-mode rule): the engine computes
    eagerly, and right, either way."""
    from twicediff.torch.engines.compiled import compiled_functions, forget_compiled

    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")
    forget_compiled()
    case = generate_routed(seed)
    td = TorchTwiceDifferentiable(case.model, case.loss)
    V = torch.randn(3, td.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = td.hvp(case.x, case.y, V.to(td.dtype), engine="compiled")
    want = V @ reference_hessian(case)
    assert float((got.double() - want).abs().max()) <= 1e-8 * max(1.0, float(want.abs().max())), case.description
    assert compiled_functions()[-1]["status"].startswith(status), compiled_functions()
    forget_compiled()


def test_a_compiler_failure_names_its_cause(monkeypatch, caplog):
    """The older weight norm's hook on a Conv1d fails inside the backend, whose message starts
    "backend='aot_eager' raised:" with the cause on the next line: the warning and the report name
    the cause, not that line alone."""
    from twicediff.torch.engines.compiled import compiled_functions, forget_compiled

    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")
    forget_compiled()
    case = generate_routed(10)
    assert "conv1d weight_norm=hook" in case.description
    td = TorchTwiceDifferentiable(case.model, case.loss)
    with caplog.at_level("WARNING", logger="twicediff"):
        td.hvp(case.x, case.y, torch.randn(2, td.num_params, dtype=td.dtype), engine="compiled")
    status = compiled_functions()[-1]["status"]
    assert status.startswith("eager fallback: BackendCompilerFailed") and not status.endswith("raised:"), status
    assert status[len("eager fallback: "):] in caplog.text
    forget_compiled()


def test_with_dtype_copies_a_model_with_the_older_weight_norm():
    """nn.utils.weight_norm keeps its computed weight as a tensor with a graph, which copy.deepcopy
    refuses: with_dtype (and so a solver's product_dtype) copies such a model all the same."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)).eval()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    wide = td.with_dtype(torch.float64)
    assert wide.model is not model and next(wide.model.parameters()).dtype == torch.float64
    assert isinstance(model[0].weight, torch.Tensor)  # the original's computed weight is back
    V = torch.randn(2, td.num_params, dtype=torch.float64)
    assert torch.allclose(wide.hvp(x.double(), y, V), td.hvp(x, y, V.float()).double(), atol=1e-5)
