"""float32 GEMMs on the CPU: ATen's BLAS (torch.mm, what the baselines use) against twicediff's gemm_
op (torch's bundled oneDNN where build_info()["cpu_gemm"] is "onednn", see csrc/cpu/gemm.cpp).

Shapes: the native HVP op's GEMMs on model (a) of issue 3 (MLP 64-128-128-10, N = 512) for one
thread's part of D = 64 directions on two threads (32 directions), and a square 2048^3 GEMM. Both
write into a kept output; medians of interleaved rounds.

    python benchmarks/bench_cpu_gemm.py [--threads 1 2] [--rounds 15] [--out benchmarks/results/cpu_gemm.md]
"""
from __future__ import annotations

import torch

from harness import bench_args, emit, header
from twicediff import build_info, ops
from twicediff.app.bench import interleaved_medians

N, D = 512, 32
# (label, a's shape, b's shape, a transposed, b transposed): a [M, K] @ b [K, N] as the op takes them
SHAPES = [
    ("R(a_1) = h_0 [V_1, Vb_1]^T", (N, 65), (65, D * 128), False, True),
    ("R(h_1) W_2^T (in R(a_2))", (N * D, 128), (128, 128), False, True),
    ("R(g_W_2) = R(g_a_2)^T h_1", (D * 128, N), (N, 128), True, False),
    ("g_a_2^T R(h_1)", (128, N), (N, D * 128), True, False),
    ("R(g_h_1) = R(g_a_2) W_2", (N * D, 128), (128, 128), False, False),
    ("R(h_2) W_3^T (in R(a_3), 10 outputs)", (N * D, 128), (128, 10), False, True),
    ("g_a_3 V_3 (in R(g_h_2), K = 10)", (N, 10), (10, D * 128), False, False),
    ("square 2048", (2048, 2048), (2048, 2048), False, False),
]


def operand(shape, transposed: bool) -> torch.Tensor:
    """A [rows, cols] operand, stored transposed (a column-major view) when the op reads it so."""
    return torch.randn(shape[1], shape[0]).t() if transposed else torch.randn(*shape)


def main() -> None:
    args = bench_args(__doc__, 15, thread_counts=True)
    lines = [header("float32 GEMMs on the CPU: torch.mm (ATen's BLAS) against gemm_", max(args.threads)),
             "", f"gemm_'s backend: {build_info()['cpu_gemm']}; medians of {args.rounds} interleaved rounds, GFLOP/s.",
             "", "| threads | GEMM | shape (M x K x N) | torch.mm | gemm_ | gemm_ / torch.mm |", "|---|---|---|---|---|---|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, sa, sb, ta, tb in SHAPES:
            a, b = operand(sa, ta), operand(sb, tb)
            out = torch.empty(sa[0], sb[1])
            res = interleaved_medians({"mm": lambda: torch.mm(a, b, out=out), "op": lambda: ops.gemm_(out, a, b)},
                                      args.rounds, calls={"mm": 3, "op": 3})
            torch.mm(a, b, out=out)
            want = out.clone()
            ops.gemm_(out, a, b)
            err = float((out - want).abs().max() / want.abs().max())
            assert err < 1e-5, f"{label}: gemm_ and torch.mm disagree by {err:.1e}"
            flops = 2 * sa[0] * sa[1] * sb[1]
            mm, op = flops / res["mm"] / 1e9, flops / res["op"] / 1e9
            lines.append(f"| {threads} | {label} | {sa[0]} x {sa[1]} x {sb[1]} | {mm:.0f} | {op:.0f} | {op / mm:.2f} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
