"""The library-wide memory budget: how many bytes a computation may add to the process at its peak.

Everything that chunks work — ``hessian`` (columns), ``mvp`` / ``hvp`` (directions), the solvers
(right-hand sides) and influence (samples) — sizes its chunks with :func:`chunk_size` against this
budget. A computation that holds memory while it works (a solver's iterates and search blocks or
its Krylov basis, the right-hand sides and results of an influence computation, a float64 copy of
the model for the products) reserves it (:func:`reserved`), so that everything it calls is chunked
against what is left: the budget bounds the peak of the whole computation, not one chunk of it.
When what a computation must hold leaves no room for one item of its work (one direction, one
column), :class:`MemoryBudgetError` (a ``MemoryError``) says how many bytes it needs, how many are
held, and names the setting.

The default is half of the memory that is free on the device when the work starts (CUDA: free
device memory; CPU: ``MemAvailable``). Set a fixed budget with :func:`set_memory_budget` or, for a
block of code, with the :func:`memory_budget` context manager::

    with twicediff.memory_budget(256 * 2**20):   # 256 MiB at the peak
        H = model.hessian(x, y)

The setting is process-wide: a ``memory_budget`` block in one thread applies to work in the
others while it lasts (chunking changes memory and speed, never results).

The CPU kernels of the native HVP op keep their scratch memory (the intermediates of one call, at
most what its chunk of directions was allowed, and at most 1 GiB) between calls, as CUDA's caching
allocator does on the GPU: fresh large blocks from the CPU allocator are faulted in and zeroed page
by page on every call, a large share of a call's time on small MLPs. During a computation it is part
of its products' share of the budget; after it, it stays held for the next one.
:func:`native_scratch_bytes` says how much is held and :func:`release_native_scratch` frees it.
The generic engines' products (torch.func, autograd, loop, compiled) keep the large blocks torch's
operators free in the same way, at most 1 GiB (twicediff.torch.block_cache):
:func:`cpu_block_cache_bytes` and :func:`release_cpu_block_cache`.

Their float32 GEMMs go through torch's bundled oneDNN (``build_info()["cpu_gemm"]``) or, where a
timed probe on first use of a shape class finds it faster, ATen's BLAS (``build_info()["probe"]``,
twicediff.torch.engines.probe). oneDNN keeps
the kernels it generates for each new GEMM shape in two process-wide caches, ideep's
(``LRU_CACHE_CAPACITY``, default 1024 entries) and oneDNN's (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
default 1024). One call of the native op costs a few MB of them the first time its shapes (batch
rows, directions per thread, layer widths) occur, and nothing again while they repeat, as they do
across the passes of a solver. Calls with ever new shapes grow them, up to a few hundred MB
(NOTE: measured in benchmarks/results/native_hvp_model_a.md). Lower the two
capacities (environment variables read when torch starts), or send the GEMMs to ATen's BLAS with
``TWICEDIFF_CPU_GEMM=blas`` (slower float32 GEMMs on most CPUs; benchmarks/results/cpu_gemm.md).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional, Union

import torch

from .errors import MemoryBudgetError

__all__ = ["MemoryBudgetError", "chunk_size", "cpu_block_cache_bytes", "even_step", "free_bytes", "get_memory_budget", "held_bytes",
           "memory_budget", "native_scratch_bytes", "release_cpu_block_cache", "release_native_scratch", "reserved",
           "set_memory_budget"]

_budget: Optional[int] = None
_DEFAULT_FRACTION = 0.5


def _validate(nbytes: Optional[int]) -> Optional[int]:
    if nbytes is None:
        return None
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)):
        raise TypeError(f"memory budget: nbytes must be an int number of bytes or None, got {type(nbytes).__name__}")
    if not nbytes > 0:
        raise ValueError(f"memory budget: nbytes must be > 0 bytes, got {nbytes}")
    return int(nbytes)


def set_memory_budget(nbytes: Optional[int]) -> None:
    """Fix the budget to ``nbytes`` bytes; ``None`` restores the default (half the free
    memory of the device the work runs on)."""
    global _budget
    _budget = _validate(nbytes)


@contextlib.contextmanager
def memory_budget(nbytes: Optional[int]) -> Iterator[None]:
    """Context manager: the budget is ``nbytes`` inside the block, and what it was after it."""
    global _budget
    previous = _budget
    _budget = _validate(nbytes)
    try:
        yield
    finally:
        _budget = previous


def free_bytes(device: Union[torch.device, str, None] = None) -> int:
    """Bytes free on ``device`` now (CUDA: free device memory; CPU: ``MemAvailable``)."""
    return _free_bytes(torch.device(device or "cpu"))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    # Read on every chunked call: raw reads of the file's head take half the time of a text-mode
    # open and line loop (MemAvailable is its third line).
    try:
        fd = os.open("/proc/meminfo", os.O_RDONLY)
        try:
            head = os.read(fd, 1024)
        finally:
            os.close(fd)
        at = head.find(b"MemAvailable:")
        if at >= 0:
            return int(head[at + len(b"MemAvailable:"):head.index(b"kB", at)]) * 1024
    except (OSError, ValueError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


_reserved = threading.local()


@contextlib.contextmanager
def reserved(nbytes: int) -> Iterator[None]:
    """Context manager: work inside the block has ``nbytes`` less budget (in this thread). A solver
    that holds blocks of its own (CG's search blocks, LiSSA's iterates, the right-hand sides of an
    influence computation) reserves them, so that the chunks of the products it calls are sized
    against what is left and the whole computation, not each chunk, stays within the budget."""
    previous = getattr(_reserved, "nbytes", 0)
    _reserved.nbytes = previous + max(int(nbytes), 0)
    try:
        yield
    finally:
        _reserved.nbytes = previous


def held_bytes() -> int:
    """Bytes the enclosing computations of this thread have reserved (:func:`reserved`)."""
    return getattr(_reserved, "nbytes", 0)


def get_memory_budget(device: Union[torch.device, str, None] = None) -> int:
    """The budget in bytes for work on ``device`` (default CPU) now: a fixed budget less what the
    enclosing computations hold (:func:`reserved`; 0 when they hold all of it), else half of the
    device's free memory now (which already excludes what they allocated)."""
    if _budget is not None:
        return max(_budget - held_bytes(), 0)
    return max(int(_DEFAULT_FRACTION * _free_bytes(torch.device(device or "cpu"))), 1)


def chunk_size(total: int, bytes_per_item: int, device: Union[torch.device, str, None] = None, *,
               fixed_bytes: int = 0, most: Optional[int] = None, what: str = "items") -> int:
    """How many of ``total`` items (directions, columns, samples) one chunk may hold when each
    costs ``bytes_per_item`` and the chunk has ``fixed_bytes`` of overhead, and at most ``most``
    (the caller's own cap): the chunks the budget allows, made about equal (:func:`even_step`). At
    least 1 and at most ``total`` (``total`` = 0 gives 0).

    Raises:
        MemoryBudgetError: when not even one item fits, naming the setting to change.
    """
    if total <= 0:
        return 0
    budget = get_memory_budget(device)
    room = budget - int(fixed_bytes)
    n = room // max(int(bytes_per_item), 1)
    if n < 1:
        held = held_bytes() if _budget is not None else 0
        beside = (f" ({held:,} bytes of the {_budget:,} set are held by the computation around it)"
                  if held else "")
        raise MemoryBudgetError(
            f"one chunk of {what} needs about {int(bytes_per_item) + int(fixed_bytes):,} bytes but the "
            f"memory budget is {budget:,} bytes{beside}; raise it with twicediff.set_memory_budget(nbytes) "
            f"(or the twicediff.memory_budget context manager), or reduce the batch size")
    return even_step(total, n if most is None else min(n, int(most)))


def even_step(total: int, most: int) -> int:
    """The chunk length that covers ``total`` items in as few chunks of at most ``most`` as possible,
    all of about one size: 64 in chunks of at most 43 gives 32 (two of 32, not 43 and 21). Equal
    chunks reuse each other's memory (the CPU block cache matches blocks by size) and, compiled,
    each other's code."""
    most = max(1, int(most))
    if total <= most:
        return max(int(total), 1)
    chunks = -(-int(total) // most)
    return -(-int(total) // chunks)


class KeptWhileFits:
    """What a first pass over the data prepares (batches' product functions), kept for later passes
    while together they fit a quarter of the memory budget and leave the budget room for one more
    ``room_after`` bytes (a direction of their products) beside ``beside`` bytes held for the pass.
    The first item that does not fit drops them all: later passes then prepare their data again.

    Attributes:
        items: what is kept, in the order offered; None once dropped.
        nbytes: their bytes (0 once dropped).
    """

    def __init__(self, device: Union[torch.device, str, None] = None, beside: int = 0):
        self.device, self.beside = device, beside
        self.quarter = get_memory_budget(device) // 4
        self.items: Optional[list] = []
        self.nbytes = 0

    def offer(self, item, nbytes: int, room_after: int = 0) -> None:
        """Keep ``item`` of ``nbytes`` bytes if it fits (see the class), else drop everything."""
        if self.items is None:
            return
        total = self.nbytes + nbytes
        if total <= self.quarter and get_memory_budget(self.device) - self.beside - total >= room_after:
            self.items.append(item)
            self.nbytes += nbytes
        else:
            self.items, self.nbytes = None, 0


def native_scratch_bytes() -> int:
    """Bytes of CPU scratch memory the native HVP op keeps between calls (0 when none)."""
    from ._build import _C

    return int(_C.scratch_bytes())


def release_native_scratch() -> None:
    """Free the CPU scratch memory the native HVP op keeps between calls; the next call allocates
    it again."""
    from ._build import _C

    _C.release_scratch()


def cpu_block_cache_bytes() -> int:
    """Bytes of freed CPU blocks the generic engines' products keep for the next ones (0 when none;
    twicediff.torch.block_cache)."""
    from ._build import _C

    return int(_C.block_cache_bytes())


def release_cpu_block_cache() -> None:
    """Free the CPU blocks the generic engines' products keep for the next ones; the next product
    allocates afresh."""
    from ._build import _C

    _C.block_cache_release()
