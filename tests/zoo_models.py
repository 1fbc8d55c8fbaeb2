"""Generated models of layer types the other families leave out, for differential tests.

``generate_zoo(seed)`` draws one of:

- ``bilinear``: ``nn.Bilinear`` of the input and its reversed features, ``nn.PReLU`` (one slope or
  one per feature), a Linear head;
- ``decoder``: ``nn.TransformerDecoderLayer`` (pre- or post-norm, ReLU or GELU) whose memory is
  the reversed sequence, mean-pooled into a Linear head;
- ``birnn``: a bidirectional GRU or LSTM of one or two layers, read at the last step;
- ``upconv``: a strided Conv2d, ``nn.GroupNorm``, ``nn.ConvTranspose2d`` (with or without
  output_padding), ``F.interpolate`` (nearest, bilinear with or without align_corners) or
  ``nn.AdaptiveAvgPool2d``, and a Linear head;
- ``parametrized``: a Linear layer under ``nn.utils.parametrizations.orthogonal`` (matrix_exp,
  cayley or householder) or ``spectral_norm`` (eval mode: its stored singular vectors);
- ``prototypes``: logits as minus the distances (``torch.cdist``) to learned prototypes;
- ``squeeze_excite``: MobileNetV3's block: Conv2d, BatchNorm2d, ``nn.Hardswish``, a
  squeeze-excitation gate (ReLU or ``nn.RReLU``, then ``nn.Hardsigmoid``), a Linear head.

The references are tests/generated_models.py's: the float64 model differentiated row by row with
plain autograd, independent of the batching and forward-mode rules the engines rely on (the
squeeze-excitation family's with its gate spelled out: torch cannot differentiate Hardsigmoid twice). (torch's
second derivatives of these layers were checked with ``torch.autograd.gradgradcheck`` on such models
when the family was added; the householder map's diagonal is cast to int, so finite differences
of it fail at its ±1 entries, a kink, not a wrong rule.)
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from generated_models import Case, _loss, _targets

__all__ = ["generate_zoo"]

FAMILIES = ("bilinear", "decoder", "birnn", "upconv", "parametrized", "prototypes", "squeeze_excite")


class _Bilinear(nn.Module):
    def __init__(self, r: random.Random, d: int, outputs: int):
        super().__init__()
        hidden = r.choice([2, 3])
        self.bilinear = nn.Bilinear(d, d, hidden, bias=r.random() < 0.7)
        self.act = nn.PReLU(r.choice([1, hidden]))
        self.head = nn.Linear(hidden, outputs)
        self.what = f"prelu slopes={self.act.num_parameters}"

    def forward(self, x):
        return self.head(self.act(self.bilinear(x, x.flip(-1))))


class _Decoder(nn.Module):
    def __init__(self, r: random.Random, d: int, outputs: int):
        super().__init__()
        norm_first, activation = r.random() < 0.5, r.choice(["relu", "gelu"])
        self.layer = nn.TransformerDecoderLayer(d, r.choice([1, 2]), dim_feedforward=2 * d, dropout=0.0,
                                                activation=activation, batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(d, outputs)
        self.what = f"norm_first={norm_first} activation={activation}"

    def forward(self, x):
        return self.head(self.layer(x, x.flip(1)).mean(1))


class _BiRNN(nn.Module):
    def __init__(self, r: random.Random, d: int, outputs: int):
        super().__init__()
        cell, layers = r.choice([nn.GRU, nn.LSTM]), r.choice([1, 2])
        self.rnn = cell(d, 2, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(4, outputs)
        self.what = f"{cell.__name__} layers={layers}"

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _UpConv(nn.Module):
    def __init__(self, r: random.Random, c_in: int, outputs: int):
        super().__init__()
        c = r.choice([2, 4])
        self.down = nn.Conv2d(c_in, c, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(r.choice([1, 2]), c)
        pad = r.choice([0, 1])
        self.up = nn.ConvTranspose2d(c, 2, 3, stride=2, padding=1, output_padding=pad)
        self.resize = r.choice(["nearest", "bilinear", "bilinear-aligned", "adaptive"])
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(2 * 4 * 4 if self.resize != "adaptive" else 2 * 2 * 2, outputs)
        self.what = f"groups={self.norm.num_groups} output_padding={pad} resize={self.resize}"

    def forward(self, x):
        h = self.up(F.silu(self.norm(self.down(x))))
        if self.resize == "adaptive":
            h = self.pool(h)
        else:
            mode = "nearest" if self.resize == "nearest" else "bilinear"
            aligned = {"align_corners": self.resize == "bilinear-aligned"} if mode == "bilinear" else {}
            h = F.interpolate(h, size=(4, 4), mode=mode, **aligned)
        return self.head(torch.tanh(h).flatten(1))


class _Parametrized(nn.Module):
    def __init__(self, r: random.Random, d: int, outputs: int):
        super().__init__()
        kind = r.choice(["matrix_exp", "cayley", "householder", "spectral_norm"])
        layer = nn.Linear(d, d if kind != "spectral_norm" else d + 1)
        if kind == "spectral_norm":
            layer = nn.utils.parametrizations.spectral_norm(layer)
        else:
            layer = nn.utils.parametrizations.orthogonal(layer, orthogonal_map=kind)
        self.layer = layer
        self.head = nn.Linear(layer.out_features, outputs)
        self.what = kind

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)))


class _Prototypes(nn.Module):
    def __init__(self, r: random.Random, d: int, outputs: int):
        super().__init__()
        self.embed = nn.Linear(d, 3)
        self.prototypes = nn.Parameter(torch.randn(outputs, 3))
        self.what = f"{outputs} prototypes"

    def forward(self, x):
        return -torch.cdist(torch.tanh(self.embed(x)), self.prototypes)


class _SqueezeExcite(nn.Module):
    def __init__(self, r: random.Random, c_in: int, outputs: int):
        super().__init__()
        c = r.choice([2, 4])
        self.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c)
        self.squeeze = nn.Conv2d(c, 2, 1)
        self.inner = r.choice([nn.ReLU(), nn.RReLU(0.1, 0.3)])
        self.excite = nn.Conv2d(2, c, 1)
        self.act, self.gate = nn.Hardswish(), nn.Hardsigmoid()
        self.head = nn.Linear(c, outputs)
        self.what = f"channels={c} inner={type(self.inner).__name__}"

        self.spelled_out = False  # the references' copy: the gate and RReLU written out (see generate_zoo)

    def forward(self, x):
        h = self.act(self.norm(self.conv(x)))
        squeezed = self.squeeze(h.mean((2, 3), keepdim=True))
        if not self.spelled_out:
            return self.head((h * self.gate(self.excite(self.inner(squeezed)))).mean((2, 3)))
        if isinstance(self.inner, nn.RReLU):  # eval mode: the mean of its slopes
            inner = torch.where(squeezed >= 0, squeezed, squeezed * (self.inner.lower + self.inner.upper) / 2)
        else:
            inner = torch.relu(squeezed)
        z = self.excite(inner)
        gate = torch.where(z <= -3, torch.zeros_like(z), torch.where(z >= 3, torch.ones_like(z), z / 6 + 0.5))
        return self.head((h * gate).mean((2, 3)))


def generate_zoo(seed: int) -> Case:
    """A small model of one of :data:`FAMILIES` (P up to a few hundred), loss and batch."""
    r = random.Random(6_000_007 + seed)
    dtype = torch.float64 if r.random() < 0.6 else torch.float32
    family = FAMILIES[seed % len(FAMILIES)]
    outputs = r.choice([2, 3]) if family == "prototypes" else r.choice([1, 2, 3])
    kind, _, loss, loss_name = _loss(r, outputs)
    gen = torch.Generator().manual_seed(seed)
    n, d = r.choice([1, 3, 4]), r.choice([2, 4])
    with torch.random.fork_rng():  # the weights from the seed, the global generator left alone
        torch.manual_seed(seed)
        if family in ("decoder", "birnn"):
            model = (_Decoder if family == "decoder" else _BiRNN)(r, d, outputs)
            x = torch.randn(n, r.choice([2, 3]), d, generator=gen, dtype=dtype)
        elif family in ("upconv", "squeeze_excite"):
            c_in = r.choice([1, 2])
            model = (_UpConv if family == "upconv" else _SqueezeExcite)(r, c_in, outputs)
            x = 3 * torch.randn(n, c_in, 4, 4, generator=gen, dtype=dtype)  # both sides of the hard kinks
        else:
            model = {"bilinear": _Bilinear, "parametrized": _Parametrized, "prototypes": _Prototypes}[family](
                r, d, outputs)
            x = torch.randn(n, d, generator=gen, dtype=dtype)
    model = model.to(dtype).eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    y = _targets(kind, n, outputs, gen, dtype)
    return Case(model, loss, x, y, f"zoo seed {seed}: {dtype} n={n} {family} {model.what} loss={loss_name}",
                reference_model=(lambda: _spelled_out(seed)) if family == "squeeze_excite" else None)


def _spelled_out(seed: int) -> nn.Module:
    """The squeeze-excitation model of ``generate_zoo(seed)`` with its Hardsigmoid gate and RReLU
    written as ``where`` (torch has no second derivative of the one, no vmap rule of the other)."""
    model = generate_zoo(seed).model
    model.spelled_out = True
    return model
