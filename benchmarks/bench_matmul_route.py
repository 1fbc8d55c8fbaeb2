"""The generic engines' products with torch's float32 matmuls routed (twicediff.torch.matmul_route)
against the same products on ATen's GEMMs alone, interleaved in one process.

For each preset and engine, two methods run the same ``hvp(x, y, V, engine=...)`` call:
- ``routed``: ``TWICEDIFF_MATMUL_ROUTE=auto`` (the default), each shape class on the faster of
  oneDNN and ATen's BLAS as timed on its first call;
- ``aten``: ``TWICEDIFF_MATMUL_ROUTE=aten``, every matmul on ATen's BLAS, as torch runs them.
The variable is read at every product, so the two alternate within one process. Each method is
timed after an untimed call of its own (``--untimed-first``). The routed results are checked
against the unrouted ones before timing (float32 rounding apart), and the shape classes the preset
added, and how many went to oneDNN, are reported with the time spent timing them.

    flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_matmul_route.py \\
        --out benchmarks/results/matmul_route_cpu.md
"""
import torch

import harness
from twicediff import TorchTwiceDifferentiable
from twicediff.app import bench
from twicediff.torch import matmul_route


def run(preset: str, engine: str, D: int, repeats: int, untimed_first: int):
    torch.manual_seed(0)
    model, loss, x, y = bench.PRESETS[preset][1](torch.device("cpu"))
    td = TorchTwiceDifferentiable(model, loss)
    V = torch.randn(D, td.num_params)

    def call(mode):
        def product():
            with harness.environment(matmul_route.ENV, mode):
                return td.hvp(x, y, V, engine=engine)
        return product

    fns = {"routed": call("auto"), "aten": call("aten")}
    before = matmul_route.decisions()
    fns["aten"]()  # compiles, where the engine compiles, before anything is timed
    want, got = fns["aten"](), fns["routed"]()
    after = matmul_route.decisions()
    gap = float((got - want).abs().max() / want.abs().max())
    med = bench.interleaved_medians(fns, repeats, untimed_first=untimed_first)
    classes = after["classes"] - before["classes"]
    onednn = after["onednn"] - before["onednn"]
    return (f"| {preset} | {engine} | {D} | {med['aten'] * 1e3:.1f} | {med['routed'] * 1e3:.1f} | "
            f"{med['aten'] / med['routed']:.2f} | {classes} | {onednn} | "
            f"{after['seconds'] - before['seconds']:.2f} | {gap:.1e} |")


def main():
    args = harness.preset_args(__doc__, lambda ap: ap.add_argument(
        "--engine", action="append", choices=["func", "autograd", "loop", "compiled"]))
    presets = args.preset or ["d_transformer", "d_cnn", "a"]
    engines = args.engine or ["func", "compiled"]
    command = ("flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_matmul_route.py "
               + " ".join(f"--preset {p}" for p in presets) + " " + " ".join(f"--engine {e}" for e in engines)
               + f" --directions {args.directions} --repeats {args.repeats} --untimed-first {args.untimed_first}")
    text = ["# The generic engines' matmuls routed, against ATen's alone (cpu)", "",
            f"{harness.run_facts()}; {args.threads} threads; float32; "
            f"{bench.timing_words(args.repeats, args.untimed_first)}; load average at start "
            f"{harness.load_average()}.", "", f"Command: `{command}`", "",
            "ms / call: one `hvp` of D directions. × aten: aten's time over routed's (> 1: routing is faster). "
            "classes: matmul shape classes the preset's products added (timed on first sight); to oneDNN: "
            "those oneDNN won; timing s: the time that took, once per process. max rel Δ: routed against "
            "aten, relative to the largest entry.", "",
            "| preset | engine | D | aten ms | routed ms | × aten | classes | to oneDNN | timing s | max rel Δ |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in presets:
        for e in engines:
            text.append(run(p, e, args.directions, args.repeats, args.untimed_first))
            print(text[-1], flush=True)
    text += ["", f"Load average at the end: {harness.load_average()}."]
    harness.emit("\n".join(text), args.out)


if __name__ == "__main__":
    main()
