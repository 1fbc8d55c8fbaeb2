"""Argument checks shared by the op wrappers and their fake kernels: a clear TypeError or ValueError
naming the op and the argument, before the native kernel sees the call."""
from __future__ import annotations

from typing import List, Sequence

import torch


def tensor_list(op: str, name: str, value) -> List[torch.Tensor]:
    """``value`` as a non-empty list of tensors, or a TypeError / ValueError naming ``name`` (a lone
    tensor is refused: it would silently be iterated over its first dimension)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(value).__name__}")
    for k, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{k}] must be a tensor, got {type(t).__name__}")
    if len(value) == 0:
        raise ValueError(f"{op}: {name} must hold at least one tensor, got an empty list")
    return list(value)


def tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
    return value


def not_tracked(op: str, named: Sequence[tuple]) -> None:
    """The in-place ops write values outside autograd: refuse a destination that is part of a graph
    (its graph would silently go stale), as torch refuses in-place writes into such leaves."""
    if torch.is_grad_enabled():
        for name, t in named:
            if t.requires_grad:
                raise ValueError(f"{op}: {name} requires grad, but {op} writes into it outside autograd; "
                                 f"pass a tensor that does not require grad")


def one_device(op: str, named: Sequence[tuple]) -> None:
    """Fake kernels: every (name, tensor) on the device of the first, else a ValueError naming it."""
    first_name, first = named[0]
    for name, t in named:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"they must be on the same device")


def named(name: str, tensors: Sequence[torch.Tensor]) -> List[tuple]:
    """[(``name[k]``, tensor)] for error messages."""
    return [(f"{name}[{k}]", t) for k, t in enumerate(tensors)]


def block_pairs(op: str, first: str, a, second: str, b) -> None:
    """One device for all blocks, and the two lists of the same length (>= 1)."""
    one_device(op, named(first, a) + named(second, b))
    if len(a) == 0 or len(a) != len(b):
        raise ValueError(f"{op}: {first} and {second} must hold the same number (>= 1) of blocks, "
                         f"got {len(a)} and {len(b)}")
