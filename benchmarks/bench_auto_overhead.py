"""What ``engine="auto"`` costs per call beyond the engine it keeps: ``wrapped.hvp(x, y, v)`` against
``wrapped.hvp(x, y, v, engine=<the engine auto kept>)``, and the product function of
``hvp_function`` (engines chosen and the batch prepared once) against both, at small D where a
product is short and a call's fixed costs show. auto is settled first (bench.settle_auto), so both
run the same engine; the difference is the per-call work: building the candidates, the probe key,
the native engine's check, the memory budget.

    flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_auto_overhead.py \\
        [--preset d_transformer --preset d_cnn --preset a] [--directions 1 16] [--sets 3]
"""
import argparse

import torch

import harness
from twicediff.app import bench
from twicediff.torch.engines import probe


def run(preset: str, D: int, sets: int, repeats: int, calls: int):
    td, x, y = bench._setup(preset, "cpu")
    probe.clear()
    v = bench._directions(td, D, x)
    bench.settle_auto(lambda: td.hvp(x, y, v))
    kept = next(iter(probe.decisions("engine").values()))["choice"]
    bound = td.hvp_function(x, y)
    fns = {"hvp auto": lambda: td.hvp(x, y, v), f"hvp engine={kept}": lambda: td.hvp(x, y, v, engine=kept),
           "hvp_function auto": lambda: bound(v)}
    lines = []
    for s in range(sets):
        med = bench.interleaved_medians(fns, repeats, calls={k: calls for k in fns})
        ms = [med[k] * 1e3 for k in fns]
        lines.append(f"| {preset} | {D} | {kept} | {s + 1} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | "
                     f"{ms[0] / ms[1]:.3f} | {(ms[0] - ms[1]) * 1e3:.0f} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", choices=sorted(bench.PRESETS))
    ap.add_argument("--directions", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--calls", type=int, default=3, help="calls back to back per timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = args.preset or ["d_transformer", "d_cnn", "a"]
    text = ["# auto's cost per call (cpu)", "",
            f"{harness.run_facts()}; {args.threads} threads; float32; {args.sets} sets of medians of {args.repeats} interleaved repeats, "
            f"{args.calls} calls back to back per timing; load average at start {harness.load_average()}.", "",
            f"Command: `flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_auto_overhead.py "
            f"{' '.join('--preset ' + p for p in presets)} --directions {' '.join(map(str, args.directions))} "
            f"--sets {args.sets}`", "",
            "ms per call. kept: the engine auto settled on, also run directly. auto / kept > 1: auto's per-call "
            "cost; µs: the difference per call.", "",
            "| preset | D | kept | set | hvp auto | hvp engine=kept | hvp_function auto | auto / kept | µs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in presets:
        for D in args.directions:
            text += run(p, D, args.sets, args.repeats, args.calls)
            print("\n".join(text[-args.sets:]), flush=True)
    harness.emit("\n".join(text), args.out)


if __name__ == "__main__":
    main()
