"""What an engine is: "apply one batch's curvature to [D, P] directions".

An engine is made for one model and loss. It prepares a batch once (:meth:`Engine.prepare` → a
:class:`PreparedBatch`), then applies the batch's Hessian (or Gauss-Newton matrix) to blocks of
directions as often as asked (:meth:`Engine.apply`), and says how much working memory one direction
costs so that callers can size chunks of directions against the memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .. import block_cache
from ..batch import input_tensors, num_points

__all__ = ["CACHED_GENERIC_CHUNK_BYTES", "GENERIC_CHUNK_BYTES", "MAX_DIRECTIONS_PER_CHUNK", "MIN_GENERIC_DIRECTIONS", "MODES", "Engine",
           "PreparedBatch", "generic_directions_per_chunk"]

#: The curvature an engine applies: the exact Hessian, or the generalized Gauss-Newton matrix JᵀH_ℓJ.
MODES = ("hessian", "gauss_newton")

# Directions per chunk above which bigger chunks stop paying off (GEMMs are already large) while
# memory keeps growing; the memory budget may make chunks smaller still.
MAX_DIRECTIONS_PER_CHUNK = 128
# The generic engines (torch.func, autograd) pay a fixed cost per call (torch.func's layers, the
# primal passes), so fewer, larger chunks are faster - while their large intermediates are reused.
# With the CPU block cache (twicediff.torch.block_cache, on by default) they are, up to its cap,
# and chunks are kept near that size. Without it glibc maps them afresh, page by page, on every
# call, and chunks past a few hundred MiB slow down (NOTE: measured in
# benchmarks/results/allocator_cpu.md and func_chunks_cpu.md): they are kept near the smaller size.
CACHED_GENERIC_CHUNK_BYTES = block_cache.CAP_BYTES
GENERIC_CHUNK_BYTES = 256 * 2**20
# ... but hold at least this many directions (the budget permitting): every chunk recomputes the
# primal forward and backward pass, which on a large model costs as much as a direction's tangents
# (NOTE: benchmarks/results/mvp_cpu_preset_c.md).
MIN_GENERIC_DIRECTIONS = 16


def generic_directions_per_chunk(bytes_per_direction: int) -> int:
    """The most directions one chunk of a generic engine takes (before the memory budget): about
    ``CACHED_GENERIC_CHUNK_BYTES`` of working memory (``GENERIC_CHUNK_BYTES`` with the block cache
    off), within [MIN_GENERIC_DIRECTIONS, MAX_DIRECTIONS_PER_CHUNK]."""
    fit = (CACHED_GENERIC_CHUNK_BYTES if block_cache.enabled() else GENERIC_CHUNK_BYTES) // max(int(bytes_per_direction), 1)
    return max(MIN_GENERIC_DIRECTIONS, min(MAX_DIRECTIONS_PER_CHUNK, fit))


@dataclass(frozen=True)
class PreparedBatch:
    """A batch as an engine keeps it between products.

    Attributes:
        inputs: what the engine feeds its model: x itself for the generic engines (a tensor, tuple,
            list or dict, :mod:`twicediff.torch.batch`); for the native engine the [N, in] rows
            entering the first trainable Linear (the frozen prefix applied).
        target: y, in the form the engine's loss takes.
    """
    inputs: Any
    target: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes the batch holds (every tensor of ``inputs``, and ``target``)."""
        tensors = [t for _, t in input_tensors(self.inputs)] + [self.target]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def rows(self) -> int:
        """Points of ``inputs``: its rows (1 for a 0-d tensor), or the batch size of a tuple or dict."""
        return num_points(self.inputs)


class Engine(Protocol):
    """Batched curvature-vector products of one model and loss.

    Attributes:
        name: ``"native"``, ``"func"`` or ``"autograd"``.
    """

    name: str

    def prepare(self, x: Any, y: torch.Tensor) -> PreparedBatch:
        """The batch in the engine's form, computed once for many products. Raises
        :class:`~twicediff.errors.NotNativeError` where the native engine cannot take it."""

    def bytes_per_direction(self, batch: PreparedBatch) -> int:
        """Working memory one direction costs on ``batch``."""

    def max_directions(self, batch: PreparedBatch) -> int:
        """The most directions one :meth:`apply` call should take, whatever the memory budget."""

    def apply(self, batch: PreparedBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        """V [D, P] → [D, P]: rows H V_d (``mode="hessian"``) or JᵀH_ℓJ V_d (``"gauss_newton"``) of
        the batch's loss, detached."""
