"""Checking what callers pass: batches (x, y), vectors in parameter space and training loaders.

Every check takes primitives (the expected dtype, device and P) rather than a model object, so that
any module can use it without importing the model wrapper. Each raises a TypeError or ValueError
that names the function (``where``), the argument, what was expected and what was given.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = ["check_training_data", "check_vectors", "num_points", "squeezed_loss", "to_device"]


def squeezed_loss(loss: Callable, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pyDVL 0.7's convention for the loss of a batch: ``loss(squeeze(output), squeeze(y))``."""
    return loss(torch.squeeze(output), torch.squeeze(y))


def num_points(x: torch.Tensor) -> int:
    """The number of points in a batch: x's leading size (1 for a 0-d x)."""
    return int(x.shape[0]) if x.dim() > 0 else 1


def to_device(x, y, dtype: torch.dtype, device: torch.device, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) on ``device`` after checking that both are tensors with the same number of points and
    that a floating x has the parameters' ``dtype``; integer labels of another width become int64."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    # A batch of several points needs as many targets; a single point, x [1, D] or [D], takes a
    # y of any shape (y [K] for a K-dimensional target), as pyDVL 0.7.1 does: the loss then
    # compares squeeze(model(x)) with squeeze(y).
    if x.dim() > 1 and x.shape[0] > 1 and y.dim() > 0 and x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: x and y must hold the same number of points (first dimension), got "
                         f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}")
    if x.is_floating_point() and x.dtype != dtype:
        raise TypeError(f"{where}: x has dtype {x.dtype} but the model's parameters are {dtype}; "
                        f"convert one of them (x.to({dtype}) or model.to(...))")
    if not (y.is_floating_point() or y.is_complex()) and y.dtype not in (torch.int64, torch.bool):
        # Class labels stored as int32 / int16 / uint8 (numpy's default on some platforms, compact
        # datasets): torch's losses take int64 class indices only.
        y = y.long()
    return x.to(device), y.to(device)


def check_vectors(v, P: int, dtype: torch.dtype, device: torch.device, where: str, name: str = "v",
                  rows: str = "D", dims: Tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """``v`` as [P] or [rows, P] vectors in parameter space (``dims`` says which of the two are
    allowed), on ``device``; a TypeError or ValueError naming ``where`` and ``name`` otherwise."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() not in dims or v.shape[-1] != P:
        form = " or ".join({1: "[P]", 2: f"[{rows}, P]"}[d] for d in sorted(dims, reverse=True))
        raise ValueError(f"{where}: {name} must be {form} with P = {P} (the model's number of "
                         f"trainable parameters), got shape {tuple(v.shape)}")
    if v.dtype != dtype:
        raise TypeError(f"{where}: {name} has dtype {v.dtype} but the model's parameters are {dtype}")
    return v.to(device)


def check_training_data(training_data, where: str) -> Optional[int]:
    """TypeError / ValueError for a loader that is None, not iterable, or has length 0; its number
    of batches where it has a length, else None. With a process group, raised on every rank when
    it holds on one (:func:`twicediff.distributed.guarded`)."""
    from .. import distributed

    return distributed.guarded(distributed.current_group(), where,
                                lambda: _check_training_data(training_data, where))


def _check_training_data(training_data, where: str) -> Optional[int]:
    if training_data is None or not hasattr(training_data, "__iter__"):
        raise TypeError(f"{where}: training_data must be an iterable of (x, y) batches (e.g. a DataLoader), "
                        f"got {type(training_data).__name__}")
    try:
        n = len(training_data)
    except TypeError:
        return None
    if n == 0:
        raise ValueError(f"{where}: training_data must not be empty (a loader of (x, y) batches), got 0 batches")
    return n
