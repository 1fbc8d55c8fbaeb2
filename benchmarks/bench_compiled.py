"""The compiled engine and ``auto``'s measured choice on the CNN and transformer presets (d_cnn,
d_transformer, and d_encoder: the same block written with ``nn.TransformerEncoderLayer``).

Part 1 (D = 64 by default): the compiled engine (torch.compile of the batched forward-over-reverse
product, and of reverse-over-reverse) against the per-direction loop (pyDVL 0.7's mvp, timed on
16 directions: its cost is linear in D) and plain torch.func ``vmap(jvp(grad))``, with the eager
engines beside them, all timed interleaved in one process. Compile time is measured apart (the
first call minus one steady call) and amortised over ``--amortise`` calls.

Part 2: ``auto`` (eager: no expected products given, so nothing is compiled) against each of its
candidates at D in {1, 16, 64, 256}, interleaved per D, once its choice is final; the probe's cost
(its first call minus a steady one) and the calls it took to settle, with their cost beyond steady
calls, are reported apart.

Part 3 (``--part3``): the evidence for two of the compiled engine's fixed settings, wall and CPU
time per HVP, interleaved: its chunk (directions per compiled call; ``--chunks``) swept on each
preset (or on the ``--chunk-preset`` ones, any of the bench presets), and inductor's channels-last
layout on and off on three max-pool CNNs of growing width (``compiled.CPU_CHANNELS_LAST_MIN_CHANNELS``;
``--skip layout`` leaves these out).

    flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_compiled.py \
        --preset d_cnn --preset d_transformer --preset d_encoder --out benchmarks/results/compiled_cpu.md
"""
import argparse
import copy
import os
import tempfile
import time

import torch

import harness
from twicediff.app import bench
from twicediff.torch.engines import compiled, probe
from twicediff.torch.engines.bound_hvp import BoundHvp
from twicediff.torch.engines.compiled import CompiledEngine


def _compiled_call(model, loss, x, y, v, variant="forward", chunk=None):
    """The compiled engine's product of ``v`` as a call of no arguments (``chunk``: directions per
    compiled call, instead of the engine's own)."""
    engine = CompiledEngine(model, loss, variant)
    if chunk is not None:
        engine.max_directions = lambda batch: chunk
    product = BoundHvp(engine, engine.prepare(x, y), "hessian", x.device)
    return lambda: product(v)


def _first_call_seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def part1(preset: str, D: int, repeats: int, amortise: int, untimed_first: int):
    td, x, y = bench._setup(preset, "cpu")
    v = bench._directions(td, D, x)
    loop_rows = min(D, bench.LOOP_MAX_DIRECTIONS)
    fns = {"loop": bench._method_call("loop", td, x, y, v),
           "vmap_jvp_grad": bench._method_call("vmap_jvp_grad", td, x, y, v),
           "func": bench._method_call("func", td, x, y, v),
           "autograd": bench._method_call("autograd", td, x, y, v)}
    compile_s = {}
    for variant in ("forward", "reverse"):
        name = f"compiled_{variant}"
        fns[name] = _compiled_call(td.model, td.loss, x, y, v, variant)
        first = _first_call_seconds(fns[name])
        steady = _first_call_seconds(fns[name])
        compile_s[name] = first - steady
        status = compiled.compiled_functions()[-1]["status"]
        if status != "compiled":
            print(f"{preset}: {name}: {status}")
    med = bench.interleaved_medians(fns, repeats, untimed_first=untimed_first)
    per_hvp = {m: med[m] / (loop_rows if m == "loop" else D) for m in fns}
    lines = [f"| {preset} | {m} | {med[m] * 1e3:.1f} | {per_hvp[m] * 1e3:.3f} | "
             f"{per_hvp['loop'] / per_hvp[m]:.2f} | {per_hvp['vmap_jvp_grad'] / per_hvp[m]:.2f} | "
             + (f"{compile_s[m]:.1f} | {amortised(per_hvp, compile_s[m], m, D, amortise):.2f} |" if m in compile_s
                else "— | — |") for m in fns]
    return lines


def amortised(per_hvp, compile_seconds, m, D, calls):
    """Throughput against the loop when the compile time is spread over ``calls`` calls of D."""
    total = calls * D * per_hvp[m] + compile_seconds
    return calls * D * per_hvp["loop"] / total


def _engine_decision() -> dict:
    """part 2's one engine decision (it clears the probe for each D)."""
    return next(iter(probe.decisions("engine").values()))


def part2(preset: str, directions, repeats: int, untimed_first: int, settle_calls: int = 16):
    td, x, y = bench._setup(preset, "cpu")
    lines = []
    for D in directions:
        probe.clear()
        v = bench._directions(td, D, x)
        candidates = ["func", "autograd", "loop"] + (["native"] if not td.native_unsupported_reason(x, y) else [])
        fns = {"auto": lambda: td.hvp(x, y, v)}
        first = _first_call_seconds(fns["auto"])
        picked = _engine_decision()["choice"]  # the probe's pick, before its calls at size were timed
        # auto times candidates at size on its first calls of the shape class, so its engine changes
        # from call to call until the choice is final: those calls are timed apart, and the auto
        # column is its steady state.
        settling = bench.settle_auto(fns["auto"], settle_calls) if probe.unsettled("engine") else []
        for e in candidates:
            fns[e] = lambda e=e: td.hvp(x, y, v, engine=e)
        med = bench.interleaved_medians(fns, repeats, untimed_first=untimed_first)
        per = {m: med[m] / D for m in fns}
        best = min(candidates, key=lambda e: per[e])
        chosen = _engine_decision()["choice"]
        chosen = chosen if chosen == picked else f"{picked} → {chosen}"
        cells = " | ".join(f"{per[e] * 1e3:.3f}" for e in ["func", "autograd", "loop"])
        extra = sum(settling) - len(settling) * med["auto"]
        lines.append(f"| {preset} | {D} | {per['auto'] * 1e3:.3f} ({chosen}) | {cells} | {best} | "
                     f"{per['auto'] / per[best]:.2f} | {first - med['auto']:.2f} | {1 + len(settling)} | {extra:.2f} |")
    return lines


def _forced_compiled(model, loss, x, y, v, chunk=None, channels_last=None):
    """:func:`_compiled_call` on a copy of the model (compiled functions are kept per model), with
    its first call, which compiles, under a forced layout when ``channels_last`` is given."""
    call = _compiled_call(copy.deepcopy(model), loss, x, y, v, chunk=chunk)
    if channels_last is not None:
        saved = compiled.CPU_CHANNELS_LAST_MIN_CHANNELS
        compiled.CPU_CHANNELS_LAST_MIN_CHANNELS = 0 if channels_last else 10**9
        try:
            call()
        finally:
            compiled.CPU_CHANNELS_LAST_MIN_CHANNELS = saved
    return call


def _cnn(widths, size=32, n=32):
    """conv(3→w1) ReLU conv(w1→w2) ReLU max-pool conv(w2→w3) ReLU global-avg-pool linear→10."""
    w1, w2, w3 = widths
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, w1, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(w1, w2, 3, padding=1),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(w2, w3, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(w3, 10)).eval()
    return model, torch.nn.functional.cross_entropy, torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))


def _wall_and_cpu(fns, repeats, D, untimed_first):
    """ms per HVP of each function, (wall, CPU), from the same interleaved timings."""
    med = bench.interleaved_medians_by_clock(fns, repeats, clocks={"wall": time.perf_counter,
                                                                   "cpu": time.process_time},
                                             untimed_first=untimed_first)
    return {k: (med["wall"][k] / D * 1e3, med["cpu"][k] / D * 1e3) for k in fns}


def part3(presets, repeats: int, untimed_first: int, D: int = 64, D_cnn: int = 16, chunks=(4, 8, 16, 32),
          layout: bool = True):
    lines = ["", f"## The compiled engine's chunk and layout, D = {D} (the wider CNNs: {D_cnn})", "",
             "ms per HVP, wall / CPU (all threads), medians of interleaved repeats; the engine's own "
             "setting marked *.", "", "| model | setting | wall ms / HVP | CPU ms / HVP |", "|---|---|---|---|"]
    for p in presets:
        torch.manual_seed(0)
        model, loss, x, y = bench.PRESETS[p][1](torch.device("cpu"))
        v = torch.randn(D, sum(q.numel() for q in model.parameters()))
        engine = CompiledEngine(model, loss)
        own = engine.max_directions(engine.prepare(x, y))
        fns = {c: _forced_compiled(model, loss, x, y, v, chunk=c) for c in chunks}
        for c, f in fns.items():
            f()
        for c, (w, cpu) in _wall_and_cpu(fns, repeats, D, untimed_first).items():
            lines.append(f"| {p} | chunk {c}{' *' if c == own else ''} | {w:.3f} | {cpu:.3f} |")
        print("\n".join(lines[-len(chunks):]), flush=True)
    for widths in [None, (8, 8, 16), (16, 16, 32), (32, 32, 64)] if layout else []:
        torch.manual_seed(0)
        if widths is None:  # the d_cnn preset itself, at part 1's D
            (model, loss, x, y), rows, name = bench.PRESETS["d_cnn"][1](torch.device("cpu")), D, "d_cnn"
        else:
            (model, loss, x, y), rows = _cnn(widths), D_cnn
            name = f"CNN {'-'.join(map(str, widths))} on 3x32x32, N=32"
        v = torch.randn(rows, sum(q.numel() for q in model.parameters()))
        own = compiled.channels_last(model, x.device)
        fns = {on: _forced_compiled(model, loss, x, y, v, channels_last=on) for on in (False, True)}
        for on, (w, cpu) in _wall_and_cpu(fns, repeats, rows, untimed_first).items():
            lines.append(f"| {name} | channels-last {'on' if on else 'off'}{' *' if on == own else ''} | "
                         f"{w:.3f} | {cpu:.3f} |")
        print("\n".join(lines[-2:]), flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", choices=["d_cnn", "d_transformer", "d_encoder"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--directions", type=int, default=64, help="D of part 1")
    ap.add_argument("--auto-directions", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=7)
    harness.add_untimed_first(ap)
    ap.add_argument("--amortise", type=int, default=1000, help="calls the compile time is spread over")
    ap.add_argument("--chunk", type=int, default=compiled.COMPILED_CHUNK, help="compiled engine's chunk")
    ap.add_argument("--skip", choices=["part1", "part2", "layout"], nargs="+", default=[],
                    help="parts not to run (layout: part 3's layout rows)")
    ap.add_argument("--part3", action="store_true", help="also time the chunk and layout rules (part 3)")
    ap.add_argument("--chunk-preset", action="append", choices=sorted(bench.PRESETS),
                    help="part 3's chunk sweep on this preset (default: the --preset ones)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32], help="part 3's chunks")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep inductor's on-disk caches (default: a fresh one, so compile times are cold)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    compiled.COMPILED_CHUNK = args.chunk
    if not args.warm_cache:  # compile times as a first run on a machine sees them
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="twicediff_bench_inductor_")
    presets = args.preset or ["d_cnn", "d_transformer"]
    text = [f"# Compiled engine and auto's measured choice (cpu)", "",
            f"{harness.run_facts()}; {args.threads} threads; float32; "
            f"{bench.timing_words(args.repeats, args.untimed_first)}; load average at start "
            f"{harness.load_average()} (1 / 5 / 15 min).", "",
            "Command: `flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/bench_compiled.py "
            + " ".join(f"--preset {p}" for p in presets) + f" --directions {args.directions} --repeats "
            f"{args.repeats} --untimed-first {args.untimed_first} --amortise {args.amortise} --chunk {args.chunk}"
            + (" --warm-cache" if args.warm_cache else "") + (" --skip " + " ".join(args.skip) if args.skip else "")
            + (" --part3" if args.part3 else "")
            + "".join(f" --chunk-preset {p}" for p in args.chunk_preset or [])
            + (" --chunks " + " ".join(map(str, args.chunks)) if args.part3 else "") + "`", "",
            "Compile times: " + ("inductor's on-disk caches as they were (warm)." if args.warm_cache else
                                 "a fresh inductor cache directory for the run (cold: what a first run sees)."), ""]
    if "part1" not in args.skip:
        text += [f"## Compiled engine, D = {args.directions}", "",
                 "ms / call: one call of all D directions (the loop: 16 of them; per HVP it is linear in D). "
                 "× loop, × vmap: HVPs per second relative to the baselines of the same run. compile s: the "
                 "first call minus a steady one. amortised × loop: throughput against the loop when the "
                 f"compile time is spread over {args.amortise} calls of D directions.", "",
                 "| preset | method | ms / call | ms / HVP | × loop | × vmap(jvp(grad)) | compile s | "
                 "amortised × loop |", "|---|---|---|---|---|---|---|---|"]
        for p in presets:
            text += part1(p, args.directions, args.repeats, args.amortise, args.untimed_first)
            print("\n".join(text))
    if "part2" not in args.skip:
        text += ["", "## auto against its candidates", "",
                 "ms per HVP; auto once its choice is final, its engine in brackets (a → b: the probe predicted "
                 "a, timing candidates at size made it b); best: the fastest candidate in the same run; auto / "
                 "best > 1 is slower; probe s: auto's first call minus a steady one; calls to settle: auto's calls "
                 "until its choice was final (the first included), the later ones timing candidates at size; "
                 "settling s: what those later calls took beyond as many steady calls.", "",
                 "| preset | D | auto | func | autograd | loop | best | auto / best | probe s | calls to settle | "
                 "settling s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in presets:
            text += part2(p, args.auto_directions, args.repeats, args.untimed_first)
            print("\n".join(text[-len(args.auto_directions):]))
    if args.part3:
        text += part3(args.chunk_preset or presets, args.repeats, args.untimed_first, args.directions,
                      chunks=args.chunks, layout="layout" not in args.skip)
    text += ["", f"Load average at the end: {harness.load_average()}. Other columns (an Intel "
             "Xeon with AVX-512) need another machine: only this one was available for this run."]
    harness.emit("\n".join(text), args.out)


if __name__ == "__main__":
    main()
