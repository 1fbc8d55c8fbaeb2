"""An embedding's padding row is a constant in every engine: forward-mode products (func,
compiled, their Gauss-Newton products) equal the reverse-mode ones and a float64 reference, for
``nn.Embedding(padding_idx=...)``, a negative padding index, a padding row tied to the output layer,
and lookups spelled ``F.embedding`` or ``torch.embedding`` in a custom forward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twicediff import TorchTwiceDifferentiable
from twicediff.torch.engines import probe
from twicediff.torch.engines.compiled import forget_compiled

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


def _rows(outputs, params):
    flat = outputs.reshape(-1)
    return torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in
                                   zip(torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True),
                                       params)]) for i in range(flat.numel())])


def reference(model, x, y, mode):
    """The float64 curvature matrix of the mean cross-entropy, by plain reverse mode (row by row)."""
    params = list(model.parameters())
    z = model(x)
    if mode == "hessian":
        g = torch.autograd.grad(F.cross_entropy(z, y), params, create_graph=True)
        return _rows(torch.cat([t.reshape(-1) for t in g]), params)
    J = _rows(z, params)
    zd = z.detach().requires_grad_(True)
    gz = torch.autograd.grad(F.cross_entropy(zd, y), zd, create_graph=True)[0]
    H_out = _rows(gz, [zd])
    return J.T @ H_out @ J


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
