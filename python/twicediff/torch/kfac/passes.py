r"""The passes of K-FAC fitting over the data: one batch's captures, and the first pass's captures
kept in memory for the EK-FAC pass.

:func:`batch_captures` runs one batch forward and backward under a :class:`LayerCapture` and yields
what the factors need from it (the tracked layers' inputs and output gradients).

:class:`CaptureCache`: EK-FAC needs a second pass over the data, because its eigenvalue correction
rotates each sample's gradient into the eigenbases of A and S, which exist only after the first
pass. The second pass would run the forward and backward of every batch again to get back the same
inputs and output gradients (with the empirical Fisher, whose targets are the data's own labels,
they are the same tensors). The cache keeps them from the first pass while they fit in the room it
is given, so that the second pass reads memory instead of recomputing the model; when they do not
fit (a quarter of the memory budget, as :class:`twicediff.memory.KeptWhileFits` rules), it lets go
of all of them and the second pass goes over the data as before. What is computed
from the cached tensors is what the second pass would compute, in the same order.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ...errors import data_errors
from ...memory import KeptWhileFits
from .. import batch as _batch
from . import batches as _b
from .layers import LayerCapture, TrackedLayer

__all__ = ["batch_captures", "CaptureCache"]

# (inputs [B, T, I], output gradients [B, T, O], token weights [B, T] or None) of one layer in one batch
Captured = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def batch_captures(layers: Sequence[TrackedLayer], fisher_type: str, model, loss, batch, reduction, sampler, device,
                   where, token_mask=None) -> Iterator[Tuple[LayerCapture, int, bool]]:
    """Yield (capture, B, first) for one batch: once with the gradients of Σ_n ℓ_n (empirical or
    sampled targets), or, for the GGN, once per column of the loss Hessian's factor (the inputs
    captured once, ``first`` true on the first)."""
    x, y = _batch.split_batch(batch, where)
    B = _batch.batch_size(x, where)
    x = _batch.move_inputs(x, device)
    mask = None
    if token_mask is not None:
        mask = token_mask(x)
        if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or mask.shape[0] != B:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{where}: token_mask(x) must return a [B, *positions] tensor with B = {B}, got {got}")
        mask = mask.detach().to(device)
    cap = LayerCapture(layers, B, mask)
    with torch.enable_grad(), cap:
        with data_errors(where, "data", x, y):  # the model's or loss's own errors, named with the batch
            output = _batch.call_model(model, x)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{where}: the model must return a tensor, got {type(output).__name__}")
        if not output.requires_grad:
            raise ValueError(f"{where}: the model's output does not depend on any tracked layer's parameters")
        if fisher_type == "ggn":
            columns = _b.loss_hessian_columns(loss, output, reduction, where)
            for c in range(columns.shape[0]):
                cap.backward((output * columns[c]).sum(), retain_graph=c + 1 < columns.shape[0])
                yield cap, B, c == 0
            return
        target = sampler(output) if sampler is not None else _batch.move_inputs(y, device)
        with data_errors(where, "data", x, y):
            total = _b.summed_loss(loss, output, target, reduction, B)
        if not total.requires_grad:
            raise ValueError(f"{where}: the loss does not depend on any tracked layer's parameters")
        cap.backward(total)
    yield cap, B, True


def _nbytes(t: Optional[torch.Tensor]) -> int:
    # The whole storage a tensor keeps alive (a view holds its base), not only its own elements.
    return 0 if t is None else t.untyped_storage().nbytes()


class CaptureCache:
    """The first pass's captures of every batch, kept while they fit a quarter of the memory budget
    (the rule of :class:`twicediff.memory.KeptWhileFits`, which HessianOperator and LiSSA keep their
    batches by too).

    Attributes:
        complete: True once the first pass has ended with every batch kept (:meth:`finish`); False
            while filling, and for good once the captures outgrew the room (all dropped then).
    """

    def __init__(self, device, enabled: bool = True):
        self._keep: Optional[KeptWhileFits] = KeptWhileFits(device) if enabled else None
        self.complete = False

    @property
    def num_samples(self) -> int:
        """The samples of the batches kept (this process's, under a process group)."""
        return sum(B for _, B in self._kept() or [])

    def _kept(self) -> Optional[List[Tuple[Dict[str, Captured], int]]]:
        """The (captures, samples) of each batch kept; None once nothing is (dropped or disabled)."""
        return None if self._keep is None else self._keep.items

    def add(self, cap: LayerCapture, layers: Sequence[TrackedLayer], B: int) -> None:
        """Keep one batch's captures (the first capture of a batch: one backward per batch)."""
        if self._kept() is None:
            return
        entry = {t.name: (cap.inputs(t.name), cap.grads(t.name), cap.weights(t.name))
                 for t in layers if cap.called(t.name)}
        self._keep.offer((entry, B), sum(_nbytes(x) for parts in entry.values() for x in parts))

    def drop(self) -> None:
        """Let go of every capture: the second pass goes over the data."""
        self._keep, self.complete = None, False

    def finish(self) -> None:
        """The first pass is over: what is kept is every batch."""
        self.complete = self._kept() is not None

    def layer(self, name: str) -> Iterator[Captured]:
        """The captures of layer ``name`` batch by batch, each released once read."""
        for entry, _ in self._kept() or []:
            parts = entry.pop(name, None)
            if parts is not None:
                yield parts
