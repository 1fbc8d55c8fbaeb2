"""Peak memory of influence factors under a fixed memory budget, each solver in a fresh process.

Problem: an MLP 1024-4096-4096-10 with Tanh (P = 21,020,682; 80.2 MiB of float32 parameters) at its
seeded default initialization, cross-entropy, 64 random training points in a loader of batch size 32,
λ = 0.1, and the influence factors ``compute_influence_factors`` of 8 random test points
([8, P]: 641 MiB of float32) under ``twicediff.set_memory_budget(2 GiB)``:

  - ``cg``: block CG, its default float64 products, ``maxiter=3``, ``rtol=atol=0`` (no row stops
    early: the most the solver ever holds);
  - ``lissa``: ``maxiter=3``, ``on_failure="warn"``;
  - ``arnoldi``: Lanczos, ``rank_estimate=4``, ``block_size=1``, ``max_iter=12``;
  - ``direct``: must raise MemoryBudgetError before allocating anything.

A short run of each solver reaches the same peak as a long one: the blocks are allocated in the
first steps and reused. Every run is a fresh ``python`` whose peak resident set (``VmHWM`` of
/proc/self/status, :func:`harness.peak_rss_bytes`) is read at the end; ``bare`` is a process that
imports torch only, ``baseline`` one that imports torch and twicediff, builds the model and the data
and computes one gradient (torch's lazily loaded kernels), and stops there. The target is the
issue's: peak RSS of the whole process ≤ budget + the model's size + 1 GiB (the baseline counted in
it). Each solver's run first makes the same call on a tiny model, so that the modules imported on
first use (torch.func's vmap pulls in parts of torch._dynamo; scipy) are in the process before the
call measured: ``peak − that`` is what the call added, which the budget bounds.

``--trace`` samples the resident set every 5 ms in a thread and prints the Python stack of the
main thread at the highest sample, and a short one each time the resident set passes a new mark
(every 128 MiB, or ``TRACE_STEP_MIB``): where a peak comes from. ``--before DIR`` measures the
twicediff in DIR too (another checkout's python/ folder with its _C), interleaved with this one.
``--widths`` and ``--budget-mib`` change the model and the budget.

Usage (heavy: up to ~3.5 GB per run; one run at a time):
    flock /tmp/mem.lock env PYTHONPATH=python python benchmarks/bench_peak_memory.py \
        [--budget-mib 2048] [--methods cg lissa arnoldi direct] [--before DIR] \
        [--out benchmarks/results/peak_memory_cpu.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20
WIDTHS = (1024, 4096, 4096, 10)
N_TRAIN, BATCH, N_TEST, LAMBDA = 64, 32, 8, 0.1
OPTIONS = {
    "cg": dict(maxiter=3, rtol=0.0, atol=0.0),
    "lissa": dict(maxiter=3, on_failure="warn"),
    "arnoldi": dict(rank_estimate=4, block_size=1, max_iter=12),
    "direct": {},
}


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Tracer(threading.Thread):
    """Samples the resident set; keeps the main thread's stack at the highest sample, and a short
    one each time the resident set passes a new 128 MiB mark (how the peak was reached)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.main = threading.main_thread().ident
        self.best, self.stack, self.running, self.steps, self.mark = 0, "", True, [], 0

    def run(self) -> None:
        while self.running:
            rss = _rss_now()
            if rss > self.best:
                frame = sys._current_frames().get(self.main)
                stack = traceback.format_stack(frame) if frame else []
                self.best, self.stack = rss, "".join(stack[-8:])
                if rss >= self.mark + int(os.environ.get("TRACE_STEP_MIB", "128")) * MiB:
                    self.mark = rss
                    where = [line.strip().splitlines()[0].replace("File ", "") for line in stack[-4:]]
                    self.steps.append(f"{rss / MiB:.0f} MiB: " + " <- ".join(reversed(where)))
            time.sleep(0.005)


def child(method: str, budget: int, trace: bool, widths=WIDTHS) -> dict:
    """One measurement in this (fresh) process."""
    sys.path.insert(0, HERE)
    from harness import peak_rss_bytes

    if method == "bare":
        import torch  # noqa: F401

        return {"peak": peak_rss_bytes()}
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import twicediff
    from twicediff import TorchTwiceDifferentiable
    from twicediff.app.presets import make_mlp
    from twicediff.influence import compute_influence_factors

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = make_mlp(widths, nn.Tanh, 1)[0]  # bench's MLP of these widths (its one data point is not used)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N_TRAIN, widths[0], generator=g), torch.randint(0, widths[-1], (N_TRAIN,), generator=g)
    xt, yt = torch.randn(N_TEST, widths[0], generator=g), torch.randint(0, widths[-1], (N_TEST,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    test = DataLoader(TensorDataset(xt, yt), batch_size=N_TEST)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    td.grad(x[:2], y[:2])
    out = {"P": td.num_params, "model": td.num_params * 4, "base": peak_rss_bytes()}
    if method == "baseline":
        out["peak"] = out["base"]
        return out
    # The same call on a tiny model first: the modules torch and twicediff import on first use
    # (torch.func's vmap, scipy) belong to the process, not to the call measured.
    tiny = TorchTwiceDifferentiable(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval(), F.cross_entropy)
    tiny_data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4)
    compute_influence_factors(tiny, tiny_data, tiny_data, method, hessian_perturbation=LAMBDA,
                              **{**OPTIONS[method], **({"rank_estimate": 2} if method == "arnoldi" else {})})
    out["warm"] = peak_rss_bytes()
    twicediff.set_memory_budget(budget)
    tracer = _Tracer() if trace else None
    if tracer:
        tracer.start()
    start = time.perf_counter()
    result = error = None
    try:
        result = compute_influence_factors(td, train, test, method, hessian_perturbation=LAMBDA, **OPTIONS[method])
    except twicediff.MemoryBudgetError as exc:
        error = f"MemoryBudgetError: {str(exc)[:400]}"
    out["seconds"] = time.perf_counter() - start
    out["peak"] = peak_rss_bytes()
    if tracer:
        tracer.running = False
        tracer.join()
        out["trace_peak"], out["trace_stack"] = tracer.best, "\n".join(tracer.steps) + "\nat the peak:\n" + tracer.stack
    if error:
        out["error"] = error
    else:  # row by row: a float64 copy of the [8, P] result would be a peak of its own
        norms = [float(row.norm()) for row in result.x]
        out["norm"] = sum(n * n for n in norms) ** 0.5
        out["finite"] = all(n == n and n != float("inf") for n in norms)
    return out


def measure(method: str, budget: int, trace: bool, package_dir: str = "", widths=WIDTHS) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if package_dir:  # the twicediff to measure: another checkout's python/ folder
        env["PYTHONPATH"] = package_dir
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, "--budget-mib",
                           str(budget // MiB), "--widths", *map(str, widths)] + (["--trace"] if trace else []),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"failed": proc.stderr[-1500:], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict, budget: int, before: dict, before_name: str, widths=WIDTHS) -> str:
    sys.path.insert(0, HERE)
    import torch

    from harness import git_commit, machine

    base = results["baseline"]
    model = base["model"]
    target = budget + model + 2**30
    lines = [
        "## Peak RSS of influence factors under a fixed memory budget (CPU)",
        "",
        f"machine: {machine()}; torch {torch.__version__}; commit {git_commit()}; 2 torch threads",
        "",
        f"MLP {'-'.join(map(str, widths))} with Tanh, P = {base['P']:,} (model {model / MiB:.1f} MiB float32), "
        f"cross-entropy, {N_TRAIN} training points in batches of {BATCH}, λ = {LAMBDA}, influence factors of "
        f"{N_TEST} test points ([{N_TEST}, P] = {N_TEST * model / MiB:.0f} MiB float32), budget "
        f"{budget / MiB:.0f} MiB. Each row is a fresh process; peak = VmHWM at its end. "
        f"Target: peak ≤ budget + model + 1 GiB = {target / MiB:.0f} MiB (the process's baseline counted in it). "
        "'added by the call' is the peak less the process's peak after the same call on a tiny model (torch.func, "
        "scipy and the rest imported on first use): what the budget bounds.",
        "",
        f"bare interpreter + `import torch`: {results['bare']['peak'] / MiB:.0f} MiB; baseline (torch + twicediff "
        f"imported, model and data built, one gradient): {base['peak'] / MiB:.0f} MiB.",
        "",
        "| run | options | peak RSS (MiB) | − baseline (MiB) | added by the call (MiB) | target (MiB) | result | "
        "time (s) |" + (f" {before_name}: peak RSS, added by the call (MiB) |" if before else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if before else ""),
    ]
    for method, r in results.items():
        if method in ("bare", "baseline"):
            continue
        opts = ", ".join(f"{k}={v}" for k, v in OPTIONS[method].items()) or "—"
        then = ""
        if before:
            b = before.get(method, {})
            then = (f" {b['peak'] / MiB:.0f}, {(b['peak'] - b['warm']) / MiB:.0f} "
                    f"({'≤' if b['peak'] - b['warm'] <= budget else '>'} budget; "
                    f"{'pass' if b['peak'] <= target else 'MISS'}{'; MemoryBudgetError' if 'error' in b else ''}) |"
                    if "peak" in b else " failed |")
        if "failed" in r:
            lines.append(f"| {method} | {opts} | — | — | — | {target / MiB:.0f} | failed (rc {r['returncode']}) | — |"
                         f"{then}")
            continue
        ok = r["peak"] <= target
        what = r.get("error", "factors computed") if method == "direct" else ("factors computed" if r.get("finite")
                                                                             else r.get("error", "non-finite"))
        what = "MemoryBudgetError before allocating" if what.startswith("MemoryBudgetError") and method == "direct" \
            else what
        added = r["peak"] - r["warm"]
        lines.append(f"| {method} | {opts} | {r['peak'] / MiB:.0f} | {(r['peak'] - base['peak']) / MiB:.0f} | "
                     f"{added / MiB:.0f} ({'≤' if added <= budget else '>'} budget) | {target / MiB:.0f} | "
                     f"{'pass' if ok else 'MISS'}: {what} | {r['seconds']:.1f} |{then}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-mib", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["cg", "lissa", "arnoldi", "direct"])
    ap.add_argument("--trace", action="store_true", help="print the stack at the highest resident set")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    ap.add_argument("--before", default="", help="also measure the twicediff in this folder (a python/ "
                    "folder of another checkout, with its own _C), named by --before-name")
    ap.add_argument("--before-name", default="before")
    ap.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="the MLP's layer widths")
    args = ap.parse_args()
    budget = args.budget_mib * MiB
    if args.child:
        print(json.dumps(child(args.child, budget, args.trace, tuple(args.widths))))
        return
    results, before = {}, {}
    for method in ["bare", "baseline"] + args.methods:
        runs = [("", results)] + ([(args.before, before)] if args.before and method not in ("bare",) else [])
        for package_dir, into in runs:  # interleaved: the two versions of a method run one after the other
            into[method] = r = measure(method, budget, args.trace, package_dir, tuple(args.widths))
            shown = {k: (f"{v / MiB:.0f} MiB" if k in ("peak", "base", "trace_peak", "model") else v)
                     for k, v in r.items() if k != "trace_stack"}
            print(f"{args.before_name}:" if package_dir else "", method, shown, flush=True)
            if r.get("trace_stack"):
                print(r["trace_stack"], flush=True)
    sys.path.insert(0, HERE)
    from harness import emit

    emit(table(results, budget, before, args.before_name, tuple(args.widths)), args.out)


if __name__ == "__main__":
    main()
