"""Large CPU blocks reused across the allocations of the generic engines' products.

A vmapped product on the CPU allocates and frees intermediates of many MB again and again; glibc
maps every block above its mmap threshold afresh and the kernel faults in and zeroes its pages on
each call (benchmarks/results/allocator_cpu.md). Inside :func:`reusing_cpu_blocks`, torch's CPU
allocator is the native block cache (csrc/cpu/block_cache.h): blocks of 1 MiB and more freed in
the scope are kept and handed to the next allocation of about their size, in this product or the
next one. At most 1 GiB is held, between products too (not under a memory budget set with
:func:`twicediff.set_memory_budget`: then only within a product); :func:`twicediff.memory.cpu_block_cache_bytes`
says how much and :func:`twicediff.memory.release_cpu_block_cache` frees it.

``TWICEDIFF_CPU_BLOCK_CACHE=0`` in the environment turns the scope into a no-op (read on every
product; values other than ``0`` and ``1`` raise ValueError). Results never depend on it: only where memory comes from changes.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .. import memory
from .._build import _C

__all__ = ["CAP_BYTES", "ENV", "enabled", "reusing_cpu_blocks"]

#: The environment variable that turns the cache off when set to ``0``.
ENV = "TWICEDIFF_CPU_BLOCK_CACHE"
#: The most bytes the cache holds (csrc/cpu/block_cache.h, kCapBytes).
CAP_BYTES = int(_C.block_cache_cap_bytes)


def enabled() -> bool:
    """Whether products reuse CPU blocks: ``TWICEDIFF_CPU_BLOCK_CACHE`` unset, empty or ``1``; ``0``
    turns it off; any other value raises ValueError naming the variable."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be '0' (off) or '1' (on, the default), got {value!r}")
    return value != "0"


@contextlib.contextmanager
def reusing_cpu_blocks(device: torch.device) -> Iterator[None]:
    """Large CPU blocks freed inside are kept for the allocations after them (nested scopes are
    counted; the outermost one puts torch's allocator back). Does nothing for a CUDA ``device``
    (its caching allocator does this already) or when the cache is turned off."""
    if torch.device(device).type != "cpu" or not enabled():
        yield
        return
    _C.block_cache_enter()
    try:
        yield
    finally:
        _C.block_cache_exit()
        if memory._budget is not None:
            # Under a budget the user set, blocks held after a product would sit beside the next
            # computation's own (a native product, say), uncounted: the budget bounds what a
            # computation adds, so nothing is kept past a product. (Without one, the budget is read
            # from the free memory, which already lacks what the cache holds.)
            _C.block_cache_release()
