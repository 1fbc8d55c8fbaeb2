"""The compiled engine: its Hessian (forward- and reverse-over-reverse) and Gauss-Newton products
against float64 references on generated models, one compilation per shape with the weights as
inputs, padding of odd chunks, the eager fallback with one log line, and ``auto`` compiling only
when the expected products repay it.

Compiling costs seconds to a minute on two CPU cores, so most checks use the ``aot_eager``
backend (dynamo and AOT autograd trace the product exactly as inductor receives it, without
generating C++), and one compiles with inductor. ``TWICEDIFF_COMPILED_CASES=N`` runs the inductor
check on N generated models of each family (default 1: one attention model, whose tangent
matmuls the graph pass of engines/gemm_fold.py folds).
"""
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from generated_models import (generate, generate_conv_attention, generate_recurrent, generate_torch_attention,
                              reference_hessian)
from routed_models import generate_routed_loss
from zoo_models import generate_zoo
from twicediff import TorchTwiceDifferentiable
from twicediff.torch.engines import compiled, probe
from twicediff.torch.engines.amortise import DEFAULT_COMPILE_SECONDS, compile_pays, compile_seconds_estimate
from twicediff.torch.engines.compiled import CompiledEngine, compiled_functions, forget_compiled

INDUCTOR_CASES = int(os.environ.get("TWICEDIFF_COMPILED_CASES", "1"))


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")
    monkeypatch.delenv("TWICEDIFF_ENGINE", raising=False)
    forget_compiled()
    probe.clear()
    yield
    forget_compiled()
    probe.clear()


def _check(case, td, got, V, M, what):
    tol = 1e-9 if td.dtype == torch.float64 else 2e-4
    want = V.double() @ M
    gap = float((got.double() - want).abs().max())
    assert gap <= tol * max(1e-3, float(want.abs().max())), f"{what}: max |Δ| {gap:.3g} for {case.description}"


def _products(case, variants=("forward", "reverse"), modes=("hessian", "gauss_newton")):
    td = TorchTwiceDifferentiable(case.model, case.loss)
    V = torch.randn(3, td.num_params, generator=torch.Generator().manual_seed(1), dtype=td.dtype)
    for mode in modes:
        M = reference_hessian(case, gauss_newton=mode == "gauss_newton")
        for variant in (variants if mode == "hessian" else ("forward",)):
            engine = CompiledEngine(td.model, td.loss, variant)
            got = engine.apply(engine.prepare(case.x, case.y), V, mode)
            _check(case, td, got, V, M, f"compiled {mode}/{variant}")
    return td


@pytest.mark.parametrize("case, variants", [(generate_conv_attention(1), ("forward", "reverse")),
                                             (generate_conv_attention(3), ("forward",)), (generate(4), ("forward",)),
                                             (generate(11), ("forward", "reverse")),
                                             (generate_torch_attention(0), ("forward",)),
                                             (generate_torch_attention(1), ("forward", "reverse")),
                                             (generate_routed_loss(1), ("forward", "reverse")),  # multi-margin
                                             (generate_routed_loss(0), ("forward",)),  # multilabel margin
                                             (generate_routed_loss(11), ("forward",)),  # Huber
                                             (generate_zoo(5), ("forward", "reverse"))],  # torch.cdist
                         ids=lambda c: c.description.split(":")[0] if hasattr(c, "description") else "+".join(c))
def test_compiled_products_match_float64(case, variants):
    _products(case, variants)
    report = compiled_functions()
    assert report and all(f["status"] == "compiled" and f["compile_seconds"] > 0 for f in report), report


@pytest.mark.parametrize("case", [generate_conv_attention(1 + s) for s in range(INDUCTOR_CASES)]
                         + [generate(s) for s in range(max(0, INDUCTOR_CASES - 1))],
                         ids=lambda c: c.description.split(":")[0])
def test_inductor_products_match_float64(case, monkeypatch):
    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "inductor")
    modes = ("hessian", "gauss_newton") if INDUCTOR_CASES > 1 else ("hessian",)
    _products(case, variants=("forward",), modes=modes)
    assert all(f["status"] == "compiled" for f in compiled_functions())


@pytest.mark.parametrize("channels_last", [False, True])
def test_inductor_products_of_a_max_pool_cnn_in_either_layout(channels_last, monkeypatch):
    """A conv2d → SiLU → max-pool → conv2d model with a residual (float64), compiled with inductor's
    channels-last layout on and off (its 2-3 channels wide convolutions get it off by default)."""
    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(compiled, "CPU_CHANNELS_LAST_MIN_CHANNELS", 1 if channels_last else 10**6)
    case = generate_conv_attention(16)
    assert "conv2d" in case.description and "MaxPool2d" in case.description, case.description
    assert compiled.channels_last(case.model, torch.device("cpu")) is channels_last
    _products(case, variants=("forward",), modes=("hessian",))
    assert all(f["status"] == "compiled" for f in compiled_functions())


def test_channels_last_on_cpu_only_where_every_convolution_is_wide():
    cpu, wide = torch.device("cpu"), compiled.CPU_CHANNELS_LAST_MIN_CHANNELS
    one_narrow = nn.Sequential(nn.Conv2d(3, wide - 1, 3), nn.ReLU(), nn.Conv2d(wide - 1, 2 * wide, 3))
    all_wide = nn.Sequential(nn.Conv2d(3, wide, 3), nn.ReLU(), nn.Conv1d(wide, wide, 1), nn.ConvTranspose2d(wide, wide, 2))
    assert not compiled.channels_last(one_narrow, cpu)
    assert compiled.channels_last(all_wide, cpu)
    assert compiled.channels_last(nn.Linear(3, 2), cpu)  # no convolution: nothing for it to change
    assert compiled.channels_last(one_narrow, torch.device("meta"))  # off the CPU: inductor decides


@pytest.mark.parametrize("problem", ["tuple", "dict"])
def test_compiled_products_of_tuple_and_dict_batches(problem):
    """x as ``(u, w)`` (model(*x)) and as a dict with a non-tensor flag (model(**x))."""
    import torch.nn.functional as F

    from structured_models import PROBLEMS, reference

    model, _, x, y = PROBLEMS[problem](10)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(3, td.num_params, dtype=td.dtype)
    got = td.hvp(x, y, V, engine="compiled")
    torch.testing.assert_close(got, V @ reference(problem, 10)[1], rtol=1e-9, atol=1e-10)
    assert [f["status"] for f in compiled_functions()] == ["compiled"]


def test_one_compilation_per_shape_weights_are_inputs_and_chunks_are_padded():
    case = generate_conv_attention(2)
    td = TorchTwiceDifferentiable(case.model, case.loss)
    product = td.hvp_function(case.x, case.y, engine="compiled")
    V = torch.randn(3, td.num_params, dtype=td.dtype)
    product(V)
    product(torch.randn(4, td.num_params, dtype=td.dtype))  # 3 rows were padded to 4: same function
    assert len(compiled_functions()) == 1 and "D=4" in compiled_functions()[0]["description"]
    with torch.no_grad():  # a training step: new weights, no new compilation, products follow them
        for p in td.model.parameters():
            p.mul_(1.5)
    got = product(V)
    assert len(compiled_functions()) == 1
    _check(case, td, got, V, reference_hessian(case), "after a weight change")
    cap = product.max_directions
    big = torch.randn(cap + 3, td.num_params, dtype=td.dtype)  # a full chunk and a padded one
    _check(case, td, product(big), big, reference_hessian(case), "two chunks")


def test_a_model_that_cannot_be_compiled_falls_back_to_eager_with_one_log_line(caplog):
    @torch.compiler.disable
    def opaque(h):
        return h * 2

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(opaque(self.a(x))))

    torch.manual_seed(0)
    model = Model().double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    V = torch.randn(5, td.num_params, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        first = td.hvp(x, y, V, engine="compiled")
        second = td.hvp(x, y, V[:2], engine="compiled")
    lines = [r for r in caplog.records if "could not compile" in r.getMessage()]
    assert len(lines) == 1 and "Model" in lines[0].getMessage()
    want = td.hvp(x, y, V, engine="func")
    torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, want[:2], rtol=1e-10, atol=1e-12)
    assert compiled_functions()[0]["status"].startswith("eager fallback")


class _Encoder(nn.Module):
    """nn.TransformerEncoderLayer (or a lone nn.MultiheadAttention) under a mean-pooled head: in
    eval mode, with batch_first and an even head count, torch runs such layers through a fused
    inference kernel that has no derivatives, unless something keeps it off."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer
        if layer == "encoder":
            self.body = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        else:
            self.body = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x) if self.layer == "encoder" else self.body(x, x, x, need_weights=False)[0]
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("layer", ["encoder", "attention"])
def test_torch_transformer_layers_compile_with_their_fast_path_kept_off(layer):
    torch.manual_seed(0)
    model = _Encoder(layer).double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(6, 5, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    V = torch.randn(4, td.num_params, dtype=torch.float64)
    want = td.hvp(x, y, V, engine="autograd")
    got = td.hvp(x, y, V, engine="compiled")
    assert [f["status"] for f in compiled_functions()] == ["compiled"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting, back after the call
    try:  # a later call whatever the user's setting: compiled code, no recompilation into the kernel
        torch.backends.mha.set_fastpath_enabled(False)
        torch.testing.assert_close(td.hvp(x, y, V[:3], engine="compiled"), want[:3], rtol=1e-9, atol=1e-10)
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(td.hvp(x, y, V, engine="compiled"), want, rtol=1e-9, atol=1e-10)
    assert [f["status"] for f in compiled_functions()] == ["compiled"]


def test_a_later_call_that_cannot_be_compiled_again_falls_back_to_eager(caplog):
    """A model whose forward branches on an attribute: flipped between calls, the compiled
    function's guard fails and its new trace has an op dynamo cannot take."""
    @torch.compiler.disable
    def opaque(h):
        return h * 2

    class Switchable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.doubled = nn.Linear(3, 4), nn.Linear(4, 2), False

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.tanh(opaque(h) if self.doubled else h))

    torch.manual_seed(0)
    model = Switchable().double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    V = torch.randn(4, td.num_params, dtype=torch.float64)
    torch.testing.assert_close(td.hvp(x, y, V, engine="compiled"), td.hvp(x, y, V, engine="autograd"))
    assert compiled_functions()[0]["status"] == "compiled"
    model.doubled = True
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        got = td.hvp(x, y, V, engine="compiled")
    torch.testing.assert_close(got, td.hvp(x, y, V, engine="autograd"), rtol=1e-10, atol=1e-12)
    assert compiled_functions()[0]["status"].startswith("eager fallback")
    assert [r for r in caplog.records if "could not compile" in r.getMessage()]


def test_a_model_neither_compiled_nor_in_forward_mode_is_computed_by_autograd(caplog):
    """A float32 LSTM on the CPU: dynamo does not compile RNNs, and torch has no forward-mode rule
    for its oneDNN kernel; the eager fallback takes reverse-over-reverse, the same product."""
    case = generate_recurrent(0)
    assert "LSTM" in case.description and case.x.dtype == torch.float32, case.description
    td = TorchTwiceDifferentiable(case.model, case.loss)
    V = torch.randn(3, td.num_params, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        for mode in ("hessian", "gauss_newton"):
            M = reference_hessian(case, gauss_newton=mode == "gauss_newton")
            _check(case, td, td.hvp(case.x, case.y, V, engine="compiled", mode=mode), V, M, f"compiled {mode}")
    assert all(f["status"].startswith("eager fallback") for f in compiled_functions())
    assert [r for r in caplog.records if "could not compile" in r.getMessage()]


class _Softsign(torch.autograd.Function):
    """x / (1 + |x|) with a backward of its own (differentiable again) and no jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x / (1 + x.abs())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return g / (1 + x.abs()) ** 2


class _CustomFunctionModel(nn.Module):
    def __init__(self, weight_norm: bool):
        super().__init__()
        self.a = nn.Linear(4, 6)
        if weight_norm:
            self.a = nn.utils.parametrizations.weight_norm(self.a)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(_Softsign.apply(self.a(x)))


@pytest.mark.parametrize("weight_norm", [False, True])
def test_a_compiled_product_that_differs_from_the_eager_one_is_not_used(weight_norm, caplog):
    """torch.compile traced the model's product otherwise than eager autograd and gave another
    matrix, with no error: 70–120% of the product's size off. The custom autograd.Function (no
    jvp, so the reverse-over-reverse variant) had its backward compiled as if it had no derivative;
    with weight normalisation as well, dynamo compiled torch's wrong second derivative of it where
    eager calls are routed (transformers' Wav2Vec2 was 0.2% off so). The first compiled call is now
    checked against the eager product, and such a model is computed eagerly."""
    torch.manual_seed(0)
    model = _CustomFunctionModel(weight_norm).double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    V = torch.randn(3, td.num_params, dtype=torch.float64)
    want = td.hvp(x, y, V, engine="loop")
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        got = td.hvp(x, y, V, engine="compiled")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert compiled_functions()[0]["status"].startswith("eager fallback: CompiledMismatch")
    assert [r for r in caplog.records if "differs from the eager one" in r.getMessage()]
    torch.testing.assert_close(td.hvp(x, y, V[:2], engine="compiled"), want[:2], rtol=1e-10, atol=1e-12)


class _LayerDrop(nn.Module):
    """Draws a number for LayerDrop in every forward pass, as transformers' Wav2Vec2 encoder
    does, and uses it only in training mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        skip = self.training and bool(torch.rand([]) < 0.1)
        if not self.training:
            torch.rand([])  # drawn all the same, as the model above does
        return self.head(h if skip else h + torch.tanh(self.b(h)))


def test_a_random_draw_an_eval_mode_model_does_not_use_leaves_the_forward_mode_engines_running():
    """torch.func refused any random draw inside vmap, so func (and compiled's forward variant)
    failed on such models; in eval mode the draw is shared by the directions, one function for all,
    as reverse mode's one forward pass is. In training mode (where the draw matters) func refuses."""
    torch.manual_seed(0)
    model = _LayerDrop().double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    V = torch.randn(3, td.num_params, dtype=torch.float64)
    want = td.hvp(x, y, V, engine="autograd")
    torch.testing.assert_close(td.hvp(x, y, V, engine="func"), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(td.hvp(x, y, V, engine="compiled"), want, rtol=1e-10, atol=1e-12)
    model.train()
    with pytest.raises(RuntimeError, match="draws random numbers"):
        td.hvp(x, y, V, engine="func")


def test_bad_data_is_not_taken_for_a_compiler_failure():
    case = generate_conv_attention(2)
    td = TorchTwiceDifferentiable(case.model, case.loss)
    engine = CompiledEngine(td.model, td.loss)
    wrong = case.x[..., :-1]  # one feature too few: the model itself fails
    with pytest.raises(RuntimeError):
        engine.apply(engine.prepare(wrong, case.y), torch.randn(2, td.num_params, dtype=td.dtype), "hessian")
    assert compiled_functions() == []  # forgotten: a corrected call compiles again


def test_the_amortisation_rule():
    assert compile_seconds_estimate() == DEFAULT_COMPILE_SECONDS  # nothing compiled yet
    assert not compile_pays(None, 1.0)
    assert not compile_pays(0, 1.0)
    # saved = E · s · (1 − 1/2) against 60 s
    assert not compile_pays(100, 1.0) and compile_pays(120, 1.0)
    assert not compile_pays(10 ** 9, 0.0)


def test_auto_compiles_only_when_the_expected_products_repay_it():
    case = generate_conv_attention(2)
    td = TorchTwiceDifferentiable(case.model, case.loss)
    V = torch.randn(4, td.num_params, dtype=td.dtype)
    H = reference_hessian(case)
    _check(case, td, td.hvp(case.x, case.y, V, expected_products=10), V, H, "auto, few products")
    assert compiled_functions() == []
    product = td.hvp_function(case.x, case.y, expected_products=10 ** 12)
    _check(case, td, product(V), V, H, "auto, many products")
    decided = {k: v for k, v in twicediff.build_info()["probe"].items() if k.startswith("compiled: ")}
    assert len(decided) == 1 and len(compiled_functions()) == 1
    entry = next(iter(decided.values()))
    assert "compiled" in entry["seconds"] and len(entry["seconds"]) == 2  # against the eager winner
    assert entry["choice"] == product.engine.chosen
    assert twicediff.build_info()["compiled"] == compiled_functions()
