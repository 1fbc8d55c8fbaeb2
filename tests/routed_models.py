"""Generated models with the ops torch differentiates twice wrongly or not at all, for differential
tests: ``nn.EmbeddingBag`` (no second derivative, no forward-mode rule) and weight normalisation
(``nn.utils.parametrizations.weight_norm`` and the older ``nn.utils.weight_norm``: a wrong second
derivative). twicediff computes them with equivalent ops (twicediff.torch.derivative_routes).

``generate_routed(seed)`` draws a bag of token ids (mode sum / mean / max, a padding index or none,
per-sample weights with the batch as a tuple (ids, weights), bags given as a 2D batch or flattened
with offsets inside the forward), or none, then a weight-normalised Linear or Conv1d (either spelling,
dim 0, 1 or None), or a plain one, and a Linear head. The references' float64 copy of the model
(the model built again from the seed) computes both ops by hand (a Python loop over each bag's
entries, ``v · g / ‖v‖``), so
the references depend on neither torch's rules for them nor twicediff's.
"""
from __future__ import annotations

import random
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from generated_models import Case, _loss, _targets

__all__ = ["generate_routed"]


def _norm_except(v: torch.Tensor, dim) -> torch.Tensor:
    if dim is None:
        return v.norm()
    rest = [d for d in range(v.dim()) if d != dim]
    return v.pow(2).sum(dim=rest, keepdim=True).sqrt()


class _Routed(nn.Module):
    def __init__(self, r: random.Random, vocab: int, d: int, outputs: int):
        super().__init__()
        self.spelled_out = False
        self.bag = None
        self.what = ""
        if r.random() < 0.75:
            mode = r.choice(["sum", "mean", "max"])
            padding = r.choice([None, 0, -1])
            self.bag = nn.EmbeddingBag(vocab, d, mode=mode, padding_idx=padding)
            self.weighted = mode == "sum" and r.random() < 0.5
            self.flat = r.random() < 0.4
            self.what += f"bag mode={mode} padding_idx={padding} weighted={self.weighted} flat={self.flat} "
        self.conv = r.random() < 0.3
        width = 2 * d if self.conv else d + 1
        layer = nn.Conv1d(1, 2, 3, padding=1) if self.conv else nn.Linear(d, width)
        self.norm = r.choice([None, "parametrization", "hook"])
        self.norm_dim = r.choice([0, 1, None])
        if self.norm == "parametrization":
            layer = nn.utils.parametrizations.weight_norm(layer, dim=self.norm_dim)
        elif self.norm == "hook":
            with warnings.catch_warnings():  # torch says the spelling is deprecated; users still have it
                warnings.simplefilter("ignore", FutureWarning)
                layer = nn.utils.weight_norm(layer, dim=self.norm_dim)
        self.layer = layer
        self.head = nn.Linear(width, outputs)
        self.what += f"{'conv1d' if self.conv else 'linear'} weight_norm={self.norm} dim={self.norm_dim}"

    def forward(self, ids, weights=None):
        h = self._bag(ids, weights) if self.bag is not None else ids
        if self.conv:
            return self.head(torch.tanh(self._layer(h.unsqueeze(1))).flatten(1))
        return self.head(torch.tanh(self._layer(h)))

    def _layer(self, h: torch.Tensor) -> torch.Tensor:
        if not self.spelled_out or self.norm is None:
            return self.layer(h)  # the older weight norm computes the weight in the call's pre-hook
        if self.norm == "parametrization":
            g, v = self.layer.parametrizations.weight.original0, self.layer.parametrizations.weight.original1
        else:
            g, v = self.layer.weight_g, self.layer.weight_v
        weight = v * (g / _norm_except(v, self.norm_dim))
        if self.conv:
            return F.conv1d(h, weight, self.layer.bias, padding=1)
        return F.linear(h, weight, self.layer.bias)

    def _bag(self, ids: torch.Tensor, weights) -> torch.Tensor:
        bag = self.bag
        if self.spelled_out:
            return torch.stack([self._one_bag(ids[i], None if weights is None else weights[i])
                                for i in range(ids.shape[0])])
        w = weights if self.weighted else None
        if self.flat:  # the bags as one 1D input with offsets, each starting where the last ended
            offsets = torch.arange(0, ids.numel(), ids.shape[1], device=ids.device)
            return bag(ids.reshape(-1), offsets, per_sample_weights=None if w is None else w.reshape(-1))
        return bag(ids, per_sample_weights=w)

    def _one_bag(self, ids: torch.Tensor, weights) -> torch.Tensor:
        bag = self.bag
        pad = None if bag.padding_idx is None else bag.padding_idx % bag.num_embeddings
        rows = [bag.weight[int(t)] * (weights[j] if self.weighted else 1.0)
                for j, t in enumerate(ids) if pad is None or int(t) != pad]
        if not rows:
            return bag.weight.new_zeros(bag.embedding_dim)
        stacked = torch.stack(rows)
        return {"sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.max(0).values}[bag.mode]


def _spelled_out(seed: int) -> nn.Module:
    """The model of ``generate_routed(seed)`` built again (a copy: deepcopy cannot copy a module
    with the older weight norm), computing both ops by hand."""
    model = generate_routed(seed).model
    model.spelled_out = True
    return model


def generate_routed(seed: int) -> Case:
    """A small model with an EmbeddingBag and / or weight normalisation (P up to about a hundred),
    loss and batch (ids, a tuple (ids, weights), or real features where there is no bag)."""
    r = random.Random(4_000_037 + seed)
    dtype = torch.float64 if r.random() < 0.6 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    n, length, vocab, d = r.choice([1, 3, 4]), r.choice([1, 3, 5]), r.choice([4, 6]), r.choice([2, 3])
    outputs = r.choice([1, 2, 3])
    with torch.random.fork_rng():  # the weights from the seed, the global generator left alone
        torch.manual_seed(seed)
        model = _Routed(r, vocab, d, outputs)
    if model.bag is None:
        x = torch.randn(n, d, generator=gen, dtype=dtype)
    else:
        ids = torch.randint(0, vocab, (n, length), generator=gen)
        x = (ids, torch.rand(n, length, generator=gen, dtype=dtype) + 0.5) if model.weighted else ids
    kind, _, loss, loss_name = _loss(r, outputs)
    model = model.to(dtype).eval()
    y = _targets(kind, n, outputs, gen, dtype)
    return Case(model, loss, x, y, f"routed seed {seed}: {dtype} n={n} length={length} {model.what} loss={loss_name}",
                reference_model=lambda: _spelled_out(seed))
