"""The batched-HVP benchmark behind ``twicediff bench``: Hessian-vector products per second of each
engine against two baselines, and the cost of one HVP in plain gradients.

Methods timed for D directions on the same batch (one call computes all D products, from the data):

- ``native`` / ``func`` / ``autograd``: ``TorchTwiceDifferentiable.hvp(x, y, v, engine=...)``
  (native only when the model qualifies);
- ``loop``: pyDVL 0.7's mvp, one gradient with ``create_graph=True`` and then one backward pass per
  direction. Its cost is linear in D, so it is timed on at most ``LOOP_MAX_DIRECTIONS`` directions
  and its throughput (HVPs per second) is what is compared;
- ``vmap_jvp_grad``: plain torch.func forward-over-reverse, ``vmap(jvp(grad(L)))`` over all D at once;
- ``grad``: one plain gradient (``autograd.grad`` of the same mean loss, all trainable parameters,
  no ``create_graph``) — the unit of ``hvp_in_grads`` = (seconds per HVP) / (seconds per gradient);
- ``grad_warm``: the same gradient, ``GRAD_CALLS`` times back to back per round (the mean), with
  caches and the allocator warm as in a training loop's steady state;
- ``auto@budget``: the ``auto`` engine under ``twicediff.memory_budget(budget)``, for the chunking
  target (throughput within 20% of unchunked ``auto``).

Times are medians of interleaved repeats in one process (all methods of one D take turns, the order
reversed every other round), so the ratios hold on a busy machine. ``benchmarks/bench_mvp.py`` adds
what only the committed tables need (peak memory in fresh subprocesses, the native op's GEMMs
alone, machine facts) through :func:`run`'s ``extra_methods`` and ``memory`` hooks.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from ..memory import memory_budget
from ..progress import progress_bar
from ..torch.guard import attention_for_derivatives
from .presets import PRESETS

__all__ = ["FULL_DIRECTIONS", "PRESETS", "QUICK_DIRECTIONS", "TABLE_HEADER", "UNTIMED_FIRST", "format_row",
           "format_table", "interleaved_medians", "interleaved_medians_by_clock", "plot", "run",
           "timing_words", "to_json"]

ENGINES = ("native", "func", "autograd")
BASELINES = ("loop", "vmap_jvp_grad")
LOOP_MAX_DIRECTIONS = 16
BUDGET_BYTES = 256 * 2**20
BUDGET_DIRECTIONS = 64
GRAD_CALLS = 10  # the "grad_warm" row: plain gradients timed back to back per round


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settle_auto(fn: Callable[[], object], max_calls: int = 16,
                device: torch.device = torch.device("cpu")) -> List[float]:
    """Calls ``fn`` (which uses ``engine="auto"``) once, then again while auto still times
    candidates at size (its engine decisions unsettled, engines/auto.py), at most ``max_calls``
    times, so that timing it afterwards times the engine it keeps; the seconds of each call made."""
    from ..torch.engines import probe

    seconds: List[float] = []
    while len(seconds) < max_calls and (not seconds or probe.unsettled("engine")):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int,
                        device: torch.device = torch.device("cpu"), *, calls: Optional[Dict[str, int]] = None,
                        clock: Callable[[], float] = time.perf_counter, untimed_first: int = 0) -> Dict[str, float]:
    """Median seconds per call of each function: one warm-up call each, then ``repeats`` rounds in
    which every function is timed once, in turn (so load changes hit all of them alike), the order
    reversed every other round (so none always follows the same neighbour). ``calls[name]`` runs
    that function so many times back to back per timing and keeps the mean: for calls of a
    millisecond or two, which one preemption would otherwise dominate. ``clock``: wall time by
    default; ``time.process_time`` gives the process's CPU time over all threads.

    ``untimed_first``: calls of a function made, untimed, right before each of its timings. Without
    them a call pays for what the function before it left behind: glibc gives back a freed heap
    only when a later ``free`` shrinks it, so a method that follows one with large heap
    allocations (torch.func's vmap, for one) spends tens of milliseconds of system time returning
    that method's pages. With them, every method is timed in its own steady state, as a user who
    calls it repeatedly (an iterative solver) sees it."""
    return interleaved_medians_by_clock(fns, repeats, device, calls=calls, clocks={"": clock},
                                        untimed_first=untimed_first)[""]


def interleaved_medians_by_clock(fns: Dict[str, Callable[[], object]], repeats: int,
                                 device: torch.device = torch.device("cpu"), *,
                                 calls: Optional[Dict[str, int]] = None,
                                 clocks: Dict[str, Callable[[], float]],
                                 untimed_first: int = 0) -> Dict[str, Dict[str, float]]:
    """:func:`interleaved_medians` read on several clocks in the same timings (e.g. ``{"wall":
    time.perf_counter, "cpu": time.process_time}``): clock name → function name → median."""
    calls = calls or {}
    for f in fns.values():
        f()
    _sync(device)
    times: Dict[str, Dict[str, List[float]]] = {c: {k: [] for k in fns} for c in clocks}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            n = max(1, int(calls.get(k, 1)))
            for _ in range(untimed_first):
                fns[k]()
            _sync(device)
            start = {c: clock() for c, clock in clocks.items()}
            for _ in range(n):
                fns[k]()
            _sync(device)
            for c, clock in clocks.items():
                times[c][k].append((clock() - start[c]) / n)
    return {c: {k: statistics.median(t) for k, t in per.items()} for c, per in times.items()}


def _loop_mvp(model, loss, x, y, v):
    """pyDVL 0.7's mvp: a gradient with a graph, then one backward pass per direction; like
    vmap(jvp(grad)) below, under the attention settings twicediff's calls use
    (guard.attention_for_derivatives), which plain torch needs too for second derivatives."""
    from ..torch.batch import squeezed_loss

    params = [p for p in model.parameters() if p.requires_grad]
    with attention_for_derivatives():
        g = torch.autograd.grad(squeezed_loss(loss, model(x), y), params, create_graph=True)
        g = torch.cat([t.reshape(-1) for t in g])
        z = (g * v).sum(dim=1)
        return torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(z[d], params, retain_graph=True)])
                            for d in range(v.shape[0])])


def _vmap_jvp_grad(model, loss, x, y, v):
    """Plain torch.func forward-over-reverse: vmap(jvp(grad(L))) over all directions at once."""
    from torch.func import functional_call, grad, jvp, vmap

    from ..torch.batch import squeezed_loss

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    tangents, col = {}, 0
    for n, p in named:
        tangents[n] = v[:, col:col + p.numel()].reshape(v.shape[0], *p.shape)
        col += p.numel()
    grad_fn = grad(lambda p: squeezed_loss(loss, functional_call(model, p, (x,)), y))
    with attention_for_derivatives():
        out = vmap(lambda t: jvp(grad_fn, (params,), (t,))[1])(tangents)
    return torch.cat([out[n].reshape(v.shape[0], -1) for n, _ in named], dim=1)


def _plain_grad(model, loss, x, y):
    from ..torch.batch import squeezed_loss

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(squeezed_loss(loss, model(x), y), params)


def _method_call(method: str, td, x, y, v) -> Callable[[], object]:
    """A no-argument callable computing the products of ``method`` for directions v [D, P]."""
    model, loss = td.model, td.loss
    if method in ENGINES:
        return lambda: td.hvp(x, y, v, engine=method)
    if method == "auto":
        return lambda: td.hvp(x, y, v)
    if method.startswith("auto@"):
        budget = int(method.split("@", 1)[1])

        def budgeted():
            with memory_budget(budget):
                return td.hvp(x, y, v)
        return budgeted
    if method == "loop":
        vl = v[:LOOP_MAX_DIRECTIONS]
        return lambda: _loop_mvp(model, loss, x, y, vl)
    if method == "vmap_jvp_grad":
        return lambda: _vmap_jvp_grad(model, loss, x, y, v)
    raise ValueError(f"bench: unknown method {method!r}")


def _setup(preset: str, device: str, seed: int = 0):
    from ..torch.twice_differentiable import TorchTwiceDifferentiable

    if preset not in PRESETS:
        raise ValueError(f"bench: preset must be one of {sorted(PRESETS)}, got {preset!r}")
    torch.manual_seed(seed)
    model, loss, x, y = PRESETS[preset][1](torch.device(device))
    return TorchTwiceDifferentiable(model, loss), x, y


def _directions(td, D: int, x) -> torch.Tensor:
    return torch.randn(D, td.num_params, dtype=td.dtype, device=x.device)


#: What ``twicediff bench`` runs without options: a quick look (well under a minute on two cores).
QUICK_DIRECTIONS = (1, 16, 64)
QUICK_REPEATS = 3
#: ``--full``: the sweep the committed tables use.
FULL_DIRECTIONS = (1, 16, 64, 256)
FULL_REPEATS = 5
#: Untimed calls of a method right before each of its timings (:func:`interleaved_medians`): the
#: default of :func:`run`, of ``twicediff bench`` and of the benchmark scripts.
UNTIMED_FIRST = 1


def timing_words(repeats: int, untimed_first: int) -> str:
    """How :func:`interleaved_medians` took a run's times, in the words its header gives them."""
    return (f"medians of {repeats} interleaved repeats, each after {untimed_first} untimed call(s) of the "
            "same method")

# An extra method: name -> factory(td, x, y, v) -> a no-argument callable, or None where it does not apply.
MethodFactory = Callable[[object, torch.Tensor, torch.Tensor, torch.Tensor], Optional[Callable[[], object]]]


def run(preset: str = "a", device: str = "cpu", directions: Iterable[int] = FULL_DIRECTIONS,
        engines: Optional[Sequence[str]] = None, threads: Optional[int] = None, repeats: int = FULL_REPEATS,
        progress: bool = False, extra_methods: Optional[Dict[str, MethodFactory]] = None,
        memory: Optional[Callable[[str, str, int, int], Dict[str, float]]] = None,
        on_rows: Optional[Callable[[List[dict]], None]] = None, untimed_first: int = UNTIMED_FIRST) -> List[dict]:
    """Benchmark one preset on one device; returns one row (dict) per (D, method).

    Args:
        preset: a key of :data:`PRESETS`.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        directions: the values of D.
        engines: subset of ``("native", "func", "autograd")`` (default all; ``native`` is left out
            when the model does not qualify). The baselines ``loop`` and ``vmap_jvp_grad``, the
            plain gradient and, when 64 or 1 is among ``directions``, the 256 MiB budget run of
            ``auto`` are always measured.
        threads: ``torch.set_num_threads`` for the run (CPU; default: leave as is).
        repeats: interleaved rounds per D (medians are reported).
        progress: a bar over the values of D.
        extra_methods: more methods to time beside the engines (the benchmark scripts add the native
            op's GEMMs alone and the BLAS backend this way); a factory returning None skips its method.
        memory: ``memory(preset, method, D, threads) -> {"peak_mb", "extra_mb"}`` for each timed
            method (the benchmark scripts measure it in a fresh subprocess); default: not measured.
        on_rows: called with each D's rows as soon as they are measured (the CLI prints them).
        untimed_first: untimed calls of each method right before each of its timings
            (:func:`interleaved_medians`).

    Row keys: preset, device, threads, D, method, seconds (median per call), hvps_per_s,
    hvp_in_grads, vs_loop and vs_vmap_jvp_grad (throughput ratios; > 1 is faster than the baseline),
    peak_mb and extra_mb (None without ``memory``), note.
    """
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    engines = list(ENGINES if engines is None else engines)
    for e in engines:
        if e not in ENGINES:
            raise ValueError(f"bench: engines must be a subset of {ENGINES}, got {e!r}")
    directions = [int(D) for D in directions]
    if not directions or min(directions) < 1:
        raise ValueError(f"bench: directions must be positive integers, got {directions}")
    td, x, y = _setup(preset, device)
    dev = x.device
    if "native" in engines and td.native_unsupported_reason(x, y):
        engines.remove("native")
    rows: List[dict] = []
    for D in progress_bar(directions, progress, desc=f"bench {preset}", unit="D"):
        v = _directions(td, D, x)
        methods = engines + list(BASELINES)
        if D in (1, BUDGET_DIRECTIONS):
            methods += ["auto", f"auto@{BUDGET_BYTES}"]
        fns = {m: _method_call(m, td, x, y, v) for m in methods}
        for name, factory in (extra_methods or {}).items():
            fn = factory(td, x, y, v)
            if fn is not None:
                fns[name] = fn
        timed = list(fns)
        for m in timed:
            if m == "auto" or m.startswith("auto@"):
                settle_auto(fns[m], device=dev)  # time the engine auto keeps, not its first choices
        # "grad", the unit of hvp_in_grads, is timed like every other method (one call per
        # round); "grad_warm" is the same gradient run GRAD_CALLS times back to back, caches and
        # allocator warm, as in a training loop's steady state.
        fns["grad"] = fns["grad_warm"] = lambda: _plain_grad(td.model, td.loss, x, y)
        med = interleaved_medians(fns, repeats, dev, calls={"grad_warm": GRAD_CALLS}, untimed_first=untimed_first)
        per_hvp = {m: med[m] / (min(D, LOOP_MAX_DIRECTIONS) if m == "loop" else D) for m in timed}
        batch = []
        for m in timed + ["grad", "grad_warm"]:
            row = {"preset": preset, "device": str(dev), "threads": threads, "D": D, "method": m,
                   "seconds": med[m], "peak_mb": None, "extra_mb": None, "note": ""}
            products = m not in ("grad", "grad_warm") and not m.endswith("_gemms")
            if not products:
                row.update(hvps_per_s=None, hvp_in_grads=None, vs_loop=None, vs_vmap_jvp_grad=None)
            else:
                row.update(hvps_per_s=1.0 / per_hvp[m], hvp_in_grads=per_hvp[m] / med["grad"],
                           vs_loop=per_hvp["loop"] / per_hvp[m],
                           vs_vmap_jvp_grad=per_hvp["vmap_jvp_grad"] / per_hvp[m])
            if m == "loop" and D > LOOP_MAX_DIRECTIONS:
                row["note"] = f"timed on {LOOP_MAX_DIRECTIONS} directions (linear in D)"
            if m.startswith("auto@"):
                row["note"] = f"memory budget {BUDGET_BYTES // 2**20} MiB"
            if m == "grad_warm":
                row["note"] = f"{GRAD_CALLS} back to back per round"
                if engines:
                    fastest = min(engines, key=lambda e: per_hvp[e])
                    row["note"] += f"; one {fastest} HVP costs {per_hvp[fastest] / med['grad_warm']:.2f} of these"
            if memory is not None and products:
                row.update(memory(preset, m, D, threads))
            batch.append(row)
        if "native" in med and "native_gemms" in med:
            next(r for r in batch if r["method"] == "native")["note"] = \
                f"{med['native'] / med['native_gemms']:.2f}× its GEMMs alone"
        rows += batch
        if on_rows is not None:
            on_rows(batch)
    return rows


def format_row(r: dict) -> str:
    """One markdown table row of :func:`run`'s output (:data:`TABLE_HEADER` heads it)."""
    return (f"| {r['preset']} | {r['D']} | {r['method']} | {r['seconds'] * 1e3:.2f} | "
            f"{_fmt(r['hvps_per_s'], '.1f')} | {_fmt(r['vs_loop'], '.2f')} | "
            f"{_fmt(r['vs_vmap_jvp_grad'], '.2f')} | {_fmt(r['hvp_in_grads'], '.2f')} | "
            f"{_fmt(r['peak_mb'], '.0f')} | {_fmt(r['extra_mb'], '.0f')} | {r['note']} |")


TABLE_HEADER = ("| preset | D | method | ms / call | HVPs / s | × loop | × vmap(jvp(grad)) | HVP in grads | "
                "peak MiB | extra MiB | note |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`run`'s rows, and the budget check when its rows are present."""
    lines = [TABLE_HEADER] + [format_row(r) for r in rows]
    budget = f"auto@{BUDGET_BYTES}"
    for preset in dict.fromkeys(r["preset"] for r in rows):
        by = {(r["D"], r["method"]): r for r in rows if r["preset"] == preset}
        lo, hi, free = by.get((1, budget)), by.get((BUDGET_DIRECTIONS, budget)), by.get((BUDGET_DIRECTIONS, "auto"))
        if hi and free:
            text = (f"\nBudget check ({preset}, {BUDGET_BYTES // 2**20} MiB, D = {BUDGET_DIRECTIONS}): throughput "
                    f"{hi['hvps_per_s'] / free['hvps_per_s']:.2f}× unchunked auto (target ≥ 0.80)")
            if lo and lo["extra_mb"] is not None and hi["extra_mb"] is not None:
                text += (f"; extra memory {hi['extra_mb']:.0f} MiB vs {lo['extra_mb']:.0f} MiB at D = 1, "
                         f"peak {hi['peak_mb']:.0f} vs {lo['peak_mb']:.0f} MiB = "
                         f"{hi['peak_mb'] / lo['peak_mb']:.2f}× (target ≤ 1.5×)")
            lines.append(text)
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str) -> None:
    """HVPs per second against D, one line per method and one panel per preset (PNG via Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4.2), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        sub = [r for r in rows if r["preset"] == preset and r["hvps_per_s"] is not None]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r["D"], r["hvps_per_s"]) for r in sub if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("directions D")
        ax.set_ylabel("HVPs per second")
        ax.set_title(f"preset {preset} ({sub[0]['device']}, {sub[0]['threads']} threads)" if sub else preset)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(rows: Sequence[dict], path: str) -> None:
    """Write the rows as a JSON list."""
    with open(path, "w") as f:
        json.dump(list(rows), f, indent=1)
