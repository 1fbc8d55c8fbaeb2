"""How fast are the parameter-space ops against what one would write in plain torch?

- pack_into (K blocks [N, *shape_k] into a preallocated [N, P] matrix) against
  ``torch.cat([b.reshape(N, -1) for b in blocks], dim=1, out=rows)`` and a per-block ``copy_`` loop;
- unpack_into against a per-block ``copy_`` loop;
- blockwise_contract (C = sum_k A_k B_k^T, no packing) against ``A @ B.T`` on packed matrices, the
  packing of A and B reported as a separate column.

K = 20 blocks shaped like a 10-layer MLP (weights and biases), N x P = --numel elements (float32).
Every method of a case is timed once per round, rounds interleaved, and the median over rounds is
reported with ratios to the baselines measured in the same run (ratio > 1: twicediff is faster).

    PYTHONPATH=python python benchmarks/bench_pack.py --out benchmarks/results/pack_cpu.md
    PYTHONPATH=python python benchmarks/bench_pack.py --device cuda --out benchmarks/results/pack_cuda.md
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List

import torch

from twicediff import ops
from harness import git_commit, interleaved_medians, machine


def block_shapes(width: int, num_blocks: int) -> List[tuple]:
    """num_blocks / 2 (weight, bias) pairs with weights of growing size, sum of numels = width."""
    pairs = num_blocks // 2
    bias = max(1, width // (100 * pairs))
    weight_total = width - bias * pairs - (num_blocks % 2)
    parts = [weight_total * (i + 1) // sum(range(1, pairs + 1)) for i in range(pairs)]
    parts[-1] += weight_total - sum(parts)
    shapes: List[tuple] = []
    for n in parts:
        cols = 10 if n % 10 == 0 else 1
        shapes += [(n // cols, cols), (bias,)]
    if num_blocks % 2:
        shapes.append((1,))
    assert sum(torch.Size(s).numel() for s in shapes) == width and len(shapes) == num_blocks
    return shapes


def bench_pack(rows: int, width: int, num_blocks: int, rounds: int, device: torch.device) -> dict:
    shapes = block_shapes(width, num_blocks)
    blocks = [torch.randn((rows, *s), device=device) for s in shapes]
    out = torch.empty(rows, width, device=device)
    flat = [b.reshape(rows, -1) for b in blocks]
    cols = [0]
    for f in flat:
        cols.append(cols[-1] + f.shape[1])

    def copy_loop():
        for f, c0, c1 in zip(flat, cols, cols[1:]):
            out[:, c0:c1].copy_(f)

    def copy_back_loop():
        for f, c0, c1 in zip(flat, cols, cols[1:]):
            f.copy_(out[:, c0:c1])

    t = interleaved_medians({
        "pack_into": lambda: ops.pack_into(blocks, out, 0),
        "cat_out": lambda: torch.cat(flat, dim=1, out=out),
        "copy_loop": copy_loop,
        "unpack_into": lambda: ops.unpack_into(out, blocks),
        "copy_back_loop": copy_back_loop,
    }, rounds, device)
    ops.pack_into(blocks, out, 0)
    assert torch.equal(out, torch.cat(flat, dim=1)), "pack_into disagrees with torch.cat"
    del blocks, out, flat
    return t


def bench_contract(rows: int, width: int, num_blocks: int, test_rows: int, rounds: int,
                   device: torch.device) -> dict:
    shapes = block_shapes(width, num_blocks)
    a = [torch.randn((rows, *s), device=device) for s in shapes]
    b = [torch.randn((test_rows, *s), device=device) for s in shapes]
    a_packed = torch.empty(rows, width, device=device)
    b_packed = torch.empty(test_rows, width, device=device)

    def pack_both():
        ops.pack_into(a, a_packed, 0)
        ops.pack_into(b, b_packed, 0)

    pack_both()
    t = interleaved_medians({
        "blockwise_contract": lambda: ops.blockwise_contract(a, b),
        "matmul_packed": lambda: a_packed @ b_packed.T,
        "pack_a_b": pack_both,
    }, rounds, device)
    c = ops.blockwise_contract(a, b)
    ref = a_packed.double() @ b_packed.double().T
    err = ((c.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, f"blockwise_contract relative error {err}"
    return t


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--numel", type=float, default=1e8, help="N x P, elements of the packed matrix")
    ap.add_argument("--blocks", type=int, default=20, help="K, parameter blocks")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--test-rows", type=int, default=100, help="V, rows of b in blockwise_contract")
    ap.add_argument("--no-contract", action="store_true",
                    help="pack / unpack only (also runs against builds that predate blockwise_contract)")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args()
    device = torch.device(args.device)
    numel = int(args.numel)
    cases = [(1000, numel // 1000), (numel // 1000, 1000), (numel // 100, 100)]  # wide, tall, very tall

    lines = [
        f"# pack / unpack / blockwise_contract on {device.type.upper()}",
        "",
        f"- machine: {device_name(device)}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()}, twicediff commit {git_commit()}",
        f"- load average at start (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- K = {args.blocks} blocks (MLP-like weights and biases), float32, N x P = {numel:.0e}, "
        f"median of {args.rounds} interleaved rounds",
        f"- command: `PYTHONPATH=python python benchmarks/bench_pack.py --device {args.device} "
        f"--numel {args.numel:g} --blocks {args.blocks} --rounds {args.rounds}"
        f"{' --no-contract' if args.no_contract else ''}`",
        "",
        "## pack_into and unpack_into (ms; ratio = baseline / twicediff, > 1 means twicediff is faster)",
        "",
        "| N | P | pack_into | cat(out=) | copy_ loop | cat / pack | loop / pack | unpack_into | copy_ loop back | loop / unpack |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rows, width in cases:
        t = bench_pack(rows, width, args.blocks, args.rounds, device)
        ms = {k: v * 1e3 for k, v in t.items()}
        lines.append(
            f"| {rows} | {width} | {ms['pack_into']:.1f} | {ms['cat_out']:.1f} | {ms['copy_loop']:.1f} | "
            f"{t['cat_out'] / t['pack_into']:.2f} | {t['copy_loop'] / t['pack_into']:.2f} | "
            f"{ms['unpack_into']:.1f} | {ms['copy_back_loop']:.1f} | {t['copy_back_loop'] / t['unpack_into']:.2f} |")
        print(lines[-1], flush=True)
    lines += [] if args.no_contract else [
        "",
        f"## blockwise_contract, C [N, V={args.test_rows}] (ms; ratio = baseline / blockwise_contract)",
        "",
        "| N | P | blockwise_contract | matmul on packed | packing A and B | matmul / blockwise | (pack + matmul) / blockwise |",
        "|---|---|---|---|---|---|---|",
    ]
    for rows, width in [] if args.no_contract else cases[:2]:
        t = bench_contract(rows, width, args.blocks, args.test_rows, args.rounds, device)
        ms = {k: v * 1e3 for k, v in t.items()}
        lines.append(
            f"| {rows} | {width} | {ms['blockwise_contract']:.1f} | {ms['matmul_packed']:.1f} | {ms['pack_a_b']:.1f} | "
            f"{t['matmul_packed'] / t['blockwise_contract']:.2f} | "
            f"{(t['matmul_packed'] + t['pack_a_b']) / t['blockwise_contract']:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
