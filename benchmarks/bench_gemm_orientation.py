"""Which form of the weight-gradient GEMM the native HVP engine should use on this BLAS.

R(g_W) of a layer, for all D directions, can be taken as R(g_a)^T h ([D*out, N] x [N, in], written
straight into the [D, out, in] result) or as h^T R(g_a) ([in, N] x [N, D*out], then transposed while
it is written). The engine picks one per dtype on the CPU (``CpuKernels::weight_grad_input_major``
in csrc/cpu/mlp_hvp.cpp); this script times both, with the write, at the shapes of issue 3's model (a)
(float32, N = 512) and of the influence benchmark's MLP (float64, N = 250 per batch and 1,000).

    python benchmarks/bench_gemm_orientation.py [--threads 1 2] [--out benchmarks/results/native_hvp_orientation.md]
"""
from __future__ import annotations

import torch

from harness import bench_args, emit, header
from twicediff import build_info, ops
from twicediff.app.bench import interleaved_medians

# (label, dtype, N rows, D directions, in, out)
SHAPES = [
    ("influence MLP layer 1, batch 250", torch.float64, 250, 64, 64, 64),
    ("influence MLP layer 1, N = 1000", torch.float64, 1000, 64, 64, 64),
    ("model (a) layer 1", torch.float32, 512, 64, 64, 128),
    ("model (a) layer 2", torch.float32, 512, 64, 128, 128),
    ("model (a) layer 3", torch.float32, 512, 64, 128, 10),
]


def main() -> None:
    args = bench_args(__doc__, 15, thread_counts=True)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, dtype, N, D, inp, out in SHAPES:
            h = torch.randn(N, inp, dtype=dtype)
            rg = torch.randn(N, D * out, dtype=dtype)
            result = torch.empty(D, out * inp + 100, dtype=dtype)  # the layer's block of a wider result
            dst = result.narrow(1, 0, out * inp).view(D, out, inp)
            # through the op's own GEMM (gemm_: oneDNN for float32 where the op uses it), into kept products
            prod_d, prod_t = torch.empty(D * out, inp, dtype=dtype), torch.empty(inp, D * out, dtype=dtype)
            direct = lambda: dst.copy_(ops.gemm_(prod_d, rg.t(), h).view(D, out, inp))
            transposed = lambda: dst.copy_(ops.gemm_(prod_t, h.t(), rg).view(inp, D, out).permute(1, 2, 0))
            torch.testing.assert_close(direct().clone(), transposed().clone())
            med = interleaved_medians({"direct": direct, "transposed": transposed}, args.rounds)
            ta, tb = 1e3 * med["direct"], 1e3 * med["transposed"]
            gflop = 2 * N * D * inp * out / 1e9
            rows.append(f"| {threads} | {label} | {str(dtype).replace('torch.', '')} | {ta:.2f} ({gflop / ta * 1e3:.0f}) "
                        f"| {tb:.2f} ({gflop / tb * 1e3:.0f}) | {ta / tb:.2f} |")
    text = "\n".join([
        header("Weight-gradient GEMM: R(g_a)^T h against h^T R(g_a) with a transposing write", max(args.threads)),
        "",
        f"Command: `python benchmarks/bench_gemm_orientation.py --threads {' '.join(map(str, args.threads))}`; "
        f"medians of {args.rounds} interleaved rounds, ms (GFLOP/s), each including the write into the result; "
        f"GEMMs through gemm_ (float32 CPU backend: {build_info()['cpu_gemm']}).",
        "",
        "| threads | shape | dtype | R(g_a)^T h | h^T R(g_a), transposed | ratio |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "ratio > 1: the transposed form is faster. The engine takes it for float64 on the CPU and the direct",
        "form otherwise (CpuKernels::weight_grad_input_major); rerun this after a GEMM library or CPU change.",
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
