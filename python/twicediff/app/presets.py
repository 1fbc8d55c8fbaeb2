"""The problems the benchmarks time: :data:`PRESETS` (name → description and builder), and
:func:`make_mlp`, the MLP of given widths the MLP presets and several benchmark scripts build."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRESETS", "make_mlp"]


class _TinyTransformer(nn.Module):
    """One pre-norm transformer block (single-head softmax attention written out, GELU MLP) over
    [N, L, d] token sequences, mean-pooled into a linear classifier."""

    def __init__(self, d: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj(att @ v)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def make_mlp(widths: Sequence[int], activation: Callable[[], nn.Module], n: int, loss: str = "ce",
             dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, loss, x [n, widths[0]], y): Linear layers of ``widths`` with ``activation`` between
    them, in eval mode, under cross-entropy (``"ce"``, class-index targets) or MSE (``"mse"``)."""
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([activation()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).to(dtype=dtype, device=device).eval()
    x = torch.randn(n, widths[0], dtype=dtype, device=device)
    if loss == "ce":
        return model, F.cross_entropy, x, torch.randint(0, widths[-1], (n,), device=device)
    return model, F.mse_loss, x, torch.randn(n, widths[-1], dtype=dtype, device=device)


def _preset_a(device):
    return make_mlp([64, 128, 128, 10], nn.Tanh, 512, device=device)


def _preset_b(device):
    return make_mlp([512, 1024, 1024, 100], nn.ReLU, 1024, device=device)


def _preset_c(device):
    # The last-layer case: a frozen feature extractor (256 -> 4096, ReLU) and a trainable
    # 4096 -> 1000 linear head over N = 2048 rows.
    model = nn.Sequential(nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 1000)).to(device).eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(2048, 256, device=device)
    return model, F.cross_entropy, x, torch.randint(0, 1000, (2048,), device=device)


def _preset_cnn(device):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).to(device).eval()
    x = torch.randn(128, 3, 16, 16, device=device)
    return model, F.cross_entropy, x, torch.randint(0, 10, (128,), device=device)


def _preset_transformer(device):
    model = _TinyTransformer().to(device).eval()
    x = torch.randn(64, 16, 32, device=device)
    return model, F.cross_entropy, x, torch.randint(0, 10, (64,), device=device)


class _Encoder(nn.Module):
    """torch's own nn.TransformerEncoderLayer (post-norm, ReLU feed-forward, no dropout) over [N, L, d]
    token sequences, mean-pooled into a linear classifier: d_transformer's sizes, written as users
    write transformers."""

    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _preset_encoder(device):
    model = _Encoder().to(device).eval()
    x = torch.randn(64, 16, 32, device=device)
    return model, F.cross_entropy, x, torch.randint(0, 10, (64,), device=device)


# name -> (description, builder(device) -> (model, loss, x, y))
PRESETS: Dict[str, Tuple[str, Callable]] = {
    "a": ("MLP 64-128-128-10 Tanh, cross-entropy, N=512", _preset_a),
    "b": ("MLP 512-1024-1024-100 ReLU, cross-entropy, N=1024", _preset_b),
    "c": ("linear head 4096->1000 behind a frozen 256->4096 ReLU prefix, cross-entropy, N=2048", _preset_c),
    "d_cnn": ("CNN conv8-pool-conv16-pool-linear on 3x16x16, cross-entropy, N=128", _preset_cnn),
    "d_transformer": ("transformer block d=32, 16 tokens, mean-pool head, cross-entropy, N=64", _preset_transformer),
    "d_encoder": ("nn.TransformerEncoderLayer d=32, 4 heads, feed-forward 64, 16 tokens, mean-pool head, "
                  "cross-entropy, N=64", _preset_encoder),
}
