"""Models whose batches are not one tensor, each with its tensor-x spelling, and float64 references.

- :class:`TwoInputs`: ``model(u, w)``, a batch's x the tuple ``(u, w)``;
  :class:`Concatenated` takes ``cat([u, w], 1)`` and calls the same module.
- :class:`TinyTransformer`: ``model(input_ids=..., attention_mask=..., causal=...)`` (embedding,
  one masked self-attention layer, LayerNorm, masked mean pooling, a classifier head), a batch's x
  the dict; :class:`Stacked` takes ``stack([input_ids, attention_mask], 1)``.

And :class:`Attention`, a tensor-x block of LayerNorm, attention and a GELU MLP, for the engines'
CPU memory and GEMM routing.

Both spellings share the module, so their parameters (and their order) are the same objects.
"""
from __future__ import annotations

import functools
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from twicediff.torch.batch import model_args

DT = torch.float64
VOCAB, WIDTH, TOKENS, CLASSES = 7, 4, 5, 3


class TwoInputs(nn.Module):
    """tanh(A u + B w) through a Linear head: two positional inputs of 3 and 2 features."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, u, w):
        return self.head(torch.tanh(self.a(u) + self.b(w)))


class Concatenated(nn.Module):
    """The tensor-x spelling of TwoInputs: x = cat([u, w], 1)."""

    def __init__(self, inner: TwoInputs):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x[..., :3], x[..., 3:])


class TinyTransformer(nn.Module):
    """Token and position embeddings, one single-head self-attention layer over the unmasked keys
    (causal on request), a residual and LayerNorm, the mean over the unmasked tokens, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.3 * torch.randn(TOKENS, WIDTH))
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, input_ids, attention_mask, causal: bool = False):
        h = self.embed(input_ids) + self.position[: input_ids.shape[-1]]
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / WIDTH ** 0.5
        keep = attention_mask[..., None, :].bool()
        if causal:
            T = input_ids.shape[-1]
            keep = keep & torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~keep, -1e9)
        h = self.norm(h + torch.softmax(scores, -1) @ self.v(h))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(-2) / m.sum(-2))


class Attention(nn.Module):
    """A LayerNorm, single-head attention and a GELU MLP over [N, L, d] tokens (GELU's CPU kernel
    takes its buffers through torch's raw allocation path), mean-pooled into a linear head."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v
        return self.head((x + self.mlp(x)).mean(dim=1))


class Stacked(nn.Module):
    """The tensor-x spelling of TinyTransformer: x = stack([input_ids, attention_mask], 1) [B, 2, T]."""

    def __init__(self, inner: TinyTransformer, causal: bool = False):
        super().__init__()
        self.inner = inner
        self.causal = causal

    def forward(self, x):
        return self.inner(x[:, 0], x[:, 1], causal=self.causal)


def attention_problem(n: int, tokens: int, seed: int = 0):
    """(an :class:`Attention` in eval mode, x [n, tokens, 16], y of 5 classes) in float32."""
    torch.manual_seed(seed)
    model = Attention().eval()
    return model, torch.randn(n, tokens, 16), torch.randint(0, 5, (n,))


def two_inputs_problem(n: int = 10, seed: int = 0):
    """(module, its tensor-x spelling, x = (u, w), y) in float64."""
    torch.manual_seed(seed)
    model = TwoInputs().to(DT).eval()
    u, w = torch.randn(n, 3, dtype=DT), torch.randn(n, 2, dtype=DT)
    return model, Concatenated(model).eval(), (u, w), torch.randint(0, CLASSES, (n,))


def transformer_problem(n: int = 10, seed: int = 0, causal: bool = False):
    """(module, its tensor-x spelling, x = {"input_ids", "attention_mask", "causal"}, y) in float64;
    every sequence keeps at least its first two tokens."""
    torch.manual_seed(seed)
    model = TinyTransformer().to(DT).eval()
    ids = torch.randint(0, VOCAB, (n, TOKENS))
    lengths = torch.randint(2, TOKENS + 1, (n,))
    mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).long()
    x = {"input_ids": ids, "attention_mask": mask, "causal": causal}
    return model, Stacked(model, causal).eval(), x, torch.randint(0, CLASSES, (n,))


def stacked_x(x: dict) -> torch.Tensor:
    """The tensor-x spelling of a transformer batch."""
    return torch.stack([x["input_ids"], x["attention_mask"]], 1)


def batches(x, y, size: int):
    """[(x_b, y_b), ...] of ``size`` points each, x a tensor, tuple or dict (other leaves kept)."""
    from twicediff.torch.batch import num_points, slice_batch

    n = num_points(x)
    return [(slice_batch(x, s, s + size), y[s:s + size]) for s in range(0, n, size)]


def flat_theta(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def mean_loss_of_theta(model: nn.Module, loss: Callable, data) -> Callable[[torch.Tensor], torch.Tensor]:
    """θ ↦ Σ_b (n_b/N) loss(squeeze(model(x_b)), squeeze(y_b)), in float64, pure torch.func."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    N = sum(int(y.shape[0]) for _, y in data)

    def f(theta):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, torch.split(theta, sizes))}
        total = 0
        for x, y in data:
            args, kwargs = model_args(x)
            out = functional_call(model, params, args, kwargs)
            total = total + loss(torch.squeeze(out), torch.squeeze(y)) * (y.shape[0] / N)
        return total
    return f


def reference_grad_hessian(model: nn.Module, loss: Callable, data) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∇θ L [P], ∇²θ L [P, P]) of the mean loss over ``data`` in float64: torch.func forward over
    reverse on the whole data as one function of θ, vmapped over the P unit directions.
    ``torch.func.hessian`` (jacfwd of jacrev) is not used: in torch 2.14 it returns a wrong,
    unsymmetric Hessian for a LayerNorm whose input and weight both depend on θ (TinyTransformer),
    where forward over reverse, plain autograd and finite differences agree."""
    f = mean_loss_of_theta(model, loss, data)
    theta = flat_theta(model)
    g = torch.func.grad(f)
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    return g(theta), torch.func.vmap(lambda e: torch.func.jvp(g, (theta,), (e,))[1])(eye)


@functools.lru_cache(maxsize=None)
def reference(problem: str, n: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∇θ L, ∇²θ L) of the mean loss over all ``n`` points of ``PROBLEMS[problem](n)``, computed
    once per session (the same for any split of the points into batches)."""
    model, _, x, y = PROBLEMS[problem](n)
    return reference_grad_hessian(model, F.cross_entropy, [(x, y)])


PROBLEMS = {"tuple": two_inputs_problem, "dict": transformer_problem}
