"""Explicit Hessian of an MLP 64-128-128-10 (Tanh, cross-entropy, P = 26,122) on 512 points:
time and peak memory of twicediff's blockwise assembly (``hessian()``, method "auto") against its
own column path (``method="columns"``: P Hessian-vector products of the native engine, in chunks)
and torch.func.hessian over the flat parameter vector (pyDVL 0.7's method), each in a fresh
subprocess (peak = ru_maxrss).

    python benchmarks/bench_hessian.py [--threads 2] [--out benchmarks/results/hessian_cpu.md]

torch.func.hessian needs the dense Jacobian of the gradient at once; it is run only with
--with-baseline (on this 24 GB machine it was killed for memory at P = 26k).
"""
import argparse
import json
import subprocess
import sys

import harness

CHILD = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
from torch import nn
method, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)).eval()
x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
t0 = time.perf_counter()
if method.startswith("twicediff"):
    from twicediff import TorchTwiceDifferentiable
    H = TorchTwiceDifferentiable(model, F.cross_entropy).hessian(
        x, y, method="columns" if method.endswith("columns") else "auto")
else:
    from torch.func import functional_call, hessian
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    def f(w):
        ps, c = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = w[c:c + s.numel()].reshape(s); c += s.numel()
        return F.cross_entropy(functional_call(model, ps, (x,)), y)
    H = hessian(f)(w0)
elapsed = time.perf_counter() - t0
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the check below
sym = max(((H[i:i + 1024] - H[:, i:i + 1024].T).norm() / H[i:i + 1024].norm()).item()
          for i in range(0, H.shape[0], 1024))
print(json.dumps({"method": method, "P": H.shape[0], "seconds": elapsed, "asym": sym, "peak_gb": peak_gb}))
"""


def run(method, threads):
    proc = subprocess.run([sys.executable, "-c", CHILD, method, str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-baseline", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [run("twicediff", args.threads), run("twicediff HVP columns", args.threads)]
    if args.with_baseline:
        rows.append(run("torch.func.hessian", args.threads))
    lines = [harness.header("Explicit Hessian, MLP 64-128-128-10 Tanh CE, N = 512", args.threads), "",
             "| method | P | time (s) | × time of the first row | peak RSS (GB) | max row-block ‖H−Hᵀ‖/‖H‖ |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | | {r['error']} | | | |")
        else:
            ratio = r["seconds"] / rows[0]["seconds"] if "seconds" in rows[0] else float("nan")
            lines.append(f"| {r['method']} | {r['P']:,} | {r['seconds']:.1f} | {ratio:.1f} | {r['peak_gb']:.2f} | "
                         f"{r['asym']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
