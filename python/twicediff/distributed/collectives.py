"""The collectives of a distributed call: the agreement check before any data is touched, the
status exchange around every local pass (failures raise on every rank), and sums over ranks."""
from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import DistributedError
from .group import Group, _dist, current_group, local_only

__all__ = ["check_agreement", "enter", "guarded", "mean_over_ranks", "same_on_every_rank", "sum_over_ranks"]


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


def all_reduce_sum_(group: Group, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place, with no status exchange: only for a collective that
    directly follows a successful :func:`sum_over_ranks` (every rank is then known to reach it)."""
    return _all_reduce_(t, group)


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
