"""Inverse-HVP solvers: twicediff's block CG and Lanczos against pyDVL 0.7.1 on one problem.

Problem (issue 8): MLP 64-64-10 with Tanh (P = 4,810) at its seeded default initialization,
cross-entropy, 1,000 random training points in a loader of batch size 250, λ = 0.1, 64 right-hand
sides = per-sample gradients of 64 random test points; CG with rtol 1e-6, atol 1e-10; the top 10
eigenpairs of H + λI with tol 1e-6.

Compared, on the same inputs (saved to a .pt file that pyDVL's runner loads):
  - twicediff.torch.solve_batch_cg (all right-hand sides at once) vs pyDVL's
    solve_hvp(InversionMethod.Cg, ...) (one right-hand side at a time), run in pyDVL's own venv
    (benchmarks/.venv-pydvl, see setup_pydvl_venv.sh) by pydvl_solvers_runner.py;
  - twicediff.torch.model_hessian_low_rank (Lanczos in torch) vs pyDVL's model_hessian_low_rank
    (scipy eigsh, default ncv) and vs scipy eigsh on twicediff's own operator (hessian_operator(...)
    .to_scipy(): same products, so this isolates the eigen solver).
Rounds interleave the contenders; the table reports medians and ratios of medians.

Usage: PYTHONPATH=python python benchmarks/bench_solvers.py [--rounds 3] [--out benchmarks/results/solvers_cpu.md]
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
LAYERS = ["nn.Linear(64, 64)", "nn.Tanh()", "nn.Linear(64, 10)"]


def make_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x_train = torch.randn(1000, 64, generator=g)
    y_train = torch.randint(0, 10, (1000,), generator=g)
    x_test = torch.randn(64, 64, generator=g)
    y_test = torch.randint(0, 10, (64,), generator=g)
    return model, x_train, y_train, x_test, y_test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pydvl-python", default=os.path.join(HERE, ".venv-pydvl", "bin", "python"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "solvers_cpu.md"))
    ap.add_argument("--block-size", type=int, default=4, help="Lanczos block size")
    ap.add_argument("--float32-products", action="store_true",
                    help="CG: products in the model's float32 instead of the default float64")
    ap.add_argument("--preconditioner", default=None, choices=[None, "jacobi", "nystrom"])
    ap.add_argument("--per-column", action="store_true", help="CG: one Krylov space per column (no block Krylov)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both contenders")
    ap.add_argument("--pydvl-cg-timeout", type=float, default=None,
                    help="seconds after which pyDVL's CG is stopped (the table then gives a lower bound)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from harness import git_commit, machine
    from twicediff.torch import (TorchTwiceDifferentiable, hessian_operator, model_hessian_low_rank, solve_batch_cg,
                                 solve_linear)
    from scipy.sparse.linalg import eigsh

    model, x_train, y_train, x_test, y_test = make_problem()
    td = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    P = td.num_params
    b = torch.stack([td.grad(x_test[i:i + 1], y_test[i:i + 1]) for i in range(64)])
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=250)
    cfg = dict(hessian_perturbation=0.1, rtol=1e-6, atol=1e-10, rank=10, eig_tol=1e-6, batch_size=250)

    tmp = tempfile.mkdtemp(prefix="bench_solvers_")
    inputs = os.path.join(tmp, "inputs.pt")
    torch.save(dict(layers=LAYERS, state_dict=model.state_dict(), x_train=x_train, y_train=y_train, b=b, **cfg),
               inputs)

    def run_pydvl(task, timeout=None):
        """(meta, outputs), or (None, None) when it ran past ``timeout`` seconds."""
        out = os.path.join(tmp, f"pydvl_{task}.pt")
        try:
            proc = subprocess.run([args.pydvl_python, os.path.join(HERE, "pydvl_solvers_runner.py"), inputs, out, task],
                                  capture_output=True, text=True, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, None
        if proc.returncode != 0:
            sys.exit(f"pyDVL runner failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out)

    def run_cg():
        t = time.perf_counter()
        res = solve_batch_cg(td, loader, b, cfg["hessian_perturbation"], rtol=cfg["rtol"], atol=cfg["atol"],
                             preconditioner=args.preconditioner, block_krylov=not args.per_column,
                             product_dtype=None if args.float32_products else torch.float64)
        return time.perf_counter() - t, res

    def run_lanczos():
        t = time.perf_counter()
        lr = model_hessian_low_rank(td, loader, cfg["hessian_perturbation"], rank_estimate=cfg["rank"],
                                    tol=cfg["eig_tol"], block_size=args.block_size)
        return time.perf_counter() - t, lr

    def run_eigsh_on_operator():
        op = hessian_operator(td, loader, hessian_perturbation=cfg["hessian_perturbation"])
        t = time.perf_counter()
        vals = eigsh(op.to_scipy(), k=cfg["rank"], tol=cfg["eig_tol"], return_eigenvectors=False)
        return time.perf_counter() - t, torch.as_tensor(sorted(vals)), op.num_passes

    td.hvp(x_train[:250], y_train[:250], b[:2])  # warm-up (engine selection, allocator)
    times = {k: [] for k in ("pydvl_cg", "td_cg", "pydvl_eigsh", "scipy_eigsh_td_op", "td_lanczos")}
    meta = pyd = None
    for r in range(args.rounds):
        eig_meta, pyd_eig = run_pydvl("eigsh")
        times["pydvl_eigsh"].append(eig_meta["seconds"])
        m, p = run_pydvl("cg", args.pydvl_cg_timeout)
        if m is not None:
            meta, pyd = m, p
        times["pydvl_cg"].append(m["seconds"] if m is not None else float("inf"))
        s, cg = run_cg()
        times["td_cg"].append(s)
        s, lr = run_lanczos()
        times["td_lanczos"].append(s)
        s, eig_op, eigsh_passes = run_eigsh_on_operator()
        times["scipy_eigsh_td_op"].append(s)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    N = b.shape[0]
    optimal = [cg.info[f"batch_{i}"]["optimal"] for i in range(N)]
    niter = [cg.info[f"batch_{i}"]["niter"] for i in range(N)]
    # float64 reference: the same model and data in float64, the explicit Hessian, an LU solve
    td64 = td.with_dtype(torch.float64)
    loader64 = DataLoader(TensorDataset(x_train.double(), y_train), batch_size=250)
    exact = solve_linear(td64, loader64, b.double(), cfg["hessian_perturbation"]).x
    op64 = hessian_operator(td64, loader64, hessian_perturbation=cfg["hessian_perturbation"])

    def true_residual(X):
        return (op64.apply_rows(X.double()) - b.double()).norm(dim=1) / b.double().norm(dim=1)

    def rel_to(X, ref):
        return (X.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1)

    true_res = true_residual(cg.x).max().item()
    solver_res = max(cg.info[f"batch_{i}"]["gamma"] ** 0.5 / float(b[i].double().norm()) for i in range(b.shape[0]))
    floor = true_residual(exact.float()).max().item()
    err_exact = rel_to(cg.x, exact).max().item()
    if pyd is not None:
        pyd_ok = torch.tensor(meta["cg_optimal"])
        col_rel = rel_to(cg.x, pyd["cg_x"])
        pyd_res = true_residual(pyd["cg_x"])
        pyd_err = rel_to(pyd["cg_x"], exact)
        pyd_line = (
            f"pyDVL: {int(pyd_ok.sum())} of {N} columns reported converged (its rule is on the recursive "
            f"residual); their true relative residuals {pyd_res[pyd_ok].min():.1e}–{pyd_res[pyd_ok].max():.1e} and "
            f"errors against the float64 solution {pyd_err[pyd_ok].min():.1e}–{pyd_err[pyd_ok].max():.1e} "
            f"(float32 products); the {int((~pyd_ok).sum())} others stopped at maxiter = 10·P with true residuals "
            f"up to {pyd_res.max():.1e}. twicediff against pyDVL: {col_rel[pyd_ok].max():.1e} on the columns pyDVL "
            f"converged, {col_rel.max():.1e} on all.")
    else:
        col_rel = torch.tensor([float("nan")])
        pyd_ok = torch.zeros(N, dtype=torch.bool)
        pyd_line = "pyDVL: stopped before it finished; no solutions to compare."
    eig_rel_pydvl = ((lr.eigen_vals.double() - pyd_eig["eigen_vals"].double()).abs()
                     / pyd_eig["eigen_vals"].double().abs()).max().item()
    eig_rel_op = ((lr.eigen_vals.double() - eig_op.double()).abs() / eig_op.double().abs()).max().item()
    pydvl_niter = f"{min(meta['cg_niter'])}–{max(meta['cg_niter'])}" if meta else "unknown (stopped)"
    cg_base = (f"{med['pydvl_cg']:.2f}" if meta and med["pydvl_cg"] != float("inf")
               else f"> {args.pydvl_cg_timeout:.0f} (stopped)")
    cg_ratio = (f"{med['pydvl_cg'] / med['td_cg']:.1f}×" if med["pydvl_cg"] != float("inf")
                else f"> {args.pydvl_cg_timeout / med['td_cg']:.1f}×")
    checks = {
        "every twicediff CG column converged": all(optimal),
        "every pyDVL CG column converged": meta is not None and all(meta["cg_optimal"]),
        "every twicediff CG column meets the rule on its true residual (float64 iterate)": solver_res <= cfg["rtol"],
        "twicediff CG solutions equal the float64 direct solution to 1e-4 relative": err_exact < 1e-4,
        "CG solutions equal pyDVL's to 1e-4 relative (columns pyDVL converged)":
            bool(pyd_ok.any()) and float(col_rel[pyd_ok].max()) < 1e-4,
        "Lanczos eigenvalues equal pyDVL/eigsh's to 1e-4 relative": eig_rel_pydvl < 1e-4,
        "Lanczos eigenvalues equal eigsh on the same operator to 1e-4 relative": eig_rel_op < 1e-4,
    }

    lines = [
        "# Inverse-HVP solvers on CPU: twicediff vs pyDVL 0.7.1",
        "",
        f"- machine: {machine()}, torch threads {torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f}",
        f"- torch {torch.__version__}, python {platform.python_version()}, commit {git_commit()}",
        f"- command: `PYTHONPATH=python python benchmarks/bench_solvers.py --rounds {args.rounds} "
        f"--block-size {args.block_size}" + (f" --preconditioner {args.preconditioner}" if args.preconditioner else "")
        + (" --per-column" if args.per_column else "") + (" --float32-products" if args.float32_products else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --pydvl-cg-timeout {args.pydvl_cg_timeout:g}" if args.pydvl_cg_timeout else "")
        + "`",
        f"- problem: MLP 64-64-10 Tanh (P = {P}), cross-entropy, 1,000 training points in batches of 250, "
        f"λ = 0.1, {N} right-hand sides (per-sample test gradients), CG rtol 1e-6 atol 1e-10; top-10 "
        "eigenpairs of H + λI, tol 1e-6",
        f"- medians of {args.rounds} interleaved rounds (seconds); ratio = baseline median / twicediff median",
        "",
        "| task | baseline | baseline s | twicediff | twicediff s | ratio |",
        "|---|---|---:|---|---:|---:|",
        f"| CG, {N} right-hand sides | pyDVL solve_hvp(Cg) | {cg_base} | solve_batch_cg "
        f"({'per-column' if args.per_column else 'block'} CG, {'float32' if args.float32_products else 'float64'} "
        f"products, {cg.info['num_passes']} passes) | "
        f"{med['td_cg']:.2f} | {cg_ratio} |",
        f"| top-10 eigenpairs | pyDVL model_hessian_low_rank (eigsh) | {med['pydvl_eigsh']:.2f} | "
        f"Lanczos (block {args.block_size}) | {med['td_lanczos']:.2f} | "
        f"{med['pydvl_eigsh'] / med['td_lanczos']:.1f}× |",
        f"| top-10 eigenpairs | scipy eigsh on twicediff's operator ({eigsh_passes} products) | "
        f"{med['scipy_eigsh_td_op']:.2f} | Lanczos (block {args.block_size}) | {med['td_lanczos']:.2f} | "
        f"{med['scipy_eigsh_td_op'] / med['td_lanczos']:.1f}× |",
        "",
        f"CG iterations per column: twicediff {min(niter)}–{max(niter)}, pyDVL {pydvl_niter}. twicediff: largest "
        f"true relative residual ‖(H+λI)x−b‖/‖b‖ of its float64 iterate (its own final check) {solver_res:.2e}; "
        f"of the float32 x it returns {true_res:.2e}, where the float64 direct solution rounded to float32 has "
        f"{floor:.2e} (rounding to float32 alone costs that much at this conditioning); largest "
        f"error against the float64 direct solution {err_exact:.2e}. Residuals here are computed with a float64 "
        f"copy of the model. {pyd_line}",
        "",
        f"Largest relative eigenvalue difference: vs pyDVL {eig_rel_pydvl:.2e}, vs eigsh on the same operator "
        f"{eig_rel_op:.2e}.",
        "",
        "| check | |",
        "|---|---|",
        *[f"| {k} | {'yes' if v else 'NO'} |" for k, v in checks.items()],
        "",
        "All times per round: " + "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in times.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
