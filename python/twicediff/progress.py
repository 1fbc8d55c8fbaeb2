"""Progress bars for long work, shown only when the caller asks (``progress=True``)."""
from __future__ import annotations

from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], progress: bool, *, desc: str, total: Optional[int] = None,
                 unit: str = "it") -> Iterable[T]:
    """``iterable`` itself, or wrapped in a tqdm bar when ``progress`` is true."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit)
