"""``V ↦ H V`` on one prepared batch: an engine and its batch, with directions taken in chunks
sized by the memory budget."""
from __future__ import annotations

from typing import Callable

import torch

from ...memory import chunk_size
from ...progress import progress_bar
from ..guard import model_call
from .base import Engine, PreparedBatch

__all__ = ["BoundHvp"]


class BoundHvp:
    """``V ↦ H V`` on one batch (:meth:`TorchTwiceDifferentiable.hvp_function`): V [D, P] goes
    through the engine in chunks of directions sized by the memory budget.

    Attributes:
        engine: the engine chosen for the batch (``engine.name`` says which).
        mode: ``"hessian"`` or ``"gauss_newton"``.
        bytes_per_direction: the engine's working memory for one direction.
        max_directions: the most directions in one chunk, whatever the budget.
        nbytes: bytes of batch data the function holds (x and y, or the native engine's prepared rows).
        calls: how many chunks of directions have gone through the engine so far.
    """

    def __init__(self, engine: Engine, batch: PreparedBatch, mode: str, device: torch.device, *,
                 progress: bool = False, check: Callable[[torch.Tensor], torch.Tensor] = lambda V: V,
                 errors: Callable = None):
        self.engine = engine
        self.mode = mode
        self._batch = batch
        self._check = check
        self._errors = errors
        self.bytes_per_direction = int(engine.bytes_per_direction(batch))
        self.max_directions = int(engine.max_directions(batch))
        self.nbytes = batch.nbytes
        self.calls = 0
        self._device = device
        self._progress = progress

    def _compute(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with model_call(self.engine.model, "hvp"):
            if self._errors is None:
                return self.engine.apply(self._batch, V, self.mode)
            with self._errors():
                return self.engine.apply(self._batch, V, self.mode)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        V = self._check(V)
        D = V.shape[0]
        if D == 0:
            return torch.empty_like(V)
        step = chunk_size(D, self.bytes_per_direction, self._device, most=self.max_directions, what="hvp directions")
        if step >= D and not self._progress:  # one chunk: the engine's own result, without a copy
            return self._compute(V)
        out = torch.empty_like(V)
        for start in progress_bar(range(0, D, step), self._progress, desc="hvp", unit="chunk"):
            out[start:start + step] = self._compute(V[start:start + step])
        return out
