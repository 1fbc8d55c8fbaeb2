"""Differential tests on generated architectures (tests/generated_models.py): every engine, the
explicit Hessian, the Gauss-Newton mode and Direct against float64 torch.func references.

TWICEDIFF_DIFFERENTIAL_CASES sets how many architectures are drawn (default 200, seconds on two
cores); TWICEDIFF_DIFFERENTIAL_SEED moves the window of seeds, so a nightly run can cover new ones.
A failure names the seed and the architecture, and ``generate(seed)`` rebuilds it.
TWICEDIFF_STRUCTURED_CASES sets how many convolutional / attention models
(``generate_conv_attention``) every eager engine and the Gauss-Newton product are checked on
(default 24); the compiled engine's checks are in tests/torch/engines/test_compiled.py.
TWICEDIFF_RECURRENT_CASES: the same for recurrent and tied-weight models (``generate_recurrent``,
default 24). TWICEDIFF_TORCH_ATTENTION_CASES: the same for transformers of torch's own layers
(``generate_torch_attention``, default 24). TWICEDIFF_ROUTED_CASES: the same for models with
EmbeddingBag or weight normalisation (``generate_routed``, default 24), and as many under the losses
torch cannot differentiate twice (``generate_routed_loss``). TWICEDIFF_ZOO_CASES: the same for the
layer types the other families leave out (``generate_zoo``: Bilinear, PReLU, GroupNorm, transposed
convolutions, interpolation, decoder layers, bidirectional RNNs, orthogonal and spectral-norm
parametrizations, cdist; default 24).
"""
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from generated_models import (flat_params, generate, generate_conv_attention, generate_recurrent,
                              generate_torch_attention, reference_hessian)
from routed_models import generate_routed, generate_routed_loss
from zoo_models import generate_zoo
from twicediff import TorchTwiceDifferentiable
from twicediff.inversion import solve_hvp

CASES = int(os.environ.get("TWICEDIFF_DIFFERENTIAL_CASES", "200"))
FIRST = int(os.environ.get("TWICEDIFF_DIFFERENTIAL_SEED", "0"))
SEEDS = range(FIRST, FIRST + CASES)
STRUCTURED = range(FIRST, FIRST + int(os.environ.get("TWICEDIFF_STRUCTURED_CASES", "24")))
RECURRENT = range(FIRST, FIRST + int(os.environ.get("TWICEDIFF_RECURRENT_CASES", "24")))
TORCH_ATTENTION = range(FIRST, FIRST + int(os.environ.get("TWICEDIFF_TORCH_ATTENTION_CASES", "24")))
ROUTED = range(FIRST, FIRST + int(os.environ.get("TWICEDIFF_ROUTED_CASES", "24")))
ZOO = range(FIRST, FIRST + int(os.environ.get("TWICEDIFF_ZOO_CASES", "24")))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-4


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, case) -> None:
    got, want = got.double(), want.double()
    scale = max(float(want.abs().max()), 1e-3)
    gap = float((got - want).abs().max())
    assert gap <= _tolerance(dtype) * scale, f"{what}: max |Δ| {gap:.3g} (scale {scale:.3g}) for {case.description}"


@pytest.mark.parametrize("seed", SEEDS)
def test_engines_hessian_and_direct_against_float64(seed, device):
    case = generate(seed)
    model = case.model.to(device)
    x, y = case.x.to(device), case.y.to(device)
    td = TorchTwiceDifferentiable(model, case.loss)
    dtype = td.dtype
    P = td.num_params
    H = reference_hessian(case).to(device)
    G = reference_hessian(case, gauss_newton=True).to(device)
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(3, P, generator=gen, dtype=torch.float64).to(device)
    reason = td.native_unsupported_reason(x, y)
    engines = ["auto", "func", "autograd", "loop"] + (["native"] if reason == "" else [])
    for engine in engines:
        for mode, M in (("hessian", H), ("gauss_newton", G)):
            got = td.hvp(x, y, V.to(dtype), engine=engine, mode=mode)
            _close(got, V @ M, dtype, f"hvp engine={engine} mode={mode} (native: {reason or 'yes'})", case)
    if reason:
        with pytest.raises(ValueError, match="engine='native' cannot take this model"):
            td.hvp(x, y, V.to(dtype), engine="native")
    _close(td.hessian(x, y), H, dtype, "hessian", case)
    # Direct on the batch as a one-batch loader: (H + λI)⁻¹ b, λ large enough for a regular system
    lam = 1.0 + float(torch.linalg.eigvalsh(H).abs().max())
    b = torch.randn(2, P, generator=gen, dtype=torch.float64).to(device)
    want = torch.linalg.solve(H + lam * torch.eye(P, dtype=torch.float64, device=device), b.T).T
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    got = solve_hvp("direct", td, loader, b.to(dtype), hessian_perturbation=lam).x
    _close(got, want, dtype, "Direct", case)


@pytest.mark.parametrize("seed", STRUCTURED)
def test_structured_models_every_eager_engine_and_gauss_newton(seed, device):
    """Convolutional and attention models: the Hessian and Gauss-Newton products of every eager
    engine (``auto`` included, whatever it measures) against float64 torch.func."""
    case = generate_conv_attention(seed)
    td = TorchTwiceDifferentiable(case.model.to(device), case.loss)
    x, y = case.x.to(device), case.y.to(device)
    assert td.native_unsupported_reason(x, y) != ""
    H = reference_hessian(case).to(device)
    G = reference_hessian(case, gauss_newton=True).to(device)
    V = torch.randn(5, td.num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    for engine in ("auto", "func", "autograd", "loop"):
        for mode, M in (("hessian", H), ("gauss_newton", G)):
            for rows in (V[:1], V):  # one direction (the loop's case) and several
                got = td.hvp(x, y, rows.to(td.dtype), engine=engine, mode=mode)
                _close(got, rows @ M, td.dtype, f"hvp engine={engine} mode={mode} D={rows.shape[0]}", case)


def _problem(case, seed: int, device):
    """(wrapped model, x, y on device, the model's state before any call, the float64 Hessian and
    Gauss-Newton matrix, three float64 directions) of a generated case; x a tensor or a tuple."""
    td = TorchTwiceDifferentiable(case.model.to(device), case.loss)
    x = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in case.x) if isinstance(case.x, tuple) \
        else case.x.to(device)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    H = reference_hessian(case).to(device)
    G = reference_hessian(case, gauss_newton=True).to(device)
    V = torch.randn(3, td.num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    return td, x, case.y.to(device), before, H, G, V


def _every_eager_engine(case, seed: int, device) -> None:
    """The Hessian and Gauss-Newton products of every eager engine, on one direction and on three,
    and the explicit Hessian, against the float64 references; the model left as it was."""
    td, x, y, before, H, G, V = _problem(case, seed, device)
    for engine in ("auto", "func", "autograd", "loop"):
        for mode, M in (("hessian", H), ("gauss_newton", G)):
            for rows in (V[:1], V):
                got = td.hvp(x, y, rows.to(td.dtype), engine=engine, mode=mode)
                _close(got, rows @ M, td.dtype, f"hvp engine={engine} mode={mode} D={rows.shape[0]}", case)
    _close(td.hessian(x, y), H, td.dtype, "hessian", case)
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before), case.description


def _every_engine_or_a_named_forward_mode_gap(case, seed: int, device) -> None:
    """As :func:`_every_eager_engine` on three directions, except that the func engine may instead
    say torch has no forward-mode derivative of an op the model calls, naming the engines that take
    it; those must be right."""
    td, x, y, before, H, G, V = _problem(case, seed, device)
    for engine in ("auto", "func", "autograd", "loop"):
        for mode, M in (("hessian", H), ("gauss_newton", G)):
            try:
                got = td.hvp(x, y, V.to(td.dtype), engine=engine, mode=mode)
            except NotImplementedError as exc:
                assert engine == "func" and "no forward-mode derivative" in str(exc), f"{exc} for {case.description}"
                assert "engine='autograd' or 'loop'" in str(exc)
                continue
            _close(got, V @ M, td.dtype, f"hvp engine={engine} mode={mode}", case)
    _close(td.hessian(x, y), H, td.dtype, "hessian", case)
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before), case.description


@pytest.mark.parametrize("seed", RECURRENT)
def test_recurrent_and_tied_weight_models_every_eager_engine(seed, device):
    """RNN / GRU / LSTM and token models with a tied output layer: the Hessian and Gauss-Newton
    products of every eager engine and the explicit Hessian against float64 autograd, the model
    left as it was. Where torch has no forward-mode derivative of an op the model calls, the func
    engine must say so and name the engines that take the model, and those must be right (the
    recurrent layers themselves take forward mode: twicediff.torch.recurrent)."""
    _every_engine_or_a_named_forward_mode_gap(generate_recurrent(seed), seed, device)


def test_the_recurrent_generator_covers_what_it_promises():
    seen = set()
    for seed in RECURRENT:
        words = generate_recurrent(seed).description
        seen |= {w for w in ("RNN", "GRU", "LSTM", "tied", "layers=2", "batch_first=False", "batch_first=True",
                             "temperature=True", "frozen=", "float32", "readout=mean", "readout=last", "n=1")
                 if w in words}
    assert len(seen) == 13, seen


@pytest.mark.parametrize("seed", TORCH_ATTENTION)
def test_torch_attention_layers_every_eager_engine(seed, device):
    """nn.TransformerEncoderLayer and nn.MultiheadAttention (self and cross, masks, extra key/value
    biases, returned weights): the Hessian and Gauss-Newton products of every eager engine and the
    explicit Hessian against float64 autograd, the model left as it was."""
    _every_eager_engine(generate_torch_attention(seed), seed, device)


def test_the_torch_attention_generator_covers_what_it_promises():
    words = ("encoder", "self-attention", "cross-attention", "norm_first=True", "norm_first=False",
             "activation=silu", "activation=gelu", "activation=relu", "bias=False", "bias_kv=True",
             "need_weights=True", "batch_first=False", "batch_first=True", "mask=padding", "mask=causal",
             "float32", "n=1")
    seen = {w for seed in TORCH_ATTENTION for w in words if w in generate_torch_attention(seed).description}
    assert seen == set(words), set(words) - seen


@pytest.mark.parametrize("seed", ROUTED)
def test_embedding_bag_and_weight_norm_every_eager_engine(seed, device):
    """nn.EmbeddingBag (torch has no second derivative of it) and weight normalisation (torch's is
    wrong): the Hessian and Gauss-Newton products of every eager engine and the explicit Hessian
    against float64 references computed with both ops spelled out, the model left as it was."""
    _every_eager_engine(generate_routed(seed), seed, device)


@pytest.mark.parametrize("seed", ROUTED)
def test_losses_torch_cannot_differentiate_twice_every_eager_engine(seed, device):
    """multi_margin_loss and multilabel_margin_loss (torch has no second derivative of either) and
    huber_loss and soft_margin_loss (no forward-mode rule of their backward), in torch's spellings:
    the Hessian and Gauss-Newton products of every eager engine and the explicit Hessian against
    float64 references of the loss written by hand, the model left as it was."""
    _every_eager_engine(generate_routed_loss(seed), seed, device)


def test_the_routed_generator_covers_what_it_promises():
    words = ("mode=sum", "mode=mean", "mode=max", "padding_idx=None", "padding_idx=0", "padding_idx=-1",
             "weighted=True", "flat=True", "flat=False", "conv1d", "linear", "weight_norm=parametrization",
             "weight_norm=hook", "weight_norm=None", "dim=0", "dim=1", "dim=None", "float32", "n=1")
    seen = {w for seed in ROUTED for w in words if w in generate_routed(seed).description}
    assert seen == set(words), set(words) - seen
    assert any("bag" not in generate_routed(seed).description for seed in ROUTED)


@pytest.mark.parametrize("seed", SEEDS[:50])
def test_calls_leave_the_model_unchanged(seed):
    case = generate(seed)
    td = TorchTwiceDifferentiable(case.model, case.loss)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    flags = [p.requires_grad for p in case.model.parameters()]
    V = torch.randn(2, td.num_params, dtype=td.dtype)
    td.hvp(case.x, case.y, V)
    td.hessian(case.x, case.y)
    td.grad(case.x, case.y)
    after = case.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert flags == [p.requires_grad for p in case.model.parameters()]
    assert all(type(p) is torch.nn.Parameter for p in flat_params(case.model))


def test_the_generator_covers_what_it_promises():
    """Across the default window: native and non-native models, reused modules, nesting, every
    activation, both dtypes, batch size 1, one output, every loss."""
    seen = {"native": 0, "generic": 0, "reused": 0, "nested": 0, "float32": 0, "n1": 0, "one_output": 0}
    losses, activations = set(), set()
    for seed in range(200):
        case = generate(seed)
        td = TorchTwiceDifferentiable(case.model, case.loss)
        seen["native" if td.native_unsupported_reason(case.x, case.y) == "" else "generic"] += 1
        seen["reused"] += "*" in case.description
        seen["nested"] += "[" in case.description
        seen["float32"] += case.x.dtype == torch.float32
        seen["n1"] += case.x.shape[0] == 1
        seen["one_output"] += case.model(case.x).shape[-1] == 1
        losses.add(case.description.split("loss=")[1].split("(")[0])
        activations |= {m.__class__.__name__ for m in case.model.modules()}
    assert all(count > 0 for count in seen.values()), seen
    assert {"nn.MSELoss", "nn.BCEWithLogitsLoss", "nn.CrossEntropyLoss"} <= losses, losses
    assert {"ReLU", "LeakyReLU", "Tanh", "Sigmoid", "GELU", "SiLU", "Softplus"} <= activations


@pytest.mark.parametrize("seed", ZOO)
def test_layer_zoo_every_eager_engine(seed, device):
    """Layer types the other families leave out (tests/zoo_models.py): the Hessian and Gauss-Newton
    products of every eager engine and the explicit Hessian against float64 references, the model
    left as it was; the func engine may instead name an op without a forward-mode rule."""
    _every_engine_or_a_named_forward_mode_gap(generate_zoo(seed), seed, device)
