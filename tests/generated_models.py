"""A generator of small model architectures for differential tests: every engine, ``hessian``,
Direct and the Gauss-Newton mode are compared on them with float64 torch.func references.

``generate(seed)`` draws, reproducibly from the seed: depth, widths (1 included), every activation
the native engine knows with non-default parameters, module instances reused in several places,
nested Sequentials, frozen layers anywhere, bias on and off, Identity / Flatten / Dropout (eval),
batch size 1, one output or one class where the loss allows it, float32 or float64, and every
supported loss and reduction. Most draws are native-engine models; the rest (frozen or reused
Linear layers after the first trainable one, losses with options) exercise the fallback.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: List[Callable[[random.Random], nn.Module]] = [
    lambda r: nn.ReLU(),
    lambda r: nn.LeakyReLU(r.choice([0.01, 0.2, 0.7])),
    lambda r: nn.Tanh(),
    lambda r: nn.Sigmoid(),
    lambda r: nn.GELU(),
    lambda r: nn.GELU(approximate="tanh"),
    lambda r: nn.SiLU(),
    lambda r: nn.Softplus(beta=r.choice([0.5, 1.0, 3.0]), threshold=r.choice([2.0, 20.0])),
]
PASSTHROUGH: List[Callable[[], nn.Module]] = [nn.Identity, nn.Flatten, lambda: nn.Dropout(0.3)]


@dataclass
class Case:
    """One generated problem: the model (eval mode), the loss, a batch and a description."""
    model: nn.Module
    loss: Callable
    x: torch.Tensor
    y: torch.Tensor
    description: str


def _loss(r: random.Random, outputs: int):
    kinds = ["mse", "bce"] + (["cross_entropy"] if outputs >= 2 else [])
    kind = r.choice(kinds)
    reduction = r.choice(["mean", "sum"])
    fn = {"mse": F.mse_loss, "bce": F.binary_cross_entropy_with_logits, "cross_entropy": F.cross_entropy}[kind]
    spelling = r.choice(["partial", "module", "function"]) if reduction == "mean" else r.choice(["partial", "module"])
    if spelling == "function":
        return kind, reduction, fn, f"F.{fn.__name__}"
    if spelling == "module":
        module = {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss, "cross_entropy": nn.CrossEntropyLoss}[kind]
        return kind, reduction, module(reduction=reduction), f"nn.{module.__name__}(reduction={reduction!r})"
    return kind, reduction, functools.partial(fn, reduction=reduction), f"partial({fn.__name__}, {reduction!r})"


def generate(seed: int) -> Case:
    r = random.Random(seed)
    dtype = torch.float64 if r.random() < 0.7 else torch.float32
    depth = r.randint(1, 4)
    widths = [r.choice([1, 2, 3, 5]) for _ in range(depth)] + [r.choice([1, 2, 3, 4])]
    kind, reduction, loss, loss_name = _loss(r, widths[-1])
    shared_act = ACTIVATIONS[r.randrange(len(ACTIVATIONS))](r) if r.random() < 0.4 else None
    layers: List[nn.Module] = []
    described: List[str] = []
    linears: List[nn.Linear] = []
    for i in range(depth):
        lin = nn.Linear(widths[i], widths[i + 1], bias=r.random() < 0.8)
        linears.append(lin)
        layers.append(lin)
        described.append(f"Linear({widths[i]},{widths[i + 1]}{'' if lin.bias is not None else ',nobias'})")
        if r.random() < 0.25:
            extra = r.choice(PASSTHROUGH)()
            layers.append(extra)
            described.append(type(extra).__name__)
        if i < depth - 1:
            for _ in range(r.choice([1, 1, 1, 2])):
                act = shared_act if shared_act is not None and r.random() < 0.7 else \
                    ACTIVATIONS[r.randrange(len(ACTIVATIONS))](r)
                layers.append(act)
                described.append(type(act).__name__ + ("*" if act is shared_act else ""))
    # nesting: wrap a random run of modules in an inner Sequential
    if len(layers) >= 3 and r.random() < 0.4:
        a = r.randrange(len(layers) - 1)
        b = r.randrange(a + 1, len(layers))
        layers = layers[:a] + [nn.Sequential(*layers[a:b + 1])] + layers[b + 1:]
        described.insert(a, "[")
        described.insert(b + 2, "]")
    model = nn.Sequential(*layers)
    # frozen layers: a frozen prefix is native, a frozen layer later is not (the generic engines take it)
    frozen = [i for i in range(depth - 1) if r.random() < 0.25]
    for i in frozen:
        linears[i].requires_grad_(False)
    if all(not p.requires_grad for p in model.parameters()):
        linears[-1].requires_grad_(True)
    model = model.to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    n = r.choice([1, 2, 5, 9])
    x = torch.randn(n, widths[0], generator=gen, dtype=dtype)
    C = widths[-1]
    if kind == "cross_entropy":
        y = torch.randint(0, C, (n,), generator=gen)
    elif kind == "bce":
        y = torch.rand(n, C, generator=gen, dtype=dtype)
    else:
        y = torch.randn(n, C, generator=gen, dtype=dtype)
    description = (f"seed {seed}: {dtype} n={n} " + " ".join(described) + f" frozen={frozen} loss={loss_name}")
    return Case(model, loss, x, y, description)


def flat_params(model: nn.Module) -> List[torch.Tensor]:
    """The trainable parameters, deduplicated, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def reference_hessian(case: Case, gauss_newton: bool = False) -> torch.Tensor:
    """The float64 Hessian (or Gauss-Newton matrix JᵀH_ℓJ) of the batch loss
    ``loss(squeeze(model(x)), squeeze(y))`` in the trainable parameters, by torch.func on a float64
    copy of the model."""
    import copy

    from torch.func import functional_call, hessian, jacrev

    model = copy.deepcopy(case.model).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    x = case.x.double()
    y = case.y.double() if case.y.is_floating_point() else case.y

    def unflatten(w):
        out, col = dict(fixed), 0
        for n, s in zip(names, shapes):
            out[n] = w[col:col + s.numel()].reshape(s)
            col += s.numel()
        return out

    def output(w):
        return functional_call(model, unflatten(w), (x,))

    def loss_of_output(o):
        return case.loss(torch.squeeze(o), torch.squeeze(y))

    if not gauss_newton:
        return hessian(lambda w: loss_of_output(output(w)))(flat)
    J = jacrev(output)(flat).reshape(-1, flat.numel())
    out = output(flat).detach()
    H_l = hessian(lambda o: loss_of_output(o.reshape(out.shape)))(out.reshape(-1))
    return J.T @ H_l @ J
