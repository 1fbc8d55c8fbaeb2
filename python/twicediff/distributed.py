r"""Data-parallel twicediff on torch.distributed: the DDP convention.

The contract. The user starts N processes (``torchrun`` or their training launcher), initialises the
default process group (gloo on CPUs, NCCL on GPUs) and gives each rank an iterable of (x, y) batches
over its own shard of the training data (e.g. a DataLoader with a ``DistributedSampler``). Every
rank then makes the same twicediff calls with the same arguments except the training data, and
every quantity defined over the training data becomes a global one:

- the Hessian of the mean loss (:meth:`TorchTwiceDifferentiable.mean_hessian`, Direct) and the mean
  gradient (:func:`mean_gradient`): each rank sums n_b times its batch means and counts its points;
  sums and counts are all-reduced, so the mean is over all ranks' points, as one process would
  compute it over the concatenated shards;
- every product of the Hessian operator with a [D, P] block (CG, Arnoldi/Lanczos, the
  preconditioners): one pass over the local shard and one all-reduce of the [D, P] sums. Every rank
  holds the same iterates, so it ends with the same solution and the same ``info``;
- LiSSA: a step is one batch from every rank, weighted by batch size: the Hessian of a step is that
  of the global batch formed by the ranks' current batches (the batch DDP training would take), so
  N ranks with batches of B points take steps of N·B points and the same number of steps. The
  alternatives were worse: steps on each rank's own batch would leave the ranks with different
  iterates (no common solution), and splitting one process's batch across ranks would need the
  ranks to read each other's data. Equal to one process whose step t takes the concatenation of
  the ranks' batches t;
- influence: the right-hand sides (test gradients) are computed on every rank from a test loader that
  is the same on every rank, and checked to be the same (rank 0's are used, bit for bit); the
  training-side scores are computed on each rank's shard and gathered into one [N_test, N_train]
  matrix on every rank, in the global order of the training data (see :func:`global_indices`);
  without test data (:class:`Sharded`) and for self-influence, the ranks' gradient rows are gathered
  first and solved for together.

The group is the initialised default process group, another one given by
:func:`use_process_group`, or none inside :func:`local_only` (each rank then computes on its own
data, as without torch.distributed). A model wrapped in ``DistributedDataParallel`` is used through
its ``.module``: twicediff differentiates with ``torch.autograd.grad``, which accumulates no
``.grad``, so none of DDP's gradient hooks fire. FSDP-sharded models are refused (TypeError).

Agreement and failures. Each distributed entry first gathers a small description from every rank
(P, dtype, device type, a fingerprint of the parameter values, the method and its options, the
shape of the right-hand sides) and raises a
ValueError on every rank naming what differs and on which ranks, before any data is touched. Every
collective that follows is preceded by a status exchange (one all-reduce of a few integers per rank:
failed or not, point count, block size, a fingerprint of the block) made in a ``try`` around the local
pass: when the model, loss or data raises on some rank, every rank raises :class:`DistributedError`
naming the failing ranks and their messages, instead of waiting in a collective; a local pass
makes no collective of its own (nested calls run as in :func:`local_only`). What this cannot
cover is a rank that dies or raises outside twicediff between two collectives; the process group's
own timeout (``init_process_group(timeout=...)``) is the last resort there.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .errors import DistributedError

__all__ = [
    "DistributedError",
    "Group",
    "Sharded",
    "broadcast_module_",
    "contiguous_shard",
    "launched_by_torchrun",
    "check_agreement",
    "current_group",
    "enter",
    "gather_columns",
    "global_indices",
    "guarded",
    "local_only",
    "mean_gradient",
    "mean_over_ranks",
    "same_on_every_rank",
    "self_influences",
    "sum_over_ranks",
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
    """``model.module`` for a ``DistributedDataParallel`` (or ``DataParallel``) model, else the model;
    a TypeError for an FSDP-sharded model (its parameters are shards: P differs from the model's)."""
    from torch import nn

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
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


# ---- agreement --------------------------------------------------------------------------------------


def _describe(value: Any) -> Any:
    """A small, comparable description of an argument: tensors by shape and dtype, numbers and
    strings by value."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return tuple(sorted((str(k), _describe(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if hasattr(value, "num_params") and hasattr(value, "dtype"):  # a TorchTwiceDifferentiable
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 200 else f"{type(value).__name__} object"


def describe_model(model: Any) -> Dict[str, Any]:
    """P, dtype, device type and a fingerprint of the parameter values of a TorchTwiceDifferentiable
    (its type name otherwise): every rank must hold the same model, as DistributedDataParallel
    keeps it."""
    try:
        with torch.no_grad():  # per parameter, so that no float64 copy of all parameters is made
            sums = torch.stack([torch.stack([p.sum(dtype=torch.float64), p.abs().sum(dtype=torch.float64)])
                                for p in model.parameters]).cpu()
        values = hash(tuple(sums.flatten().tolist())) & ((1 << 62) - 1)
        return {"P (number of trainable parameters)": int(model.num_params), "dtype": str(model.dtype),
                "device type": torch.device(model.device).type, "parameter values (fingerprint)": values}
    except Exception:  # not a model: each rank's own argument check will name it
        return {"model type": type(model).__name__}


def check_agreement(group: Optional[Group], where: str, description: Dict[str, Any]) -> None:
    """A ValueError on every rank, naming each item of ``description`` on which the ranks differ and
    which ranks hold which value; nothing when they agree (or without a group). One collective
    (``all_gather_object`` of the description)."""
    if group is None:
        return
    mine = {str(k): _describe(v) for k, v in description.items()}
    gathered: List[Any] = [None] * group.size
    _dist().all_gather_object(gathered, mine, group=group.process_group)
    keys = list(mine) + [k for g in gathered for k in g if k not in mine]
    problems = []
    for key in dict.fromkeys(keys):
        values = [g.get(key, "<not given>") for g in gathered]
        if len(set(map(repr, values))) > 1:
            by_value: Dict[str, List[int]] = {}
            for r, v in enumerate(values):
                by_value.setdefault(repr(v), []).append(r)
            problems.append(f"{key}: " + "; ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} "
                                                   f"{', '.join(map(str, rs))}" for v, rs in by_value.items()))
    if problems:
        raise ValueError(f"{where}: the ranks of the process group disagree (every rank must make the same call "
                         f"with the same model and options): " + " | ".join(problems))


def enter(where: str, model: Any = None, **description: Any) -> Optional[Group]:
    """The group of a distributed entry point, after :func:`check_agreement` on the model's P,
    dtype and device type and on ``description``; None without a group (then nothing is done)."""
    group = current_group()
    if group is not None:
        full = {**(describe_model(model) if model is not None else {}), "call": where, **description}
        check_agreement(group, where, full)
    return group


# ---- status exchange ------------------------------------------------------------------------------------


def fingerprint(t: Optional[torch.Tensor]) -> int:
    """A 62-bit digest of a tensor's shape and values (two float64 sums), equal on two ranks that
    hold the same tensor bit for bit and different, but for a negligible chance, when they differ."""
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    d = t.detach().to(torch.float64)
    weights = torch.arange(1, d.shape[-1] + 1, dtype=torch.float64, device=d.device) if d.dim() else None
    s1 = float(d.sum())
    s2 = float((d * weights).sum()) if weights is not None else s1
    return hash((tuple(t.shape), s1, s2)) & ((1 << 62) - 1)


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _exchange(group: Group, where: str, error: Optional[BaseException], count: int = 0, key: int = 0,
              digest: int = 0, key_name: str = "block sizes") -> List[int]:
    """One all-reduce of [failed, count, key, digest] per rank. Raises DistributedError on every rank
    when some rank failed (naming it and its message: one more gather, on this path only) or when
    the ranks' keys (block sizes) or digests (block fingerprints) differ. Returns the ranks' counts."""
    W, r = group.size, group.rank
    status = torch.zeros(4 * W, dtype=torch.int64, device=group.device)
    status[r] = 1 if error is not None else 0
    status[W + r] = int(count)
    status[2 * W + r] = int(key)
    status[3 * W + r] = int(digest)
    _dist().all_reduce(status, group=group.process_group)
    status = status.cpu().tolist()
    failed = [i for i in range(W) if status[i]]
    if failed:
        messages: List[Any] = [None] * W
        _dist().all_gather_object(messages, _message(error) if error is not None else None,
                                  group=group.process_group)
        failures = {i: messages[i] for i in failed}
        text = "; ".join(f"rank {i}: {m}" for i, m in failures.items()) if len(failed) > 1 else failures[failed[0]]
        raise DistributedError(f"{where}: failed on rank{'s' if len(failed) > 1 else ''} "
                               f"{', '.join(map(str, failed))} of {W}: {text}", failures) from error
    for name, first in ((key_name, 2 * W), ("blocks", 3 * W)):
        values = status[first:first + W]
        if len(set(values)) > 1:
            odd = [i for i in range(W) if values[i] != values[0]]
            raise DistributedError(
                f"{where}: the ranks' {name} differ (rank 0 against rank{'s' if len(odd) > 1 else ''} "
                f"{', '.join(map(str, odd))}): every rank must apply the same operation to the same vectors; "
                f"the ranks' iterates diverged or their inputs differ (the same right-hand sides, options and "
                f"seeds on every rank; a solver whose start is random per process, such as ARPACK, diverges)")
    return status[W:2 * W]


def _run_local(local: Callable[[], Any]) -> Any:
    """``local()`` with no process group: a rank's local pass makes no collective (another rank may
    have failed before reaching it), so nested twicediff calls inside it compute locally."""
    with local_only():
        return local()


def guarded(group: Optional[Group], where: str, local: Callable[[], Any]) -> Any:
    """``local()``; with a group, run in a ``try`` and followed by a status exchange, so that a
    failure on any rank raises DistributedError on every rank."""
    if group is None:
        return local()
    try:
        result, error = _run_local(local), None
    except Exception as exc:  # reported to every rank by the exchange
        result, error = None, exc
    _exchange(group, where, error)
    return result


def _all_reduce_(t: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of ``t`` over the ranks, in place where ``t`` is contiguous on the group's device."""
    work = t if (t.device == group.device and t.is_contiguous()) else t.to(group.device).contiguous()
    _dist().all_reduce(work, group=group.process_group)
    if work is not t:
        t.copy_(work)
    return t


def sum_over_ranks(group: Optional[Group], where: str, local: Callable[[], Tuple[torch.Tensor, int]], *,
                   key: int = 0, check: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """``(sums, count)`` from ``local()`` summed over the ranks: a status exchange (which also checks
    that every rank has the same ``key`` and the same ``check`` tensor, bit for bit) and one
    all-reduce of the sums, in their dtype. Without a group, ``local()``."""
    if group is None:
        return local()
    try:
        (sums, count), error = _run_local(local), None
    except Exception as exc:
        sums, count, error = None, 0, exc
    counts = _exchange(group, where, error, count, key, fingerprint(check))
    return _all_reduce_(sums, group), sum(counts)


def mean_over_ranks(group: Optional[Group], where: str, local: Callable[[], Tuple[torch.Tensor, int]], *,
                    check: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean over all ranks' points of ``local()`` = (the mean over this rank's n points, n):
    Σ_r n_r·mean_r / Σ_r n_r; without a group, the local mean unchanged."""
    if group is None:
        return local()[0]

    def sums():
        mean, n = local()
        return mean * n, n

    total, n = sum_over_ranks(group, where, sums, key=0, check=check)
    if n == 0:
        raise ValueError(f"{where}: no rank yielded a point")
    return total.div_(n)


def same_on_every_rank(group: Optional[Group], where: str, name: str, t: torch.Tensor, *,
                       rtol: float = 1e-6) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (broadcast), after checking that each rank's own ``t`` is within
    ``rtol`` of it (relative to its largest entry): the right-hand sides computed from the same test
    data agree up to rounding, and from here on every rank holds the same bits. Without a group, t."""
    if group is None or not isinstance(t, torch.Tensor):
        return t
    work = t.detach().to(group.device).clone().contiguous()
    _dist().broadcast(work, src=_dist().get_global_rank(group.process_group, 0)
                      if group.process_group is not None else 0, group=group.process_group)

    def compare():
        ref = work.to(t.device)
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((t.detach() - ref).abs().max()) if ref.numel() else 0.0
        if not diff <= rtol * max(scale, torch.finfo(torch.float64).tiny):
            raise ValueError(f"{where}: {name} differs from rank 0's (largest difference {diff:.3g} against "
                             f"largest entry {scale:.3g}); every rank must pass the same {name} (e.g. the same test "
                             f"data on every rank)")

    guarded(group, where, compare)
    return work.to(t.device)


# ---- influence: global order -------------------------------------------------------------------------


class Sharded:
    """Marks test data as sharded over the ranks like the training data (each rank holds part of the
    test points): :func:`twicediff.compute_influence_factors` then gathers the test gradients of all
    ranks, in the global order (:func:`global_indices`), instead of requiring the same test data on
    every rank. ``compute_influences`` without ``test_data`` uses the training data this way."""

    def __init__(self, data: Any):
        self.data = data

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def _distributed_sampler(data: Any):
    """The DistributedSampler a DataLoader draws from, or None."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(data, DataLoader):
        return None
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def global_indices(data: Any, count: int) -> Optional[torch.Tensor]:
    """The global indices of the ``count`` points a rank's loader yields, when it is a DataLoader
    over a ``DistributedSampler`` (the sampler's indices, in its order: positions in the dataset);
    None otherwise, and the global order is then rank 0's points, then rank 1's, ...: the order of
    the concatenated shards."""
    sampler = _distributed_sampler(data)
    if sampler is None:
        return None
    indices = torch.as_tensor(list(iter(sampler)), dtype=torch.int64)
    if indices.numel() < count:
        raise ValueError(f"the DistributedSampler of the training data gives {indices.numel()} indices but the "
                         f"loader yielded {count} points")
    return indices[:count]


def gather_columns(group: Optional[Group], where: str, local: Callable[[], torch.Tensor], data: Any, *,
                   check: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The [T, N, ...] matrix of all ranks' columns in the global order, on every rank, from each
    rank's ``local()`` [T, n_r, ...] over its shard ``data``.

    Columns go to their global index (:func:`global_indices`; rank-major order otherwise); N is the
    size of the sampler's dataset (the sum of the ranks' counts otherwise); an index no rank holds
    (a ``DistributedSampler`` with ``drop_last``) gives a column of NaN; an index two ranks hold
    (the sampler's padding) gets one of the equal values. ``check`` (the influence factors) must be
    the same on every rank.
    """
    if group is None:
        return local()
    try:
        cols, error = _run_local(local), None
        n = int(cols.shape[1])
        idx = global_indices(data, n)
        # 0 for rank-major order, else 1 + the dataset's size: the same on every rank (checked)
        size = 0 if idx is None else 1 + len(_distributed_sampler(data).dataset)
    except Exception as exc:
        cols, n, idx, size, error = None, 0, None, 0, exc
    counts = _exchange(group, where, error, n, size, fingerprint(check),
                       key_name="orders of the data (DistributedSampler datasets of different sizes, or one on some "
                                "ranks only)")
    W = group.size
    most = max(counts)
    T, rest = cols.shape[0], tuple(cols.shape[2:])
    padded = cols.new_zeros((T, most) + rest, device=group.device)
    padded[:, :n] = cols.to(group.device)
    if idx is None:
        offset = sum(counts[:group.rank])
        idx = torch.arange(offset, offset + n, dtype=torch.int64)
    index = torch.full((most,), -1, dtype=torch.int64, device=group.device)
    index[:n] = idx.to(group.device)
    parts = [torch.empty_like(padded) for _ in range(W)]
    indices = [torch.empty_like(index) for _ in range(W)]
    _dist().all_gather(parts, padded.contiguous(), group=group.process_group)
    _dist().all_gather(indices, index, group=group.process_group)
    N = size - 1 if size else sum(counts)
    out = cols.new_full((T, N) + rest, float("nan"))
    for part, ind, c in zip(parts, indices, counts):
        out[:, ind[:c].to(out.device)] = part[:, :c].to(out.device)
    return out


def self_influences(group: Group, model, training_data, gradient_matrix: Callable[[], torch.Tensor],
                    solve: Callable[[torch.Tensor], torch.Tensor], rows: int) -> torch.Tensor:
    r"""Self-influence ``g_i · (H + λI)⁻¹ g_i`` of every rank's training points, [N] in the global
    order on every rank: the ranks' gradient rows ``gradient_matrix()`` [n_r, P] are gathered
    ([N, P] on every rank), then solved for in blocks of at most ``rows`` rows (the smallest of
    the ranks' values) by ``solve`` (a distributed solve: every rank takes the same block)."""
    where = "compute_self_influences"
    G = gather_columns(group, where, lambda: gradient_matrix().unsqueeze(0), training_data)[0]
    most = torch.tensor([int(rows)], dtype=torch.int64, device=group.device)
    _dist().all_reduce(most, op=_dist().ReduceOp.MIN, group=group.process_group)
    rows = max(1, int(most))
    out = torch.full((G.shape[0],), float("nan"), dtype=G.dtype, device=G.device)
    seen = torch.nonzero(~torch.isnan(G).any(dim=1)).flatten()  # an index no rank holds stays NaN
    for start in range(0, seen.numel(), rows):
        idx = seen[start:start + rows]
        g = G[idx]
        out[idx] = torch.einsum("ip,ip->i", g, solve(g).to(g.dtype))
    return out


# ---- the mean gradient ------------------------------------------------------------------------------------


def mean_gradient(model, training_data, *, progress: bool = False) -> torch.Tensor:
    r"""The gradient of the mean loss over ``training_data`` (over all ranks' shards with a group),
    \(\sum_b (n_b / N) \nabla_\theta L(x_b, y_b)\), [P] in the model's dtype."""
    from .errors import data_errors
    from .progress import progress_bar
    from .torch.batch import check_training_data, num_points
    from .torch.twice_differentiable import TorchTwiceDifferentiable

    where = "mean_gradient"
    group = enter(where, model)

    def local():
        if not isinstance(model, TorchTwiceDifferentiable):
            raise TypeError(f"{where}: model must be a TorchTwiceDifferentiable, got {type(model).__name__}")
        check_training_data(training_data, where)
        acc = torch.zeros(model.num_params, dtype=model.dtype, device=model.device)
        total = 0
        for i, (x, y) in enumerate(progress_bar(training_data, progress, desc="gradient", unit="batch")):
            n = num_points(x) if isinstance(x, torch.Tensor) else 1
            with data_errors(where, f"training_data batch {i}", x, y):
                acc.add_(model.grad(x, y), alpha=n)
            total += n
        return acc, total

    acc, total = sum_over_ranks(group, where, local)
    if total == 0:
        raise ValueError(f"{where}: training_data yielded no points")
    return acc.div_(total)

