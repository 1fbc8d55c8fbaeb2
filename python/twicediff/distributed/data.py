"""Data spread over ranks: sharded test data, the global order of training points, influence
columns gathered in that order, self-influence and the mean gradient over all ranks."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import MemoryBudgetError
from ..memory import get_memory_budget
from .group import Group, _dist, current_group
from .collectives import _exchange, _run_local, enter, fingerprint, sum_over_ranks

__all__ = ["Sharded", "gather_columns", "global_indices", "mean_gradient", "self_influences"]


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
    N = size - 1 if size else sum(counts)
    # the gathered parts and the result, on every rank (the same figures on every rank: all raise)
    need = (W * most + N) * T * math.prod(rest) * cols.element_size()
    if need > get_memory_budget(group.device):
        raise MemoryBudgetError(
            f"{where}: gathering the [{T}, {N}{''.join(f', {d}' for d in rest)}] scores of all {W} ranks needs "
            f"{need / 2**20:,.0f} MiB on every rank, over the memory budget of {get_memory_budget(group.device) / 2**20:,.0f} "
            f"MiB; compute each rank's columns inside twicediff.distributed.local_only() and write them with "
            f"twicediff.distributed.save_columns(path, columns, data) (twicediff.distributed.load_columns "
            f"assembles the files), or raise the budget (twicediff.set_memory_budget)")
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
    out = cols.new_full((T, N) + rest, float("nan"))
    for part, ind, c in zip(parts, indices, counts):
        out[:, ind[:c].to(out.device)] = part[:, :c].to(out.device)
    return out


def save_columns(path: str, columns: torch.Tensor, data: Any) -> None:
    """Writes this rank's score columns [T, n, ...] (of its shard ``data``, e.g. from an influence
    function called inside :func:`local_only`) to ``path`` with their global indices, for results too
    large to gather on one rank; :func:`load_columns` assembles the files of all ranks. Under a
    process group this is a collective (every rank calls it, each with its own path): without a
    ``DistributedSampler`` the global order is rank-major, and each rank needs the others' counts."""
    if not isinstance(columns, torch.Tensor) or columns.dim() < 2:
        got = tuple(columns.shape) if isinstance(columns, torch.Tensor) else type(columns).__name__
        raise ValueError(f"save_columns: columns must be a [T, n, ...] tensor, got {got}")
    group = current_group()
    n = int(columns.shape[1])
    idx = global_indices(data, n)
    rank, world, size = 0, 1, None
    if idx is not None:
        size = len(_distributed_sampler(data).dataset)
    if group is not None:
        counts = _exchange(group, "save_columns", None, n, 0 if size is None else 1 + size,
                           key_name="orders of the data (DistributedSampler datasets of different sizes, or one on "
                                    "some ranks only)")
        rank, world = group.rank, group.size
        if idx is None:
            offset = sum(counts[:rank])
            idx = torch.arange(offset, offset + n, dtype=torch.int64)
            size = sum(counts)
    if idx is None:
        idx, size = torch.arange(n, dtype=torch.int64), n
    torch.save({"columns": columns.detach().cpu(), "indices": idx.cpu(), "size": int(size), "rank": rank,
                "world": world}, path)


def load_columns(paths: Sequence[str]) -> torch.Tensor:
    """The [T, N, ...] matrix in the global order from the files :func:`save_columns` wrote (one per
    rank, in any order); an index no file holds gives NaN."""
    parts = [torch.load(p, weights_only=True) for p in paths]
    if not parts:
        raise ValueError("load_columns: paths must name at least one file written by save_columns")
    sizes = {int(p["size"]) for p in parts}
    if len(sizes) != 1:
        raise ValueError(f"load_columns: the files describe data sets of different sizes: {sorted(sizes)}")
    first = parts[0]["columns"]
    out = first.new_full((first.shape[0], sizes.pop()) + tuple(first.shape[2:]), float("nan"))
    for p in parts:
        out[:, p["indices"]] = p["columns"].to(out.dtype)
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
    from ..errors import data_errors
    from ..progress import progress_bar
    from ..torch.batch import check_training_data, num_points
    from ..torch.twice_differentiable import TorchTwiceDifferentiable

    where = "mean_gradient"
    group = enter(where, model)

    def local():
        if not isinstance(model, TorchTwiceDifferentiable):
            raise TypeError(f"{where}: model must be a TorchTwiceDifferentiable, got {type(model).__name__}")
        check_training_data(training_data, where)
        acc = torch.zeros(model.num_params, dtype=model.dtype, device=model.device)
        total = 0
        for i, (x, y) in enumerate(progress_bar(training_data, progress, desc="gradient", unit="batch")):
            with data_errors(where, f"training_data batch {i}", x, y):
                g = model.grad(x, y)
            n = num_points(x)  # x checked by grad
            acc.add_(g, alpha=n)
            total += n
        return acc, total

    acc, total = sum_over_ranks(group, where, local)
    if total == 0:
        raise ValueError(f"{where}: training_data yielded no points")
    return acc.div_(total)
