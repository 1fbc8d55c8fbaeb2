"""When compiling pays: how a caller says how many products it expects, and the rule that weighs
them against the compile time.

``engine="auto"`` considers the compiled engine only when the products expected on one model and
batch shape repay compiling them. A caller says how many it expects by
``hvp_function(..., expected_products=n)`` / ``hessian_operator(..., expected_products=n)``, or
around any code by ``with expected_products(n): ...``; twicediff's own callers say it where they
know it: the explicit Hessian of a model the native engine does not take (P products), the
iterative solvers CG and LiSSA (rows × min(maxiter, SOLVER_STEPS), :func:`solver_products`) and
the Lanczos / Arnoldi eigen solvers (the Krylov basis' size). Without a signal nothing is compiled.

The rule (:func:`compile_pays`): with E products expected and s seconds per product on the
fastest eager engine, compiling pays when ``E · s · (1 − 1/EXPECTED_SPEEDUP)`` — the time saved if
compiled products are EXPECTED_SPEEDUP times faster — is at least the compile time expected:
the mean of this process's compile times so far, or ``DEFAULT_COMPILE_SECONDS`` before the first.
Whether the compiled products are then faster is measured, not assumed (engines/auto.py).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

__all__ = ["DEFAULT_COMPILE_SECONDS", "EXPECTED_SPEEDUP", "SOLVER_STEPS", "compile_pays", "compile_seconds_estimate",
           "expected_products", "products_expected", "solver_products"]

#: The speed-up assumed for compiled products when deciding whether to compile.
EXPECTED_SPEEDUP = 2.0
#: The compile time assumed before this process has compiled anything (tracing and generating
#: C++ kernels for a small network's product on two CPU cores takes tens of seconds).
DEFAULT_COMPILE_SECONDS = 60.0

#: The steps an iterative solver (CG, LiSSA) is expected to take where its cap is larger: CG on a
#: regularised Hessian typically stops after tens to a few hundred.
SOLVER_STEPS = 100

_expected: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("twicediff_expected_products",
                                                                          default=None)


def _check(n, where: str) -> Optional[int]:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{where}: expected_products must be None or an int >= 0, got {n!r}")
    return n


@contextlib.contextmanager
def expected_products(n: Optional[int]) -> Iterator[None]:
    """Within the block, product functions made without their own ``expected_products`` expect
    ``n`` products (None: no expectation) on each model and batch shape."""
    token = _expected.set(_check(n, "expected_products"))
    try:
        yield
    finally:
        _expected.reset(token)


def products_expected(explicit: Optional[int], where: str = "hvp_function") -> Optional[int]:
    """The caller's own number when given, else the enclosing :func:`expected_products` block's."""
    explicit = _check(explicit, where)
    return explicit if explicit is not None else _expected.get()


def solver_products(rows: int, maxiter: int) -> int:
    """The products an iterative solver expects on each batch shape: ``rows`` right-hand sides for
    min(``maxiter``, SOLVER_STEPS) steps."""
    return int(rows) * min(int(maxiter), SOLVER_STEPS)


def compile_seconds_estimate() -> float:
    """Seconds one compilation is expected to take (see the module docstring)."""
    from .compiled import compiled_functions

    seen = [f["compile_seconds"] for f in compiled_functions() if f["compile_seconds"] is not None]
    return sum(seen) / len(seen) if seen else DEFAULT_COMPILE_SECONDS


def compile_pays(expected: Optional[int], seconds_per_product: float) -> bool:
    """Whether ``expected`` products at ``seconds_per_product`` (eager) repay a compilation."""
    if not expected or not seconds_per_product > 0:
        return False
    saved = expected * seconds_per_product * (1.0 - 1.0 / EXPECTED_SPEEDUP)
    return saved >= compile_seconds_estimate()
