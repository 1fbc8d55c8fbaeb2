"""What every call guarantees about the user's model and the context it is called in: buffers and
parameters left as found (a training-mode BatchNorm included), a training-mode Dropout reported once
per model, gradients under torch.no_grad(), a clear error under torch.inference_mode(), and stock
attention (scaled_dot_product_attention, nn.TransformerEncoderLayer) differentiable twice, cuDNN
off for recurrent models, sparse embeddings dense inside a call and sparse after it, and the same
Parameter objects in every slot (a module registered twice, a shared weight)."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twicediff import TorchTwiceDifferentiable
from twicediff.errors import ModelChangedError
from twicediff.influence import compute_influences


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_training_batchnorm_buffers_survive_every_call(engine):
    """A BatchNorm in training mode updates its running statistics in every forward pass; an hvp
    (its preparation, the activation-size probe, the products), grad and hessian used to leave
    them overwritten. torch.func cannot trace the in-place update: engine="func" says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    model.train()
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    td = TorchTwiceDifferentiable(model, F.mse_loss)
    before = _state(model)
    td.hvp(x, y, torch.randn(3, td.num_params), engine=engine)
    _assert_same_state(model, before)
    for named in ("func", "compiled"):  # the compiled engine traces torch.func, then falls back to it
        with pytest.raises(RuntimeError, match="^hvp: a module updates a buffer in place .*torch.func cannot "
                                               "trace.*call model.eval\\(\\) first"):
            td.hvp(x, y, torch.randn(3, td.num_params), engine=named)
        _assert_same_state(model, before)
    td.grad(x, y)
    td.hessian(x, y)
    _assert_same_state(model, before)


def test_training_dropout_warned_once_per_model(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Linear(5, 2))  # training mode
    td = TorchTwiceDifferentiable(model, F.mse_loss)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        td.grad(x, y)
        td.hvp(x, y, torch.randn(td.num_params))
        td.hessian(x, y)
    dropout = [r for r in caplog.records if "Dropout in training mode" in r.getMessage()]
    assert len(dropout) == 1 and "'1'" in dropout[0].getMessage()
    model.eval()
    other = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.0))  # p = 0 is not random
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        TorchTwiceDifferentiable(other, F.mse_loss).grad(x, y)
    assert not [r for r in caplog.records if "Dropout" in r.getMessage()]


def test_gradients_under_no_grad_and_a_clear_error_under_inference_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    expected = td.grad(x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    pert = compute_influences(td, loader, influence_type="perturbation", hessian_regularization=0.1)
    with torch.no_grad():
        assert torch.equal(td.grad(x, y), expected)
        assert torch.allclose(compute_influences(td, loader, influence_type="perturbation",
                                                 hessian_regularization=0.1), pert)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            td.grad(x, y)
        with pytest.raises(RuntimeError, match="inference_mode"):
            td.hvp(x, y, torch.randn(td.num_params))


class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):  # [B, T, d] -> [B, 2]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v).mean(1))


@pytest.mark.parametrize("which", ["sdpa", "encoder_layer"])
def test_stock_attention_is_twice_differentiable(which):
    """torch's fused CPU attention kernel has no second derivative ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); twicediff's
    passes select the math backend. Checked against double backward on the same model in float64."""
    torch.manual_seed(0)
    d = 8
    if which == "sdpa":
        model = _Attention(d)
    else:
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(3 * d, 2))
    model = model.eval().double()
    x, y = torch.randn(5, 3, d, dtype=torch.float64), torch.randint(0, 2, (5,))
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    P = td.num_params
    v = torch.randn(3, P, dtype=torch.float64)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        params = list(model.parameters())
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        g = torch.cat([t.reshape(-1) for t in g])
        ref = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(g @ vd, params, retain_graph=True)])
                           for vd in v])
    for engine in ("auto", "func", "autograd"):
        torch.testing.assert_close(td.hvp(x, y, v, engine=engine), ref)
    H = td.hessian(x[:2], y[:2])
    assert H.shape == (P, P) and torch.isfinite(H).all()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    for kind in ("up", "perturbation"):
        out = compute_influences(td, loader, influence_type=kind, hessian_regularization=0.1,
                                 inversion_method="direct")
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("setting", [True, False])
def test_the_transformer_fast_path_setting_is_left_as_the_user_set_it(setting):
    """Inside a call the MHA / transformer inference fast path is off (it has no derivatives);
    after it, torch.backends.mha's flag is what the user set, nested calls included."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(3 * 8, 2)).eval().double()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(4, 3, 8, dtype=torch.float64), torch.randint(0, 2, (4,))
    torch.backends.mha.set_fastpath_enabled(setting)
    try:
        td.hvp(x, y, torch.randn(2, td.num_params, dtype=torch.float64))  # auto: probes nest calls
        td.hessian(x, y)
        assert torch.backends.mha.get_fastpath_enabled() is setting
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


class _RecordsCudnn(nn.Module):
    """An LSTM classifier that notes torch.backends.cudnn.enabled at each forward."""

    def __init__(self, recurrent: bool):
        super().__init__()
        self.seen = []
        self.body = nn.LSTM(3, 4, batch_first=True) if recurrent else nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        self.seen.append(torch.backends.cudnn.enabled)
        h = self.body(x)[0][:, -1] if isinstance(self.body, nn.LSTM) else self.body(x).mean(1)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("recurrent", [True, False])
@pytest.mark.parametrize("setting", [True, False])
def test_cudnn_is_off_inside_a_call_on_a_recurrent_model_and_left_as_the_user_set_it(recurrent, setting):
    """cuDNN's RNN kernels have no second derivative and no backward outside training mode: in a
    model with an RNN module cuDNN is off inside the call (a GPU takes torch's own recurrent
    kernels), elsewhere it is left alone, and after the call it is what the user set."""
    torch.manual_seed(0)
    model = _RecordsCudnn(recurrent).double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    torch.backends.cudnn.enabled = setting
    try:
        td.hvp(x, y, torch.randn(2, td.num_params, dtype=torch.float64))  # auto: probes nest calls
        td.grad(x, y)
        assert model.seen and set(model.seen) == ({False} if recurrent else {setting})
        assert torch.backends.cudnn.enabled is setting
    finally:
        torch.backends.cudnn.enabled = True


def test_max_norm_embedding_weights_left_as_found_and_every_engine_agrees(monkeypatch):
    """nn.Embedding(max_norm=...) renormalizes the rows it looks up, in place, in every forward
    pass: every call used to leave the user's table renormalized. The weights are now written back;
    every engine differentiates at the renormalized values (what the model's own first forward
    uses), so all agree with autograd on an already renormalized copy."""
    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")  # traced as inductor would be, no C++
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, max_norm=1.0), nn.Flatten(), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(4)  # every row longer than max_norm
    x, y = torch.randint(0, 6, (5, 2)), torch.randint(0, 2, (5,))
    renormalized = copy.deepcopy(model)
    renormalized(x)
    want = TorchTwiceDifferentiable(renormalized, F.cross_entropy)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    v = torch.randn(2, td.num_params, dtype=torch.float64)
    before = _state(model)
    for engine in ("auto", "func", "autograd", "loop", "compiled"):
        torch.testing.assert_close(td.hvp(x, y, v, engine=engine), want.hvp(x, y, v, engine="autograd"))
        _assert_same_state(model, before)
    torch.testing.assert_close(td.grad(x, y), want.grad(x, y))
    td.hessian(x, y)
    compute_influences(td, DataLoader(TensorDataset(x, y), batch_size=5), hessian_regularization=0.1,
                       inversion_method="direct")
    _assert_same_state(model, before)


class _Recommender(nn.Module):
    """An nn.Embedding and an nn.EmbeddingBag, sparse or dense, into a Linear head."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.users = nn.Embedding(7, 3, sparse=sparse)
        self.items = nn.EmbeddingBag(9, 3, mode="mean", sparse=sparse)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(torch.cat([self.users(x[:, 0]), self.items(x[:, 1:])], 1)))


def test_sparse_embeddings_are_dense_inside_a_call_and_sparse_after_it(monkeypatch):
    """Embeddings with sparse=True (as recommenders train with SparseAdam) give sparse gradients,
    which no flat vector holds, and were refused. Inside a call they are now dense: every engine,
    the Hessian, per-sample gradients and influences equal those of the dense twin, and afterwards
    the modules are sparse again, so the user's training step still gets sparse gradients."""
    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = _Recommender(sparse=True).double().eval()
    dense = _Recommender(sparse=False).double().eval()
    dense.load_state_dict(model.state_dict())
    x = torch.cat([torch.randint(0, 7, (6, 1)), torch.randint(0, 9, (6, 3))], 1)
    y = torch.randint(0, 2, (6,))
    td, want = TorchTwiceDifferentiable(model, F.cross_entropy), TorchTwiceDifferentiable(dense, F.cross_entropy)
    v = torch.randn(3, td.num_params, dtype=torch.float64)
    before = _state(model)
    for engine in ("auto", "func", "autograd", "loop", "compiled"):
        torch.testing.assert_close(td.hvp(x, y, v, engine=engine), want.hvp(x, y, v, engine="autograd"))
    torch.testing.assert_close(td.grad(x, y), want.grad(x, y))
    torch.testing.assert_close(td.hessian(x, y), want.hessian(x, y))
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    torch.testing.assert_close(
        compute_influences(td, loader, hessian_regularization=0.1, inversion_method="cg", maxiter=40, rtol=1e-12),
        compute_influences(want, loader, hessian_regularization=0.1, inversion_method="direct"))
    _assert_same_state(model, before)
    assert model.users.sparse and model.items.sparse
    F.cross_entropy(model(x), y).backward()
    assert model.users.weight.grad.is_sparse and model.items.weight.grad.is_sparse


class _CachedBias(nn.Module):
    """Keeps a tensor computed from a parameter in eval mode and reuses it, as timm's LeViT
    attention keeps its attention biases (``attention_bias_cache``)."""

    def __init__(self):
        super().__init__()
        self.lin, self.bias_table = nn.Linear(3, 4), nn.Parameter(torch.randn(6))
        self.bias_cache = {}

    def forward(self, x):
        if self.training:
            bias = self.bias_table[:4] * 2
        else:
            bias = self.bias_cache.setdefault(str(x.device), self.bias_table[:4] * 2)
        return self.lin(x) + bias


def test_a_module_that_keeps_a_graph_between_forward_passes_is_reported_once(caplog):
    """The engines that swap the parameters differentiate such a cache at stale values (timm's
    LeViT: func and compiled 0.14% off in float64, per-sample gradients an autograd error), with no
    error of torch's: the call says so in a warning naming the module and the attribute, once per
    model. The hooks of weight and spectral normalisation recompute their attribute at every
    forward: no warning for them."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    model = _CachedBias().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    with caplog.at_level(logging.WARNING, logger="twicediff.torch.guard"):
        td.hvp(x, y, torch.randn(2, td.num_params), engine="loop")
        td.grad(x, y)
    kept = [r.getMessage() for r in caplog.records if "between forward passes" in r.getMessage()]
    assert len(kept) == 1 and "module '' (_CachedBias)" not in kept[0]
    assert "_CachedBias" in kept[0] and "'bias_cache'" in kept[0] and kept[0].startswith("hvp:")
    caplog.clear()
    normalised = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                               nn.utils.spectral_norm(nn.Linear(4, 4))).eval()
    td = TorchTwiceDifferentiable(normalised, F.cross_entropy)
    with caplog.at_level(logging.WARNING, logger="twicediff.torch.guard"):
        td.hvp(x, y, torch.randn(2, td.num_params))
    assert not [r for r in caplog.records if "between forward passes" in r.getMessage()]


class _SharedTwice(nn.Module):
    """A Linear registered under two names (``self.b = self.a``: one slot, two names) and a weight
    shared by two Linears (two slots, one Parameter), beside a buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.head, self.tail = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
        self.tail.weight = self.head.weight
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x) * self.scale)))
        return self.head(h) + self.tail(h * h)


def _block_twice():
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    return nn.Sequential(block, block, nn.Linear(4, 3))


def _slots(model):
    return [(m, kind, name, t) for m in model.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items()]


def _double_backward_hessian(model, x, y):
    params = list(model.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(x), y), params,
                                                                  create_graph=True)])
    return torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(gi, params, retain_graph=True)])
                        for gi in g])


@pytest.mark.parametrize("build", [_SharedTwice, _block_twice], ids=["module_twice_and_shared_weight", "block_twice"])
def test_a_module_under_two_names_keeps_its_parameters_and_every_engine_is_exact(build, monkeypatch):
    """torch.func.functional_call with its default tie_weights=True swaps a slot once per name and
    puts the first swap's substitute back last: after one func-engine product, a module registered
    twice held a detached plain tensor instead of its Parameter, and every later grad, product and
    Hessian (reverse mode, on the Parameter) came out wrong with no error. Checked here: every slot
    holds the same object after each call, and every result equals double backward in float64."""
    monkeypatch.setenv("TWICEDIFF_COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = build().double().eval()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    H = _double_backward_hessian(model, x, y)
    slots, before = _slots(model), _state(model)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    v = torch.randn(3, td.num_params, dtype=torch.float64)

    def unchanged():
        now = _slots(model)
        assert len(now) == len(slots) and all(s[3] is n[3] for s, n in zip(slots, now))
        assert all(isinstance(p, nn.Parameter) for p in model.parameters())
        _assert_same_state(model, before)

    for engine in ("func", "auto", "autograd", "loop", "compiled"):
        torch.testing.assert_close(td.hvp(x, y, v, engine=engine), v @ H, msg=engine)
        unchanged()
    grad = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    torch.testing.assert_close(td.grad(x, y), torch.cat([g.reshape(-1) for g in grad]))
    torch.testing.assert_close(td.hessian(x, y), H)
    unchanged()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for kind in ("up", "perturbation"):
        assert torch.isfinite(compute_influences(td, loader, influence_type=kind, hessian_regularization=0.1,
                                                 inversion_method="direct")).all()
        unchanged()


class _AssignsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        self.lin.weight = nn.Parameter(self.lin.weight.detach() * 1.0)  # a new Parameter at every call
        return self.lin(x)


def test_a_forward_that_assigns_a_new_parameter_is_undone_and_refused():
    torch.manual_seed(0)
    model = _AssignsParameter().eval()
    weight = model.lin.weight
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ModelChangedError, match="^grad: the call left another tensor in place of parameter "
                                                "'weight' of module 'lin' \\(Linear\\); the original is back"):
        td.grad(x, y)
    assert model.lin.weight is weight


class _ReassignsBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls = self.calls + 1  # not in place: a new tensor in the buffer's slot
        return self.lin(x)


def test_a_forward_that_reassigns_a_buffer_finds_it_back_after_every_call():
    torch.manual_seed(0)
    model = _ReassignsBuffer().eval()
    calls = model.calls
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    td.grad(x, y)
    td.hvp(x, y, torch.randn(2, td.num_params), engine="autograd")
    assert model.calls is calls and float(calls) == 0.0


def test_under_autocast_every_engine_computes_in_the_models_dtype():
    """Called inside a mixed-precision training step's torch.autocast, the generic engines computed
    their products in bfloat16 (0.6% off) while the native engine stayed in float32, and auto
    picked one by speed. Inside every call autocast is off; outside it stays on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 5)).eval()
    x, y = torch.randn(64, 30), torch.randint(0, 5, (64,))
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    v = torch.randn(3, td.num_params)
    want = {engine: td.hvp(x, y, v, engine=engine) for engine in ("auto", "native", "func", "autograd", "loop")}
    grad = td.grad(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for engine, expected in want.items():
            torch.testing.assert_close(td.hvp(x, y, v, engine=engine), expected, rtol=1e-5, atol=1e-6, msg=engine)
        torch.testing.assert_close(td.grad(x, y), grad, rtol=1e-5, atol=1e-6)
        assert torch.is_autocast_enabled("cpu")
