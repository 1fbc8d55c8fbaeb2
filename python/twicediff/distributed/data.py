"""Data spread over ranks: sharded test data, the global order of training points, influence
columns gathered in that order, self-influence and the mean gradient over all ranks."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .group import Group, _dist
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
            n = num_points(x) if isinstance(x, torch.Tensor) else 1
            with data_errors(where, f"training_data batch {i}", x, y):
                acc.add_(model.grad(x, y), alpha=n)
            total += n
        return acc, total

    acc, total = sum_over_ranks(group, where, local)
    if total == 0:
        raise ValueError(f"{where}: training_data yielded no points")
    return acc.div_(total)
