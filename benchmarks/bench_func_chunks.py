"""How the generic HVP engines' speed depends on the number of directions per chunk.

``hvp(engine="func")`` on D = 64 directions with the chunk size forced to 4 ... 64, for the small CNN
and transformer block (presets d_cnn, d_transformer of twicediff.app.bench) and model (a); the
per-direction loop (pyDVL 0.7's method) as the baseline. It is the evidence for
``twicediff.torch.engines.base.CACHED_GENERIC_CHUNK_BYTES`` (``GENERIC_CHUNK_BYTES`` with the CPU block
cache off), the working memory the generic engines' chunks are kept near (the estimated bytes per
direction are in the table).

    PYTHONPATH=python python benchmarks/bench_func_chunks.py [--threads 2] [--out benchmarks/results/func_chunks_cpu.md]
"""
from __future__ import annotations



from harness import bench_args, emit, header, median_ms
from twicediff.app import bench
from twicediff.torch.engines import base as _chunks

CHUNKS = (4, 8, 16, 32, 64)
PRESETS = ("d_cnn", "d_transformer", "a")
D = 64


def main() -> None:
    args = bench_args(__doc__, rounds=5)
    rows = []
    default_caps = _chunks.GENERIC_CHUNK_BYTES, _chunks.CACHED_GENERIC_CHUNK_BYTES
    for preset in PRESETS:
        td, x, y = bench._setup(preset, "cpu")
        v = bench._directions(td, D, x)
        per = td.hvp_function(x, y, engine="func").bytes_per_direction
        times = {}
        floor = _chunks.MIN_GENERIC_DIRECTIONS
        _chunks.MIN_GENERIC_DIRECTIONS = 1
        for chunk in CHUNKS:
            # exactly `chunk` directions per chunk, the block cache on or off
            _chunks.GENERIC_CHUNK_BYTES = _chunks.CACHED_GENERIC_CHUNK_BYTES = chunk * per
            times[chunk] = median_ms(lambda: td.hvp(x, y, v, engine="func"), args.rounds)
        (_chunks.GENERIC_CHUNK_BYTES, _chunks.CACHED_GENERIC_CHUNK_BYTES), _chunks.MIN_GENERIC_DIRECTIONS = default_caps, floor
        loop = bench._method_call("loop", td, x, y, v)  # times LOOP_MAX_DIRECTIONS directions
        loop_ms = median_ms(loop, args.rounds) * D / min(D, bench.LOOP_MAX_DIRECTIONS)
        default_chunk = _chunks.generic_directions_per_chunk(per)
        rows.append(f"| {preset} | {per / 2**20:.1f} | " + " | ".join(f"{times[c]:.0f}" for c in CHUNKS)
                    + f" | {loop_ms:.0f} | {default_chunk} |")
    text = "\n".join([
        header(f"hvp(engine='func') at D = {D} against directions per chunk", args.threads),
        "",
        f"Command: `PYTHONPATH=python python benchmarks/bench_func_chunks.py --threads {args.threads}`; ms per call, "
        f"medians of {args.rounds} rounds; loop: the per-direction loop, timed on "
        f"{bench.LOOP_MAX_DIRECTIONS} directions and scaled to {D}.",
        "",
        "| preset | MiB per direction (estimate) | " + " | ".join(f"{c} per chunk" for c in CHUNKS)
        + " | loop | default chunk |",
        "|---|---|" + "---|" * len(CHUNKS) + "---|---|",
        *rows,
        "",
        f"default chunk: directions per chunk under CACHED_GENERIC_CHUNK_BYTES = {default_caps[1] // 2**20} MiB "
        f"(GENERIC_CHUNK_BYTES = {default_caps[0] // 2**20} MiB with the block cache off), at least "
        f"MIN_GENERIC_DIRECTIONS = {_chunks.MIN_GENERIC_DIRECTIONS} (twicediff.torch.engines.base.generic_directions_per_chunk).",
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
