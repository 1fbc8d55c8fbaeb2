"""One pass of the Hessian operator (what every CG / Lanczos step costs) with its batches kept
against re-reading them from the loader, on a last-layer model: a frozen 256 -> 2048 -> 2048 ReLU
feature extractor and a trainable 2048 -> 10 head (P = 20,490), cross-entropy, 2,000 rows in
batches of 250, 16 directions per pass.

Kept: the operator's first pass keeps each batch's product function (the prefix's output
included). Re-read: a memory budget whose quarter is under the prefix's output, so that every pass
reads the loader and runs the prefix again (what every pass did before the cache), and that still
takes a pass's directions in one chunk.

    PYTHONPATH=python python benchmarks/bench_operator_cache.py [--threads 2] [--out benchmarks/results/operator_cache_cpu.md]
"""
from __future__ import annotations


import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import bench_args, emit, header, median_ms
import twicediff
from twicediff.torch import hessian_operator

ROWS, BATCH, DIRECTIONS = 2000, 250, 16


def main() -> None:
    args = bench_args(__doc__, rounds=9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)).eval()
    for module in list(model)[:4]:
        module.requires_grad_(False)
    td = twicediff.TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    x, y = torch.randn(ROWS, 256), torch.randint(0, 10, (ROWS,))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    V = torch.randn(DIRECTIONS, td.num_params)
    kept = hessian_operator(td, loader)
    kept_ms = median_ms(lambda: kept.apply_rows(V), args.rounds)  # the warm-up pass fills the cache
    # A quarter of this budget holds half the prefix's output, so nothing is kept; it still holds
    # all 16 directions of a pass in one chunk (about 0.45 MB each here).
    features = ROWS * 2048 * 4
    with twicediff.memory_budget(2 * features):
        reread = hessian_operator(td, loader)
        reread_ms = median_ms(lambda: reread.apply_rows(V), args.rounds)
        per_direction = td.hvp_function(x[:BATCH], y[:BATCH]).bytes_per_direction
        assert 2 * features // per_direction >= DIRECTIONS
    assert kept.cached and not reread.cached
    torch.testing.assert_close(kept.apply_rows(V), reread.apply_rows(V), rtol=1e-5, atol=1e-7)
    text = "\n".join([
        header("Hessian operator: one pass with the batches kept against re-read", args.threads),
        "",
        f"Command: `PYTHONPATH=python python benchmarks/bench_operator_cache.py --threads {args.threads}`; "
        f"medians of {args.rounds} passes after the first.",
        "",
        f"Model: frozen 256 -> 2048 -> 2048 ReLU prefix, trainable 2048 -> 10 head (P = {td.num_params:,}), "
        f"cross-entropy; {ROWS:,} rows in batches of {BATCH}; {DIRECTIONS} directions per pass.",
        "",
        "| batches | ms per pass | × kept |",
        "|---|---:|---:|",
        f"| kept (product functions, prefix output included) | {kept_ms:.1f} | 1.0 |",
        f"| re-read from the loader (prefix run every pass) | {reread_ms:.1f} | {reread_ms / kept_ms:.1f} |",
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
