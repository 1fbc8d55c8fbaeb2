"""Progress bars for long work, shown only when the caller asks (``progress=True``).

A bar's total is the work that will really be done: a loop that may stop early (an iterative
solver that stops when it converges) shows a count without a total (``count_only=True``) rather
than a bar that ends at a few percent of ``maxiter``. A bar opened while another twicediff bar is
open (a solver's bar inside an influence function's bar over batches) is cleared when it closes,
so that nested bars do not pile up or garble the outer one; loops that break early close their bar.
"""
from __future__ import annotations

from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], progress: bool, *, desc: str, total: Optional[int] = None,
                 unit: str = "it", count_only: bool = False) -> Iterable[T]:
    """``iterable`` itself, or wrapped in a tqdm bar when ``progress`` is true (see the module
    docstring for ``count_only`` and nesting). Close the bar (``bar.close()``) when leaving the
    loop early."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    nested = any(not getattr(bar, "disable", False) for bar in list(getattr(tqdm, "_instances", ())))
    if count_only:
        iterable, total = iter(iterable), None  # no len(): tqdm then counts without a total
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=not nested)


def close_bar(bar) -> None:
    """Close ``bar`` when it is a progress bar (a plain iterable when progress is off)."""
    close = getattr(bar, "close", None)
    if close is not None:
        close()
