"""The passes of K-FAC fitting (twicediff.torch.kfac.passes): the EK-FAC pass run from the first
pass's captures kept in memory gives the factors of a second pass over the data, and both equal
the float64 definition Λ̃ = mean_n (Q_Sᵀ G_n Q_A)² with per-sample gradients from autograd."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twicediff import memory_budget
from twicediff.torch.kfac import KFACFactors

DT = torch.float64


class _Counted:
    """An iterable of batches that counts how many times it is iterated."""

    def __init__(self, batches):
        self.batches, self.passes = list(batches), 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


class _Tokens(nn.Module):
    """Tokens [B, T, 4] through two Linear layers (the second called twice: weight sharing) and a
    mean-pooled head."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h)) + h
        return self.head(torch.tanh(self.mid(h)).mean(1))


def _problem(n=11, T=5, seed=0):
    torch.manual_seed(seed)
    model = _Tokens().to(DT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, T, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def _batches(x, y, size=4):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def _per_sample_grads(model, x, y):
    """[N, P] per-sample gradients of ℓ_n, one autograd backward per sample."""
    params = [p for p in model.parameters()]
    rows = []
    for n in range(x.shape[0]):
        g = torch.autograd.grad(F.cross_entropy(model(x[n:n + 1]), y[n:n + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def _layer_block(model, G, layer):
    offsets, c = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (c, p.numel())
        c += p.numel()
    c, n = offsets[layer.weight_name]
    w = G[:, c:c + n].reshape(-1, layer.out_features, layer.in_features)
    if not layer.has_bias:
        return w
    c, n = offsets[layer.bias_name]
    return torch.cat([w, G[:, c:c + n].reshape(-1, layer.out_features, 1)], 2)


def test_cached_pass_equals_second_pass_and_the_definition():
    model, x, y = _problem()
    cached_data, twice_data = _Counted(_batches(x, y)), _Counted(_batches(x, y))
    cached = KFACFactors.fit(model, F.cross_entropy, cached_data)
    with memory_budget(1):  # no room: the EK-FAC pass goes over the data again
        twice = KFACFactors.fit(model, F.cross_entropy, twice_data)
    assert cached_data.passes == 1 and twice_data.passes == 2
    G = _per_sample_grads(model, x, y)
    for layer in cached.layers:
        torch.testing.assert_close(cached.corrected[layer.name], twice.corrected[layer.name], rtol=0, atol=0)
        Gl = _layer_block(model, G, layer)
        R = cached.Q_S[layer.name].T @ Gl @ cached.Q_A[layer.name]
        torch.testing.assert_close(cached.corrected[layer.name], (R * R).mean(0), rtol=1e-10, atol=1e-14)


def test_captures_that_outgrow_the_room_are_dropped():
    """Room for the first batch but not all of them: nothing is kept, the data is read twice, and the
    factors are those of two passes."""
    model, x, y = _problem(n=40)
    data = _Counted(_batches(x, y, size=8))
    # One batch's captures: inputs and output gradients of every call, float64.
    per_batch = 8 * 5 * ((4 + 6) + 2 * (6 + 6)) * 8 + 8 * (6 + 3) * 8
    with memory_budget(4 * 2 * per_batch):
        partial = KFACFactors.fit(model, F.cross_entropy, data)
    assert data.passes == 2
    whole = KFACFactors.fit(model, F.cross_entropy, _batches(x, y, size=8))
    for n in whole.corrected:
        torch.testing.assert_close(partial.corrected[n], whole.corrected[n], rtol=0, atol=0)


def test_token_weights_are_kept_with_the_captures():
    model, x, y = _problem(n=9)
    mask = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool)
    mask[:, 3:] = False
    batches = [((xb, mb), yb) for (xb, yb), mb in zip(_batches(x, y), mask.split(4))]

    class Masked(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, m):
            return self.inner(x * m[..., None])

    wrapped = Masked(model)
    opts = dict(token_mask=lambda inp: inp[1])
    data = _Counted(batches)
    cached = KFACFactors.fit(wrapped, F.cross_entropy, data, **opts)
    with memory_budget(1):
        twice = KFACFactors.fit(wrapped, F.cross_entropy, batches, **opts)
    assert data.passes == 1
    for n in cached.corrected:
        torch.testing.assert_close(cached.corrected[n], twice.corrected[n], rtol=0, atol=0)


@pytest.mark.parametrize("fisher_type", ["true", "ggn"])
def test_other_fisher_types_read_the_data_twice(fisher_type):
    """Sampled targets are drawn afresh on the EK-FAC pass and the GGN backpropagates one column at
    a time: both go over the data again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)
    data = _Counted(_batches(x, y))
    KFACFactors.fit(model, F.cross_entropy, data, fisher_type=fisher_type)
    assert data.passes == 2


def test_kfac_without_the_correction_reads_the_data_once_and_keeps_nothing():
    model, x, y = _problem()
    data = _Counted(_batches(x, y))
    f = KFACFactors.fit(model, F.cross_entropy, data, ekfac=False)
    assert data.passes == 1 and f.corrected is None
