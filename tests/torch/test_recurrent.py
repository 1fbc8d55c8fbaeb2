"""twicediff.torch.recurrent against torch's recurrent modules: the same outputs and final states
and the same gradients on generated configurations (RNN tanh / relu, GRU, LSTM with and without
projections; layers, directions, batch_first, biases, given or zero initial states, unbatched
input), forward mode on oneDNN's float32 LSTM, which torch has no rule for, and what it leaves to
torch (packed sequences, dropout between layers in training mode). Hessian products of recurrent
models through every engine are in tests/test_differential.py."""
import random

import pytest
import torch
from torch import nn
from torch.func import grad, jvp, vjp
from torch.overrides import TorchFunctionMode

from twicediff.torch.recurrent import ROUTED


class _Routed(TorchFunctionMode):
    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ROUTED:
            _Routed.calls += 1
        return ROUTED.get(func, func)(*args, **(kwargs or {}))


def _draw(seed: int):
    r = random.Random(seed)
    torch.manual_seed(seed)
    cls, dtype = r.choice([nn.RNN, nn.GRU, nn.LSTM]), r.choice([torch.float32, torch.float64])
    options = dict(num_layers=r.choice([1, 2, 3]), bidirectional=r.random() < 0.5, batch_first=r.random() < 0.5,
                   bias=r.random() < 0.8)
    if cls is nn.RNN:
        options["nonlinearity"] = r.choice(["tanh", "relu"])
    if cls is nn.LSTM and r.random() < 0.3:
        options["proj_size"] = 2
    module = cls(3, 4, **options).to(dtype).eval()
    batched, steps, n = r.random() < 0.8, r.choice([1, 2, 5]), r.choice([1, 3])
    shape = ((n, steps, 3) if options["batch_first"] else (steps, n, 3)) if batched else (steps, 3)
    x = torch.randn(*shape, dtype=dtype)
    states = options["num_layers"] * (2 if options["bidirectional"] else 1)
    out = options.get("proj_size", 0) or 4
    hx = None
    if r.random() < 0.5:
        h = torch.randn(*((states, n, out) if batched else (states, out)), dtype=dtype)
        c = torch.randn(*((states, n, 4) if batched else (states, 4)), dtype=dtype)
        hx = (h, c) if cls is nn.LSTM else h
    return f"seed {seed}: {cls.__name__} {options} batched={batched} T={steps} hx={hx is not None}", module, x, hx


def _flat(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("seed", range(60))
def test_outputs_states_and_gradients_are_torchs(seed):
    what, module, x, hx = _draw(seed)
    args = (x,) if hx is None else (x, hx)
    tol = dict(rtol=1e-10, atol=1e-12) if x.dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    want = _flat(module(*args))
    before = _Routed.calls
    with _Routed():
        got = _flat(module(*args))
    assert _Routed.calls == before + 1, what
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol, msg=what)
    weights = [torch.randn_like(t) for t in want]
    params = list(module.parameters())
    with _Routed():
        ours = torch.autograd.grad(sum((t * w).sum() for t, w in zip(_flat(module(*args)), weights)), params)
    theirs = torch.autograd.grad(sum((t * w).sum() for t, w in zip(_flat(module(*args)), weights)), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol, msg=what)


def test_forward_mode_of_a_float32_lstm_that_torch_cannot_take():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 3)
    params = dict(lstm.named_parameters())

    def loss(p):
        return torch.func.functional_call(lstm, p, (x,))[0].pow(2).sum()

    v = {k: torch.randn_like(t) for k, t in params.items()}
    with pytest.raises(NotImplementedError, match="forward AD"):  # oneDNN's LSTM: torch 2.14
        jvp(grad(loss), (params,), (v,))
    with _Routed():
        forward = jvp(grad(loss), (params,), (v,))[1]
    reverse = vjp(grad(loss), params)[1](v)[0]
    for k in params:
        torch.testing.assert_close(forward[k], reverse[k], rtol=1e-4, atol=1e-6)


def test_packed_sequences_and_training_dropout_are_left_to_torch():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, num_layers=2, dropout=0.5)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    with _Routed():
        routed = gru.eval()(packed)[0].data
    torch.testing.assert_close(routed, gru(packed)[0].data, rtol=0, atol=0)  # torch's op, bit for bit
    torch.manual_seed(1)
    with _Routed():
        first = gru.train()(torch.ones(5, 2, 3))[0]
    torch.manual_seed(1)
    torch.testing.assert_close(first, gru(torch.ones(5, 2, 3))[0])  # the same random dropout: torch's op
