"""Loading the compiled extension safely, and what it was built against.

`_build_config.py` is written by CMake when `_C` is compiled. It is read *before* `_C` is imported
so that a mismatch between the build and the running torch is reported as a clear ImportError
rather than as an undefined-symbol or missing-library traceback from the dynamic loader.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Optional

import torch

_REBUILD = (
    "Rebuild twicediff against the torch you run: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` in the source tree "
    "(or `scripts/build_inplace.sh` for a development build), or install the wheel built for "
    "this torch (see docs/building.md, 'Wheels for CUDA targets')."
)


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_compatible(built_torch: str, built_cuda: Optional[str],
                     running_torch: str, running_cuda: Optional[str]) -> None:
    """Raise ImportError when an extension built for (built_torch, built_cuda) cannot run under
    (running_torch, running_cuda). Pure function so that the mismatch message can be tested."""
    if _major_minor(built_torch) != _major_minor(running_torch):
        raise ImportError(
            f"twicediff's compiled extension was built against torch {built_torch}, but torch "
            f"{running_torch} is installed (expected torch {_major_minor(built_torch)}.x). {_REBUILD}")
    if built_cuda is not None and running_cuda is None:
        raise ImportError(
            f"twicediff's compiled extension was built with CUDA {built_cuda} kernels against torch "
            f"{built_torch}, but the installed torch {running_torch} is a CPU-only build (expected a "
            f"CUDA build of torch). Install a CUDA build of torch, or {_REBUILD}")


def _load() -> Any:
    try:
        config = importlib.import_module("twicediff._build_config")
    except ImportError as exc:
        raise ImportError(
            "twicediff's compiled extension (twicediff._C) is missing: this looks like a source "
            f"tree that was never built, or a broken install. {_REBUILD}") from exc
    check_compatible(config.TORCH_VERSION, config.CUDA_VERSION, torch.__version__, torch.version.cuda)
    try:
        module = importlib.import_module("twicediff._C")
    except ImportError as exc:
        raise ImportError(
            f"twicediff._C could not be loaded although it was built for torch {config.TORCH_VERSION} "
            f"(CUDA {config.CUDA_VERSION}) and torch {torch.__version__} (CUDA {torch.version.cuda}) "
            f"is installed: {exc}. {_REBUILD}") from exc
    return config, module


_config, _C = _load()


def build_info() -> Dict[str, Any]:
    """What the native extension was compiled against and what this process can use.

    Keys: ``torch`` (version built against), ``torch_runtime`` (version running), ``cuda`` (CUDA
    version of the build, or None), ``cuda_archs`` (list of ``sm_XY``), ``cuda_kernels`` (CUDA
    kernels compiled in), ``gpu_available`` (a CUDA device is usable now), ``nvcc``, ``sanitize``,
    ``cpu_gemm`` (which library takes the native ops' float32 GEMMs on the CPU: ``"onednn"``, torch's
    bundled oneDNN, or ``"blas"``, ATen's; the environment variable ``TWICEDIFF_CPU_GEMM=blas`` or
    ``torch.backends.mkldnn.enabled = False`` forces the latter; otherwise a timed probe picks one
    per shape class on first use), ``cpu_gemm_refusal`` (oneDNN's message when it refused float32
    GEMMs in this process, as torch 2.14's does on CPUs without bf16 support; then ``cpu_gemm`` is
    ``"blas"``; "" when it never refused), ``probe`` (those choices, see twicediff.torch.engines.probe:
    ``"cpu_gemm: ..."`` the GEMM library, ``"engine: ..."`` the engine ``engine="auto"`` measured
    fastest per shape class, ``"compiled: ..."`` whether the compiled engine replaced it),
    ``cpu_matmul_route`` (the shape classes of torch's own float32 matmuls in the generic engines'
    products timed so far, and how many went to oneDNN: twicediff.torch.matmul_route), ``engine``
    (``TWICEDIFF_ENGINE``: what ``engine="auto"`` stands for, or None) and ``compiled``
    (the products torch.compile compiled in this process, with their compile seconds).
    """
    return {
        "torch": _config.TORCH_VERSION,
        "torch_runtime": torch.__version__,
        "cuda": _config.CUDA_VERSION,
        "cuda_archs": list(_config.CUDA_ARCHS),
        "cuda_kernels": bool(_C.cuda_kernels),
        "gpu_available": bool(_C.cuda_kernels) and torch.cuda.is_available(),
        "nvcc": _config.NVCC_VERSION,
        "sanitize": _config.SANITIZE,
        "cpu_gemm": _C.cpu_gemm(),
        "cpu_gemm_refusal": _C.cpu_gemm_refusal(),
        "probe": _probe_choices(),
        "cpu_matmul_route": _matmul_route_decisions(),
        "engine": os.environ.get("TWICEDIFF_ENGINE") or None,
        "compiled": _compiled_functions(),
    }


def _probe_choices() -> Dict[str, Any]:
    """The choices made by timed probes so far (twicediff.torch.engines.probe)."""
    from .torch.engines import probe

    return probe.choices()


def _matmul_route_decisions() -> Dict[str, Any]:
    """The routing of the generic engines' float32 CPU matmuls so far (twicediff.torch.matmul_route)."""
    from .torch import matmul_route

    return matmul_route.decisions()


def _compiled_functions():
    """The compiled engine's functions so far (twicediff.torch.engines.compiled)."""
    from .torch.engines.compiled import compiled_functions

    return compiled_functions()
