"""Streamed K-FAC scoring against the explicit product of preconditioned queries with per-sample
training gradients (one autograd backward per training sample), on models with tokens, convolutions
and layers left out."""
import pytest
import torch
import torch.nn.functional as F

from test_kfac import MODELS, _data, _layer_index, _loader, _per_sample_grads
from twicediff.torch.kfac import KFACFactors

DT = torch.float64


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("contraction", ["auto", "per_sample", "tokens"])
def test_scores_equal_explicit_contraction(kind, contraction):
    model = MODELS[kind]()
    model.eval()
    x, y = _data(kind, n=14)
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 5))
    xq, yq = _data(kind, n=3, seed=7)
    q = factors.solve(_per_sample_grads(model, F.cross_entropy, xq, yq), 0.1)
    got = factors.score(model, F.cross_entropy, q, _loader(x, y, 4), contraction=contraction)
    G = _per_sample_grads(model, F.cross_entropy, x, y)
    mask = torch.zeros(G.shape[1], dtype=torch.bool)
    for layer in factors.layers:
        idx, _ = _layer_index(model, layer)
        mask[idx] = True
    want = q[:, mask] @ G[:, mask].T
    assert got.shape == (3, 14)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_scoring_leaves_the_model_unchanged():
    model = MODELS["cnn"]()
    model.train()
    x, y = _data("cnn", n=8)
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    P = sum(p.numel() for p in model.parameters())
    factors.score(model, F.cross_entropy, torch.randn(2, P, dtype=DT), _loader(x, y, 4))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="contraction must be one of"):
        factors.score(model, F.cross_entropy, torch.randn(2, P, dtype=DT), _loader(x, y, 4), contraction="x")


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_self_scores_equal_explicit(kind, method):
    model = MODELS[kind]()
    model.eval()
    x, y = _data(kind, n=9)
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 4))
    G = _per_sample_grads(model, F.cross_entropy, x, y)
    want = (factors.solve(G, 0.2, method=method) * G).sum(1)
    got = factors.self_score(model, F.cross_entropy, _loader(x, y, 4), 0.2, method)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    rel = factors.self_score(model, F.cross_entropy, _loader(x, y, 4), 0.2, method, relative_damping=True)
    torch.testing.assert_close(rel, (factors.solve(G, 0.2, method=method, relative_damping=True) * G).sum(1),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(MODELS))
def test_low_rank_queries(kind):
    """query_rank = r contracts the rank-r truncated SVD of each query's layer block: exact at full
    rank, and at rank 1 equal to the explicit product with the rank-1 reconstructions."""
    model = MODELS[kind]()
    model.eval()
    x, y = _data(kind, n=10)
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 5))
    G = _per_sample_grads(model, F.cross_entropy, x, y)
    q = factors.solve(G[:3], 0.1)
    full = factors.score(model, F.cross_entropy, q, _loader(x, y, 4))
    torch.testing.assert_close(factors.score(model, F.cross_entropy, q, _loader(x, y, 4), query_rank=10 ** 6), full,
                               rtol=1e-10, atol=1e-12)
    q1 = torch.zeros_like(q)
    for layer in factors.layers:
        idx, _ = _layer_index(model, layer)
        blk = q[:, idx].reshape(3, layer.out_features, layer.in_dim)
        u, s, vh = torch.linalg.svd(blk)
        q1[:, idx] = (s[:, 0, None, None] * u[:, :, :1] @ vh[:, :1, :]).reshape(3, -1)
    got = factors.score(model, F.cross_entropy, q, _loader(x, y, 4), query_rank=1)
    torch.testing.assert_close(got, q1 @ G.T, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="query_rank must be a positive int"):
        factors.score(model, F.cross_entropy, q, _loader(x, y, 4), query_rank=0)
