"""Top-10 eigenpairs of H + λI on an MLP: twicediff's Lanczos vs ARPACK on one operator.

Problem (default; --widths, --points and --batch change it): MLP 512-1536-768-10 with Tanh (P = 1,976,074) at its seeded default initialization,
cross-entropy, N random training points in one batch (feature j scaled by 4·0.97^j), λ = 0.1; the 10 eigenpairs largest in |θ|
with tol 1e-6 (a pair converged when ‖A v − θ v‖ ≤ tol·|θ|).

All contenders apply the same HessianOperator (float32 products of the float32 model; float64
vectors in and out) and differ only in the eigensolver: twicediff's thick-restart block Lanczos
(``eigen_solver="lanczos"``, basis sized by the memory budget) with each block size given by
--block-size (``auto``, the default of ``solve_arnoldi``, times the operator in the solve and
picks 1 or 4; its probe's products are in its time and its count) and scipy's ``eigsh`` (ARPACK,
``eigen_solver="arpack"``, default ncv = max(2k + 1, 20)). Each run is a fresh subprocess, so its
peak resident memory (VmHWM) is its own and ``auto`` decides anew; the memory budget is fixed with
--budget-mib. Rounds rotate the contenders; the table gives medians and ratios of medians.

Usage: flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_lanczos.py \
           [--rounds 3] [--threads 2] [--block-size auto 1 4] [--out benchmarks/results/lanczos_cpu.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTHS = (512, 1536, 768, 10)


def child(args) -> None:
    torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)
    import twicediff
    from harness import peak_rss_bytes, reset_peak_rss
    from twicediff.torch import TorchTwiceDifferentiable, hessian_operator
    from twicediff.app.presets import make_mlp
    from twicediff.torch.solvers.low_rank import _low_rank

    twicediff.set_memory_budget(args.budget_mib * 2**20)
    torch.manual_seed(0)
    widths = tuple(args.widths)
    model = make_mlp(widths, nn.Tanh, 1)[0]  # bench's MLP of these widths (its one data point is not used)
    g = torch.Generator().manual_seed(1)
    # Inputs with geometrically decaying feature scales: a Hessian whose top eigenvalues are
    # separated (isotropic random inputs give a tight cluster that no Krylov method resolves fast).
    x = torch.randn(args.points, widths[0], generator=g) * (4.0 * 0.97 ** torch.arange(widths[0]))
    y = torch.randint(0, widths[-1], (args.points,), generator=g)
    batch = args.batch or args.points
    td = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    op = hessian_operator(td, [(x[i:i + batch], y[i:i + batch]) for i in range(0, args.points, batch)],
                          hessian_perturbation=0.1)
    for d in (1, 4):  # warm-up: batch cache, the GEMM probe of each shape class
        op.apply_rows(torch.randn(d, td.num_params, dtype=torch.float64))
    passes0 = op.num_passes
    reset_peak_rss()
    base = peak_rss_bytes()
    t, c = time.perf_counter(), time.process_time()
    lr = _low_rank(op.apply_rows, td.num_params, torch.float64, td.device, rank_estimate=10, krylov_dimension=None,
                   tol=1e-6, max_iter=None, eigen_solver=args.child, block_size=args.block, progress=False,
                   where="bench")
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
    peak = peak_rss_bytes()
    V, vals = lr.projections, lr.eigen_vals
    res = max(float(r) for r in ((op.apply_rows(V.T.contiguous()) - vals[:, None] * V.T).norm(dim=1) / vals.abs()))
    chosen = twicediff.build_info()["probe"].get(f"lanczos_block: P={td.num_params} cpu", {}).get("choice")
    print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu_seconds, products=op.num_passes - passes0,
                          P=td.num_params, chosen=chosen,
                          base_mib=base / 2**20, peak_mib=peak / 2**20, extra_mib=(peak - base) / 2**20,
                          eigenvalues=sorted(vals.tolist()), max_rel_residual=res)))


def _block(text: str):
    return text if text == "auto" else int(text)


def _name(method: str, block) -> str:
    return "arpack" if method == "arpack" else f"lanczos block {block}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", type=int, default=256)
    ap.add_argument("--block-size", nargs="+", default=["auto"], type=_block,
                    help="Lanczos block sizes to compare with ARPACK: ints or auto (default: auto)")
    ap.add_argument("--block", type=_block, help=argparse.SUPPRESS)
    ap.add_argument("--budget-mib", type=int, default=1024)
    ap.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="the MLP's layer widths")
    ap.add_argument("--batch", type=int, default=0, help="points per batch (default: all in one)")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", choices=["lanczos", "arpack"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, HERE)
    from harness import emit, git_commit, machine

    methods = [("arpack", 1)] + [("lanczos", b) for b in args.block_size]
    names = [_name(m, b) for m, b in methods]
    runs = {n: [] for n in names}
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for i in range(len(methods)):
            method, block = methods[(i + r) % len(methods)]
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--threads", str(args.threads),
                   "--points", str(args.points), "--block", str(block), "--budget-mib", str(args.budget_mib),
                   "--widths", *map(str, args.widths), "--batch", str(args.batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if proc.returncode != 0:
                sys.exit(f"{method} failed:\n{proc.stderr[-4000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[_name(method, block)].append(out)
            print(_name(method, block), {k: v for k, v in out.items() if k != "eigenvalues"}, flush=True)
    med = {m: statistics.median(o["seconds"] for o in v) for m, v in runs.items()}
    cpu = {m: statistics.median(o["cpu_seconds"] for o in v) for m, v in runs.items()}
    ar = runs["arpack"][0]
    P = ar["P"]
    ev_diff = max(abs(a - b) / abs(b) for n in names[1:] for a, b in zip(runs[n][0]["eigenvalues"], ar["eigenvalues"]))
    lines = [
        f"# Top-10 eigenpairs on a {f'{P / 1e6:.3g}M' if P >= 1e6 else f'{P:,}'}-parameter MLP: Lanczos vs ARPACK "
        "on the same operator (CPU)",
        "",
        f"- machine: {machine()}; shared with other agents (load average {load:.1f} at start): ratios come from "
        f"rounds that alternate the contenders in one run",
        f"- torch {torch.__version__}, {args.threads} threads, commit {git_commit()}",
        f"- command: `flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_lanczos.py "
        f"--rounds {args.rounds} --threads {args.threads} --points {args.points} --block-size "
        f"{' '.join(map(str, args.block_size))} --budget-mib {args.budget_mib}"
        + (f" --widths {' '.join(map(str, args.widths))}" if tuple(args.widths) != WIDTHS else "")
        + (f" --batch {args.batch}" if args.batch else "") + "`",
        f"- problem: MLP {'-'.join(map(str, args.widths))} Tanh (P = {P:,}), cross-entropy, {args.points} points in "
        f"batches of {args.batch or args.points}, λ = 0.1, k = 10, tol 1e-6; memory budget {args.budget_mib} MiB; Lanczos basis "
        f"max(2k + 2b, 20) + b float64 rows for block size b ({(22 + 1) * P * 8 / 2**20:.0f} MiB at b = 1, "
        f"{(28 + 4) * P * 8 / 2**20:.0f} MiB at b = 4)",
        "- each run a fresh subprocess; peak = VmHWM during the solve, extra = peak − resident set before it "
        "(model, data, operator cache)",
        "",
        "| eigensolver | median s | median CPU s | products (passes) | CPU s per product | extra MiB | peak MiB | "
        "largest ‖Av−θv‖/|θ| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in names:
        o = runs[m][0]
        label = "ARPACK (scipy eigsh, ncv 21)" if m == "arpack" else f"twicediff Lanczos ({m[8:]})"
        if m.endswith("auto"):
            label += " → chose " + ", ".join(sorted({str(x["chosen"]) for x in runs[m]}))
        lines.append(f"| {label} | {med[m]:.2f} | {cpu[m]:.2f} | {o['products']} | {cpu[m] / o['products']:.3f} | "
                     f"{max(x['extra_mib'] for x in runs[m]):.0f} | {max(x['peak_mib'] for x in runs[m]):.0f} | "
                     f"{o['max_rel_residual']:.1e} |")
    lines += ["", "Lanczos time / ARPACK time (target ≤ 1.2), wall clock: " + "; ".join(
        f"{m[8:]}: **{med[m] / med['arpack']:.2f}**" for m in names[1:]) + "; process CPU time (both threads; "
        "what the solve itself used, less moved by other jobs on a shared machine): " + "; ".join(
        f"{m[8:]}: **{cpu[m] / cpu['arpack']:.2f}**" for m in names[1:]) + ". "
              f"Largest relative eigenvalue difference: {ev_diff:.1e}.", "",
              "All times (s, wall / CPU): " + "; ".join(
                  f"{m}: " + ", ".join(f"{o['seconds']:.2f} / {o['cpu_seconds']:.2f}" for o in v)
                  for m, v in runs.items())]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
