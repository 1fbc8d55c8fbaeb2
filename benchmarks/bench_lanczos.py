"""Top-10 eigenpairs of H + λI on a 2M-parameter MLP: twicediff's Lanczos vs ARPACK on one operator.

Problem: MLP 512-1536-768-10 with Tanh (P = 1,976,074) at its seeded default initialization,
cross-entropy, N random training points in one batch (feature j scaled by 4·0.97^j), λ = 0.1; the 10 eigenpairs largest in |θ|
with tol 1e-6 (a pair converged when ‖A v − θ v‖ ≤ tol·|θ|).

Both contenders apply the same HessianOperator (float32 products of the float32 model; float64
vectors in and out) and differ only in the eigensolver: twicediff's thick-restart block Lanczos
(``eigen_solver="lanczos"``, basis sized by the memory budget) and scipy's ``eigsh`` (ARPACK,
``eigen_solver="arpack"``, default ncv = max(2k + 1, 20)). Each run is a fresh subprocess, so its
peak resident memory (VmHWM) is its own; the memory budget is fixed with --budget-mib.
Rounds alternate the contenders; the table gives medians and ratios of medians.

Usage: flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_lanczos.py \
           [--rounds 3] [--threads 2] [--out benchmarks/results/lanczos_cpu.md]
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
    from twicediff.app.bench import make_mlp
    from twicediff.torch.solvers.low_rank import _low_rank

    twicediff.set_memory_budget(args.budget_mib * 2**20)
    torch.manual_seed(0)
    model = make_mlp(WIDTHS, nn.Tanh, 1)[0]  # bench's MLP of these widths (its one data point is not used)
    g = torch.Generator().manual_seed(1)
    # Inputs with geometrically decaying feature scales: a Hessian whose top eigenvalues are
    # separated (isotropic random inputs give a tight cluster that no Krylov method resolves fast).
    x = torch.randn(args.points, WIDTHS[0], generator=g) * (4.0 * 0.97 ** torch.arange(WIDTHS[0]))
    y = torch.randint(0, WIDTHS[-1], (args.points,), generator=g)
    td = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    op = hessian_operator(td, [(x, y)], hessian_perturbation=0.1)
    for d in sorted({1, args.block_size}):  # warm-up: batch cache, the GEMM probe of each shape class
        op.apply_rows(torch.randn(d, td.num_params, dtype=torch.float64))
    passes0 = op.num_passes
    reset_peak_rss()
    base = peak_rss_bytes()
    t = time.perf_counter()
    lr = _low_rank(op.apply_rows, td.num_params, torch.float64, td.device, rank_estimate=10, krylov_dimension=None,
                   tol=1e-6, max_iter=None, eigen_solver=args.child, block_size=args.block_size, progress=False,
                   where="bench")
    seconds = time.perf_counter() - t
    peak = peak_rss_bytes()
    V, vals = lr.projections, lr.eigen_vals
    res = max(float(r) for r in ((op.apply_rows(V.T.contiguous()) - vals[:, None] * V.T).norm(dim=1) / vals.abs()))
    print(json.dumps(dict(seconds=seconds, products=op.num_passes - passes0, P=td.num_params,
                          base_mib=base / 2**20, peak_mib=peak / 2**20, extra_mib=(peak - base) / 2**20,
                          eigenvalues=sorted(vals.tolist()), max_rel_residual=res)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=4, help="Lanczos block size (ARPACK: 1)")
    ap.add_argument("--budget-mib", type=int, default=1024)
    ap.add_argument("--out", default="")
    ap.add_argument("--child", choices=["lanczos", "arpack"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, HERE)
    from harness import emit, git_commit, machine

    runs = {"lanczos": [], "arpack": []}
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for method in (("lanczos", "arpack") if r % 2 == 0 else ("arpack", "lanczos")):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--threads", str(args.threads),
                   "--points", str(args.points), "--block-size", str(args.block_size),
                   "--budget-mib", str(args.budget_mib)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if proc.returncode != 0:
                sys.exit(f"{method} failed:\n{proc.stderr[-4000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[method].append(out)
            print(method, {k: v for k, v in out.items() if k != "eigenvalues"}, flush=True)
    med = {m: statistics.median(o["seconds"] for o in v) for m, v in runs.items()}
    lz, ar = runs["lanczos"][0], runs["arpack"][0]
    P = lz["P"]
    ev_diff = max(abs(a - b) / abs(b) for a, b in zip(lz["eigenvalues"], ar["eigenvalues"]))
    m_rows = max(2 * 10 + 2 * args.block_size, 20)
    lines = [
        "# Top-10 eigenpairs on a 2M-parameter MLP: Lanczos vs ARPACK on the same operator (CPU)",
        "",
        f"- machine: {machine()}; shared with other agents (load average {load:.1f} at start): ratios come from "
        f"rounds that alternate the contenders in one run",
        f"- torch {torch.__version__}, {args.threads} threads, commit {git_commit()}",
        f"- command: `flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_lanczos.py "
        f"--rounds {args.rounds} --threads {args.threads} --points {args.points} --block-size {args.block_size} "
        f"--budget-mib {args.budget_mib}`",
        f"- problem: MLP {'-'.join(map(str, WIDTHS))} Tanh (P = {P:,}), cross-entropy, {args.points} points in one "
        f"batch, λ = 0.1, k = 10, tol 1e-6; memory budget {args.budget_mib} MiB; Lanczos basis "
        f"{m_rows} + {args.block_size} float64 rows = {(m_rows + args.block_size) * P * 8 / 2**20:.0f} MiB",
        "- each run a fresh subprocess; peak = VmHWM during the solve, extra = peak − resident set before it "
        "(model, data, operator cache)",
        "",
        "| eigensolver | median s | products (passes) | s per product | extra MiB | peak MiB | largest ‖Av−θv‖/|θ| |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, label in (("arpack", "ARPACK (scipy eigsh, ncv 21)"),
                     ("lanczos", f"twicediff Lanczos (block {args.block_size})")):
        o = runs[m][0]
        lines.append(f"| {label} | {med[m]:.2f} | {o['products']} | {med[m] / o['products']:.3f} | "
                     f"{max(x['extra_mib'] for x in runs[m]):.0f} | {max(x['peak_mib'] for x in runs[m]):.0f} | "
                     f"{o['max_rel_residual']:.1e} |")
    lines += ["", f"Lanczos time / ARPACK time: **{med['lanczos'] / med['arpack']:.2f}** (target ≤ 1.2). "
              f"Largest relative eigenvalue difference: {ev_diff:.1e}.", "",
              "All times (s): " + "; ".join(f"{m}: " + ", ".join(f"{o['seconds']:.2f}" for o in v)
                                           for m, v in runs.items())]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
