"""What the generic engines (torch.func, autograd) share: they take any model, keep the batch as it
is, and estimate a direction's working memory from the model's activations."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..batch import call_model, detached, input_tensors
from ..block_cache import reusing_cpu_blocks
from ..guard import model_call
from ..matmul_route import routing_matmuls
from .base import PreparedBatch, generic_directions_per_chunk

__all__ = ["GenericEngine", "activation_numel", "product_scope"]


@contextlib.contextmanager
def product_scope(v: torch.Tensor) -> Iterator[None]:
    """What every generic product runs in, for directions ``v``: on the CPU, large blocks reused
    (:mod:`~twicediff.torch.block_cache`) and float32 matmuls routed
    (:mod:`~twicediff.torch.matmul_route`); on a GPU, nothing."""
    with reusing_cpu_blocks(v.device), routing_matmuls(v):
        yield


class GenericEngine:
    """Base of the engines that take any model: prepare keeps (x, y) detached; a direction carries
    tangents of every activation (forward) and cotangents (backward), about 6 copies of the
    activations, plus 3 copies of the parameters."""

    name = "generic"

    def __init__(self, model: nn.Module, loss: Callable):
        self.model = model
        self.loss = loss

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def prepare(self, x, y: torch.Tensor) -> PreparedBatch:
        return PreparedBatch(detached(x), y.detach())

    def bytes_per_direction(self, batch: PreparedBatch) -> int:
        first = next(p for p in self.model.parameters() if p.requires_grad)
        elem = first.element_size()
        return elem * (3 * self.num_params + 6 * activation_numel(self.model, batch.inputs))

    def max_directions(self, batch: PreparedBatch) -> int:
        return generic_directions_per_chunk(self.bytes_per_direction(batch))


_activation_cache: dict = {}


def _shape_key(x) -> tuple:
    """What the activations' size depends on: the structure of x, its tensors' shapes, dtypes and
    devices, and its other leaves (flags) by value where they are plain, else by type."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__,) + tuple(_shape_key(v) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple((k, _shape_key(v)) for k, v in x.items())
    return (x,) if isinstance(x, (bool, int, float, str, type(None))) else (type(x).__name__,)


#: Elements a recurrent module's products hold per layer, direction, step and hidden unit beyond its
#: output, in units of ``activation_numel`` (before the ×6 of ``bytes_per_direction``): its gates and
#: their tangents and cotangents, every step of them. Set from the func engine's peak memory per
#: direction, the larger of the generic engines'; GRU takes LSTM's factor (a thin margin at 7).
#: NOTE: measured in benchmarks/results/peak_memory_cpu.md (the recurrent section).
_RECURRENT_INTERNALS = ((nn.LSTM, 8), (nn.GRU, 8), (nn.RNN, 2))


def _recurrent_internals(module: nn.RNNBase, output) -> int:
    sequence = output[0] if isinstance(output, (tuple, list)) else output
    data = sequence.data if isinstance(sequence, nn.utils.rnn.PackedSequence) else sequence
    directions = 2 if module.bidirectional else 1
    width = directions * (getattr(module, "proj_size", 0) or module.hidden_size)
    rows = data.numel() // max(width, 1)  # steps × points
    factor = next((f for kind, f in _RECURRENT_INTERNALS if isinstance(module, kind)), 8)
    return factor * rows * module.num_layers * directions * module.hidden_size


def activation_numel(model: nn.Module, x) -> int:
    """Elements of all leaf-module outputs for a batch shaped like x (a tensor, tuple, list or dict;
    one no_grad forward pass, cached by model identity and input shapes): every tensor of an output
    that is a tuple (a recurrent module's), and a recurrent module's steps
    (``_RECURRENT_INTERNALS``)."""
    key = (id(model), _shape_key(x))
    hit = _activation_cache.get(key)
    if hit is not None:
        return hit
    total = [sum(t.numel() for _, t in input_tensors(x))]

    def count(module, inputs, output):
        total[0] += sum(t.numel() for t in tree_leaves(output) if isinstance(t, torch.Tensor))
        if isinstance(module, nn.RNNBase):
            total[0] += _recurrent_internals(module, output)

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with model_call(model, "activation size"), torch.no_grad():  # buffers kept as they were
            call_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    if len(_activation_cache) > 256:
        _activation_cache.clear()
    _activation_cache[key] = total[0]
    return total[0]
