"""How the CPU allocator's settings change the generic engine's speed at large chunks of directions.

On Linux, glibc hands large blocks (above its mmap threshold, at most 32 MiB) to the kernel with
mmap and returns them on free, so a vmapped product whose intermediates are that large touches
fresh pages, and takes a page fault for each, on every call. This script times
``hvp(engine="func")`` on D = 64 directions, with chunks of 16 and of 64 directions (forced as in
bench_func_chunks.py), in child processes under four settings, alternated round by round so that
the host's load hits them alike:

- ``default``: glibc as it is, twicediff's CPU block cache off (``TWICEDIFF_CPU_BLOCK_CACHE=0``);
- ``thp``: that and ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's switch for transparent huge pages on its
  CPU allocations of 2 MiB and more (512 times fewer faults where the kernel grants them);
- ``glibc``: that and ``MALLOC_MMAP_THRESHOLD_=1 GiB MALLOC_TRIM_THRESHOLD_=4 GiB
  MALLOC_TOP_PAD_=256 MiB``: blocks stay on the heap and are reused (the process keeps its peak memory);
- ``block_cache``: twicediff's default since the block cache landed (twicediff.torch.block_cache):
  the products reuse their large blocks, at most 1 GiB held.

The first three are settings a user makes before starting Python; twicediff changes neither.

``--baseline`` times the plain-torch per-direction loop instead (the benchmarks' baseline, 16
directions), in a fresh process per preset, under the default and glibc settings: first alone, then
after one call of ``vmap(jvp(grad))``, whose large blocks, once freed, raise glibc's mmap threshold.
It shows how much the baseline's speed depends on what ran before it in the process.

    PYTHONPATH=python python benchmarks/bench_allocator.py [--baseline] [--threads 2] [--rounds 3] [--out FILE]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from harness import bench_args, emit, header

SETTINGS = {
    "default": {"TWICEDIFF_CPU_BLOCK_CACHE": "0"},
    "thp": {"TWICEDIFF_CPU_BLOCK_CACHE": "0", "THP_MEM_ALLOC_ENABLE": "1"},
    "glibc": {"TWICEDIFF_CPU_BLOCK_CACHE": "0", "MALLOC_MMAP_THRESHOLD_": str(2**30),
              "MALLOC_TRIM_THRESHOLD_": str(2**32), "MALLOC_TOP_PAD_": str(2**28)},
    "block_cache": {"TWICEDIFF_CPU_BLOCK_CACHE": "1"},
}
PRESETS = ("d_cnn", "d_transformer")
CHUNKS = (16, 64)
D = 64
CALLS = 5


def _settings_words(settings) -> str:
    """The settings as the tables list them: "name: VAR=value ...; ..." ("as it is" for none)."""
    return "; ".join(f"{n}: " + (" ".join(f"{k}={v}" for k, v in e.items()) or "as it is") for n, e in settings.items())


def child(threads: int) -> None:
    """One process's medians: {preset: {chunk: ms per call}} as JSON on stdout."""
    import torch

    from harness import median_ms
    from twicediff.app import bench
    from twicediff.torch.engines import base as chunks

    torch.set_num_threads(threads)
    out = {}
    for preset in PRESETS:
        td, x, y = bench._setup(preset, "cpu")
        v = bench._directions(td, D, x)
        per = td.hvp_function(x, y, engine="func").bytes_per_direction
        out[preset] = {}
        for chunk in CHUNKS:
            chunks.GENERIC_CHUNK_BYTES = chunks.CACHED_GENERIC_CHUNK_BYTES = chunk * per
            chunks.MIN_GENERIC_DIRECTIONS = 1
            out[preset][chunk] = median_ms(lambda: td.hvp(x, y, v, engine="func"), CALLS)
    print(json.dumps(out))


def baseline_child(threads: int, preset: str) -> None:
    """The loop's ms per call in this fresh process, alone and after one vmap(jvp(grad)) call, as JSON."""
    import torch

    from harness import median_ms
    from twicediff.app import bench

    torch.set_num_threads(threads)
    td, x, y = bench._setup(preset, "cpu")
    v = bench._directions(td, D, x)
    loop = bench._method_call("loop", td, x, y, v)
    loop()  # untimed, as in the benchmarks
    alone = median_ms(loop, CALLS)
    bench._method_call("vmap_jvp_grad", td, x, y, v)()
    print(json.dumps({"alone": alone, "after_vmap": median_ms(loop, CALLS)}))


def baseline(args) -> None:
    settings = {n: {k: v for k, v in SETTINGS[n].items() if k != "TWICEDIFF_CPU_BLOCK_CACHE"}
                for n in ("default", "glibc")}
    runs = {(p, n): [] for p in PRESETS for n in settings}
    for r in range(args.rounds):
        for p in PRESETS:
            for n in (list(settings) if r % 2 == 0 else list(reversed(settings))):
                done = subprocess.run([sys.executable, __file__, "--baseline-child", str(args.threads), p],
                                      env={**os.environ, **settings[n]}, check=True, capture_output=True, text=True)
                runs[p, n].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [f"| {p} | {n} | " + " | ".join(f"{statistics.median(r[k] for r in runs[p, n]):.1f}"
                                            for k in ("alone", "after_vmap")) + " |" for p, n in runs]
    emit("\n".join([
        header("The per-direction loop baseline (16 directions): the CPU allocator's settings", args.threads), "",
        f"Command: `PYTHONPATH=python python benchmarks/bench_allocator.py --baseline --threads {args.threads} "
        f"--rounds {args.rounds}`; ms per call of the loop: in each fresh child process (one per preset and "
        f"setting) the median of {CALLS} calls after one untimed call, then again after one call of "
        f"vmap(jvp(grad)) on D = {D}; the median over {args.rounds} child processes, the settings alternated. "
        f"Settings: {_settings_words(settings)}.",
        "", "| preset | setting | loop alone ms | loop after one vmap call ms |", "|---|---|---|---|", *rows]), args.out)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--baseline-child"]:
        baseline_child(int(sys.argv[2]), sys.argv[3])
        return
    args = bench_args(__doc__, rounds=3, add=lambda ap: ap.add_argument(
        "--baseline", action="store_true", help="time the plain-torch loop baseline instead (see above)"))
    if args.baseline:
        baseline(args)
        return
    runs = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            env = {**os.environ, **SETTINGS[name]}
            done = subprocess.run([sys.executable, __file__, "--child", str(args.threads)], env=env, check=True,
                                  capture_output=True, text=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for preset in PRESETS:
        for chunk in CHUNKS:
            ms = {n: statistics.median(run[preset][str(chunk)] for run in runs[n]) for n in SETTINGS}
            rows.append(f"| {preset} | {chunk} | " + " | ".join(f"{ms[n]:.0f}" for n in SETTINGS)
                        + " | " + " | ".join(f"{ms['default'] / ms[n]:.2f}" for n in SETTINGS if n != "default") + " |")
    others = [n for n in SETTINGS if n != "default"]
    text = "\n".join([
        header(f"hvp(engine='func') at D = {D}: the CPU allocator's settings", args.threads),
        "",
        f"Command: `PYTHONPATH=python python benchmarks/bench_allocator.py --threads {args.threads} --rounds "
        f"{args.rounds}`; ms per call: in each child process the median of {CALLS} calls, then the median over "
        f"{args.rounds} child processes per setting, the settings alternated round by round. "
        f"Settings: {_settings_words(SETTINGS)}.",
        "",
        "| preset | directions per chunk | " + " | ".join(f"{n} ms" for n in SETTINGS) + " | "
        + " | ".join(f"× default ({n})" for n in others) + " |",
        "|---|---|" + "---|" * (len(SETTINGS) + len(others)),
        *rows,
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
