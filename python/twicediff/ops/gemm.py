"""The GEMM of the native kernels (csrc/cpu/gemm.cpp, csrc/cuda/gemm.cu), exposed for tests and
benchmarks that replay the native engine's GEMMs."""
from __future__ import annotations

import torch

from .. import _build  # noqa: F401  (loads twicediff._C, which registers the ops)
from ._checks import not_tracked, tensor

__all__ = ["gemm_"]

_native = torch.ops.twicediff


def gemm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
    """``out = beta · out + alpha · a @ b`` in place for a [M, K], b [K, N], out [M, N]; returns out.

    One floating dtype and device for all three. ``beta = 0``: out's contents are not read (NaN there
    does not spread). On the CPU, float32 goes through torch's bundled oneDNN where it can,
    everything else through ATen (``twicediff.build_info()["cpu_gemm"]`` says which;
    ``TWICEDIFF_CPU_GEMM=blas`` forces ATen). Values only: out gets no autograd graph.
    """
    for name, t in (("out", out), ("a", a), ("b", b)):
        tensor("gemm_", name, t)
    not_tracked("gemm_", [("out", out)])
    for name, value in (("beta", beta), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"gemm_: {name} must be a number, got {type(value).__name__}")
    with torch.no_grad():
        _native.gemm_(out, a, b, float(beta), float(alpha))
    return out


@torch.library.register_fake("twicediff::gemm_")
def _gemm_fake(out, a, b, beta, alpha):
    return None
