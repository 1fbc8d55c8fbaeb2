"""Native HVP engine vs its baselines on model (a) of issue 3: MLP 64-128-128-10 with Tanh,
cross-entropy, N = 512, float32, D directions (default 64), CPU threads fixed (default 2).

Methods, timed interleaved (one call each per round, medians over rounds):
  native   twicediff's engine: NativeHvpEngine.hvp(x, y, V), one op call for all D
  native_blas  the same with its GEMMs sent to ATen's BLAS (TWICEDIFF_CPU_GEMM=blas) instead of
           torch's oneDNN (when build_info()["cpu_gemm"] is "onednn")
  loop     pyDVL 0.7's mvp: grad with create_graph, then one autograd.grad per direction
  func     torch.func vmap(jvp(grad(L))) over the D directions at once
  grad     one plain gradient (autograd.grad of the mean loss, no create_graph)
  gemms    harness.native_gemms: the GEMMs the native engine runs, alone (same shapes,
           through the op's own GEMM): the floor of the native engine's algorithm
  peak     one square 2048^3 sgemm, what the fastest GEMM reaches with these threads, in the same
           rounds: torch.mm (ATen's BLAS, which the baselines use) and twicediff's gemm_ op
           (oneDNN where the op uses it), the faster of the two; every method's rate is given as
           GFLOP/s of exact-HVP work (hvp_flops) and as a fraction of it, so that a target ratio
           can be checked against what the hardware allows

Usage: python benchmarks/bench_native_hvp.py [--d 64] [--rounds 15] [--threads 2] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from harness import emit
from twicediff import TorchTwiceDifferentiable
from twicediff import _build, ops
from harness import cpu_gemm, git_commit, interleaved_medians, machine, native_gemms
from twicediff.torch.engines import NativeEngine


GRAD_REPEATS = 10


def model_a() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)).eval()


def hvp_flops(model: nn.Sequential, n: int) -> int:
    """FLOPs of one exact HVP by the R-operator: per Linear layer and row, R(a) = h V^T + R(h) W^T
    and R(g_W) = R(g_a)^T h + g_a^T R(h), R(g_h) = R(g_a) W + g_a V — six GEMM terms of in*out
    multiply-adds; the first layer has two (R(h_0) = 0 and no R(g_h_0))."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    macs = sum((2 if i == 0 else 6) * lin.in_features * lin.out_features for i, lin in enumerate(linears))
    return 2 * n * macs


def gradient_flops(model: nn.Sequential, n: int) -> int:
    """FLOPs of one plain gradient's GEMMs: forward h W^T and weight gradient g^T h of every layer,
    input gradient g W of every layer but the first."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    macs = sum((2 if i == 0 else 3) * lin.in_features * lin.out_features for i, lin in enumerate(linears))
    return 2 * n * macs


PEAK_SIZE = 2048


def make_methods(model, x, y, V):
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    engine = NativeEngine(model, F.cross_entropy)
    loss_of = lambda out: F.cross_entropy(torch.squeeze(out), torch.squeeze(y))

    def native():
        return engine.apply(engine.prepare(x, y), V, "hessian")

    def native_blas():
        with cpu_gemm("blas"):
            return engine.apply(engine.prepare(x, y), V, "hessian")

    def loop():
        g = torch.autograd.grad(loss_of(model(x)), params, create_graph=True)
        flat = torch.cat([t.reshape(-1) for t in g])
        rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat @ v, params, retain_graph=True)])
                for v in V]
        return torch.stack(rows)

    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_flat(t):
        ps = {n: c.view(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}
        return loss_of(functional_call(model, ps, (x,)))

    def func():
        return vmap(lambda v: jvp(grad(loss_flat), (theta,), (v,))[1])(V)

    def plain_gradient():
        return torch.autograd.grad(loss_of(model(x)), params)

    # The native engine's GEMMs alone, on buffers of the same shapes (harness.native_gemms).
    gemms = native_gemms(TorchTwiceDifferentiable(model, F.cross_entropy), x, y, V)

    square = torch.randn(PEAK_SIZE, PEAK_SIZE)
    product = torch.empty(PEAK_SIZE, PEAK_SIZE)

    methods = {"native": native, "loop": loop, "func": func, "grad": plain_gradient, "gemms": gemms,
               "peak_blas": lambda: torch.mm(square, square, out=product)}
    if _build._C.cpu_gemm() == "onednn":
        methods["native_blas"] = native_blas
        methods["peak_op"] = lambda: ops.gemm_(product, square, square)
    return methods


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: process CPU time (all threads), steadier on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = model_a()
    x, y = torch.randn(args.n, 64), torch.randint(0, 10, (args.n,))
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(args.d, P)
    methods = make_methods(model, x, y, V)
    # Correctness of what is timed: the three HVP methods agree.
    ref = methods["loop"]()
    for name in [m for m in ("native", "native_blas", "func") if m in methods]:
        err = (methods[name]() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-4, f"{name} disagrees with the loop: relative error {err:.2e}"
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    med = interleaved_medians(methods, args.rounds, calls={"grad": GRAD_REPEATS}, clock=clock)
    D = args.d
    peak = min(med[k] for k in ("peak_blas", "peak_op") if k in med)
    peaks = " and ".join(f"torch.mm {2 * PEAK_SIZE ** 3 / med['peak_blas'] / 1e9:.0f}" if k == "peak_blas" else
                         f"gemm_ {2 * PEAK_SIZE ** 3 / med['peak_op'] / 1e9:.0f}" for k in ("peak_blas", "peak_op")
                         if k in med)
    lines = [
        f"# Native HVP engine, model (a): MLP 64-128-128-10 Tanh, cross-entropy, N={args.n}, D={D}, float32",
        "",
        f"machine: {machine()}, {args.threads} threads; torch {torch.__version__}; "
        f"commit {git_commit()}; medians of {args.rounds} interleaved rounds; {args.clock} clock; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        "",
        f"Exact-HVP work: {hvp_flops(model, args.n) / 1e6:.1f} MFLOP per direction. GFLOP/s: that work per "
        f"second of the method; % peak: against a {PEAK_SIZE}^3 sgemm timed in the same rounds, the faster "
        f"of {peaks} ({2 * PEAK_SIZE ** 3 / peak / 1e9:.0f} GFLOP/s). Native op's float32 CPU GEMMs: "
        f"{_build._C.cpu_gemm()}.",
        "",
        "| method | ms per call (D dirs) | ms per HVP | HVP cost in plain gradients | native speed-up | GFLOP/s | % peak |",
        "|---|---|---|---|---|---|---|",
    ]
    g = med["grad"]
    flops = hvp_flops(model, args.n)
    peak_rate = 2 * PEAK_SIZE ** 3 / peak
    for k in [m for m in ("native", "native_blas", "loop", "func", "gemms") if m in med]:
        per = med[k] / D
        rate = flops / per
        lines.append(f"| {k} | {med[k] * 1e3:.2f} | {per * 1e3:.3f} | {per / g:.2f} | {med[k] / med['native']:.2f}x "
                     f"| {rate / 1e9:.0f} | {100 * rate / peak_rate:.0f}% |")
    lines.append(f"| grad (one plain gradient) | {g * 1e3:.3f} | | 1.00 | | | |")
    lines.append("")
    lines.append(f"native / gemms-alone time: {med['native'] / med['gemms']:.2f}")
    loop_rate = flops / (med["loop"] / D)
    lines.append(f"3x the loop needs {3 * loop_rate / 1e9:.0f} GFLOP/s of exact-HVP work, "
                 f"{100 * 3 * loop_rate / peak_rate:.0f}% of the sgemm peak.")
    func_rate = flops / (med["func"] / D)
    lines.append(f"2x torch.func needs {2 * func_rate / 1e9:.0f} GFLOP/s, {100 * 2 * func_rate / peak_rate:.0f}% of the peak.")
    grad_flops = gradient_flops(model, args.n)
    need = flops / (0.8 * g)
    lines.append(f"One HVP in at most 0.8 plain gradients needs {need / 1e9:.0f} GFLOP/s, {100 * need / peak_rate:.0f}% of "
                 f"the peak: an exact HVP is {flops / grad_flops:.2f}x a plain gradient's GEMM work "
                 f"({grad_flops / 1e6:.1f} MFLOP), and the plain gradient ran at "
                 f"{grad_flops / g / 1e9:.0f} GFLOP/s ({100 * grad_flops / g / peak_rate:.0f}% of the peak).")
    text = "\n".join(lines)
    emit(text, args.out)


if __name__ == "__main__":
    main()
