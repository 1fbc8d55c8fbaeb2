"""The fused LayerNorm rules (twicediff.torch.layer_norm) in the func engine's forward-over-reverse
products: its Hessian and Gauss-Newton products equal the float64 reverse-mode reference on every
spelling of a LayerNorm (nn.LayerNorm with and without affine parameters or bias, a 2-d normalized
shape, F.layer_norm with a weight only, a LayerNorm of the data itself, of a non-contiguous view),
the fused path is the one taken from MIN_DIRECTIONS directions on and not below, and what it does
not take (float16, shapes torch refuses) is left to torch."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff.torch.layer_norm as fused
from generated_models import Case, float64_copy, generate_conv_attention, reference_hessian
from twicediff import TorchTwiceDifferentiable
from twicediff.torch.engines import probe


class Normed(nn.Module):
    """tokens [N, L, 4] → a LayerNorm spelled ``spelling`` somewhere → mean-pooled linear head."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        if spelling == "2d":
            self.norm = nn.LayerNorm((2, 4))
        elif spelling in ("module", "data", "transposed"):
            self.norm = nn.LayerNorm(4)
        elif spelling == "no_affine":
            self.norm = nn.LayerNorm(4, elementwise_affine=False)
        elif spelling == "no_bias":
            self.norm = nn.LayerNorm(4, bias=False)
        else:  # "F.layer_norm": a weight parameter and no bias, called functionally
            self.weight = nn.Parameter(torch.randn(4))
        for p in self.parameters():  # weights and biases that are not ones and zeros
            with torch.no_grad():
                p.copy_(torch.randn_like(p))

    def forward(self, x):
        if self.spelling == "data":
            return self.head(torch.tanh(self.inner(self.norm(x))).mean(1))
        h = torch.tanh(self.inner(x))
        if self.spelling == "2d":
            h = self.norm(h.reshape(h.shape[0], -1, 2, 4)).reshape(h.shape)
        elif self.spelling == "transposed":
            h = self.norm(h.transpose(0, 1)).transpose(0, 1)
        elif self.spelling == "F.layer_norm":
            h = F.layer_norm(h, (4,), self.weight, None, 1e-3)
        else:
            h = self.norm(h)
        return self.head(torch.tanh(h).mean(1))


SPELLINGS = ["module", "no_affine", "no_bias", "2d", "F.layer_norm", "data", "transposed"]


@pytest.fixture(autouse=True)
def fresh():
    probe.clear()
    yield
    probe.clear()


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_func_engine_matches_reverse_mode_reference(spelling, mode):
    torch.manual_seed(0)
    model = Normed(spelling).double().eval()
    x, y = torch.randn(5, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    H = reference_hessian(Case(model, F.cross_entropy, x, y, ""), gauss_newton=mode == "gauss_newton")
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(fused.MIN_DIRECTIONS + 1, td.num_params, dtype=torch.float64)
    got = td.hvp(x, y, V, mode=mode, engine="func")
    torch.testing.assert_close(got, V @ H, rtol=1e-9, atol=1e-11)


def _attention_cases(count):
    cases, seed = [], 0
    while len(cases) < count:
        case = generate_conv_attention(seed)
        if " attention d=" in case.description:
            cases.append(case)
        seed += 1
    return cases


@pytest.mark.parametrize("case", _attention_cases(4), ids=lambda c: c.description)
def test_generated_attention_blocks_match_the_reference(case):
    """Generated pre-norm attention blocks (random widths, activations, losses) whose LayerNorms get
    weights and biases that are not ones and zeros."""
    model, x, y = float64_copy(case)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
    H = reference_hessian(Case(model, case.loss, x, y, case.description))
    td = TorchTwiceDifferentiable(model, case.loss)
    V = torch.randn(fused.MIN_DIRECTIONS + 3, td.num_params, dtype=torch.float64)
    torch.testing.assert_close(td.hvp(x, y, V, engine="func"), V @ H, rtol=1e-8, atol=1e-10)


def _count_fused_calls(monkeypatch):
    calls = {"tangent": 0, "backward_tangent": 0}

    def spy(name, op):
        def wrapped(*args):
            calls[name] += 1
            return op(*args)
        return wrapped
    monkeypatch.setattr(fused, "layer_norm_tangent", spy("tangent", fused.layer_norm_tangent))
    monkeypatch.setattr(fused, "layer_norm_backward_tangent", spy("backward_tangent", fused.layer_norm_backward_tangent))
    return calls


def test_the_func_engine_takes_the_fused_rules_from_enough_directions(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model = Normed("module").eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(5, 4, 4), torch.randint(0, 3, (5,))
    td.hvp(x, y, torch.randn(fused.MIN_DIRECTIONS - 1, td.num_params), engine="func")
    assert calls == {"tangent": 0, "backward_tangent": 0}
    td.hvp(x, y, torch.randn(fused.MIN_DIRECTIONS, td.num_params), engine="func")
    assert calls == {"tangent": 1, "backward_tangent": 1}  # one call each for all the directions


def test_what_the_rules_do_not_take_stays_with_torch(monkeypatch):
    """float16 (the ops take float32 and float64) and a normalized shape that is not the input's
    trailing shape (torch's own error) do not reach the fused rules."""
    calls = _count_fused_calls(monkeypatch)
    assert not fused.applies(torch.randn(3, 4, dtype=torch.float16), (4,))
    assert not fused.applies(torch.randn(3, 4), (5,))
    assert not fused.applies(torch.randn(3, 4), (4,), torch.ones(4, dtype=torch.float64))
    assert fused.applies(torch.randn(3, 4), (4,), torch.ones(4), None)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(Exception) as info:
        td.hvp(torch.randn(5, 6), y, torch.randn(fused.MIN_DIRECTIONS, td.num_params), engine="func")
    assert "6" in str(info.value)
    assert calls == {"tangent": 0, "backward_tangent": 0}
    del x


def test_a_reverse_over_reverse_fallback_takes_torch_rules():
    """mse_loss's forward-mode formula fails on an integer target (forward_mode.FORMULA_FAILURES):
    the func engine takes that product reverse over reverse, which differentiates LayerNorm's
    backward in reverse mode; the fused rules, which do not, step aside."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7, 3))
    td = TorchTwiceDifferentiable(model, F.mse_loss)
    V = torch.randn(fused.MIN_DIRECTIONS + 1, td.num_params, dtype=torch.float64)
    torch.testing.assert_close(td.hvp(x, y, V, engine="func"), td.hvp(x, y, V, engine="autograd"),
                               rtol=1e-9, atol=1e-11)


def test_the_model_is_unchanged():
    torch.manual_seed(2)
    model = Normed("module").eval()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    td.hvp(torch.randn(5, 4, 4), torch.randint(0, 3, (5,)), torch.randn(fused.MIN_DIRECTIONS, td.num_params),
           engine="func")
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n])
