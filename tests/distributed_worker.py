"""One rank of the distributed tests (tests/test_distributed.py starts N of these with a free port).

    python distributed_worker.py SCENARIO RANK WORLD PORT OUT_DIR

``compute``: every distributed quantity on this rank's shard (contiguous ranges of one
generated data set, uneven when the sizes say so), in float64 and float32, saved to
OUT_DIR/rank{RANK}.pt (in float64 also on dict batches, ``dict_results``); the test computes the
same with one process on the concatenated data.
``compute+failures`` adds a sequence of calls that must fail on every rank (a rank raising, ranks
disagreeing), each caught and its message saved; the process group stays usable after each.
The data, model and calls are defined here once and used by the test for its reference.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
import traceback

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import twicediff
from twicediff import InversionMethod, TorchTwiceDifferentiable, distributed as tdist

N_TRAIN, N_TEST, FEATURES, CLASSES, BATCH = 23, 4, 3, 3, 4
LAMBDA = 1.0


def shard_bounds(world: int):
    """Contiguous shards: even-ish for 2 ranks, uneven (5, 10, 8 points) for 3."""
    sizes = {1: [N_TRAIN], 2: [12, 11], 3: [5, 10, 8]}[world]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def dtypes(world: int):
    """float64 and float32 with 2 ranks; float64 with 3 (the uneven shards are about counting)."""
    return (torch.float64, torch.float32) if world == 2 else (torch.float64,)


def make_model(dtype: torch.dtype, hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).to(dtype).eval()


def make_data(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN, FEATURES, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    xt = torch.randn(N_TEST, FEATURES, generator=g, dtype=torch.float64).to(dtype)
    yt = torch.randint(0, CLASSES, (N_TEST,), generator=g)
    return x, y, xt, yt


def batches(x, y, start: int, stop: int):
    return [(x[i:min(i + BATCH, stop)], y[i:min(i + BATCH, stop)]) for i in range(start, stop, BATCH)]


def lissa_reference_batches(x, y, world: int):
    """The batches one process must see for LiSSA to take the steps of ``world`` ranks: step t
    concatenates batch t of every rank's (cycled) shard."""
    per_rank = [batches(x, y, a, b) for a, b in shard_bounds(world)]
    steps = math.lcm(*[len(p) for p in per_rank])
    return [(torch.cat([p[t % len(p)][0] for p in per_rank]), torch.cat([p[t % len(p)][1] for p in per_rank]))
            for t in range(steps)]


def compute(model: TorchTwiceDifferentiable, train, lissa_train, test, sampler_loader) -> dict:
    """Every quantity compared between the distributed run and one process: ``train`` the rank's
    shard (all the data for one process), ``lissa_train`` the batches LiSSA steps through,
    ``sampler_loader`` a DataLoader over the whole data set (with a DistributedSampler on a rank)."""
    out = {}
    out["mean_gradient"] = tdist.mean_gradient(model, train)
    out["mean_hessian"] = model.mean_hessian(train)
    rhs = torch.cat([model.grad(x[i:i + 1], y[i:i + 1]).unsqueeze(0) for x, y in test for i in range(len(x))])
    out["direct"] = twicediff.solve_hvp(InversionMethod.Direct, model, train, rhs, hessian_perturbation=LAMBDA).x
    cg = twicediff.solve_hvp(InversionMethod.Cg, model, train, rhs, hessian_perturbation=LAMBDA, rtol=1e-12,
                             atol=1e-14)
    out["cg"], out["cg_info"] = cg.x, cg.info
    out["cg_jacobi"] = twicediff.solve_hvp(InversionMethod.Cg, model, train, rhs, hessian_perturbation=LAMBDA,
                                           rtol=1e-12, atol=1e-14, block_krylov=False,
                                           preconditioner="jacobi").x
    out["arnoldi"] = twicediff.solve_hvp(InversionMethod.Arnoldi, model, train, rhs, hessian_perturbation=LAMBDA,
                                         rank_estimate=6, block_size=4).x
    out["lissa"] = twicediff.solve_hvp(InversionMethod.Lissa, model, lissa_train, rhs, hessian_perturbation=LAMBDA,
                                       maxiter=15, rtol=0.0, scale=5.0, on_failure="warn").x
    out["influences_cg"] = twicediff.compute_influences(model, train, test_data=test,
                                                        inversion_method=InversionMethod.Cg,
                                                        hessian_regularization=LAMBDA, rtol=1e-12, atol=1e-14)
    out["influences_all"] = twicediff.compute_influences(model, train, hessian_regularization=LAMBDA)
    out["self_influences"] = twicediff.compute_self_influences(model, train, inversion_method=InversionMethod.Cg,
                                                               hessian_regularization=LAMBDA, rtol=1e-12, atol=1e-14)
    # K-FAC / EK-FAC: factor sums and counts all-reduced, the scores gathered
    out["ekfac"] = twicediff.solve_hvp(InversionMethod.Ekfac, model, train, rhs, hessian_perturbation=LAMBDA).x
    out["kfac_ggn"] = twicediff.solve_hvp(InversionMethod.Kfac, model, train, rhs, hessian_perturbation=LAMBDA,
                                          fisher_type="ggn").x
    out["influences_ekfac"] = twicediff.compute_influences(model, train, test_data=test,
                                                           inversion_method=InversionMethod.Ekfac,
                                                           hessian_regularization=LAMBDA)
    out["influences_all_ekfac"] = twicediff.compute_influences(model, train, inversion_method=InversionMethod.Ekfac,
                                                               hessian_regularization=LAMBDA)
    out["self_influences_ekfac"] = twicediff.compute_self_influences(model, train,
                                                                     inversion_method=InversionMethod.Ekfac,
                                                                     hessian_regularization=LAMBDA)
    factors = out["direct"]
    out["influences_pert"] = twicediff.compute_influences_pert(model, train, factors)
    out["influences_sampler"] = twicediff.compute_influences_up(model, sampler_loader, factors)
    return out


class DictInputs(nn.Module):
    """A model called model(**x) with x = {"u": [B, 2], "w": [B, 1], "scale": a float}."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.a, self.b = nn.Linear(2, hidden), nn.Linear(1, hidden, bias=False)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, u, w, scale: float = 1.0):
        return self.head(torch.tanh(self.a(u) + scale * self.b(w)))


def dict_results(dtype: torch.dtype, start: int, stop: int) -> dict:
    """The distributed data path on dict batches (float64 only): the same points as ``batches``,
    x split into a dict with a non-tensor entry, for points start:stop (a rank's shard)."""
    if dtype != torch.float64:
        return {}
    x, y, _, _ = make_data(dtype)
    torch.manual_seed(0)
    model = TorchTwiceDifferentiable(DictInputs().to(dtype).eval(), F.cross_entropy)
    train = [({"u": bx[:, :2], "w": bx[:, 2:], "scale": 0.5}, by) for bx, by in batches(x, y, start, stop)]
    rhs = torch.stack([model.grad({"u": x[i:i + 1, :2], "w": x[i:i + 1, 2:], "scale": 0.5}, y[i:i + 1])
                       for i in range(N_TEST)])
    return {"dict_mean_gradient": tdist.mean_gradient(model, train),
            "dict_mean_hessian": model.mean_hessian(train),
            "dict_cg": twicediff.solve_hvp(InversionMethod.Cg, model, train, rhs, hessian_perturbation=LAMBDA,
                                           rtol=1e-12, atol=1e-14).x,
            "dict_influences_all": twicediff.compute_influences(model, train, hessian_regularization=LAMBDA),
            "dict_self_influences": twicediff.compute_self_influences(model, train, hessian_regularization=LAMBDA),
            "dict_influences_all_ekfac": twicediff.compute_influences(model, train, hessian_regularization=LAMBDA,
                                                                      inversion_method=InversionMethod.Ekfac)}


def init(rank: int, world: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))


def run_compute(rank: int, world: int) -> dict:
    a, b = shard_bounds(world)[rank]
    results = {}
    for dtype in dtypes(world):
        x, y, xt, yt = make_data(dtype)
        module = make_model(dtype)
        # The float64 run with 2 ranks goes through DistributedDataParallel (its construction is the
        # slowest part of a run): its .module is used and none of its hooks fire.
        ddp = dtype == torch.float64 and world == 2
        wrapped = nn.parallel.DistributedDataParallel(module) if ddp else module
        model = TorchTwiceDifferentiable(wrapped, F.cross_entropy)
        sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=sampler)
        res = compute(model, batches(x, y, a, b), batches(x, y, a, b), batches(xt, yt, 0, N_TEST), loader)
        # LiSSA over the sampler's shard, reshuffled each epoch (set_epoch): no one-process twin,
        # but every rank must end with the same iterate.
        rhs = torch.stack([model.grad(xt[i:i + 1], yt[i:i + 1]) for i in range(N_TEST)])
        res["lissa_sampler_only"] = twicediff.solve_hvp(InversionMethod.Lissa, model, loader, rhs,
                                                        hessian_perturbation=LAMBDA, maxiter=12, rtol=0.0,
                                                        scale=5.0, on_failure="warn").x
        # ARPACK starts every rank from the same vector; its rank-6 solution is Lanczos's to its tol
        res["arpack_only"] = twicediff.solve_hvp(InversionMethod.Arnoldi, model, batches(x, y, a, b), rhs,
                                                 hessian_perturbation=LAMBDA, rank_estimate=6,
                                                 eigen_solver="arpack").x
        # block_size="auto" times products on each rank; the ranks sum their timings and so take
        # the same block size (they would hang or differ otherwise)
        res["arnoldi_auto_only"] = twicediff.solve_hvp(InversionMethod.Arnoldi, model, batches(x, y, a, b), rhs,
                                                       hessian_perturbation=LAMBDA, rank_estimate=6,
                                                       block_size="auto").x
        res["grads_untouched"] = torch.tensor(all(p.grad is None for p in module.parameters()))
        res.update(dict_results(dtype, a, b))
        results.update({f"{k}/{str(dtype)[6:]}": v for k, v in res.items()})
    return results


class Raising:
    """Batches that raise ``message`` at batch ``at`` of iteration ``epoch`` (counted from 0)."""

    def __init__(self, data, message: str, at: int, epoch: int = 0):
        self.data, self.message, self.at, self.epoch, self.iterations = data, message, at, epoch, 0

    def __iter__(self):
        epoch, self.iterations = self.iterations, self.iterations + 1
        for i, batch in enumerate(self.data):
            if epoch == self.epoch and i == self.at:
                raise RuntimeError(self.message)
            yield batch


def run_failures(rank: int, world: int) -> dict:
    a, b = shard_bounds(world)[rank]
    x, y, xt, yt = make_data(torch.float64)
    model = TorchTwiceDifferentiable(make_model(torch.float64), F.cross_entropy)
    train = batches(x, y, a, b)
    rhs = torch.stack([model.grad(xt[i:i + 1], yt[i:i + 1]) for i in range(N_TEST)])
    cases = {}

    def case(name, call):
        try:
            call()
            cases[name] = "no error"
        except Exception as exc:  # the test checks type and message
            cases[name] = f"{type(exc).__name__}: {exc}"

    bad = [(xb[:, :2], yb) for xb, yb in train] if rank == 1 else train  # rank 1: a wrong feature count
    case("model_raises", lambda: model.mean_hessian(bad))
    corrupt = Raising(train, "shard 1 is corrupt", at=1) if rank == 1 else train
    case("data_raises_in_cg", lambda: twicediff.solve_hvp(InversionMethod.Cg, model, corrupt, rhs,
                                                          hessian_perturbation=LAMBDA))
    # LiSSA keeps the prepared batches after its first pass when they fit: the failure comes in that pass
    late = Raising(train, "rank 0 ran out of disk", at=0, epoch=0) if rank == 0 else train
    case("data_raises_in_lissa", lambda: twicediff.solve_hvp(InversionMethod.Lissa, model, late, rhs,
                                                             hessian_perturbation=LAMBDA, maxiter=50, rtol=0.0,
                                                             on_failure="warn"))
    other = TorchTwiceDifferentiable(make_model(torch.float64, hidden=6), F.cross_entropy) if rank == 1 else model
    case("P", lambda: twicediff.solve_hvp(InversionMethod.Cg, other, train, rhs[:, :other.num_params]))
    m32 = TorchTwiceDifferentiable(make_model(torch.float32), F.cross_entropy)
    case("empty_shard", lambda: twicediff.solve_hvp(InversionMethod.Cg, model, train if rank == 0 else [], rhs))
    case("dtype", lambda: model.mean_hessian(train) if rank == 0 else
         m32.mean_hessian([(xb.float(), yb) for xb, yb in train]))
    case("method", lambda: twicediff.solve_hvp(InversionMethod.Cg if rank == 0 else InversionMethod.Direct, model,
                                               train, rhs))
    case("options", lambda: twicediff.solve_hvp(InversionMethod.Cg, model, train, rhs, rtol=1e-7 * (1 + rank)))
    operator = twicediff.torch.hessian_operator(model, train)
    case("diverged", lambda: operator.apply_rows(rhs + rank))
    case("rhs", lambda: twicediff.solve_hvp(InversionMethod.Cg, model, train, rhs + rank))
    other_values = TorchTwiceDifferentiable(make_model(torch.float64), F.cross_entropy)
    if rank == 1:
        with torch.no_grad():
            other_values.model[0].bias[0] += 1e-3
    case("parameters", lambda: other_values.mean_hessian(train))
    def fsdp():
        from torch.distributed.fsdp import fully_shard

        TorchTwiceDifferentiable(fully_shard(make_model(torch.float64)), F.cross_entropy)

    case("fsdp", fsdp)
    factors = twicediff.compute_influence_factors(model, train, batches(xt, yt, 0, N_TEST), InversionMethod.Direct,
                                                  hessian_perturbation=LAMBDA).x
    # 40 rows of scores: each rank's own fit the budget, the gathered [40, 23] on every rank do not
    with twicediff.memory_budget(8000):
        case("gather_over_budget", lambda: twicediff.compute_influences_up(model, train, factors.repeat(10, 1)))
    # what the error advises: each rank's columns to its own file, assembled from the files
    with tdist.local_only():
        local = twicediff.compute_influences_up(model, train, factors)
    path = os.path.join(OUT_DIR, f"columns{rank}.pt")
    tdist.save_columns(path, local, train)
    torch.distributed.barrier()
    cases["from_files"] = tdist.load_columns([os.path.join(OUT_DIR, f"columns{r}.pt") for r in range(world)])
    cases["gathered"] = twicediff.compute_influences_up(model, train, factors)
    # the group is still in step: a good call after all these
    cases["after"] = model.mean_hessian(train)
    # another group of the same ranks gives the same; local_only gives this rank's own
    with tdist.use_process_group(torch.distributed.new_group(list(range(world)))):
        cases["subgroup"] = model.mean_hessian(train)
    with tdist.local_only():
        cases["local"] = model.mean_hessian(train)
    return cases


OUT_DIR = "."


def main() -> None:
    global OUT_DIR
    scenario, rank, world, port, out_dir = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    OUT_DIR = out_dir
    torch.set_num_threads(1)
    try:
        init(rank, world, port)
        results = {"compute": run_compute(rank, world)}
        if scenario == "compute+failures":
            results["failures"] = run_failures(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait for the other ranks in the group's teardown


if __name__ == "__main__":
    main()
