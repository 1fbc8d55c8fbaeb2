"""torch's float32 matmuls inside the generic engines' products, each shape class on the faster of
oneDNN and ATen's BLAS.

A vmapped product on a transformer is GEMM-bound, and ATen sends float32 GEMMs to MKL, which runs
its AVX2 code path on AMD CPUs with AVX-512; torch's bundled oneDNN runs many of the product's
shapes 2-3x faster there at full float32 precision (benchmarks/results/curvlinops_cpu.md). Inside
:func:`routing_matmuls`, the calling thread's ``aten::mm``, ``addmm`` and ``bmm`` on float32 CPU
tensors, and their ``out=`` forms (which compiled code calls), go to whichever of the two was
faster for their shape class (operator, sizes, strides, alpha, beta), timed on the first call of
the class in the process (csrc/cpu/matmul_route.h). The timing costs a few GEMMs per class, at
most 2 s per process (later new classes stay on ATen).

Results differ from ATen's by float32 rounding (another order of summation); everything outside a
scope, and in other threads, gets ATen's own results bit for bit. :func:`decisions` says what was
chosen (``build_info()["cpu_matmul_route"]``).

``TWICEDIFF_MATMUL_ROUTE`` (read at every scope): ``auto`` (or unset) as above; ``onednn`` sends
every float32 matmul in a scope to oneDNN without timing; ``aten`` leaves them all on ATen, as do
``TWICEDIFF_CPU_GEMM=blas``, ``torch.backends.mkldnn.enabled = False`` and a oneDNN that refuses
float32 GEMMs on this CPU (``build_info()["cpu_gemm_refusal"]``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Union

import torch

from .._build import _C

__all__ = ["ENV", "decisions", "forget", "mode", "routing_matmuls", "thread_seconds"]

#: The environment variable that picks the routing: ``auto``, ``onednn`` or ``aten``.
ENV = "TWICEDIFF_MATMUL_ROUTE"
_MODES = ("auto", "onednn", "aten")


def mode() -> str:
    """``TWICEDIFF_MATMUL_ROUTE``: ``"auto"`` when unset or empty; a value other than ``auto``,
    ``onednn`` and ``aten`` raises ValueError naming the variable."""
    value = os.environ.get(ENV, "").strip() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(_MODES)}, got {value!r}")
    return value


@contextlib.contextmanager
def routing_matmuls(tensor: torch.Tensor) -> Iterator[None]:
    """This thread's float32 CPU matmuls routed (see the module) while the scope is open, when
    ``tensor`` (the product's directions) is a float32 CPU tensor; otherwise nothing changes.
    Nested scopes are counted."""
    how = mode()
    if (tensor.device.type != "cpu" or tensor.dtype != torch.float32 or how == "aten"
            or not _C.matmul_route_enter(timed=how == "auto")):
        yield
        return
    try:
        yield
    finally:
        _C.matmul_route_exit()


def decisions() -> Dict[str, Union[int, float]]:
    """``classes``: shape classes timed so far in this process; ``onednn``: how many of them went to
    oneDNN (the rest stay on ATen); ``seconds``: the time spent timing them. Matmuls routed under
    ``TWICEDIFF_MATMUL_ROUTE=onednn`` are not timed, so not counted."""
    return {"classes": int(_C.matmul_route_classes()), "onednn": int(_C.matmul_route_onednn_classes()),
            "seconds": float(_C.matmul_route_seconds())}


def thread_seconds() -> float:
    """Seconds the calling thread has spent timing shape classes (never reset by :func:`forget`): a
    timed probe of the engines leaves them out of the engine's time."""
    return float(_C.matmul_route_thread_seconds())


def forget() -> None:
    """Forget every decision: the next call of each shape class is timed again."""
    _C.matmul_route_forget()
