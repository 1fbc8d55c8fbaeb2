"""twicediff.torch.cdist against torch.cdist: the same distances and gradients on generated inputs
(every p, every compute_mode, either side of torch's 25-row rule, broadcast batch dimensions), a
derivative of 0 at distance 0 as torch's backward gives, and the batched second derivatives right
where torch's batching rule is not (``vmap`` over the pullback of ``grad``). The products of models
that call torch.cdist, through every engine, are in tests/test_differential.py (``generate_zoo``,
its prototypes family) and tests/torch/engines/test_compiled.py. twicediff.torch.cdist.pdist against
F.pdist (no forward-mode rule in torch): values, gradients and forward mode, and a model calling
it through every engine."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from same_as_torch import assert_same_values_and_gradients
from twicediff.torch.cdist import MODES, cdist, pdist

PS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, math.inf)


def _draw(seed: int):
    r = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows1, rows2, cols = r.choice([1, 3, 26, 30]), r.choice([1, 2, 27]), r.choice([1, 3])
    batch1, batch2 = r.choice([((), ()), ((2,), ()), ((), (3,)), ((2, 1), (3,)), ((2, 3), (1,)), ((2,), (2,))])
    x1 = torch.randn(*batch1, rows1, cols, generator=gen, dtype=torch.float64)
    x2 = torch.randn(*batch2, rows2, cols, generator=gen, dtype=torch.float64)
    return x1, x2, r.choice(PS), r.choice(MODES)


@pytest.mark.parametrize("seed", range(60))
def test_distances_and_gradients_are_torchs(seed):
    x1, x2, p, mode = _draw(seed)
    what = f"seed {seed}: {tuple(x1.shape)} {tuple(x2.shape)} p={p} {mode}"
    a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
    want = torch.cdist(a, b, p=p, compute_mode=mode)
    got = cdist(a, b, p=p, compute_mode=mode)
    assert_same_values_and_gradients(got, want, (a, b), what, rtol=1e-10, atol=1e-10, grad_rtol=1e-8, grad_atol=1e-10)


@pytest.mark.parametrize("p", PS[1:])
@pytest.mark.parametrize("rows", [3, 30])
def test_batched_second_derivatives_are_the_one_at_a_time_ones(p, rows):
    """vmap over the pullback of grad (and over its forward-mode tangent) gives what each direction
    gives alone; torch.cdist's own batched pullback does not (torch 2.14, under 26 rows)."""
    gen = torch.Generator().manual_seed(rows)
    params = (torch.randn(rows, 3, generator=gen, dtype=torch.float64),
              torch.randn(4, 3, generator=gen, dtype=torch.float64))

    def loss(ps):
        return torch.tanh(cdist(ps[0], ps[1], p=p)).sum()

    directions = tuple(torch.randn(5, *t.shape, generator=gen, dtype=torch.float64) for t in params)
    _, pullback = vjp(grad(loss), params)
    one_at_a_time = [pullback(tuple(d[k] for d in directions))[0] for k in range(5)]
    batched = vmap(lambda t: pullback(t)[0])(directions)
    forward = vmap(lambda t: jvp(grad(loss), (params,), (t,))[1])(directions)
    for i in range(2):
        want = torch.stack([one[i] for one in one_at_a_time])
        torch.testing.assert_close(batched[i], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(forward[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_a_distance_of_zero_has_derivative_zero_as_torchs(p):
    x = torch.randn(4, 3, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    ours, = torch.autograd.grad(cdist(a, x, p=p).sum(), a)
    theirs, = torch.autograd.grad(torch.cdist(a, x, p=p).sum(), a)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("rows", [0, 1, 2, 5])
def test_pdist_distances_gradients_and_forward_mode_are_torchs(p, rows):
    """Rows 0 and 2 are equal: a distance of 0, whose derivative torch's backward takes as 0."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    if rows > 2:
        x[2] = x[0]
    a = x.clone().requires_grad_(True)
    want, got = F.pdist(a, p=p), pdist(a, p=p)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(want)
    if want.numel():
        theirs, = torch.autograd.grad(want, a, weights)
        ours, = torch.autograd.grad(got, a, weights)
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)
    tangent = torch.randn_like(x)
    _, forward = jvp(lambda t: pdist(t, p=p), (x,), (tangent,))
    _, reverse = vjp(lambda t: pdist(t, p=p), x)
    # ⟨w, J t⟩ = ⟨Jᵀ w, t⟩: forward mode agrees with the reverse mode checked above
    torch.testing.assert_close((weights * forward).sum(), (reverse(weights)[0] * tangent).sum())


def test_a_model_calling_pdist_through_every_engine():
    """func could not take it (no forward-mode rule of F.pdist); every engine now agrees with
    float64 autograd, which differentiates torch's op twice."""
    from twicediff import TorchTwiceDifferentiable

    class Spread(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(3, 4), nn.Linear(6, 2)

        def forward(self, x):  # x [N, 4 points, 3]: each sample's pairwise distances of its points
            return self.head(torch.stack([F.pdist(torch.tanh(self.embed(pts)), p=1.5) for pts in x]))

    torch.manual_seed(0)
    model = Spread().double().eval()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    v = torch.randn(3, td.num_params, dtype=torch.float64)
    want = td.hvp(x, y, v, engine="autograd")
    for engine in ("auto", "func", "loop"):
        torch.testing.assert_close(td.hvp(x, y, v, engine=engine), want, rtol=1e-9, atol=1e-11, msg=engine)


@pytest.mark.parametrize("call, words", [
    (lambda: pdist(torch.randn(2, 3, 4)), "must be a matrix"),
    (lambda: pdist(torch.randn(2, 3), p=-2.0), "p must be >= 0, got -2.0"),
    (lambda: cdist(torch.randn(3), torch.randn(2, 3)), "at least 2 dimensions"),
    (lambda: cdist(torch.randn(2, 3), torch.randn(2, 4)), "same number of columns, got 3 and 4"),
    (lambda: cdist(torch.randn(2, 3), torch.randn(2, 3), p=-1.0), "p must be >= 0, got -1.0"),
    (lambda: cdist(torch.randn(2, 3), torch.randn(2, 3), compute_mode="fast"), "compute_mode must be one of"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(ValueError, match=words):
        call()
