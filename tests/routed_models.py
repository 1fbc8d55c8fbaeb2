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

import functools
import random
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from generated_models import Case, _loss, _targets

__all__ = ["generate_routed", "generate_routed_loss"]


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


def _reduced(values, reduction: str) -> torch.Tensor:
    total = torch.stack(values).sum()
    return total / len(values) if reduction == "mean" else total


def _multi_margin_by_hand(o, t, p, margin, weight, reduction):
    values = []
    for scores, y in ([(o, t)] if o.dim() == 1 else zip(o, t)):
        y = int(y)
        terms = [torch.relu(margin - scores[y] + scores[i]) ** p * (1.0 if weight is None else weight[y])
                 for i in range(scores.shape[0]) if i != y]
        values.append(sum(terms, 0 * scores.sum()) / scores.shape[0])  # no terms: still a function of o
    return _reduced(values, reduction)


def _multilabel_margin_by_hand(o, t, reduction):
    values = []
    for scores, target in ([(o, t)] if o.dim() == 1 else zip(o, t)):
        labels = []
        for entry in target.tolist():
            if entry == -1:
                break
            labels.append(entry)
        terms = [torch.relu(1 - scores[j] + scores[i]) for j in labels for i in range(scores.shape[0])
                 if i not in labels]
        values.append(sum(terms, 0 * scores.sum()) / scores.shape[0])  # no terms: still a function of o
    return _reduced(values, reduction)


def _elementwise_by_hand(o, t, term, reduction):
    values = [term(a, b) for a, b in zip(o.reshape(-1), t.expand_as(o).reshape(-1))]
    return _reduced(values, reduction)


def _huber_term(delta):
    return lambda a, b: 0.5 * (a - b) ** 2 if abs(float((a - b).detach())) < delta else delta * ((a - b).abs() - 0.5 * delta)


def generate_routed_loss(seed: int) -> Case:
    """A small MLP (P up to about fifty) under one of the losses of twicediff.torch.losses, in one of
    torch's spellings, and its reference written by hand."""
    r = random.Random(5_000_011 + seed)
    dtype = torch.float64 if r.random() < 0.6 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    n, d, hidden, classes = r.choice([1, 3, 4]), r.choice([2, 3]), r.choice([2, 4]), r.choice([2, 3, 4])
    kind = r.choice(["multi_margin", "multilabel_margin", "huber", "soft_margin"])
    reduction = r.choice(["mean", "sum"])
    spelling = r.choice(["function", "module", "partial"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if r.random() < 0.7:
            model = nn.Sequential(nn.Linear(d, hidden), r.choice([nn.Tanh, nn.GELU, nn.Sigmoid])(),
                                  nn.Linear(hidden, classes))
        else:
            model = nn.Sequential(nn.Linear(d, classes))
    model = model.to(dtype).eval()
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    if kind == "multi_margin":
        p, margin = r.choice([1, 2]), r.choice([1.0, 0.5, 2.0])
        weight = torch.rand(classes, generator=gen, dtype=dtype) + 0.5 if r.random() < 0.4 else None
        options = dict(p=p, margin=margin, weight=weight, reduction=reduction)
        fn, module = F.multi_margin_loss, nn.MultiMarginLoss
        y = torch.randint(0, classes, (n,), generator=gen)
        reference = lambda o, t: _multi_margin_by_hand(o, t, p, margin, None if weight is None else weight.double(),
                                                       reduction)
    elif kind == "multilabel_margin":
        options, fn, module = dict(reduction=reduction), F.multilabel_margin_loss, nn.MultiLabelMarginLoss
        rows = []
        for _ in range(n):  # its labels (a repeat allowed), then -1 and anything in range after it
            labels = [r.randrange(classes) for _ in range(r.randint(0, classes))]
            rest = [r.randrange(-1, classes) for _ in range(classes - len(labels))]
            rows.append((labels + ([-1] if rest else []) + rest[1:])[:classes])
        y = torch.tensor(rows, dtype=torch.long)
        reference = lambda o, t: _multilabel_margin_by_hand(o, t, reduction)
    elif kind == "huber":
        delta = r.choice([0.3, 1.0, 2.0])
        options, fn, module = dict(reduction=reduction, delta=delta), F.huber_loss, nn.HuberLoss
        y = torch.randn(n, classes, generator=gen, dtype=dtype)
        reference = lambda o, t: _elementwise_by_hand(o, t, _huber_term(delta), reduction)
    else:
        options, fn, module = dict(reduction=reduction), F.soft_margin_loss, nn.SoftMarginLoss
        y = torch.randn(n, classes, generator=gen, dtype=dtype).sign()
        reference = lambda o, t: _elementwise_by_hand(o, t, lambda a, b: torch.log1p(torch.exp(-b * a)), reduction)
    if spelling == "function" and reduction == "mean" and "weight" not in options and "delta" not in options \
            and "p" not in options:
        loss, name = fn, f"F.{fn.__name__}"
    elif spelling == "module":
        loss, name = module(**options), f"nn.{module.__name__}({options})"
    else:
        loss, name = functools.partial(fn, **options), f"partial({fn.__name__}, {options})"
    return Case(model, loss, x, y, f"routed loss seed {seed}: {dtype} n={n} classes={classes} {name}",
                reference_loss=reference)
