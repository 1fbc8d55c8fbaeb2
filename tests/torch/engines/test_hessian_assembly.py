"""The blockwise Hessian / Gauss-Newton assembly (twicediff.torch.hessian_assembly) against the
float64 explicit references, over the native engine's activations, losses, reductions, biases and
frozen prefixes, deeper stacks (non-adjacent layer blocks), and chunking of rows and blocks."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from twicediff.torch import TorchTwiceDifferentiable
from twicediff.torch.engines.hessian_assembly import assemble_hessian
from native_helpers import build_native_engine, native_hvp

from hessian_reference import explicit_gauss_newton, explicit_hessian
from test_native_engine import CLASSES, LOSSES, make_batch, make_model, native_config, over_native_configs


def _assembled(model, loss_fn, x, y, gauss_newton=False):
    engine, reason = build_native_engine(model, loss_fn)
    assert engine is not None, reason
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return assemble_hessian(engine, engine.prepare(x, y), torch.zeros(P, P, dtype=torch.float64),
                            gauss_newton=gauss_newton)


@over_native_configs
def test_assembled_hessian_matches_explicit(activation, loss, reduction, bias, prefix):
    model, loss_fn, gen, classes = native_config(activation, loss, reduction, bias, prefix, salt="assembly")
    for n in (1, 6):
        x, y = make_batch(loss, n, prefix, classes, gen)
        torch.testing.assert_close(_assembled(model, loss_fn, x, y), explicit_hessian(model, loss_fn, x, y),
                                   rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
def test_assembled_gauss_newton_matches_explicit(activation, loss):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(5)
    classes = CLASSES[loss]
    model = make_model(activation, True, False, classes)
    x, y = make_batch(loss, 6, False, classes, gen)
    torch.testing.assert_close(_assembled(model, F.cross_entropy if loss == "cross_entropy" else LOSSES[loss], x, y,
                                          gauss_newton=True),
                               explicit_gauss_newton(model, LOSSES[loss], x, y), rtol=1e-9, atol=1e-11)


def _deep(bias_pattern=(True, False, True, True)):
    """Four Linear layers, chains of zero, one and two activations, nested Sequential and
    pass-through modules: blocks between non-adjacent layers and an identity chain."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(3, 5, bias=bias_pattern[0]), nn.Tanh(),
        nn.Sequential(nn.Linear(5, 4, bias=bias_pattern[1]), nn.Identity()),
        nn.Linear(4, 6, bias=bias_pattern[2]), nn.SiLU(), nn.Softplus(), nn.Dropout(0.3),
        nn.Linear(6, 3, bias=bias_pattern[3]), nn.Sigmoid(),
    ).double().eval()


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_deep_stack_with_non_adjacent_blocks(loss, gauss_newton):
    gen = torch.Generator().manual_seed(4)
    model = _deep()
    x = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen) if loss == "cross_entropy" else \
        torch.randn(9, 3, generator=gen, dtype=torch.float64)
    loss_fn = LOSSES[loss]
    want = (explicit_gauss_newton if gauss_newton else explicit_hessian)(model, loss_fn, x, y)
    torch.testing.assert_close(_assembled(model, loss_fn, x, y, gauss_newton), want, rtol=1e-9, atol=1e-11)


def test_chunked_rows_and_blocks_give_the_same_matrix():
    """A budget small enough to split the rows and every block's temporaries (rows a of each
    block, diagonal and mirrored parts) into many chunks; checked against the whole assembly and
    against Hessian-vector products with the unit vectors."""
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 20, bias=False), nn.Softplus(),
                          nn.Linear(20, 3)).double().eval()
    x = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    whole = _assembled(model, F.cross_entropy, x, y)
    with twicediff.memory_budget(1_000_000):
        chunked = _assembled(model, F.cross_entropy, x, y)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    engine, _ = build_native_engine(model, F.cross_entropy)
    P = whole.shape[0]
    columns = native_hvp(engine, x, y, torch.eye(P, dtype=torch.float64))
    torch.testing.assert_close(whole, columns, rtol=1e-9, atol=1e-12)


def test_twice_differentiable_hessian_uses_assembly_and_matches_columns():
    """TorchTwiceDifferentiable.hessian goes through the assembly for a native model; its float32
    result agrees with the float64 explicit Hessian, and a model the engine declines still works."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(30, 6, generator=gen)
    y = torch.randint(0, 4, (30,), generator=gen)
    got = TorchTwiceDifferentiable(model.eval(), F.cross_entropy).hessian(x, y)
    want = explicit_hessian(model.double(), F.cross_entropy, x.double(), y)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    xc = torch.randn(5, 1, 6, generator=gen, dtype=torch.float64)
    yc = torch.randint(0, 3, (5,), generator=gen)
    torch.testing.assert_close(TorchTwiceDifferentiable(conv, F.cross_entropy).hessian(xc, yc),
                               explicit_hessian(conv, F.cross_entropy, xc, yc), rtol=1e-9, atol=1e-11)


def test_hessian_method_columns_and_bad_method():
    gen = torch.Generator().manual_seed(2)
    model = _deep()
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    torch.testing.assert_close(td.hessian(x, y, method="columns"), td.hessian(x, y), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="method must be one of.*'blocks'"):
        td.hessian(x, y, method="blocks")


def test_assembly_on_device_matches_cpu_reference(device):
    """On every available device (CUDA when a GPU is present): float64 against the explicit CPU
    reference, float32 against float64."""
    gen = torch.Generator().manual_seed(6)
    model = _deep()
    x = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen)
    want = explicit_hessian(model, F.cross_entropy, x, y)
    on = model.to(device)
    got = TorchTwiceDifferentiable(on, F.cross_entropy).hessian(x.to(device), y.to(device))
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-11)
    got32 = TorchTwiceDifferentiable(on.float(), F.cross_entropy).hessian(x.float().to(device), y.to(device))
    torch.testing.assert_close(got32.cpu().double(), want, rtol=1e-4, atol=1e-5)


def test_native_unsupported_reason_names_what_is_not_native():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    assert TorchTwiceDifferentiable(_deep(), F.cross_entropy).native_unsupported_reason(x, y) == ""
    smoothed = functools.partial(F.cross_entropy, label_smoothing=0.1)
    assert "label_smoothing" in TorchTwiceDifferentiable(_deep(), smoothed).native_unsupported_reason(x, y)
    conv = nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(4, 3)).double()
    assert "Conv1d" in TorchTwiceDifferentiable(conv, F.cross_entropy).native_unsupported_reason(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_assembly_on_cuda_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(9)
    model = _deep()
    x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    want = explicit_hessian(model, F.cross_entropy, x, y)
    half = model.to("cuda", dtype)
    got = TorchTwiceDifferentiable(half, F.cross_entropy).hessian(x.to("cuda", dtype), y.cuda())
    assert got.dtype == dtype
    # the parameters themselves are rounded to half precision: compare at that resolution
    assert float((got.double().cpu() - want).abs().max() / want.abs().max()) < (2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_ignored_targets_and_loss_modules():
    """Cross-entropy rows with ignore_index do not count (the mean is over the others); loss given
    as nn modules with mean and sum reductions."""
    gen = torch.Generator().manual_seed(12)
    model = _deep()
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    y[[1, 4, 7]] = -100
    for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"), F.cross_entropy):
        torch.testing.assert_close(_assembled(model, loss, x, y), explicit_hessian(model, loss, x, y),
                                   rtol=1e-9, atol=1e-11)
    yr = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    for loss in (nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss()):
        target = yr.sigmoid() if isinstance(loss, nn.BCEWithLogitsLoss) else yr
        torch.testing.assert_close(_assembled(model, loss, x, target), explicit_hessian(model, loss, x, target),
                                   rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n", [1, 5])
def test_bare_linear_model_with_one_output(n):
    """A bare nn.Linear with a single output (squeezed to [N], or to a scalar when N = 1)."""
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(1)
    model = nn.Linear(3, 1).double()
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    for loss in (F.mse_loss, F.binary_cross_entropy_with_logits):
        target = y.sigmoid() if loss is F.binary_cross_entropy_with_logits else y
        torch.testing.assert_close(_assembled(model, loss, x, target), explicit_hessian(model, loss, x, target),
                                   rtol=1e-9, atol=1e-11)


def test_frozen_prefix_runs_once_per_call_whatever_the_chunks():
    """The native paths prepare the batch (frozen prefix, no_grad) once: hvp over many chunks of
    directions and the assembled Hessian each run the prefix a single time."""
    torch.manual_seed(0)
    prefix = nn.Linear(5, 6).double().requires_grad_(False)
    runs = []
    prefix.register_forward_hook(lambda m, i, o: runs.append(1))
    model = nn.Sequential(prefix, nn.Tanh(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    assert td.native_unsupported_reason(x, y) == ""
    runs.clear()
    v = torch.randn(40, td.num_params, dtype=torch.float64, generator=gen)
    with twicediff.memory_budget(3 * 8 * (4 * 8 * 7 + 5 * td.num_params)):  # about 3 directions a chunk
        got = td.hvp(x, y, v)
    assert len(runs) == 1
    runs.clear()
    H = td.hessian(x, y)
    assert len(runs) == 1
    torch.testing.assert_close(got, v @ H, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(H, explicit_hessian(model, F.cross_entropy, x, y), rtol=1e-9, atol=1e-11)


def _batch_by_batch(td, batches):
    """Σ_b (n_b / N) H_b, each H_b from Hessian-vector products of unit vectors (no assembly)."""
    P = td.num_params
    out = torch.zeros(P, P, dtype=torch.float64)
    total = 0
    for x, y in batches:
        td.add_hessian_(x, y, out, alpha=x.shape[0], method="columns")
        total += x.shape[0]
    return out / total


@pytest.mark.parametrize("loss, reduction", [("cross_entropy", "mean"), ("mse", "sum"), ("bce", "mean")])
def test_mean_hessian_assembles_uneven_batches_together(loss, reduction, caplog):
    torch.manual_seed(3)
    classes = CLASSES[loss]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).double().eval()
    fn = F.cross_entropy if loss == "cross_entropy" else LOSSES[loss]
    td = TorchTwiceDifferentiable(model, functools.partial(fn, reduction=reduction))
    gen = torch.Generator().manual_seed(4)
    batches = [make_batch(loss, n, False, classes, gen) for n in (9, 9, 9, 3)]
    if loss == "cross_entropy":  # ignored targets change a batch's mean, not its weight n_b / N
        batches[1][1][:2] = -100
    want = _batch_by_batch(td, batches)
    import re

    def groups():
        text = caplog.records[-1].getMessage()
        caplog.clear()
        return [int(n) for n in re.search(r"of \[([\d, ]+)\]", text).group(1).split(",")]

    caplog.set_level("DEBUG", logger="twicediff.torch.hessian")
    torch.testing.assert_close(td.mean_hessian(batches), want, rtol=1e-10, atol=1e-12)
    assert groups() == [4]
    with twicediff.memory_budget(7700):  # an eighth of it holds two batches of 9 rows, not three
        torch.testing.assert_close(td.mean_hessian(batches), want, rtol=1e-10, atol=1e-12)
    found = groups()
    assert len(found) > 1 and sum(found) == 4


def test_mean_hessian_of_a_model_the_native_engine_does_not_take():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    batches = [(torch.randn(n, 1, 3, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 2)]
    torch.testing.assert_close(td.mean_hessian(batches), _batch_by_batch(td, batches), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="mean_hessian: training_data must not be empty"):
        td.mean_hessian([])
    with pytest.raises(ValueError, match="mean_hessian: training_data yielded no points"):
        td.mean_hessian(iter([]))  # no length to check up front
