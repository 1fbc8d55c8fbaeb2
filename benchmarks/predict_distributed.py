"""Predicted data-parallel scaling of twicediff's iterative solvers on GPU clusters, from the
communication formulas of docs/distributed.md and stated assumptions (no measurement: no GPU cluster
here). Prints the markdown tables that docs/distributed.md holds.

    python benchmarks/predict_distributed.py

Model of one Hessian-operator product on W ranks (one CG / LiSSA / Lanczos step), ring all-reduce:

    T(W) = C / W  +  S  +  2·(W−1)/W · s·D·P / B  +  2 · 2·(W−1) · α

C: the compute of one product over all the training data on one GPU (FLOPS_PER_POINT · N · D / F);
S = 10·D²·P / F: block CG's own work on the [D, P] blocks (QR of the search block, projections),
which every rank repeats (the solver state is replicated, not sharded); s·D·P: the block's bytes; B: the all-reduce bus bandwidth per rank; α: the latency of one
ring hop; two all-reduces per product (the status exchange and the block). Speedup T(1) / T(W).
"""
from __future__ import annotations

from dataclasses import dataclass

# Links. "NVLink": H100 NVLink 4 all-reduce bus bandwidth as NCCL reaches within an 8-GPU node; for 64
# GPUs this presumes an NVLink-class fabric between nodes (an NVL72-like switch system), otherwise
# the cluster's inter-node link (e.g. 400 Gb/s InfiniBand = 50 GB/s) is the one to put here.
# "100 Gb/s Ethernet": 12.5 GB/s per rank on the ring (one NIC per GPU, or per node with a
# hierarchical all-reduce whose inter-node ring carries the same bytes).
LINKS = {"NVLink (450 GB/s, α = 2 µs)": (450e9, 2e-6), "100 Gb/s Ethernet (12.5 GB/s, α = 10 µs)": (12.5e9, 10e-6)}


@dataclass
class Workload:
    name: str
    P: int
    points: float          # training points (tokens for a transformer) in one pass
    point_name: str
    D: int                 # directions per product (the block width)
    s: int                 # bytes per element of the block (product dtype)
    flops: float           # achieved FLOP/s of one GPU on the products
    note: str

    @property
    def flops_per_point(self) -> float:
        # One Hessian-vector product per point and direction ≈ 2 gradients ≈ 2 · 6·P FLOPs
        # (forward 2P, backward 4P): 12·P.
        return 12.0 * self.P


def mlp_params(sizes) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


WORKLOADS = [
    # Block CG all-reduces its float64 blocks whatever the model's dtype: s = 8.
    Workload("MLP 64-128-128-10", mlp_params([64, 128, 128, 10]), 60_000, "points", 64, 8, 10e12,
             "float32 products, float64 CG blocks; small GEMMs: 10 TFLOP/s achieved"),
    Workload("124M transformer (GPT-2 small)", 124_000_000, 1e7, "tokens", 8, 8, 150e12,
             "float32 products on TF32 tensor cores (150 TFLOP/s achieved), float64 CG blocks"),
    # A float64 [1, P] block of a 7B model is 56 GB and block CG holds about seven: beyond one GPU.
    # The row is a solver whose blocks are bfloat16 (what LiSSA's iterate is for a bfloat16 model).
    Workload("7B transformer", 7_000_000_000, 1e7, "tokens", 1, 2, 300e12,
             "bfloat16 products and blocks (not twicediff's CG, whose float64 blocks do not fit): "
             "300 TFLOP/s achieved"),
]


def step_time(w: Workload, W: int, B: float, alpha: float) -> tuple:
    compute = w.flops_per_point * w.points * w.D / w.flops
    serial = 10.0 * w.D * w.D * w.P / w.flops
    comm = 2 * (W - 1) / W * w.s * w.D * w.P / B
    latency = 2 * 2 * (W - 1) * alpha
    return compute / W, serial, comm, latency


def main() -> None:
    print("| model | P | block [D, P] bytes | one step on 1 GPU | link | W | compute / W | replicated solver work | "
          "all-reduce | latency | predicted speedup | efficiency | points per rank where communication = compute |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in WORKLOADS:
        one = sum(step_time(w, 1, 1.0, 0.0)[:2])
        for link, (B, alpha) in LINKS.items():
            for W in (8, 64):
                c, ser, m, lat = step_time(w, W, B, alpha)
                speedup = one / (c + ser + m + lat)
                # compute per rank = communication: 12·P·D·n / F = 2(W−1)/W · s·D·P / B
                breakeven = 2 * (W - 1) / W * w.s * w.flops / (12.0 * B)
                print(f"| {w.name} | {w.P:,} | {w.s * w.D * w.P / 1e6:,.1f} MB | {_t(one)} | {link} | {W} | {_t(c)} | {_t(ser)} | "
                      f"{_t(m)} | {_t(lat)} | {speedup:.1f}× | {100 * speedup / W:.0f}% | "
                      f"{breakeven:,.0f} {w.point_name} |")
    print()
    for w in WORKLOADS:
        print(f"- {w.name}: {w.points:,.0f} {w.point_name} per pass, D = {w.D}, {w.s}-byte elements, {w.note}.")


def _t(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:,.1f} s"
    if seconds >= 1e-3:
        return f"{1e3 * seconds:.1f} ms"
    return f"{1e6 * seconds:.0f} µs"


if __name__ == "__main__":
    main()
