"""Which process group twicediff uses, and what it does with a wrapped model: the group, its
overrides (use_process_group, local_only), torchrun launches and model unwrapping."""
from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import torch


__all__ = [
    "Group",
    "broadcast_module_",
    "contiguous_shard",
    "launched_by_torchrun",
    "current_group",
    "local_only",
    "unwrap_model",
    "use_process_group",
]

_LOCAL = "local"
_override: contextvars.ContextVar = contextvars.ContextVar("twicediff_process_group", default=None)


@dataclass(frozen=True)
class Group:
    """A process group as twicediff uses it: the group (None for the default one), this process's
    rank and the group's size, and the device its collectives take tensors on (the current CUDA
    device for NCCL, else the CPU)."""

    process_group: Any
    rank: int
    size: int
    device: torch.device


def _dist():
    import torch.distributed as dist

    return dist


def current_group() -> Optional[Group]:
    """The group twicediff computes over: the one set by :func:`use_process_group`, else the
    initialised default process group; None inside :func:`local_only` or without torch.distributed
    initialised."""
    chosen = _override.get()
    if chosen == _LOCAL:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        if chosen is not None:
            raise RuntimeError("twicediff.distributed: a process group was given but torch.distributed is not "
                               "initialised; call torch.distributed.init_process_group first")
        return None
    rank = dist.get_rank(chosen)
    if rank < 0:
        raise ValueError("twicediff.distributed: this process is not a member of the given process_group")
    backend = str(dist.get_backend(chosen)).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    return Group(chosen, rank, dist.get_world_size(chosen), device)


@contextlib.contextmanager
def use_process_group(process_group) -> Iterator[None]:
    """Computes over ``process_group`` (a ``torch.distributed.ProcessGroup``) instead of the default
    one within the block."""
    if process_group is None or isinstance(process_group, (str, bool, int)):
        raise TypeError(f"use_process_group: process_group must be a torch.distributed.ProcessGroup, "
                        f"got {process_group!r}")
    token = _override.set(process_group)
    try:
        yield
    finally:
        _override.reset(token)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within the block each process computes on its own data only, as without torch.distributed
    (no collective is made)."""
    token = _override.set(_LOCAL)
    try:
        yield
    finally:
        _override.reset(token)


@contextlib.contextmanager
def launched_by_torchrun(device_type: str = "cpu") -> Iterator[Optional[Group]]:
    """Within the block, the default process group of a ``torchrun`` launch (WORLD_SIZE > 1 in the
    environment): initialised here when it is not yet (gloo for ``device_type`` "cpu", NCCL with
    this process's LOCAL_RANK GPU for "cuda") and destroyed at the end; the group is yielded, or
    None for a plain one-process run."""
    import os

    dist = _dist()
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        started = True
    try:
        yield current_group()
    finally:
        if started:
            dist.destroy_process_group()


def broadcast_module_(module, group: Optional[Group] = None) -> None:
    """Rank 0's parameters and buffers copied into ``module`` on every rank (what
    DistributedDataParallel does when it wraps a module), in place; nothing without a group."""
    group = current_group() if group is None else group
    if group is None:
        return
    src = _dist().get_global_rank(group.process_group, 0) if group.process_group is not None else 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            work = t.detach().to(group.device).contiguous()
            _dist().broadcast(work, src=src, group=group.process_group)
            t.copy_(work)


def contiguous_shard(n: int, group: Optional[Group]) -> Tuple[int, int]:
    """[start, stop) of this rank's share of n points split into contiguous, nearly equal ranges
    in rank order (the whole range without a group): concatenated they give the points in order."""
    if group is None:
        return 0, n
    return group.rank * n // group.size, (group.rank + 1) * n // group.size


# ---- models ---------------------------------------------------------------------------------------


def unwrap_model(model):
    """The module a wrapper runs: ``model.module`` for a ``DistributedDataParallel`` (or
    ``DataParallel``) model, the original module of a ``torch.compile``-d one (its forward is that
    module's, and the native engine reads only plain modules; under torch.func's transforms the
    compiled forward ran 2.5× slower than the eager one), in any nesting; else the model. A
    TypeError for an FSDP-sharded model (its parameters are shards: P differs from the model's)."""
    from torch import nn

    # torch.compile's wrapper: looked up in sys.modules, as FSDP below, since whoever made one has
    # imported dynamo, and importing it here would cost every other user.
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(compiled, type) and isinstance(model, compiled):
            model = model._orig_mod
        else:
            break
    # A model sharded by FSDP was built with its modules, so they are imported by then: looking in
    # sys.modules keeps the (heavy) FSDP and DTensor imports out of every other user's path.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_types = tuple(t for t in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None))
                       if isinstance(t, type))
    sharded = bool(fsdp_types) and isinstance(model, fsdp_types)
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if not sharded and isinstance(dtensor, type) and isinstance(model, nn.Module):
        sharded = any(isinstance(p, dtensor) for p in model.parameters())
    if sharded:
        raise TypeError(f"TorchTwiceDifferentiable: model {type(model).__name__} is sharded with FSDP (its parameters "
                        "are shards or DTensors), which twicediff does not support; pass the unsharded module "
                        "(e.g. wrap it in DistributedDataParallel instead, or gather the full parameters with "
                        "FSDP's full state dict into a plain copy of the model)")
    return model
