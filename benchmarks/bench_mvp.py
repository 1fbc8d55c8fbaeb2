"""HVPs per second of twicediff's engines against the per-direction loop (pyDVL 0.7's mvp) and
torch.func vmap(jvp(grad)), with the cost of one HVP in plain gradients, peak memory and the 256 MiB
budget check. A thin entry over ``twicediff.app.bench`` with the extras of ``harness``; writes a markdown table, a PNG and the JSON rows.

    PYTHONPATH=python python benchmarks/bench_mvp.py [--preset a] [--device cpu] [--threads 2] [--quick]
"""
import argparse
import os

import torch

import harness
from twicediff.app import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", choices=sorted(bench.PRESETS),
                    help="preset to run (repeatable; default a)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--directions", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    harness.add_untimed_first(ap)
    ap.add_argument("--quick", action="store_true",
                    help="D in {1, 16, 64}, 3 repeats: runnable in minutes on a shared 2-core machine")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", default=None, help="markdown path (default benchmarks/results/mvp_<device>.md); "
                                                "the PNG and JSON go next to it")
    args = ap.parse_args()
    presets = args.preset or ["a"]
    directions = [1, 16, 64] if args.quick else args.directions
    repeats = 3 if args.quick else args.repeats
    device_kind = torch.device(args.device).type
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"mvp_{device_kind}.md")
    machine = (torch.cuda.get_device_name(torch.device(args.device)) if device_kind == "cuda"
               else harness.machine())
    command = ("PYTHONPATH=python python benchmarks/bench_mvp.py " + " ".join(f"--preset {p}" for p in presets)
               + f" --device {args.device} --threads {args.threads}" + (" --quick" if args.quick else
               f" --directions {' '.join(map(str, directions))} --repeats {repeats}")
               + f" --untimed-first {args.untimed_first}"
               + (" --no-memory" if args.no_memory else ""))
    header = [f"# Batched HVPs ({args.device})", "",
              f"Machine: {machine}; torch {torch.__version__}; commit {harness.git_commit()}; "
              f"{args.threads} threads; float32; {bench.timing_words(repeats, args.untimed_first)}.", "",
              f"Command: `{command}`", "",
              "Presets: " + "; ".join(f"**{p}** {bench.PRESETS[p][0]}" for p in presets) + ".", "",
              "× loop and × vmap(jvp(grad)): throughput relative to the baselines in the same run "
              "(> 1 is faster). HVP in grads: seconds per HVP / seconds per plain gradient. "
              "Peak / extra MiB: resident set of a fresh process running the configuration once, and "
              "its growth during the call" + (" (GPU: max_memory_allocated)" if device_kind == "cuda" else "")
              + ". `auto@268435456`: the auto engine under a 256 MiB memory budget.", ""]
    rows = []
    for preset in presets:  # the files are rewritten after each preset, so a cut-off run keeps the finished ones
        rows += bench.run(preset, args.device, directions, threads=args.threads, repeats=repeats,
                          progress=True, extra_methods=harness.EXTRA_METHODS, untimed_first=args.untimed_first,
                          memory=None if args.no_memory else harness.memory_of(args.device))
        with open(out, "w") as f:
            f.write("\n".join(header) + "\n" + bench.format_table(rows) + "\n")
        base = os.path.splitext(out)[0]
        bench.plot(rows, base + ".png")
        bench.to_json(rows, base + ".json")
    print(bench.format_table(rows))
    print("wrote", out, base + ".png", base + ".json")


if __name__ == "__main__":
    main()
