"""K-FAC / EK-FAC factors (twicediff.torch.kfac) against explicit float64 references.

The references are built independently of the package's linear algebra: per-sample gradients by
one autograd backward per sample (pyDVL's loss of a batch of one), explicit Kronecker products of
the factors with torch.kron, explicit solves with torch.linalg.solve, the exact Hessian with
torch.autograd.functional.hessian.
"""
import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twicediff.torch.kfac import KFACFactors, find_layers

DT = torch.float64


def _loader(x, y, batch_size):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3)).to(DT)


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = self.bn(self.c2(h)).relu()
        return self.head(h.flatten(1))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return _CNN().to(DT)


class _Transformer(nn.Module):
    def __init__(self, d=8, classes=3):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.block(x).mean(1))


class _CNN1d(nn.Module):
    """Conv1d layers with padding, stride, dilation, a circular padding mode and no bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding=1, dilation=2)
        self.c2 = nn.Conv1d(3, 4, 2, stride=2, padding=1, padding_mode="circular", bias=False)
        self.head = nn.Linear(4 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _cnn1d(seed=0):
    torch.manual_seed(seed)
    return _CNN1d().to(DT)


def _transformer(seed=0):
    torch.manual_seed(seed)
    return _Transformer().to(DT)


def _data(kind, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 5), "cnn": (n, 2, 4, 4), "cnn1d": (n, 2, 6), "transformer": (n, 5, 8)}[kind]
    return torch.randn(*shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


MODELS = {"mlp": _mlp, "cnn": _cnn, "cnn1d": _cnn1d, "transformer": _transformer}


def _per_sample_grads(model, loss, x, y):
    """[N, P] rows: ∇θ ℓ_n, ℓ_n = loss(model(x[n:n+1]), y[n:n+1]), in model.parameters() order."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        gs = torch.autograd.grad(loss(model(x[n:n + 1]), y[n:n + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _layer_index(model, layer):
    """Flat-vector column of each (o, i) entry of the layer's [O, I'] block, row-major."""
    offs, c = {}, 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            offs[n] = c
            c += p.numel()
    O, I = layer.out_features, layer.in_features
    idx = offs[layer.weight_name] + torch.arange(O)[:, None] * I + torch.arange(I)[None, :]
    if layer.has_bias:
        idx = torch.cat([idx, (offs[layer.bias_name] + torch.arange(O))[:, None]], 1)
    return idx.reshape(-1), c


def _explicit_solve(factors, model, v, damping, method):
    """(F + λI)⁻¹ v with each layer's F an explicit [OI', OI'] matrix: kron(S, A) for K-FAC, and
    kron(Q_S, Q_A) diag(vec Λ̃) kron(Q_S, Q_A)ᵀ for EK-FAC; zero outside the tracked layers."""
    out = torch.zeros_like(v)
    for layer in factors.layers:
        idx, _ = _layer_index(model, layer)
        name = layer.name
        if method == "kfac":
            Fl = torch.kron(factors.S[name], factors.A[name])
        else:
            Q = torch.kron(factors.Q_S[name], factors.Q_A[name])
            Fl = Q @ torch.diag(factors.corrected[name].reshape(-1)) @ Q.T
        Fl = Fl + damping * torch.eye(Fl.shape[0], dtype=DT)
        out[:, idx] = torch.linalg.solve(Fl, v[:, idx].T).T
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_solve_equals_explicit_kronecker_reference(kind, method):
    model = MODELS[kind]()
    model.eval()
    x, y = _data(kind)
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 10))
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(4, P, dtype=DT, generator=torch.Generator().manual_seed(3))
    for damping in (1e-2, 0.3):
        got = factors.solve(v, damping, method=method)
        want = _explicit_solve(factors, model, v, damping, method)
        assert _rel(got, want) <= 1e-10


@pytest.mark.parametrize("kind", list(MODELS))
def test_factors_equal_their_definitions(kind):
    """A, S from the layers' inputs and per-sample output gradients; Λ̃ = mean_n (Q_Sᵀ G_n Q_A)²
    with G_n the per-sample gradients of an independent autograd pass (so the hooks read the
    right tensors, tokens included, and the batch-mean scaling is undone)."""
    model = MODELS[kind]()
    model.eval()
    x, y = _data(kind, n=13)
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 5))
    G = _per_sample_grads(model, F.cross_entropy, x, y)
    for layer in factors.layers:
        idx, _ = _layer_index(model, layer)
        Gl = G[:, idx].reshape(-1, layer.out_features, layer.in_dim)
        R = factors.Q_S[layer.name].T @ Gl @ factors.Q_A[layer.name]
        torch.testing.assert_close(factors.corrected[layer.name], (R * R).mean(0), rtol=1e-10, atol=1e-14)
        # The eigendecompositions reproduce the factors.
        for M, w, Q in ((factors.A, factors.eig_A, factors.Q_A), (factors.S, factors.eig_S, factors.Q_S)):
            torch.testing.assert_close(Q[layer.name] @ torch.diag(w[layer.name]) @ Q[layer.name].T, M[layer.name],
                                       rtol=1e-10, atol=1e-12)
    # With one token per sample, S = mean_n g_n g_nᵀ and the weight gradient is g_n ā_nᵀ: the
    # output layer's S equals the per-sample bias gradients' second moment.
    head = factors.layers[-1]
    idx, _ = _layer_index(model, head)
    gb = G[:, idx].reshape(-1, head.out_features, head.in_dim)[:, :, -1]
    torch.testing.assert_close(factors.S[head.name], gb.T @ gb / x.shape[0], rtol=1e-10, atol=1e-14)


def test_conv1d_layers_are_tracked():
    """Conv1d layers carry factors of their own (the definition and solve tests above then check
    them on the "cnn1d" model); they used to be left out of the curvature and reported."""
    x, y = _data("cnn1d")
    factors = KFACFactors.fit(_cnn1d(), F.cross_entropy, _loader(x, y, 10))
    assert [(t.name, t.kind, t.in_features) for t in factors.layers] == [
        ("c1", "conv1d", 2 * 3), ("c2", "conv1d", 3 * 2), ("head", "linear", 12)]


def test_one_linear_layer_equals_exact_hessian_where_theory_says():
    """A single Linear layer under the squared error: the Hessian of the mean loss is the
    Gauss-Newton matrix h·I ⊗ E[ā āᵀ]. When each input appears with residuals ±σ e_k for every
    output k, the empirical Fisher is that same matrix and it is exactly Kronecker-factored, so
    K-FAC and EK-FAC (exact per-sample statistics, one token per sample) both equal the Hessian."""
    torch.manual_seed(0)
    O, I, M = 3, 4, 5
    layer = nn.Linear(I, O).to(DT)
    base = torch.randn(M, I, dtype=DT)
    sigma = O / 2 ** 0.5  # per-sample loss (1/O)||f - y||², gradient (2/O) r
    xs, ys = [], []
    with torch.no_grad():
        for m in range(M):
            f = layer(base[m])
            for k in range(O):
                for s in (1.0, -1.0):
                    r = torch.zeros(O, dtype=DT)
                    r[k] = s * sigma
                    xs.append(base[m])
                    ys.append(f - r)
    x, y = torch.stack(xs), torch.stack(ys)
    factors = KFACFactors.fit(layer, F.mse_loss, _loader(x, y, 7))

    params = list(layer.parameters())
    shapes = [p.shape for p in params]

    def mean_loss(flat):
        w = flat[:O * I].reshape(shapes[0])
        b = flat[O * I:]
        return F.mse_loss(F.linear(x, w, b), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(mean_loss, flat)
    idx, _ = _layer_index(layer, factors.layers[0])
    H_block = H[idx][:, idx]
    t = factors.layers[0].name
    kfac = torch.kron(factors.S[t], factors.A[t])
    Q = torch.kron(factors.Q_S[t], factors.Q_A[t])
    ekfac = Q @ torch.diag(factors.corrected[t].reshape(-1)) @ Q.T
    assert _rel(kfac, H_block) <= 1e-10
    assert _rel(ekfac, H_block) <= 1e-10
    v = torch.randn(2, H.shape[0], dtype=DT)
    for method in ("kfac", "ekfac"):
        torch.testing.assert_close(factors.solve(v, 0.05, method=method),
                                   torch.linalg.solve(H + 0.05 * torch.eye(H.shape[0], dtype=DT), v.T).T,
                                   rtol=1e-9, atol=1e-12)


def test_ekfac_is_the_best_diagonal_in_the_kronecker_basis():
    """EK-FAC's Λ̃ is the diagonal of the exact empirical Fisher block in the basis Q_S ⊗ Q_A."""
    model = _mlp()
    x, y = _data("mlp", n=17)
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 6))
    G = _per_sample_grads(model, F.cross_entropy, x, y)
    for layer in factors.layers:
        idx, _ = _layer_index(model, layer)
        Fl = G[:, idx].T @ G[:, idx] / x.shape[0]
        Q = torch.kron(factors.Q_S[layer.name], factors.Q_A[layer.name])
        torch.testing.assert_close(torch.diagonal(Q.T @ Fl @ Q), factors.corrected[layer.name].reshape(-1),
                                   rtol=1e-10, atol=1e-14)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m, m.training) for m in model.modules()],
            [p.grad for p in model.parameters()],
            [p.requires_grad for p in model.parameters()])


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("fisher_type", ["empirical", "true", "ggn"])
def test_model_unchanged_by_fitting(kind, fisher_type):
    model = MODELS[kind]()
    model.train()  # batch norm in train mode would update its running statistics if fitting ran it so
    x, y = _data(kind)
    state, modes, grads, req = _snapshot(model)
    KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), fisher_type=fisher_type)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(m.training == t for m, t in modes)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == req
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_save_load_round_trip():
    model = _cnn()
    model.eval()
    x, y = _data("cnn")
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8))
    buf = io.BytesIO()
    torch.save(factors.state_dict(), buf)
    buf.seek(0)
    loaded = KFACFactors.from_state_dict(torch.load(buf, weights_only=True), model=copy.deepcopy(model))
    v = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=DT)
    for method in ("kfac", "ekfac"):
        assert torch.equal(loaded.solve(v, 0.1, method=method), factors.solve(v, 0.1, method=method))
    assert loaded.info() == factors.info()
    other = KFACFactors.from_state_dict(factors.state_dict())
    with pytest.raises(ValueError, match="trainable parameters differ"):
        other.attach(_mlp())


def test_true_fisher_is_seeded_and_differs_from_empirical():
    model = _mlp()
    x, y = _data("mlp")
    a = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), fisher_type="true", seed=5)
    b = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), fisher_type="true", seed=5)
    c = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), fisher_type="true", seed=6)
    e = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8))
    name = a.layers[-1].name
    assert torch.equal(a.S[name], b.S[name]) and torch.equal(a.corrected[name], b.corrected[name])
    assert not torch.equal(a.S[name], c.S[name])
    assert not torch.allclose(a.S[name], e.S[name])
    # A depends on inputs only.
    torch.testing.assert_close(a.A[name], e.A[name])


def test_true_fisher_matches_its_expectation_for_cross_entropy():
    """For the output layer under cross-entropy, E_y[g gᵀ] = diag(p) - p pᵀ per sample: the sampled
    S converges to it (a loose, seeded statistical check with many draws)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(DT)
    x = torch.randn(8, 3, dtype=DT).repeat(500, 1)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 1000), fisher_type="true", seed=0, ekfac=False)
    with torch.no_grad():
        p = torch.softmax(model(x[:8]), -1)
    want = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(f.S[""], want, atol=0.02, rtol=0)


def test_mean_and_sum_reduction_agree():
    model = _mlp()
    x, y = _data("mlp")
    a = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 7))
    b = KFACFactors.fit(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), _loader(x, y, 7),
                        reduction="sum")
    for n in a.S:
        torch.testing.assert_close(a.S[n], b.S[n], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(a.corrected[n], b.corrected[n], rtol=1e-12, atol=1e-15)


def test_layers_left_out_are_reported(caplog):
    model = _transformer()
    x, y = _data("transformer")
    with caplog.at_level(logging.INFO, logger="twicediff.torch.kfac"):
        f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8))
    names = [t.name for t in f.layers]
    assert names == ["block.linear1", "block.linear2", "head"]
    assert "block.self_attn.out_proj" in caplog.text  # never called as a module by MultiheadAttention
    assert "block.self_attn.in_proj_weight" in f.left_out and "block.norm1.weight" in f.left_out
    # Their entries of a solve are zero.
    P = sum(p.numel() for p in model.parameters())
    out = f.solve(torch.ones(1, P, dtype=DT), 0.1)
    off = 0
    for n, p in model.named_parameters():
        block = out[0, off:off + p.numel()]
        assert (block == 0).all() == (n in f.left_out), n
        off += p.numel()


def test_weight_normalised_layers_are_left_out():
    """A weight-normalised Linear's weight is computed from its parameters (g, v): the factors
    describe the weight, so the layer is left out (it crashed with a KeyError), and naming it is an
    error saying why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    model = model.double().eval()
    x, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 4))
    assert [t.name for t in f.layers] == ["2"]
    assert {"0.bias", "0.parametrizations.weight.original0", "0.parametrizations.weight.original1"} <= set(f.left_out)
    with pytest.raises(ValueError, match=r"layers\[0\] = '0' cannot be tracked: its weight or bias is computed"):
        find_layers(model, ["0"])


def test_leaving_most_parameters_out_is_a_warning(caplog):
    model = _mlp()
    x, y = _data("mlp")
    with caplog.at_level(logging.INFO, logger="twicediff.torch.kfac"):
        KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), layers=["2", "4"])  # 30 + 6 of 75 left out
        KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), layers=["4"])  # 60 of 75 left out
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if "out of the curvature" in r.getMessage()]
    assert [lv for lv, _ in levels] == [logging.INFO, logging.WARNING]
    assert "(60 elements, 80% of the trainable ones)" in levels[1][1] and "0.weight, 0.bias, 2.weight" in levels[1][1]


def test_a_tied_weight_used_outside_its_tracked_layer_is_a_warning(caplog):
    class Tied(nn.Module):  # the output layer's matrix is the embedding's
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.out = nn.Embedding(5, 3), nn.Linear(3, 3), nn.Linear(3, 5)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.mix(self.embed(ids).mean(dim=1))))

    torch.manual_seed(0)
    model = Tied().to(DT).eval()
    ids, y = torch.randint(0, 5, (8, 4)), torch.randint(0, 5, (8,))
    with caplog.at_level(logging.INFO, logger="twicediff.torch.kfac"):
        KFACFactors.fit(model, F.cross_entropy, _loader(ids, y, 4))
        KFACFactors.fit(_mlp(), F.cross_entropy, _loader(*_data("mlp"), 8))  # nothing shared: nothing said
    said = [r for r in caplog.records if "also used by other modules" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert said[0].getMessage().endswith("out: embed (Embedding)")


def test_user_named_layers_and_errors():
    model = _mlp()
    assert [t.name for t in find_layers(model, ["2", model[4]])] == ["2", "4"]
    with pytest.raises(ValueError, match="not a module of the model"):
        find_layers(model, ["nope"])
    with pytest.raises(ValueError, match="is a Tanh; expected an nn.Linear, an nn.Conv1d or an nn.Conv2d"):
        find_layers(model, ["1"])
    x, y = _data("mlp")
    f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), layers=["4"])
    assert f.left_out == ["0.weight", "0.bias", "2.weight"]
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8), fisher_type="exact")
    with pytest.raises(ValueError, match="sample_targets"):
        KFACFactors.fit(model, lambda o, t: F.nll_loss(o.log_softmax(-1), t), _loader(x, y, 8), fisher_type="true")
    with pytest.raises(ValueError, match=r"grads must be \[N, P\]"):
        f.solve(torch.zeros(2, 5, dtype=DT))
    with pytest.raises(ValueError, match="method must be one of"):
        f.solve(torch.zeros(2, sum(p.numel() for p in model.parameters()), dtype=DT), method="direct")


def test_dict_and_tuple_batches_and_list_grads():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)

        def forward(self, u, w):
            return self.a(u) + self.b(w)

    torch.manual_seed(0)
    model = TwoInputs().to(DT)
    u, w, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT), torch.randint(0, 4, (10,))
    as_tuple = KFACFactors.fit(model, F.cross_entropy, [((u[:6], w[:6]), y[:6]), ((u[6:], w[6:]), y[6:])])
    as_dict = KFACFactors.fit(model, F.cross_entropy, [({"u": u[:6], "w": w[:6]}, y[:6]),
                                                       ({"u": u[6:], "w": w[6:]}, y[6:])])
    for n in as_tuple.A:
        torch.testing.assert_close(as_tuple.corrected[n], as_dict.corrected[n])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        KFACFactors.fit(model, F.cross_entropy, [({"u": u[:6], "w": w[:5]}, y[:6])])
    grads = [torch.randn(2, *p.shape, dtype=DT) for p in model.parameters()]
    flat = torch.cat([g.reshape(2, -1) for g in grads], 1)
    out_list = as_tuple.solve(grads, 0.1)
    out_flat = as_tuple.solve(flat, 0.1)
    torch.testing.assert_close(torch.cat([g.reshape(2, -1) for g in out_list], 1), out_flat)
    out_dict = as_tuple.solve(dict(zip([n for n, _ in model.named_parameters()], grads)), 0.1)
    torch.testing.assert_close(out_dict["a.weight"], out_list[0])


def test_rank_deficient_factors_do_not_crash():
    """A constant-zero input feature and a dead output make A and S singular: the eigendecomposition
    holds, eigenvalues are ≥ 0, and the undamped solve is the pseudo-inverse (finite)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    x = torch.randn(6, 4, dtype=DT)
    x[:, 1] = 0
    y = torch.randint(0, 3, (6,))
    f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 3))
    assert (f.eig_A[""] >= 0).all() and f.eig_A[""][0] == 0
    out = f.solve(torch.randn(2, 15, dtype=DT), 0.0, method="kfac")
    assert torch.isfinite(out).all()


def test_relative_damping_scales_with_mean_eigenvalue():
    model = _mlp()
    x, y = _data("mlp")
    f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8))
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=DT)
    rel = f.solve(v, 0.1, relative_damping=True)
    for layer in f.layers:
        lam = 0.1 * float(f.corrected[layer.name].mean())
        assert f.damping_for(layer.name, 0.1, relative=True) == pytest.approx(lam)
    want = _explicit_solve_relative(f, model, v, 0.1)
    assert _rel(rel, want) <= 1e-10


def _explicit_solve_relative(f, model, v, alpha):
    out = torch.zeros_like(v)
    for layer in f.layers:
        idx, _ = _layer_index(model, layer)
        Q = torch.kron(f.Q_S[layer.name], f.Q_A[layer.name])
        lam = f.corrected[layer.name].reshape(-1)
        Fl = Q @ torch.diag(lam) @ Q.T + alpha * float(lam.mean()) * torch.eye(lam.numel(), dtype=DT)
        out[:, idx] = torch.linalg.solve(Fl, v[:, idx].T).T
    return out


def test_token_mask_equals_truncated_sequences():
    """Padding tokens masked out give the factors of the unpadded sequences (the model ignores
    padding; without the mask, A would count the padded inputs)."""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x, mask):
            return self.head((torch.tanh(self.lin(x)) * mask[..., None]).sum(1))

    torch.manual_seed(0)
    model = Pooled().to(DT)
    B, T, k = 6, 5, 3
    x = torch.randn(B, T, 3, dtype=DT)
    y = torch.randint(0, 2, (B,))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :k] = True
    padded = KFACFactors.fit(model, F.cross_entropy, [((x, mask), y)], token_mask=lambda inp: inp[1])
    plain = KFACFactors.fit(model, F.cross_entropy, [((x[:, :k].clone(), mask[:, :k].clone()), y)])
    unmasked = KFACFactors.fit(model, F.cross_entropy, [((x, mask), y)])
    for n in ("lin", "head"):
        for key in ("A", "S", "corrected"):
            torch.testing.assert_close(getattr(padded, key)[n], getattr(plain, key)[n], rtol=1e-12, atol=1e-14)
    assert padded.num_tokens["lin"] == B * k
    assert not torch.allclose(unmasked.A["lin"], plain.A["lin"])
    with pytest.raises(ValueError, match="token_mask"):
        KFACFactors.fit(model, F.cross_entropy, [((x, mask), y)], token_mask=lambda inp: inp[1][0])


def test_fit_on_device_matches_cpu(device):
    """The same factors on every device (CUDA runs the native ops' CUDA kernels there), also for a
    float32 model accumulated in float32."""
    model = _transformer()
    x, y = _data("transformer")
    want = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8))
    on = copy.deepcopy(model).to(device)
    got = KFACFactors.fit(on, F.cross_entropy, _loader(x.to(device), y.to(device), 8)).to("cpu")
    for n in want.A:
        for key in ("A", "S", "corrected"):
            torch.testing.assert_close(getattr(got, key)[n], getattr(want, key)[n], rtol=1e-9, atol=1e-12)
    f32 = KFACFactors.fit(copy.deepcopy(model).float().to(device), F.cross_entropy,
                          _loader(x.float().to(device), y.to(device), 8)).to("cpu")
    for n in want.A:
        torch.testing.assert_close(f32.A[n], want.A[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f32.corrected[n], want.corrected[n], rtol=1e-3, atol=1e-6)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(2, P, dtype=DT)
    torch.testing.assert_close(got.to(device).solve(v.to(device), 0.1).cpu(), want.solve(v, 0.1), rtol=1e-8, atol=1e-10)


def test_inplace_activation_after_a_tracked_layer():
    """ReLU(inplace=True) rewrites a tracked layer's output after the layer returned it: the
    factors must still use the gradient of the value the layer returned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(DT)
    x, y = torch.randn(11, 4, dtype=DT), torch.randint(0, 3, (11,))
    factors = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 4))
    G = _per_sample_grads(model, F.cross_entropy, x, y)
    for layer in factors.layers:
        idx, _ = _layer_index(model, layer)
        Gl = G[:, idx].reshape(-1, layer.out_features, layer.in_dim)
        R = factors.Q_S[layer.name].T @ Gl @ factors.Q_A[layer.name]
        torch.testing.assert_close(factors.corrected[layer.name], (R * R).mean(0), rtol=1e-10, atol=1e-14)
        gb = Gl[:, :, -1]  # bias gradients = per-sample output gradients (one token)
        torch.testing.assert_close(factors.S[layer.name], gb.T @ gb / 11, rtol=1e-10, atol=1e-14)
    q = factors.solve(G[:2], 0.1)
    torch.testing.assert_close(factors.score(model, F.cross_entropy, q, _loader(x, y, 4)), q @ G.T,
                               rtol=1e-10, atol=1e-12)


def test_bfloat16_model_fits_and_solves():
    """A bfloat16 model: factors accumulated in float32 by the native ops, eigenbases in float64,
    the solve computed in float32 and returned in bfloat16; close to the float64 fit."""
    model = _mlp()
    x, y = _data("mlp", n=32)
    want = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 8))
    got = KFACFactors.fit(copy.deepcopy(model).bfloat16(), F.cross_entropy, _loader(x.bfloat16(), y, 8))
    for n in want.A:
        torch.testing.assert_close(got.A[n], want.A[n], rtol=0.05, atol=0.02)
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=DT)
    out = got.solve(v.bfloat16(), 1.0, method="kfac")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want.solve(v, 1.0, method="kfac"), rtol=0.1, atol=0.05)


def test_layers_wider_than_max_factor_dim_are_left_out(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 40)).to(DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 40, (8,))
    with caplog.at_level(logging.INFO, logger="twicediff.torch.kfac"):
        f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 4), max_factor_dim=16)
    assert [t.name for t in f.layers] == ["0"] and f.left_out == ["2.weight", "2.bias"]
    assert "max_factor_dim = 16" in caplog.text and "S [40, 40]" in caplog.text
    assert [t.name for t in find_layers(model, ["2"], max_factor_dim=16)] == ["2"]  # named: tracked anyway
    assert [t.name for t in find_layers(model, max_factor_dim=None)] == ["0", "2"]
    with pytest.raises(ValueError, match="max_factor_dim must be a positive int"):
        find_layers(model, max_factor_dim=0)


def _linear_hessian(layer, loss, x, y):
    """The exact Hessian of the mean loss of a single Linear layer (= its Gauss-Newton matrix, the
    model being linear in its parameters), in the layout (weight row-major, bias)."""
    O, I = layer.weight.shape

    def mean_loss(flat):
        return loss(F.linear(x, flat[:O * I].reshape(O, I), flat[O * I:]), y)

    flat = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    return torch.autograd.functional.hessian(mean_loss, flat)


def test_ggn_of_a_linear_layer_under_mse_is_exact():
    """Squared error: the loss Hessian is the constant (2/C)·I, so the Gauss-Newton matrix of a
    Linear layer is exactly Kronecker-factored; with fisher_type='ggn' (no sampling) K-FAC and
    EK-FAC both equal the exact Hessian, for any data."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(23, 4, dtype=DT), torch.randn(23, 3, dtype=DT)
    f = KFACFactors.fit(layer, F.mse_loss, _loader(x, y, 6), fisher_type="ggn")
    H = _linear_hessian(layer, F.mse_loss, x, y)
    idx, _ = _layer_index(layer, f.layers[0])
    H = H[idx][:, idx]
    Q = torch.kron(f.Q_S[""], f.Q_A[""])
    assert _rel(torch.kron(f.S[""], f.A[""]), H) <= 1e-10
    assert _rel(Q @ torch.diag(f.corrected[""].reshape(-1)) @ Q.T, H) <= 1e-10


def test_ggn_ekfac_is_the_exact_diagonal_under_cross_entropy():
    """Cross-entropy on a Linear layer: the GGN E_n[(diag p_n - p_n p_nᵀ) ⊗ ā_n ā_nᵀ] is the exact
    Hessian; EK-FAC with fisher_type='ggn' (exact per-sample statistics) has Λ̃ equal to its
    diagonal in the Kronecker eigenbasis, and S equal to the mean output Hessian."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(19, 4, dtype=DT), torch.randint(0, 3, (19,))
    f = KFACFactors.fit(layer, nn.CrossEntropyLoss(), _loader(x, y, 5), fisher_type="ggn")
    H = _linear_hessian(layer, F.cross_entropy, x, y)
    idx, _ = _layer_index(layer, f.layers[0])
    H = H[idx][:, idx]
    Q = torch.kron(f.Q_S[""], f.Q_A[""])
    torch.testing.assert_close(f.corrected[""].reshape(-1), torch.diagonal(Q.T @ H @ Q), rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        p = torch.softmax(layer(x), -1)
    torch.testing.assert_close(f.S[""], (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0),
                               rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="fisher_type='ggn' needs a loss whose Hessian is known"):
        KFACFactors.fit(layer, nn.CrossEntropyLoss(label_smoothing=0.1), _loader(x, y, 5), fisher_type="ggn")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ggn_ekfac_is_the_diagonal_of_the_exact_ggn(kind):
    """Any depth: with fisher_type='ggn', Λ̃ of every layer is the diagonal, in the Kronecker
    eigenbasis, of the exact Gauss-Newton block (1/N) Σ_n J_nᵀ H_n J_n, built from per-sample
    Jacobians of the outputs (torch.func) and the cross-entropy Hessian diag(p) - p pᵀ."""
    model = MODELS[kind]()
    model.eval()
    x, y = _data(kind, n=7)
    f = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 3), fisher_type="ggn")
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def out(p, xi):
        return torch.func.functional_call(model, (p, buffers), (xi[None],))[0]

    P = sum(p.numel() for p in params.values())
    GGN = torch.zeros(P, P, dtype=DT)
    for n in range(x.shape[0]):
        jac = torch.func.jacrev(out)(params, x[n])
        J = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in names], 1)  # [C, P]
        p = torch.softmax(out(params, x[n]), -1).detach()
        GGN += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    GGN /= x.shape[0]
    for layer in f.layers:
        idx, _ = _layer_index(model, layer)
        Q = torch.kron(f.Q_S[layer.name], f.Q_A[layer.name])
        torch.testing.assert_close(f.corrected[layer.name].reshape(-1), torch.diagonal(Q.T @ GGN[idx][:, idx] @ Q),
                                   rtol=1e-9, atol=1e-14)


def test_float32_factor_dtype_keeps_eigenbases_in_float32():
    """factor_dtype=float32 stores A, S, Q_A, Q_S in float32 after the float64 eigendecomposition
    (eigenvalues and Λ̃ stay float64): the same factors rounded once, so for a float32 model the
    solve and the scores agree with the float64-stored fit to float32 rounding, and the state
    round-trips with its dtypes."""
    model = _transformer().float()
    model.eval()
    x, y = _data("transformer", n=20)
    x = x.float()
    want = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 6))
    got = KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 6), factor_dtype=torch.float32)
    for n in want.A:
        for key in ("A", "S", "Q_A", "Q_S"):
            assert getattr(got, key)[n].dtype == torch.float32 and getattr(want, key)[n].dtype == torch.float64
            torch.testing.assert_close(getattr(got, key)[n], getattr(want, key)[n].float(), rtol=0, atol=0)
        assert got.eig_A[n].dtype == got.corrected[n].dtype == torch.float64
        torch.testing.assert_close(got.corrected[n], want.corrected[n], rtol=1e-5, atol=1e-9)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(3, P, generator=torch.Generator().manual_seed(5))
    for method in ("kfac", "ekfac"):
        torch.testing.assert_close(got.solve(v, 0.1, method=method), want.solve(v, 0.1, method=method),
                                   rtol=1e-4, atol=1e-5)
    pre = got.solve(v, 0.1)
    blocks = {n: pre[:, o:o + p.numel()].reshape(3, *p.shape) for (n, p), o in
              zip(model.named_parameters(), torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0))}
    torch.testing.assert_close(got.score(model, F.cross_entropy, blocks, _loader(x, y, 6)),
                               want.score(model, F.cross_entropy, pre, _loader(x, y, 6)), rtol=1e-4, atol=1e-5)
    buf = io.BytesIO()
    torch.save(got.state_dict(), buf)
    buf.seek(0)
    loaded = KFACFactors.from_state_dict(torch.load(buf, weights_only=True), model=model)
    assert loaded.Q_A[got.layers[0].name].dtype == torch.float32
    assert torch.equal(loaded.solve(v, 0.1), got.solve(v, 0.1))
    with pytest.raises(ValueError, match="factor_dtype must be torch.float32 or torch.float64, got torch.float16"):
        KFACFactors.fit(model, F.cross_entropy, _loader(x, y, 6), factor_dtype=torch.float16)
