"""twicediff.torch.attention: the self-attention the func engine routes nn.MultiheadAttention's
plain calls to, against torch's own F.multi_head_attention_forward in float64 on generated shapes
(values and first and second derivatives), and what it leaves to torch."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twicediff import TorchTwiceDifferentiable
from twicediff.torch.attention import applies, self_attention
from twicediff.torch import forward_mode
from twicediff.torch.guard import attention_for_derivatives


def _module(seed: int):
    r = random.Random(seed)
    heads = r.choice([1, 2, 4])
    E = heads * r.choice([1, 2, 3])
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, heads, bias=r.random() < 0.7).double().eval()
    x = torch.randn(r.choice([1, 2, 5]), r.choice([1, 3]), E, dtype=torch.float64)  # [L, N, E]
    return mha, x


def _torch(mha, x, pad=None):
    return F.multi_head_attention_forward(x, x, x, mha.embed_dim, mha.num_heads, mha.in_proj_weight,
                                          mha.in_proj_bias, None, None, False, 0.0, mha.out_proj.weight,
                                          mha.out_proj.bias, training=False, need_weights=False,
                                          key_padding_mask=pad)[0]


def _padding(seed: int, x: torch.Tensor):
    """None, or a key-padding mask [N, L] (bool, or torch's additive -inf form) that keeps each
    sequence's first key."""
    kind = random.Random(seed).choice([None, "bool", "float"])
    if kind is None:
        return None
    pad = torch.rand(x.shape[1], x.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    pad[:, 0] = False
    return pad if kind == "bool" else torch.zeros(pad.shape, dtype=x.dtype).masked_fill_(pad, float("-inf"))


@pytest.mark.parametrize("seed", range(16))
def test_values_and_derivatives_are_torchs(seed):
    mha, x = _module(seed)
    pad = _padding(seed, x)
    ours = self_attention(x, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                          mha.out_proj.bias, pad)[0]
    torch.testing.assert_close(ours, _torch(mha, x, pad), rtol=1e-12, atol=1e-12)
    params = [p for p in mha.parameters()]

    def second(fn):  # d/dθ of (∇θ sum(out²)) · u: second derivatives through every weight
        with attention_for_derivatives():  # torch's fused CPU kernel has no double backward
            g = torch.autograd.grad(fn().pow(2).sum(), params, create_graph=True)
            u = [torch.ones_like(t) for t in g]
            return torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, u)), params)

    for a, b in zip(second(lambda: self_attention(x, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
                                                  mha.out_proj.weight, mha.out_proj.bias, pad)[0]),
                    second(lambda: _torch(mha, x, pad))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_what_is_left_to_torch():
    mha, x = _module(3)
    base = dict(query=x, key=x, value=x, embed_dim_to_check=mha.embed_dim, num_heads=mha.num_heads,
                in_proj_weight=mha.in_proj_weight, in_proj_bias=mha.in_proj_bias, bias_k=None, bias_v=None,
                add_zero_attn=False, dropout_p=0.1, out_proj_weight=mha.out_proj.weight,
                out_proj_bias=mha.out_proj.bias, training=False, need_weights=False)
    assert applies((), base) is not None
    mask = torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool)
    assert applies((), {**base, "key_padding_mask": mask}) is not None
    other = x.clone()
    for change in ({"key": other, "value": other}, {"need_weights": True}, {"training": True},
                   {"key_padding_mask": torch.zeros(x.shape[1], x.shape[0] + 1, dtype=torch.bool)},
                   {"key_padding_mask": mask.float()},
                   {"attn_mask": torch.zeros(x.shape[0], x.shape[0])},
                   {"is_causal": True}, {"add_zero_attn": True}, {"bias_k": torch.zeros(1, 1, x.shape[2])},
                   {"use_separate_proj_weight": True}, {"query": x[0], "key": x[0], "value": x[0]},
                   {"embed_dim_to_check": x.shape[2] + 1}, {"unknown": 1}):
        assert applies((), {**base, **change}) is None, change


def test_the_func_engine_routes_an_encoder_layer_and_agrees_with_autograd(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(24, 3)).double().eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(5, 3, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    V = torch.randn(4, td.num_params, dtype=torch.float64)
    calls = []

    def counting(*args):
        calls.append(1)
        return self_attention(*args)

    monkeypatch.setattr(forward_mode, "_self_attention", counting)
    got = td.hvp(x, y, V, engine="func")
    assert calls  # the layer's attention went through twicediff.torch.attention
    torch.testing.assert_close(got, td.hvp(x, y, V, engine="autograd"), rtol=1e-10, atol=1e-12)
