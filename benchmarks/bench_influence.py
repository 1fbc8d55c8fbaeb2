"""Influence functions: twicediff against pyDVL 0.7.1 itself, and twicediff's scaling in N_input.

1. End to end, Up influence (``compute_influences``): MLP 64-64-10 Tanh (P = 4,810) at its seeded
   default initialization, cross-entropy, 1,000 random training points (loader batch 250), 64 random
   test points, λ = 0.1, float32, CPU; inversion Direct and CG (maxiter 100). pyDVL runs in its own
   venv (benchmarks/.venv-pydvl, made by setup_pydvl_venv.sh) through pydvl_influence_runner.py on the
   same inputs (a .pt file); the repetitions of both sides are interleaved and the medians compared.
   Values are compared with pyDVL's and with a float64 Direct reference.
2. Scaling of ``compute_influences_up`` in N_input ∈ {1e3, 1e4, 1e5} (64 factors, same model): time
   and peak resident memory (VmHWM), each case in a fresh subprocess, with the default memory
   budget (gradients packed into one [N_input, P] matrix while it fits) and with a 64 MiB budget
   (streamed: [N_input, P] never held).

    python benchmarks/bench_influence.py [--reps 3] [--out benchmarks/results/influence_cpu.md]

Environment: PYDVL_PYTHON overrides the pyDVL interpreter (default benchmarks/.venv-pydvl/bin/python).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pydvl_influence_runner import build_mlp  # noqa: E402

import twicediff  # noqa: E402
from harness import git_commit, machine  # noqa: E402
from twicediff.influence import compute_influences, compute_influences_up  # noqa: E402

N_TRAIN, N_TEST, BATCH, LAM, SEED = 1000, 64, 250, 0.1, 0
SOLVER_OPTIONS = {"direct": {}, "cg": {"maxiter": 100}}
STREAM_BUDGET = 64 * 2 ** 20


def make_inputs(threads: int) -> dict:
    torch.manual_seed(SEED)
    model = build_mlp()
    g = torch.Generator().manual_seed(SEED + 1)
    return {
        "state_dict": model.state_dict(),
        "train_x": torch.randn(N_TRAIN, 64, generator=g), "train_y": torch.randint(0, 10, (N_TRAIN,), generator=g),
        "test_x": torch.randn(N_TEST, 64, generator=g), "test_y": torch.randint(0, 10, (N_TEST,), generator=g),
        "lam": LAM, "batch_size": BATCH, "solver_options": SOLVER_OPTIONS, "threads": threads,
    }


def wrapped_model(inputs: dict, dtype=torch.float32) -> twicediff.TorchTwiceDifferentiable:
    model = build_mlp()
    model.load_state_dict(inputs["state_dict"])
    return twicediff.TorchTwiceDifferentiable(model.to(dtype).eval(), nn.functional.cross_entropy)


def twicediff_influences(inputs: dict, method: str, dtype=torch.float32) -> torch.Tensor:
    model = wrapped_model(inputs, dtype)
    train = DataLoader(TensorDataset(inputs["train_x"].to(dtype), inputs["train_y"]), batch_size=BATCH)
    test = DataLoader(TensorDataset(inputs["test_x"].to(dtype), inputs["test_y"]), batch_size=BATCH)
    return compute_influences(model, train, test_data=test, input_data=train, inversion_method=method,
                              hessian_regularization=LAM, **SOLVER_OPTIONS[method])


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / max |ref|."""
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def end_to_end(reps: int, pydvl_python: str, threads: int) -> list:
    inputs = make_inputs(threads)
    rows = []
    reference = twicediff_influences(inputs, "direct", torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.pt")
        torch.save(inputs, path)
        for method in SOLVER_OPTIONS:
            ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
            twicediff_influences({**inputs, "train_x": inputs["train_x"][:16], "test_x": inputs["test_x"][:2],
                                  "train_y": inputs["train_y"][:16], "test_y": inputs["test_y"][:2]}, method)  # warm-up
            for _ in range(reps):  # interleaved: pyDVL, then twicediff
                out = os.path.join(tmp, f"pydvl_{method}.pt")
                proc = subprocess.run([pydvl_python, os.path.join(HERE, "pydvl_influence_runner.py"), path, method, out],
                                      check=True, capture_output=True, text=True)
                info = json.loads(proc.stdout.strip().splitlines()[-1])
                theirs.append(info["seconds"])
                theirs_cpu.append(info["cpu_seconds"])
                start, start_cpu = time.perf_counter(), time.process_time()
                values = twicediff_influences(inputs, method)
                ours.append(time.perf_counter() - start)
                ours_cpu.append(time.process_time() - start_cpu)
            pydvl_values = torch.load(out)
            rows.append({"method": method, "pydvl_s": statistics.median(theirs), "twicediff_s": statistics.median(ours),
                         "speedup": statistics.median(theirs) / statistics.median(ours),
                         "pydvl_cpu_s": statistics.median(theirs_cpu), "twicediff_cpu_s": statistics.median(ours_cpu),
                         "cpu_speedup": statistics.median(theirs_cpu) / statistics.median(ours_cpu),
                         "vs_pydvl": relative_error(values, pydvl_values),
                         "twicediff_vs_f64": relative_error(values, reference),
                         "pydvl_vs_f64": relative_error(pydvl_values, reference),
                         "pydvl_version": info["pydvl"], "reps": reps})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: peak resident), in MiB.
    VmHWM starts afresh at exec, unlike ru_maxrss, which a child inherits from its parent."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def scaling_child(n: int, budget: str, threads: int) -> None:
    """One scaling case, in its own process: prints {seconds, rss_before_mib, peak_rss_mib, input_mib}."""
    torch.set_num_threads(threads)
    inputs = make_inputs(threads)
    model = wrapped_model(inputs)
    g = torch.Generator().manual_seed(SEED + 2)
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    factors = torch.randn(N_TEST, model.num_params, generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    compute_influences_up(model, DataLoader(TensorDataset(x[:BATCH], y[:BATCH]), batch_size=BATCH), factors)
    if budget == "stream":
        twicediff.set_memory_budget(STREAM_BUDGET)
    rss_before = _status_mib("VmRSS")
    start = time.perf_counter()
    scores = compute_influences_up(model, data, factors)
    seconds = time.perf_counter() - start
    assert scores.shape == (N_TEST, n)
    print(json.dumps({"seconds": seconds, "rss_before_mib": rss_before, "peak_rss_mib": _status_mib("VmHWM"),
                      "input_mib": (x.numel() * 4 + y.numel() * 8) / 2 ** 20}))


def scaling(threads: int) -> list:
    rows = []
    for budget in ("default", "stream"):
        for n in (1_000, 10_000, 100_000):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--scaling-child", str(n), budget,
                                   "--threads", str(threads)], check=True, capture_output=True, text=True)
            rows.append({"budget": budget, "n": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_table(path: str, e2e: list, scale: list, threads: int) -> None:
    lines = [
        "# Influence functions on CPU: twicediff against pyDVL 0.7.1",
        "",
        f"- Machine: {machine()}, {platform.system()} {platform.release()}; torch.set_num_threads({threads}); shared with other jobs while measured.",
        f"- torch {torch.__version__}, pyDVL {e2e[0]['pydvl_version'] if e2e else '-'}, twicediff commit {git_commit()}",
        "- Command: `python benchmarks/bench_influence.py` (pyDVL from `benchmarks/.venv-pydvl`)",
        "",
        "## End to end: `compute_influences`, Up",
        "",
        f"MLP 64-64-10 Tanh (P = 4,810) at its seeded default init, cross-entropy, {N_TRAIN} random training points "
        f"(loader batch {BATCH}), {N_TEST} random test points, λ = {LAM}, float32. Both sides run the same inputs; "
        f"median of {e2e[0]['reps'] if e2e else 0} interleaved runs each (pyDVL timed inside its own process after a "
        "warm-up, twicediff likewise). CPU is the process CPU time of the timed run (all threads), less sensitive to "
        "other jobs than wall time. Errors are max |a − b| / max |b|; f64 is twicediff Direct in float64. A large "
        "error against f64 means the solver did not converge (e.g. CG within maxiter on an H + λI that is not "
        "positive definite); agreement between the two libraries is then not expected.",
        "",
        "| inversion | pyDVL 0.7.1 wall (s) | twicediff wall (s) | speedup (wall) | pyDVL CPU (s) | twicediff CPU (s) "
        "| speedup (CPU) | twicediff vs pyDVL | twicediff vs f64 | pyDVL vs f64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in e2e:
        lines.append(f"| {r['method']}{' (maxiter 100)' if r['method'] == 'cg' else ''} | {r['pydvl_s']:.3f} | "
                     f"{r['twicediff_s']:.3f} | {r['speedup']:.1f}× | {r['pydvl_cpu_s']:.2f} | {r['twicediff_cpu_s']:.2f} | "
                     f"{r['cpu_speedup']:.1f}× | {r['vs_pydvl']:.1e} | "
                     f"{r['twicediff_vs_f64']:.1e} | {r['pydvl_vs_f64']:.1e} |")
    lines += [
        "",
        "## Scaling in N_input: `compute_influences_up`, twicediff alone",
        "",
        f"Same model, {N_TEST} factors (random), loader batch {BATCH}; each case in a fresh process. `default`: the "
        "default memory budget (half the free memory), under which the input gradients are packed into one "
        f"[N_input, P] matrix; `stream`: a {STREAM_BUDGET // 2 ** 20} MiB budget, under which scores are computed "
        "block by block and [N_input, P] is never held. RSS before: resident memory of the process (torch, model, "
        "inputs, factors) just before the timed call; peak: the process's peak resident memory (VmHWM); growth = "
        "peak − before. Time ratio: time / (time at N = 1e3) of the same budget, "
        "to compare with N / 1e3.",
        "",
        "| budget | N_input | time (s) | time ratio (N/1e3) | µs / point | RSS before (MiB) | peak RSS (MiB) "
        "| growth (MiB) | inputs (MiB) | [N, P] f32 (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["budget"]: r["seconds"] for r in scale if r["n"] == 1_000}
    for r in scale:
        lines.append(f"| {r['budget']} | {r['n']:,} | {r['seconds']:.3f} | {r['seconds'] / base[r['budget']]:.1f} "
                     f"({r['n'] // 1000}) | {1e6 * r['seconds'] / r['n']:.1f} | {r['rss_before_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} | "
                     f"{r['input_mib']:.1f} | {r['n'] * 4810 * 4 / 2 ** 20:.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=os.path.join(HERE, "results", "influence_cpu.md"))
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--scaling-child", nargs=2, metavar=("N", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.scaling_child:
        scaling_child(int(args.scaling_child[0]), args.scaling_child[1], args.threads)
        return
    pydvl_python = os.environ.get("PYDVL_PYTHON", os.path.join(HERE, ".venv-pydvl", "bin", "python"))
    if not args.skip_end_to_end and not os.path.exists(pydvl_python):
        sys.exit(f"bench_influence: no pyDVL interpreter at {pydvl_python}; run benchmarks/setup_pydvl_venv.sh "
                 "or set PYDVL_PYTHON")
    e2e = [] if args.skip_end_to_end else end_to_end(args.reps, pydvl_python, args.threads)
    scale = [] if args.skip_scaling else scaling(args.threads)
    write_table(args.out, e2e, scale, args.threads)


if __name__ == "__main__":
    main()
