"""What reverse mode holds constant, every engine holds constant: forward-mode products (func,
compiled, their Gauss-Newton products) equal the reverse-mode ones and a float64 reference for an
embedding's padding row (``nn.Embedding(padding_idx=...)``, a negative padding index, a padding row
tied to the output layer, lookups spelled ``F.embedding`` or ``torch.embedding``) and for
parameters used with gradients disabled (``torch.no_grad``, ``set_grad_enabled(False)``) or not
used at all, where the gradient, the Hessian and per-sample gradients are zero."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from generated_models import Case, reference_hessian
from twicediff import TorchTwiceDifferentiable
from twicediff.torch.engines import probe
from twicediff.torch.engines.compiled import forget_compiled
from twicediff.torch.per_sample import per_sample_grads

ENGINES = ["func", "compiled", "autograd", "loop", "auto"]


class Bag(nn.Module):
    """Token ids → mean of their embeddings → tanh layer → classes; ``spelling`` says how the lookup
    is written, ``tied`` makes the output layer share the embedding table (so the padding row is a
    live parameter there)."""

    def __init__(self, spelling: str = "module", tied: bool = False, padding_idx: int = 0, vocab: int = 7):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4, padding_idx=padding_idx)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, vocab, bias=False)
        if tied:
            self.out.weight = self.emb.weight
        with torch.no_grad():  # a padding row that is not zero, so that its products are not either
            self.emb.weight[padding_idx] = torch.randn(4)
        self.spelling, self.pad = spelling, padding_idx

    def forward(self, x):
        if self.spelling == "module":
            e = self.emb(x)
        elif self.spelling == "F.embedding":
            e = F.embedding(x, self.emb.weight, padding_idx=self.pad)
        else:  # torch.embedding(weight, indices, padding_idx): a negative index there means none
            e = torch.embedding(self.emb.weight, x, self.pad % self.emb.num_embeddings)
        return self.out(torch.tanh(self.hidden(e.mean(1))))


def reference(model, x, y, mode):
    """The float64 curvature matrix of the mean cross-entropy, by plain reverse mode (row by row)."""
    return reference_hessian(Case(model, F.cross_entropy, x, y, ""), gauss_newton=mode == "gauss_newton")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")
    forget_compiled()
    probe.clear()
    yield
    forget_compiled()
    probe.clear()


@pytest.mark.parametrize("spelling, tied, padding_idx", [
    ("module", False, 0), ("module", True, 0), ("module", False, -1), ("F.embedding", True, 2),
    ("torch.embedding", False, -2)])
@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_padding_row_is_constant_in_every_engine(spelling, tied, padding_idx, mode):
    torch.manual_seed(0)
    model = Bag(spelling, tied, padding_idx).double().eval()
    pad = padding_idx % 7
    x = torch.randint(0, 7, (6, 3))
    x[:3, 0] = pad  # the padding row is looked up
    y = torch.randint(0, 7, (6,))
    H = reference(model, x, y, mode)
    assert torch.allclose(H, H.T, atol=1e-12)  # reverse mode's matrix, symmetric
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(3, td.num_params, dtype=torch.float64)  # nonzero in the padding row
    for engine in ENGINES:
        got = td.hvp(x, y, V, mode=mode, engine=engine)
        torch.testing.assert_close(got, V @ H, rtol=1e-9, atol=1e-12, msg=lambda m: f"{engine}: {m}")


class Frozen(nn.Module):
    """A backbone run with gradients disabled (``how``: "no_grad", "set_grad_enabled", or "cdist":
    distances to its weight's rows under no_grad), or a layer never used ("unused"), before a
    trainable head; every parameter requires grad."""

    def __init__(self, how: str):
        super().__init__()
        self.backbone, self.head, self.spare = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(2, 2)
        self.how = how

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                h = torch.tanh(self.backbone(x))
        elif self.how == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                h = self.backbone(x).tanh()
        elif self.how == "cdist":  # an op the forward-mode context routes (twicediff.torch.cdist)
            with torch.no_grad():  # the routed call the block's last op (each op's output is detached)
                h = torch.cdist(x, self.backbone.weight)
            h = torch.tanh(-h)
        else:
            h = torch.tanh(self.backbone(x))
        return self.head(h)


@pytest.mark.parametrize("how", ["no_grad", "set_grad_enabled", "cdist", "unused"])
@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_parameters_without_a_gradient_are_constants_in_every_engine(how, mode):
    torch.manual_seed(0)
    model = Frozen(how).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = reference(model, x, y, mode)
    assert torch.allclose(H, H.T, atol=1e-12)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(3, td.num_params, dtype=torch.float64)
    for engine in ENGINES:
        got = td.hvp(x, y, V, mode=mode, engine=engine)
        torch.testing.assert_close(got, V @ H, rtol=1e-9, atol=1e-12, msg=lambda m: f"{engine}: {m}")
    if mode == "hessian":
        torch.testing.assert_close(td.hessian(x, y), H, rtol=1e-9, atol=1e-12)
        zero = torch.cat([torch.full((p.numel(),), n.startswith("spare") or
                                     (how != "unused" and n.startswith("backbone")))
                          for n, p in model.named_parameters()])
        g = td.grad(x, y)
        assert (g[zero] == 0).all() and (g[~zero] != 0).any()
        per_point = torch.cat([t.reshape(len(x), -1) for t in per_sample_grads(td, x, y)], 1)
        torch.testing.assert_close(per_point.mean(0), g)


@pytest.mark.parametrize("model", [Bag("module", tied=True), Frozen("no_grad")], ids=["padding", "no_grad"])
def test_pydvl_functional_hvp_agrees_in_both_directions(model):
    """pyDVL's functional ``hvp(func, params, vec, reverse_only=...)``: forward over reverse gives
    the pullback's product on models with padding rows and no_grad values too."""
    from twicediff.torch.functional import batch_loss_function, hvp

    torch.manual_seed(0)
    model = model.double().eval()
    if isinstance(model, Bag):
        x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6,))
        x[:3, 0] = 0
    else:
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    vec = {n: torch.randn_like(p) for n, p in params.items()}
    f = batch_loss_function(model, F.cross_entropy, x, y)
    reverse, forward = hvp(f, params, vec, reverse_only=True), hvp(f, params, vec, reverse_only=False)
    for n in params:
        torch.testing.assert_close(forward[n], reverse[n], rtol=1e-9, atol=1e-12)


def test_a_failing_forward_mode_formula_falls_back_to_reverse_mode(monkeypatch):
    """torch's forward-mode formula of mse_loss's backward fails on an integer target ("result
    type Double can't be cast to the desired output type Long", torch 2.14) where reverse mode
    computes; the func and compiled engines and the functional hvp used to raise it."""
    from twicediff.torch.functional import batch_loss_function, hvp

    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7, 3))
    td = TorchTwiceDifferentiable(model, F.mse_loss)
    V = torch.randn(2, td.num_params, dtype=torch.float64)
    want = td.hvp(x, y, V, engine="autograd")
    for engine in ("func", "compiled", "auto"):
        torch.testing.assert_close(td.hvp(x, y, V, engine=engine), want, msg=lambda m: f"{engine}: {m}")
    params = {n: p.detach() for n, p in model.named_parameters()}
    vec = {n: torch.randn_like(p) for n, p in params.items()}
    f = batch_loss_function(model, F.mse_loss, x, y)
    forward, reverse = hvp(f, params, vec, reverse_only=False), hvp(f, params, vec, reverse_only=True)
    for n in params:
        torch.testing.assert_close(forward[n], reverse[n])


def test_the_first_forward_mode_product_of_a_process_does_not_warn():
    """torch's first forward-mode product loads decompositions it scripts with torch.jit.script,
    which warns that it is deprecated: a FutureWarning about torch's own code that users saw at
    their first hvp. A fresh process, every warning an error."""
    import subprocess
    import sys

    code = ("import torch, torch.nn as nn, torch.nn.functional as F\n"
            "from twicediff import TorchTwiceDifferentiable\n"
            "m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()\n"
            "td = TorchTwiceDifferentiable(m, F.cross_entropy)\n"
            "td.hvp(torch.randn(5, 3), torch.randint(0, 2, (5,)), torch.randn(2, td.num_params), engine='func')\n")
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
