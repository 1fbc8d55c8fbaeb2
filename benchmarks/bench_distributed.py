"""Data-parallel twicediff on this CPU: 2 gloo processes × 1 thread against 1 process × 1 thread on
the same total data, for block CG on the influence benchmark's problem (bench_influence.py: MLP
64-64-10 Tanh, P = 4,810, 1,000 training points in batches of 250, 64 test points, λ = 0.1, float32,
CG maxiter 100).

Each process times, after a warm-up solve:
- ``solve``: ``solve_hvp(Cg, ...)`` for the 64 test gradients (block Krylov CG: one pass over the
  rank's shard and one all-reduce of the [D, P] block per step);
- ``influences``: ``compute_influences(..., Cg)`` end to end (test gradients on every rank, the
  solve, the up-weighting scores of the rank's shard gathered into [64, 1000] on every rank);
- ``ekfac_fit``: ``KFACFactors.fit(..., ekfac=True)`` on a wider model and more data (see
  EKFAC_N): both passes over the rank's shard, the factors all-reduced once per pass.
Time in collectives is the wall time spent inside torch.distributed's calls (wrapped here, so it
includes waiting for the slower rank); their number and bytes are counted by kind. An all-reduce
of a [64, P] float64 block (block CG's products are all-reduced in its float64) alone is timed too: gloo's transfer cost on this machine without any
wait. The runs of the two configurations are interleaved (alternating which goes first); medians.

    flock /tmp/bench.lock python benchmarks/bench_distributed.py [--reps 5] [--out benchmarks/results/distributed_cpu.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_influence import BATCH, LAM, N_TEST, N_TRAIN, make_inputs, wrapped_model  # noqa: E402
from harness import git_commit, machine  # noqa: E402

import twicediff  # noqa: E402
from twicediff import InversionMethod, distributed as tdist  # noqa: E402
from twicediff.torch.kfac import KFACFactors  # noqa: E402

MAXITER = 100
# EK-FAC fitting (both passes) on a wider model and more data than the CG problem, so that a fit
# takes seconds: MLP 64-256-256-10 Tanh (P = 85,002), 32,000 random points in batches of 250.
EKFAC_N, EKFAC_WIDTH = 32000, 256
LOAD_AT_START = os.getloadavg()[0]
WRAPPED = ("all_reduce", "all_gather", "all_gather_object", "broadcast")


class CollectiveClock:
    """Wraps torch.distributed's collectives that twicediff calls, counting calls, bytes and the
    wall time spent in them. An int64 all-reduce of 4·W entries is a status exchange."""

    def __init__(self, world: int):
        import torch.distributed as dist

        self.world = world
        self.reset()
        self._originals = {name: getattr(dist, name) for name in WRAPPED}
        for name, original in self._originals.items():
            setattr(dist, name, self._wrap(name, original))

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls: dict = {}
        self.bytes: dict = {}

    def _kind(self, name: str, args) -> str:
        t = args[0] if args else None
        if name == "all_reduce" and isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.numel() == 4 * self.world:
            return "status all-reduce"
        return name.replace("_", "-")

    @staticmethod
    def _nbytes(name: str, args) -> int:
        if name in ("all_reduce", "broadcast") and isinstance(args[0], torch.Tensor):
            return args[0].numel() * args[0].element_size()
        if name == "all_gather" and isinstance(args[1], torch.Tensor):
            return args[1].numel() * args[1].element_size()  # this rank's contribution
        return 0  # pickled objects: small descriptions

    def _wrap(self, name, original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                kind = self._kind(name, args)
                self.calls[kind] = self.calls.get(kind, 0) + 1
                self.bytes[kind] = self.bytes.get(kind, 0) + self._nbytes(name, args)
        return timed


def child(rank: int, world: int, port: int, out: str, maxiter: int) -> None:
    torch.set_num_threads(1)
    clock = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        clock = CollectiveClock(world)
    barrier = (lambda: torch.distributed.barrier()) if world > 1 else (lambda: None)
    inputs = make_inputs(1)
    model = wrapped_model(inputs)
    first, stop = tdist.contiguous_shard(N_TRAIN, tdist.current_group())
    train = DataLoader(TensorDataset(inputs["train_x"][first:stop], inputs["train_y"][first:stop]), batch_size=BATCH)
    test = DataLoader(TensorDataset(inputs["test_x"], inputs["test_y"]), batch_size=BATCH)
    from twicediff.torch.per_sample import gradient_matrix

    rhs = gradient_matrix(model, test, "bench", "test_data", False)
    twicediff.solve_hvp(InversionMethod.Cg, model, train, rhs, hessian_perturbation=LAM, maxiter=2)  # warm-up
    row = {"rank": rank, "world": world, "points": stop - first}

    def timed(name, fn):
        barrier()
        if clock:
            clock.reset()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        row[f"{name}_s"] = time.perf_counter() - start
        row[f"{name}_cpu_s"] = time.process_time() - start_cpu
        if clock:
            row[f"{name}_collective_s"] = clock.seconds
            row[f"{name}_calls"] = dict(clock.calls)
            row[f"{name}_bytes"] = dict(clock.bytes)
        return result

    solved = timed("solve", lambda: twicediff.solve_hvp(InversionMethod.Cg, model, train, rhs,
                                                        hessian_perturbation=LAM, maxiter=maxiter))
    row["block_steps"] = max(v["niter"] for k, v in solved.info.items() if k.startswith("batch_"))
    row["passes"] = solved.info["num_passes"]
    scores = timed("influences", lambda: twicediff.compute_influences(
        model, train, test_data=test, input_data=train, inversion_method="cg", hessian_regularization=LAM,
        maxiter=maxiter))
    fit_model, fit_x, fit_y = ekfac_problem()
    a, b = tdist.contiguous_shard(EKFAC_N, tdist.current_group())
    fit_data = DataLoader(TensorDataset(fit_x[a:b], fit_y[a:b]), batch_size=BATCH)
    fitted = timed("ekfac_fit", lambda: KFACFactors.fit(fit_model, torch.nn.functional.cross_entropy, fit_data,
                                                        ekfac=True))
    if clock:  # gloo's cost of one [64, P] float64 all-reduce, no wait for a slower rank
        import torch.distributed as dist

        block = torch.randn(N_TEST, model.num_params, dtype=torch.float64)
        times = []
        for _ in range(20):
            dist.barrier()
            start = time.perf_counter()
            clock._originals["all_reduce"](block)
            times.append(time.perf_counter() - start)
        row["allreduce_block_s"] = statistics.median(times)
    if rank == 0:
        torch.save({"x": solved.x, "scores": scores,
                    "corrected": torch.cat([c.flatten() for c in fitted.corrected.values()])}, out + ".pt")
    with open(out, "w") as f:
        json.dump(row, f)
    if world > 1:
        torch.distributed.destroy_process_group()


def ekfac_problem():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, EKFAC_WIDTH), torch.nn.Tanh(),
                                torch.nn.Linear(EKFAC_WIDTH, EKFAC_WIDTH), torch.nn.Tanh(),
                                torch.nn.Linear(EKFAC_WIDTH, 10)).eval()
    return model, torch.randn(EKFAC_N, 64, generator=g), torch.randint(0, 10, (EKFAC_N,), generator=g)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, tmp: str, maxiter: int) -> list:
    """One run of ``world`` processes; each rank's row."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    port = _free_port()
    outs = [os.path.join(tmp, f"w{world}_r{r}.json") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", str(r), str(world), str(port),
                               outs[r], "--maxiter", str(maxiter)], env=env) for r in range(world)]
    for p in procs:
        if p.wait(timeout=900) != 0:
            raise RuntimeError(f"a {world}-process run failed (exit {p.returncode})")
    rows = []
    for o in outs:
        with open(o) as f:
            rows.append(json.load(f))
    rows[0]["result"] = torch.load(outs[0] + ".pt")
    return rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "distributed_cpu.md"))
    parser.add_argument("--maxiter", type=int, default=MAXITER, help="CG steps at most (a smaller value: a quick "
                        "check of this script, not the table's problem)")
    parser.add_argument("--child", nargs=4, metavar=("RANK", "WORLD", "PORT", "OUT"))
    args = parser.parse_args()
    if args.child:
        rank, world, port, out = args.child
        return child(int(rank), int(world), int(port), out, args.maxiter)
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):  # interleaved, alternating which configuration goes first
            for world in ((1, 2) if rep % 2 == 0 else (2, 1)):
                rows = run(world, tmp, args.maxiter)
                (one if world == 1 else two).append(rows)
                print(json.dumps([{k: v for k, v in r.items() if k != "result"} for r in rows]), flush=True)
            # after every round, so that the rounds finished so far are kept if the run is stopped
            write_table(args.out, one, two, rep + 1, args.maxiter, quiet=rep + 1 < args.reps, asked=args.reps)


def fit_bytes(width: int) -> int:
    dims = [(64, width), (width, width), (width, 10)]
    return 4 * sum((i + 1) ** 2 + o ** 2 + (i + 1) * o for i, o in dims)


def _median(runs: list, key: str, reduce=max) -> float:
    """Median over runs of ``reduce`` over the ranks (max: the run ends when its slowest rank does)."""
    return statistics.median(reduce(r[key] for r in rows) for rows in runs)


def write_table(path: str, one: list, two: list, reps: int, maxiter: int, quiet: bool = False,
                asked: int = 0) -> None:
    W = 2
    t1s, t2s = _median(one, "solve_s"), _median(two, "solve_s")
    t1i, t2i = _median(one, "influences_s"), _median(two, "influences_s")
    c2s = [_median(two, "solve_collective_s", lambda v: list(v)[r]) for r in range(W)]
    c2i = [_median(two, "influences_collective_s", lambda v: list(v)[r]) for r in range(W)]
    block = _median(two, "allreduce_block_s")
    last = two[-1][0]
    steps1 = sorted({rows[0]["block_steps"] for rows in one})
    steps2 = sorted({rows[0]["block_steps"] for rows in two})
    x1, x2 = one[-1][0]["result"], two[-1][0]["result"]
    ratios_s = [r1[0]["solve_s"] / max(r["solve_s"] for r in r2) for r1, r2 in zip(one, two)]
    ratios_i = [r1[0]["influences_s"] / max(r["influences_s"] for r in r2) for r1, r2 in zip(one, two)]
    cpu = {name: (_median(one, f"{name}_cpu_s"), [_median(two, f"{name}_cpu_s", lambda v: list(v)[r]) for r in range(W)])
           for name in ("solve", "influences", "ekfac_fit")}
    t1f, t2f = _median(one, "ekfac_fit_s"), _median(two, "ekfac_fit_s")
    c2f = [_median(two, "ekfac_fit_collective_s", lambda v: list(v)[r]) for r in range(W)]
    ratios_f = [r1[0]["ekfac_fit_s"] / max(r["ekfac_fit_s"] for r in r2) for r1, r2 in zip(one, two)]
    lines = [
        "# Data-parallel twicediff on CPU: 2 gloo processes × 1 thread against 1 process × 1 thread",
        "",
        f"- Machine: {machine()}, {platform.system()} {platform.release()}. Shared with other jobs while "
        f"measured (load average {LOAD_AT_START:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on two "
        "cores): the two configurations ran interleaved in one run, alternating which went first, so their "
        "ratio is more meaningful than either time.",
        f"- torch {torch.__version__}, twicediff commit {git_commit()}, gloo over TCP on 127.0.0.1.",
        f"- Command: `flock /tmp/bench.lock python benchmarks/bench_distributed.py --reps {asked or reps}"
        f"{'' if maxiter == MAXITER else f' --maxiter {maxiter}'}`"
        f"{f' ({reps} of its {asked} rounds finished: stopped early)' if asked and reps < asked else ''}",
        "",
        f"Problem: the influence benchmark's (bench_influence.py): MLP 64-64-10 Tanh (P = 4,810), {N_TRAIN} random "
        f"training points (loader batch {BATCH}; 2 processes: {N_TRAIN // 2} contiguous points each), {N_TEST} "
        f"random test points, λ = {LAM}, float32, block Krylov CG with maxiter {maxiter}. Each process uses one "
        "thread (`torch.set_num_threads(1)`, OMP_NUM_THREADS=1). Times are medians over "
        f"{reps} runs of each configuration; a 2-process time is its slower rank's. Time in collectives is the "
        "wall time inside torch.distributed calls on each rank, waits for the other rank included (a rank that "
        "finishes its pass first waits in the all-reduce).",
        "",
        "| what | 1 process (s) | 2 processes (s) | speedup (median of per-run ratios, range) | of which in "
        "collectives, rank 0 / rank 1 (s) |",
        "|---|---:|---:|---:|---:|",
        f"| `solve_hvp(Cg)`, 64 right-hand sides | {t1s:.3f} | {t2s:.3f} | {statistics.median(ratios_s):.2f}× "
        f"({min(ratios_s):.2f}–{max(ratios_s):.2f}) | {c2s[0]:.3f} / {c2s[1]:.3f} ({100 * c2s[0] / t2s:.0f}% / "
        f"{100 * c2s[1] / t2s:.0f}%) |",
        f"| `compute_influences(Cg)` end to end, [64, 1000] | {t1i:.3f} | {t2i:.3f} | "
        f"{statistics.median(ratios_i):.2f}× ({min(ratios_i):.2f}–{max(ratios_i):.2f}) | {c2i[0]:.3f} / {c2i[1]:.3f} "
        f"({100 * c2i[0] / t2i:.0f}% / {100 * c2i[1] / t2i:.0f}%) |",
        f"| EK-FAC fit (both passes), MLP 64-{EKFAC_WIDTH}-{EKFAC_WIDTH}-10, {EKFAC_N:,} points | {t1f:.3f} | "
        f"{t2f:.3f} | {statistics.median(ratios_f):.2f}× ({min(ratios_f):.2f}–{max(ratios_f):.2f}) | "
        f"{c2f[0]:.3f} / {c2f[1]:.3f} ({100 * c2f[0] / t2f:.0f}% / {100 * c2f[1] / t2f:.0f}%) |",
        "",
        "CPU time of each process (all its threads; one here), the work it did whatever the machine's load: "
        f"`solve_hvp` {cpu['solve'][0]:.3f} s in 1 process against {cpu['solve'][1][0]:.3f} / {cpu['solve'][1][1]:.3f} s "
        f"on rank 0 / rank 1; `compute_influences` {cpu['influences'][0]:.3f} s against "
        f"{cpu['influences'][1][0]:.3f} / {cpu['influences'][1][1]:.3f} s; the EK-FAC fit {cpu['ekfac_fit'][0]:.3f} s "
        f"against {cpu['ekfac_fit'][1][0]:.3f} / {cpu['ekfac_fit'][1][1]:.3f} s (medians). Where a rank's CPU time is "
        "about half of the one process's but its wall time is not, the two processes did not get a core each.",
        "",
        f"Block CG steps: {steps1} (1 process), {steps2} (2 processes); passes over the data (products): "
        f"{sorted({rows[0]['passes'] for rows in one})} and {sorted({rows[0]['passes'] for rows in two})}. "
        "Same result: 2 processes against 1, "
        f"relative difference (Frobenius) {rel(x2['x'], x1['x']):.1e} on the solution and "
        f"{rel(x2['scores'], x1['scores']):.1e} on the influences (the operator's sums are float64, added in "
        "another order across the ranks, and cast to float32 at the end), "
        f"{rel(x2['corrected'], x1['corrected']):.1e} on EK-FAC's corrected eigenvalues (float32 sums).",
        "",
        f"One all-reduce of a [{N_TEST}, 4810] float64 block ({N_TEST * 4810 * 8 / 1e6:.2f} MB) alone, no wait: "
        f"{1e3 * block:.2f} ms (median of 20; gloo over loopback: {N_TEST * 4810 * 8 / block / 1e9:.2f} GB/s of "
        "block per second). A CG step's all-reduce on this machine costs this; the rest of the time in "
        "collectives is one rank waiting for the other's pass (load imbalance on a shared machine).",
        "",
        "Collectives of one 2-process run (rank 0, the last run):",
        "",
        "| call | kind | calls | bytes sent by this rank (payload) |",
        "|---|---|---:|---:|",
    ]
    for name in ("solve", "influences", "ekfac_fit"):
        for kind in sorted(last[f"{name}_calls"]):
            lines.append(f"| {name} | {kind} | {last[f'{name}_calls'][kind]} | {last[f'{name}_bytes'][kind]:,} |")
    steps = last["block_steps"]
    data = last["solve_bytes"].get("all-reduce", 0)
    calls = last["solve_calls"].get("all-reduce", 0)
    lines += [
        "",
        f"In the solve, {calls} data all-reduces carried {data:,} bytes: {data / max(calls, 1):,.0f} bytes per "
        f"product on average = 8·D·P with D = {data / max(calls, 1) / 8 / 4810:.1f} directions on average (block "
        f"CG's blocks are float64 whatever the model's dtype; the search block shrinks as it deflates), against "
        f"8·64·P = {8 * 64 * 4810:,} for a full block; each "
        f"product also made one status all-reduce of 4·W int64 = {32 * W} bytes. See docs/distributed.md for "
        "the formulas and the predicted scaling on clusters.",
        "",
        f"The EK-FAC fit all-reduces its factors once per pass: 4·Σ((in+1)² + out²) bytes for the covariances "
        f"and 4·Σ(in+1)·out for the corrections (float32 sums), {fit_bytes(EKFAC_WIDTH):,} bytes in all for "
        f"this model (+ 8·(2L + 1) bytes of sample and token counts, L = 3 layers), against two passes over "
        f"{EKFAC_N // 2:,} points per rank.",
        "",
        "Not measured here: any GPU or multi-machine run (no such hardware here).",
        "",
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
