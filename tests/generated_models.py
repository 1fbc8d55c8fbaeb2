"""A generator of small model architectures for differential tests: every engine, ``hessian``,
Direct and the Gauss-Newton mode are compared on them with float64 torch.func references.

``generate(seed)`` draws, reproducibly from the seed: depth, widths (1 included), every activation
the native engine knows with non-default parameters, module instances reused in several places,
nested Sequentials, frozen layers anywhere, bias on and off, Identity / Flatten / Dropout (eval),
batch size 1, one output or one class where the loss allows it, float32 or float64, and every
supported loss and reduction. Most draws are native-engine models; the rest (frozen or reused
Linear layers after the first trainable one, losses with options) exercise the fallback.

``generate_conv_attention(seed)`` draws models no native engine takes: small convolutional networks
(Conv1d / Conv2d, pooling, BatchNorm in eval mode, residual additions) and attention blocks
(LayerNorm, softmax attention written out, a GELU/SiLU MLP, mean pooling), for the generic and
compiled engines and the Gauss-Newton product of any model.

``generate_recurrent(seed)`` draws the other spellings users' models have: recurrent layers (RNN, GRU,
LSTM; batch-first or not, one or two layers, read out at the last step or by the mean), token models
whose output layer shares the embedding's weight, and around either a frozen parameter, a 0-d
temperature parameter and a buffer the forward multiplies by.

``generate_torch_attention(seed)`` draws transformers written with torch's own layers:
nn.TransformerEncoderLayer (pre- or post-norm, ReLU / GELU / a callable activation, with or without
biases) or nn.MultiheadAttention (attention weights returned or not, extra key/value biases, a
cross-attention over a second sequence of another width), batch-first or not, with a key-padding or
causal mask where drawn (a padding mask passed with the batch as a tuple (x, mask); a causal one
built in the forward).
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    # Builds the model the references differentiate (else a copy of ``model``): a family whose ops
    # torch differentiates wrongly or not at all twice (tests/routed_models.py) spells them out there.
    reference_model: Optional[Callable[[], nn.Module]] = None
    # The loss the references differentiate (else ``loss``): the same function spelled out where torch
    # cannot differentiate the loss's own op twice (tests/routed_models.py).
    reference_loss: Optional[Callable] = None


def _targets(kind: str, n: int, C: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """n targets for a loss of ``kind``: class indices, probabilities (bce) or real values."""
    if kind == "cross_entropy":
        return torch.randint(0, C, (n,), generator=gen)
    if kind == "bce":
        return torch.rand(n, C, generator=gen, dtype=dtype)
    return torch.randn(n, C, generator=gen, dtype=dtype)


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
    # A Linear registered twice: a square one applied again after its own activations. Drawn from
    # a stream of its own, so that every other choice of a seed stays what it was.
    again = random.Random(f"registered twice {seed}")
    squares = [k for k, m in enumerate(layers) if isinstance(m, nn.Linear) and m.in_features == m.out_features]
    if squares and again.random() < 0.3:
        k = again.choice(squares)
        end = next((j for j in range(k + 1, len(layers)) if isinstance(layers[j], nn.Linear)), len(layers))
        layers = layers[:end] + layers[k:end] + layers[end:]
        described = described[:end] + [described[k] + "(again)"] + described[k + 1:end] + described[end:]
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
    y = _targets(kind, n, widths[-1], gen, dtype)
    description = (f"seed {seed}: {dtype} n={n} " + " ".join(described) + f" frozen={frozen} loss={loss_name}")
    return Case(model, loss, x, y, description)


def flat_params(model: nn.Module) -> List[torch.Tensor]:
    """The trainable parameters, deduplicated, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def float64_copy(case: Case):
    """(model, x, y) of ``case`` in float64: a copy of the model, floating tensors cast (token ids
    and class indices stay integers)."""
    import copy

    def cast(t):
        if isinstance(t, tuple):
            return tuple(cast(u) for u in t)
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    model = (case.reference_model() if case.reference_model is not None else copy.deepcopy(case.model)).double()
    return model, cast(case.x), cast(case.y)


def reference_hessian(case: Case, gauss_newton: bool = False) -> torch.Tensor:
    """The float64 Hessian (or Gauss-Newton matrix JᵀH_ℓJ) of the batch loss
    ``loss(squeeze(model(x)), squeeze(y))`` in the trainable parameters, on a float64 copy of the
    model, row by row with plain autograd (one backward pass per row, no vmap, no forward mode):
    independent of the batching and forward-mode rules the engines rely on. (torch.func.hessian
    and jacrev(jacrev) of a model with LayerNorm before attention come out asymmetric in
    torch 2.14: a batching rule of the second backward pass is wrong there.)"""
    model, x, y = float64_copy(case)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of_output(o):
        return (case.reference_loss or case.loss)(torch.squeeze(o), torch.squeeze(y))

    def rows(outputs: torch.Tensor, wrt) -> torch.Tensor:
        """∂outputs[i]/∂wrt for every element i of ``outputs`` (which has a graph)."""
        flat = outputs.reshape(-1)
        out = []
        for i in range(flat.numel()):
            if not flat[i].requires_grad:  # an entry constant in ``wrt`` (a hinge loss of a linear model)
                out.append(torch.cat([torch.zeros_like(w).reshape(-1) for w in wrt]))
                continue
            grads = torch.autograd.grad(flat[i], wrt, retain_graph=True, allow_unused=True)
            out.append(torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1)
                                  for g, w in zip(grads, wrt)]))
        return torch.stack(out)

    with sdpa_kernel(SDPBackend.MATH):  # torch's fused CPU attention has no double backward
        return _reference(case, model, x, y, params, loss_of_output, rows, gauss_newton)


def _reference(case, model, x, y, params, loss_of_output, rows, gauss_newton):
    z = model(*x) if isinstance(x, tuple) else model(x)
    if not gauss_newton:
        # A parameter the loss does not reach (unused, or used under torch.no_grad): a zero block.
        g = torch.autograd.grad(loss_of_output(z), params, create_graph=True, allow_unused=True,
                                materialize_grads=True)
        flat = torch.cat([t.reshape(-1) for t in g])
        if not flat.requires_grad:  # a loss linear in every parameter
            return torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
        return rows(flat, params)
    J = rows(z, params)  # [n·C, P]
    o = z.detach().requires_grad_(True)
    g_o = torch.autograd.grad(loss_of_output(o), o, create_graph=True)[0]
    H_l = rows(g_o, [o])  # [n·C, n·C]
    return J.T @ H_l @ J

class _ConvNet(nn.Module):
    """conv → act → [pool] → [BatchNorm] → conv (+ residual) → act → flatten → linear."""

    def __init__(self, r: random.Random, dims: int, c_in: int, size: int, outputs: int):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        c = r.choice([2, 3])
        self.conv1 = conv(c_in, c, 3, padding=1, bias=r.random() < 0.8)
        self.act = ACTIVATIONS[r.randrange(len(ACTIVATIONS))](r)
        pool = r.choice(["max", "avg", None])
        self.pool = (nn.MaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)) if pool == "max" else \
            (nn.AvgPool1d(2) if dims == 1 else nn.AvgPool2d(2)) if pool == "avg" else nn.Identity()
        self.norm = (nn.BatchNorm1d(c) if dims == 1 else nn.BatchNorm2d(c)) if r.random() < 0.3 else nn.Identity()
        self.conv2 = conv(c, c, 3, padding=1)
        self.residual = r.random() < 0.5
        side = size // 2 if pool else size
        self.head = nn.Linear(c * side ** dims, outputs)

    def forward(self, x):
        h = self.norm(self.pool(self.act(self.conv1(x))))
        h2 = self.conv2(h)
        h = self.act(h2 + h if self.residual else h2)
        return self.head(h.flatten(1))


class _Attention(nn.Module):
    """A pre-norm attention block with an MLP, mean-pooled into a linear head."""

    def __init__(self, r: random.Random, d: int, outputs: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=r.random() < 0.7)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), r.choice([nn.GELU, nn.SiLU, nn.Tanh])(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, outputs)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + att @ v
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def generate_conv_attention(seed: int) -> Case:
    """A small convolutional or attention model (P up to a few hundred), loss and batch."""
    r = random.Random(1_000_003 + seed)
    dtype = torch.float64 if r.random() < 0.6 else torch.float32
    outputs = r.choice([1, 2, 3])
    kind, reduction, loss, loss_name = _loss(r, outputs)
    gen = torch.Generator().manual_seed(seed)
    n = r.choice([1, 3, 4])
    shape = r.choice(["conv1d", "conv2d", "attention"])
    if shape == "attention":
        d, tokens = r.choice([4, 6]), r.choice([2, 3])
        model = _Attention(r, d, outputs)
        x = torch.randn(n, tokens, d, generator=gen, dtype=dtype)
        what = f"attention d={d} tokens={tokens}"
    else:
        dims = 1 if shape == "conv1d" else 2
        c_in, size = r.choice([1, 2]), 4
        model = _ConvNet(r, dims, c_in, size, outputs)
        x = torch.randn(n, c_in, *([size] * dims), generator=gen, dtype=dtype)
        what = f"{shape} c_in={c_in} act={type(model.act).__name__} pool={type(model.pool).__name__} " \
               f"norm={type(model.norm).__name__} residual={model.residual}"
    model = model.to(dtype).eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    y = _targets(kind, n, outputs, gen, dtype)
    return Case(model, loss, x, y, f"conv/attention seed {seed}: {dtype} n={n} {what} loss={loss_name}")


class _Recurrent(nn.Module):
    """RNN / GRU / LSTM over [N, T, F] sequences, read out at the last step or by the mean, into a
    Linear head; a buffer masks the input features, a 0-d parameter scales the logits."""

    def __init__(self, r: random.Random, features: int, outputs: int):
        super().__init__()
        cell = r.choice([nn.RNN, nn.GRU, nn.LSTM])
        self.batch_first = r.random() < 0.5
        extra = {"nonlinearity": r.choice(["tanh", "relu"])} if cell is nn.RNN else {}
        self.rnn = cell(features, r.choice([2, 3]), num_layers=r.choice([1, 2]), batch_first=self.batch_first,
                        bias=r.random() < 0.8, **extra)
        self.readout = r.choice(["last", "mean"])
        self.head = nn.Linear(self.rnn.hidden_size, outputs)
        self.register_buffer("mask", (torch.arange(features) % 3 != 1).to(torch.get_default_dtype()))
        self.temperature = nn.Parameter(torch.tensor(1.3)) if r.random() < 0.5 else None

    def forward(self, x):
        x = x * self.mask
        h = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        h = h if self.batch_first else h.transpose(0, 1)
        out = self.head(h[:, -1] if self.readout == "last" else h.mean(dim=1))
        return out / self.temperature if self.temperature is not None else out


class _TiedTokens(nn.Module):
    """Token ids → embedding → mean over tokens → tanh Linear → logits over the vocabulary by the
    embedding's own weight (tied, one Parameter in two modules), plus a bias of their own."""

    def __init__(self, r: random.Random, vocab: int, d: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=r.random() < 0.5)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embed(ids).mean(dim=1))))


def generate_recurrent(seed: int) -> Case:
    """A small recurrent or tied-weight model (P up to about a hundred), loss and batch."""
    r = random.Random(2_000_003 + seed)
    dtype = torch.float64 if r.random() < 0.6 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    n, steps = r.choice([1, 3, 4]), r.choice([1, 2, 4])
    recurrent = r.random() < 0.65
    if recurrent:
        features, outputs = r.choice([2, 3]), r.choice([1, 2, 3])
    else:
        vocab, d = r.choice([3, 5]), r.choice([2, 3])
        outputs = vocab
    with torch.random.fork_rng():  # the weights from the seed, the global generator left alone
        torch.manual_seed(seed)
        model = _Recurrent(r, features, outputs) if recurrent else _TiedTokens(r, vocab, d)
    if recurrent:
        x = torch.randn(n, steps, features, generator=gen, dtype=dtype)
        rnn = model.rnn
        what = (f"{type(rnn).__name__} layers={rnn.num_layers} batch_first={model.batch_first} bias={rnn.bias} "
                f"readout={model.readout} temperature={model.temperature is not None}")
    else:
        x = torch.randint(0, vocab, (n, steps), generator=gen)
        what = f"tied embedding vocab={vocab} d={d} out bias={model.out.bias is not None}"
    kind, reduction, loss, loss_name = _loss(r, outputs)
    if r.random() < 0.4:  # one parameter frozen, anywhere
        name = r.choice([name for name, _ in model.named_parameters()])
        model.get_parameter(name).requires_grad_(False)
        what += f" frozen={name}"
    model = model.to(dtype).eval()
    y = _targets(kind, n, outputs, gen, dtype)
    return Case(model, loss, x, y, f"recurrent/tied seed {seed}: {dtype} n={n} steps={steps} {what} loss={loss_name}")


class _TorchAttention(nn.Module):
    """torch's nn.TransformerEncoderLayer or nn.MultiheadAttention (self- or cross-attention) over
    [N, T, d] (or [T, N, d]) sequences, an optional mask as the forward's second argument, the
    tokens averaged into a Linear head."""

    def __init__(self, r: random.Random, d: int, outputs: int):
        super().__init__()
        self.batch_first = r.random() < 0.6
        heads = r.choice([h for h in (1, 2, 4) if d % h == 0])
        bias = r.random() < 0.8
        self.kind = r.choice(["encoder", "encoder", "self", "cross"])
        if self.kind == "encoder":
            activation = r.choice(["relu", "gelu", F.silu])
            self.body = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, activation=activation,
                                                   batch_first=self.batch_first, norm_first=r.random() < 0.5,
                                                   bias=bias)
            self.what = (f"encoder heads={heads} norm_first={self.body.norm_first} "
                         f"activation={getattr(activation, '__name__', activation)} bias={bias}")
        else:
            self.kv_width = d + 1 if self.kind == "cross" else None
            self.need_weights = r.random() < 0.5
            self.body = nn.MultiheadAttention(d, heads, bias=bias, add_bias_kv=r.random() < 0.3,
                                              kdim=self.kv_width, vdim=self.kv_width, batch_first=self.batch_first)
            self.what = (f"{self.kind}-attention heads={heads} bias={bias} bias_kv={self.body.bias_k is not None} "
                         f"need_weights={self.need_weights}")
        self.head = nn.Linear(d, outputs)
        self.causal = False

    def forward(self, x, mask=None, memory=None):
        seq = (lambda t: t) if self.batch_first else (lambda t: t.transpose(0, 1))
        if self.causal:  # built here: a tensor of the batch has the batch's leading dimension
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype, device=x.device)
        if self.kind == "encoder":
            h = self.body(seq(x), **self._masks(mask, x))
        else:
            kv = x if memory is None else memory
            h = self.body(seq(x), seq(kv), seq(kv), need_weights=self.need_weights, **self._masks(mask, x, "mha"))[0]
        return self.head(seq(h).mean(dim=1))

    @staticmethod
    def _masks(mask, x, where="encoder"):
        if mask is None:
            return {}
        if mask.dim() == 2 and mask.shape == (x.shape[1], x.shape[1]) and mask.dtype != torch.bool:
            return {"src_mask" if where == "encoder" else "attn_mask": mask}  # float causal mask
        return {"src_key_padding_mask" if where == "encoder" else "key_padding_mask": mask}


def generate_torch_attention(seed: int) -> Case:
    """A transformer of torch's own layers (P up to a few hundred), loss and batch (x, or a tuple
    (x, mask) or (x, None, memory))."""
    r = random.Random(3_000_017 + seed)
    dtype = torch.float64 if r.random() < 0.6 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    n, tokens, d = r.choice([1, 3, 4]), r.choice([2, 3, 5]), r.choice([4, 8])
    outputs = r.choice([1, 2, 3])
    with torch.random.fork_rng():  # the weights from the seed, the global generator left alone
        torch.manual_seed(seed)
        model = _TorchAttention(r, d, outputs)
    x = torch.randn(n, tokens, d, generator=gen, dtype=dtype)
    what = model.what + f" batch_first={model.batch_first}"
    mask = r.choice([None, "padding", "causal"])
    if model.kind == "cross":
        memory = torch.randn(n, tokens + 1, model.kv_width, generator=gen, dtype=dtype)
        inputs, mask = (x, None, memory), None
    elif mask == "padding":  # True: a padded key; every row keeps its first token
        pad = torch.rand(n, tokens, generator=gen) < 0.4
        pad[:, 0] = False
        inputs = (x, pad)
    elif mask == "causal":
        model.causal, inputs = True, x
    else:
        inputs = x
    kind, reduction, loss, loss_name = _loss(r, outputs)
    model = model.to(dtype).eval()
    y = _targets(kind, n, outputs, gen, dtype)
    return Case(model, loss, inputs, y, f"torch attention seed {seed}: {dtype} n={n} tokens={tokens} d={d} {what} "
                                        f"mask={mask} loss={loss_name}")
