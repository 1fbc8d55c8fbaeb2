"""K-FAC / EK-FAC as inversion methods of the pyDVL-shaped API (solve_hvp, compute_influences,
compute_self_influences) against an explicit float64 reference: the dense [P, P] curvature built
from the same fitted factors (S ⊗ A, or the EK-FAC eigenbasis with Λ̃), zero outside the tracked
layers, inverted with torch.linalg."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twicediff.influence import compute_influences, compute_self_influences
from twicediff.inversion import InversionMethod, solve_hvp
from twicediff.torch import TorchTwiceDifferentiable
from twicediff.torch.kfac import KFACFactors

F64 = torch.float64


def make_data(n=24, d=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)


def make_model(norm=True, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 5)] + ([nn.LayerNorm(5)] if norm else []) + [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).to(F64).eval()


def loader(x, y, bs=7):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def point_grads(module, x, y):
    """∇θ of pyDVL's loss of a batch of one, every trainable parameter, one point at a time."""
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(torch.squeeze(module(x[i:i + 1])), torch.squeeze(y[i:i + 1]))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def dense_curvature(factors, module, method):
    """[P, P]: the layer blocks of F in the flat parameter layout, zero rows/columns elsewhere."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    sizes = dict((n, p.numel()) for n, p in module.named_parameters() if p.requires_grad)
    offsets, o = {}, 0
    for n in names:
        offsets[n], o = o, o + sizes[n]
    P = o
    Fm = torch.zeros(P, P, dtype=F64)
    for t in factors.layers:
        O, Ip = t.out_features, t.in_dim
        if method == "kfac":
            block = torch.kron(factors.S[t.name], factors.A[t.name])  # row-major vec of V [O, I']
        else:
            Q = torch.kron(factors.Q_S[t.name], factors.Q_A[t.name])
            block = Q @ torch.diag(factors.corrected[t.name].reshape(-1)) @ Q.T
        # index of V[o, i] in the flat layout: weight (row-major [O, I]) then bias [O]
        idx = torch.empty(O, Ip, dtype=torch.long)
        w0 = offsets[t.weight_name]
        idx[:, :Ip - (1 if t.has_bias else 0)] = w0 + torch.arange(O * t.in_features).reshape(O, t.in_features)
        if t.has_bias:
            idx[:, -1] = offsets[t.bias_name] + torch.arange(O)
        idx = idx.reshape(-1)
        Fm[idx[:, None], idx[None, :]] = block
    tracked = Fm.abs().sum(1) > 0
    return Fm, tracked


def reference_inverse(Fm, tracked, lam):
    """(F + λI)⁻¹ on the tracked coordinates, zero elsewhere."""
    idx = tracked.nonzero().reshape(-1)
    sub = Fm[idx[:, None], idx[None, :]] + lam * torch.eye(len(idx), dtype=F64)
    inv = torch.zeros_like(Fm)
    inv[idx[:, None], idx[None, :]] = torch.linalg.inv(sub)
    return inv


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
@pytest.mark.parametrize("relative", [False, True])
def test_influences_match_dense_reference(method, relative):
    x, y = make_data()
    xt, yt = make_data(5, seed=1)
    module = make_model()
    model = TorchTwiceDifferentiable(module, F.cross_entropy)
    lam = 0.05
    factors = KFACFactors.fit(module, lambda o, t: F.cross_entropy(o.squeeze(), t.squeeze()), loader(x, y))
    Fm, tracked = dense_curvature(factors, module, method)
    assert tracked.sum() == sum(t.num_params for t in factors.layers) < model.num_params  # LayerNorm left out
    if relative:
        lams = {t.name: lam * float(factors.eigenvalues(t.name, method).mean()) for t in factors.layers}
        assert len(set(lams.values())) == 2
        # one λ per layer: build the inverse layer block by layer block
        inv = torch.zeros_like(Fm)
        for t in factors.layers:
            sel = torch.zeros(model.num_params, dtype=torch.bool)
            names = {t.weight_name, t.bias_name}
            o = 0
            for n, p in module.named_parameters():
                if n in names:
                    sel[o:o + p.numel()] = True
                o += p.numel()
            inv += reference_inverse(Fm * sel[:, None] * sel[None, :], sel, lams[t.name])
    else:
        inv = reference_inverse(Fm, tracked, lam)
    g_test, g_train = point_grads(module, xt, yt), point_grads(module, x, y)
    ref_factors = g_test @ inv.T
    ref_up = ref_factors @ g_train.T
    ref_self = torch.einsum("ip,pq,iq->i", g_train, inv, g_train)

    opts = dict(relative_damping=relative)
    for fitted in (None, factors):  # refitted by the solver, and passed in
        res = solve_hvp(method, model, loader(x, y), g_test, hessian_perturbation=lam, factors=fitted, **opts)
        torch.testing.assert_close(res.x, ref_factors, rtol=1e-10, atol=1e-12)
        assert res.info["left_out"] == ["1.weight", "1.bias"]
        up = compute_influences(model, loader(x, y), test_data=loader(xt, yt), inversion_method=method,
                                hessian_regularization=lam, factors=fitted, **opts)
        torch.testing.assert_close(up, ref_up, rtol=1e-10, atol=1e-12)
        selfs = compute_self_influences(model, loader(x, y), inversion_method=method, hessian_regularization=lam,
                                        factors=fitted, **opts)
        torch.testing.assert_close(selfs, ref_self, rtol=1e-10, atol=1e-12)


def test_perturbation_influence_matches_reference():
    x, y = make_data(10)
    xt, yt = make_data(3, seed=1)
    module = make_model()
    model = TorchTwiceDifferentiable(module, F.cross_entropy)
    factors = KFACFactors.fit(module, lambda o, t: F.cross_entropy(o.squeeze(), t.squeeze()), loader(x, y))
    Fm, tracked = dense_curvature(factors, module, "ekfac")
    pre = point_grads(module, xt, yt) @ reference_inverse(Fm, tracked, 0.1).T
    params = [p for p in module.parameters() if p.requires_grad]
    ref = torch.zeros(3, 10, 3, dtype=F64)
    for i in range(10):
        xi = x[i:i + 1].clone().requires_grad_(True)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            F.cross_entropy(torch.squeeze(module(xi)), torch.squeeze(y[i:i + 1])), params, create_graph=True)])
        for t in range(3):
            ref[t, i] = torch.autograd.grad(pre[t] @ g, xi, retain_graph=True)[0][0]
    got = compute_influences(model, loader(x, y), test_data=loader(xt, yt), inversion_method=InversionMethod.Ekfac,
                             influence_type="perturbation", hessian_regularization=0.1, factors=factors)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_large_damping_agrees_with_direct():
    """With λ far above the curvature both (F + λI)⁻¹ and (H + λI)⁻¹ are ≈ I/λ: same sign and scale
    as Direct when every parameter is tracked."""
    x, y = make_data()
    module = make_model(norm=False)
    model = TorchTwiceDifferentiable(module, F.cross_entropy)
    lam = 1e4
    direct = compute_influences(model, loader(x, y), inversion_method="direct", hessian_regularization=lam)
    for method in ("ekfac", "kfac"):
        got = compute_influences(model, loader(x, y), inversion_method=method, hessian_regularization=lam)
        torch.testing.assert_close(got, direct, rtol=1e-3, atol=1e-3 * direct.abs().max().item())


def test_left_out_parameters_are_logged(caplog):
    x, y = make_data()
    model = TorchTwiceDifferentiable(make_model(), F.cross_entropy)
    with caplog.at_level(logging.INFO):
        compute_self_influences(model, loader(x, y), inversion_method="kfac", hessian_regularization=0.1)
    assert any("left out of the influence" in r.message and "1.weight" in r.message for r in caplog.records)


def test_errors():
    x, y = make_data()
    module = make_model()
    model = TorchTwiceDifferentiable(module, F.cross_entropy)
    kfac_only = KFACFactors.fit(module, F.cross_entropy, loader(x, y), ekfac=False)
    with pytest.raises(ValueError, match="needs factors fitted with the EK-FAC pass"):
        solve_hvp("ekfac", model, loader(x, y), torch.zeros(model.num_params, dtype=F64), factors=kfac_only)
    with pytest.raises(TypeError, match="factors must be a twicediff.torch.kfac.KFACFactors"):
        solve_hvp("kfac", model, loader(x, y), torch.zeros(model.num_params, dtype=F64), factors="no")
    with pytest.raises(TypeError, match="unexpected options"):
        compute_self_influences(model, loader(x, y), inversion_method="kfac", maxiter=3)
    with pytest.raises(ValueError, match="fisher_type"):
        solve_hvp("kfac", model, loader(x, y), torch.zeros(model.num_params, dtype=F64), fisher_type="bogus")
    with pytest.raises(ValueError, match="hessian_regularization"):
        compute_self_influences(model, loader(x, y), inversion_method="ekfac", hessian_regularization=-1.0)
    assert InversionMethod("ekfac") is InversionMethod.Ekfac and InversionMethod("kfac") is InversionMethod.Kfac


def test_ggn_fisher_type_through_solve_hvp():
    x, y = make_data()
    module = make_model()
    model = TorchTwiceDifferentiable(module, F.cross_entropy)
    b = point_grads(module, *make_data(4, seed=2))
    got = solve_hvp("ekfac", model, loader(x, y), b, hessian_perturbation=0.1, fisher_type="ggn")
    factors = KFACFactors.fit(module, F.cross_entropy, loader(x, y), fisher_type="ggn")
    Fm, tracked = dense_curvature(factors, module, "ekfac")
    torch.testing.assert_close(got.x, b @ reference_inverse(Fm, tracked, 0.1).T, rtol=1e-10, atol=1e-12)
    assert got.info["factors"].fisher_type == "ggn"
