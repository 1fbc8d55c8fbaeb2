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
- K-FAC / EK-FAC factors: each rank accumulates its shard's covariances (and, on the second pass,
  EK-FAC's eigenvalue corrections); the sums and counts are all-reduced, and every rank computes
  the same eigendecompositions from the same bits. Their influence and self-influence scores are
  streamed on each rank's shard and gathered like the other methods' (no gradient rows are
  gathered). The true Fisher's sampled labels are drawn per rank from the same seed, so they are
  reproducible for a given set of shards but not those of one process.

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
from ..errors import DistributedError
from .collectives import all_reduce_sum_, check_agreement, enter, guarded, mean_over_ranks, same_on_every_rank, sum_over_ranks
from .data import Sharded, gather_columns, global_indices, load_columns, mean_gradient, save_columns, self_influences
from .group import (
    Group,
    broadcast_module_,
    contiguous_shard,
    current_group,
    launched_by_torchrun,
    local_only,
    unwrap_model,
    use_process_group,
)

__all__ = [
    "all_reduce_sum_",
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
    "load_columns",
    "local_only",
    "mean_gradient",
    "mean_over_ranks",
    "same_on_every_rank",
    "save_columns",
    "self_influences",
    "sum_over_ranks",
    "unwrap_model",
    "use_process_group",
]
