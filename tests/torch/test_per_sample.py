"""Per-sample gradients of batches whose x is a tuple or a dict (twicediff.torch.per_sample): the
vmapped path and the one-sample-at-a-time fallback against one ``grad`` per point, chunks of samples
under a small memory budget, the number of points of a list of such batches, and recurrent models
vmapped (their layers step by step) rather than one point at a time."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from twicediff.torch import per_sample
from twicediff.torch.batch import slice_batch
from twicediff.torch.per_sample import gradient_matrix, num_points_of, per_sample_grads, sample_chunks

from generated_models import generate_recurrent
from structured_models import DT, PROBLEMS, batches
from zoo_models import generate_zoo


def one_at_a_time(model, x, y, n):
    return torch.stack([model.grad(slice_batch(x, i, i + 1), y[i:i + 1]) for i in range(n)])


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_per_sample_grads_equal_one_grad_per_point(name):
    module, _, x, y = PROBLEMS[name]()
    model = twicediff.TorchTwiceDifferentiable(module, F.cross_entropy)
    packed = torch.cat([b.reshape(10, -1) for b in per_sample_grads(model, x, y)], 1)
    want = one_at_a_time(model, x, y, 10)
    torch.testing.assert_close(packed, want, rtol=1e-10, atol=1e-12)
    data = batches(x, y, 4)
    assert num_points_of(data) == 10
    torch.testing.assert_close(gradient_matrix(model, data, "test", "data", False), want, rtol=1e-10, atol=1e-12)


def test_chunks_of_samples_slice_every_tensor_and_keep_the_other_entries():
    module, _, x, y = PROBLEMS["dict"]()
    model = twicediff.TorchTwiceDifferentiable(module, F.cross_entropy)
    with twicediff.memory_budget(30_000):
        chunks = list(sample_chunks(model, batches(x, y, 10), "test", "data", False))
    assert len(chunks) > 1 and sum(c[1].shape[0] for c in chunks) == 10
    start = 0
    for cx, cy, name in chunks:
        n = cy.shape[0]
        assert name == "data batch 0" and cx["causal"] is False
        assert torch.equal(cx["input_ids"], x["input_ids"][start:start + n])
        assert torch.equal(cx["attention_mask"], x["attention_mask"][start:start + n])
        start += n


class _NoVmapTanh(torch.autograd.Function):
    """tanh as an old-style autograd.Function: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return (1 - out * out) * grad


class _TwoInputsNoVmap(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, u, w, scale: float = 1.0):
        return self.head(_NoVmapTanh.apply(self.a(u) + scale * self.b(w)))


def test_the_autograd_fallback_takes_tuples_with_other_entries(caplog, monkeypatch):
    monkeypatch.setattr(per_sample, "_logged_fallback", set())  # the fallback is logged once per process
    torch.manual_seed(0)
    model = twicediff.TorchTwiceDifferentiable(_TwoInputsNoVmap().to(DT).eval(), F.cross_entropy)
    x = (torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT), 0.5)
    y = torch.randint(0, 3, (5,))
    with caplog.at_level(logging.WARNING):
        blocks = per_sample_grads(model, x, y)
    assert "per_sample_grads: torch.func cannot run this model" in caplog.text
    packed = torch.cat([b.reshape(5, -1) for b in blocks], 1)
    torch.testing.assert_close(packed, one_at_a_time(model, x, y, 5), rtol=1e-10, atol=1e-12)
    full = model.grad(x, y)
    torch.testing.assert_close(packed.mean(0), full, rtol=1e-10, atol=1e-12)  # the mean loss's gradient


class _PaddedEncoder(nn.Module):
    """nn.TransformerEncoder over padded token sequences: in eval mode, with a key-padding mask and
    its fast path on, it packs the batch into nested tensors, which have no vmap rules."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x, pad):
        return self.head(self.encoder(x, src_key_padding_mask=pad).mean(dim=1))


def test_torch_transformer_layers_take_the_vmapped_path(caplog, monkeypatch):
    monkeypatch.setattr(per_sample, "_logged_fallback", set())
    torch.manual_seed(0)
    model = twicediff.TorchTwiceDifferentiable(_PaddedEncoder().to(DT).eval(), F.cross_entropy)
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[::2, -2:] = True
    x, y = (torch.randn(6, 5, 8, dtype=DT), pad), torch.randint(0, 3, (6,))
    with caplog.at_level(logging.WARNING):
        blocks = per_sample_grads(model, x, y)
    assert "cannot run this model" not in caplog.text
    packed = torch.cat([b.reshape(6, -1) for b in blocks], 1)
    torch.testing.assert_close(packed, one_at_a_time(model, x, y, 6), rtol=1e-10, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting, back after the call


@pytest.mark.parametrize("case", [generate_recurrent(s) for s in range(8)] + [generate_zoo(2), generate_zoo(16)],
                         ids=lambda c: c.description.split(":")[0])
def test_recurrent_models_are_vmapped_not_taken_one_point_at_a_time(case, caplog, monkeypatch):
    """torch's fused recurrent ops do not batch under vmap; computed step by step inside the
    per-sample products (twicediff.torch.recurrent) they do: no fallback, the same gradients."""
    monkeypatch.setattr(per_sample, "_logged_fallback", set())
    model = twicediff.TorchTwiceDifferentiable(case.model, case.loss)
    n = case.y.shape[0]
    with caplog.at_level(logging.WARNING, logger="twicediff"):
        packed = torch.cat([b.reshape(n, -1) for b in per_sample_grads(model, case.x, case.y)], 1)
        if isinstance(case.x, torch.Tensor) and case.x.is_floating_point():
            per_sample.per_sample_mixed_products(model, case.x, case.y, torch.randn(2, model.num_params,
                                                                                       dtype=model.dtype))
    assert "one sample at a time" not in caplog.text, caplog.text
    tol = dict(rtol=1e-9, atol=1e-12) if model.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(packed, one_at_a_time(model, case.x, case.y, n), **tol)
