"""``engine="auto"``: the engine picked by measurement, per model, batch shape and number of directions.

The candidates are the native engine (where it takes the model; behind a frozen prefix with
weights it is used without measuring, engines/select.py), torch.func forward-over-reverse
(``func``), autograd reverse-over-reverse (``autograd``) and the per-direction loop (``loop``).
Each runs in chunks of its own size within the memory budget; one that cannot fit a single
direction is out.
On the first chunk of directions of a shape class — the model's structure, the batch's shape,
dtype and device, the mode, the chunk's number of directions rounded up to a power of two, the
number of threads — a short timed probe runs them on the chunk's first directions and keeps the
fastest per direction for the rest of the process (engines/probe.py: the cache, its optional file
``TWICEDIFF_PROBE_CACHE``, the report in ``build_info()["probe"]``).

The probe's cost is bounded by ``PROBE_SECONDS`` (0.4 s): each candidate runs once on one
direction (warm-up, in the order of the rule below; a candidate is left out when the time spent
so far and the slowest warm-up would pass half the budget), then timed rounds on 2, 4, 8, ...
directions, up to the chunk's own number, while the time spent and the next round (predicted as
twice the last) stay within the budget; the loop, whose cost per direction does not depend on
how many there are, stops at ``LOOP_PROBE_DIRECTIONS``. Each candidate's time per direction at
the chunk it would compute is then predicted from its two largest timed calls, t(d) = a + b·d
(a fixed part per call, b per direction), extrapolated at most ``EXTRAPOLATION`` (4) times beyond
the directions it was timed on, and the fastest wins: on a slow model or a busy machine the budget
allows only small calls, where the per-call part would otherwise favour the loop over the
batched engines. The prediction is then checked where it costs nothing: the choice's first call at
its real size is timed, and each candidate not yet timed there whose prediction is within
``RUNNER_UP_MARGIN`` (2×) of the best measured is chosen for the next call of the shape class and
timed there; candidates measured within ``RECHECK_MARGIN`` (1.5×) of the fastest are timed
``RECHECK_CALLS`` (3) times each, in turn, since one call on a busy machine can run slow by more than
their gap; then the lowest median stays (``source`` "confirmed" in the report): a per-direction
cost that grows with the chunk (caches), or a fixed part the small calls overstate, shows up
there. A candidate that raises (an op without a torch.func rule, a module updating buffers in
training mode) is out, and so is one whose warm-up product is not the loop's (engines/agreement.py;
where the budget ran out before the loop warmed up, it runs one direction for that check all the
same, and is chosen only where every other candidate is out). So a probe costs at most about the budget, plus a warm-up where one product
alone takes longer: there only the engine the rule picks runs, and it is kept.

Where timing is not possible or not wanted — ``TWICEDIFF_PROBE=0``, inside ``torch.compile``
tracing, during CUDA graph capture — the deterministic rule decides: native where it takes the
model, else the loop for a single direction, else func. ``engine=`` (any name but ``"auto"``),
``TWICEDIFF_ENGINE=<name>`` (what ``"auto"`` means in this process) and
``probe.set_choice("engine", name)`` override the measurement.

The compiled engine (engines/compiled.py) is a candidate only when the caller expects enough
products to repay compiling (engines/amortise.py): then, after the eager choice, it is compiled on
the chunk and timed against the eager winner (decision kind ``"compiled"``), and the faster is kept.
"""
from __future__ import annotations

import hashlib
import logging
import math
import statistics
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...errors import MemoryBudgetError
from ...memory import chunk_size
from ..batch import detached, input_tensors
from . import probe
from .agreement import REFERENCES, disagreeing
from .amortise import compile_pays
from .autograd import AutogradEngine
from .base import PreparedBatch
from .compiled import CompiledEngine
from .func import FuncEngine
from .loop import LoopEngine

__all__ = ["CANDIDATES", "LOOP_PROBE_DIRECTIONS", "PROBE_SECONDS", "AutoBatch", "AutoEngine", "default_engine"]

logger = logging.getLogger(__name__)

#: The eager candidates, in the deterministic rule's order of preference.
CANDIDATES = ("native", "func", "autograd", "loop")
#: The time a probe may take, in seconds.
PROBE_SECONDS = 0.4
#: The most directions the loop is timed on.
LOOP_PROBE_DIRECTIONS = 8
#: How far beyond the directions it was timed on a candidate's time is extrapolated.
EXTRAPOLATION = 4
#: A candidate not yet timed at size is timed there once when its predicted time is at most this
#: factor above the best measured: predictions from small calls can be off by more than their gaps
#: (warm caches, allocations, a busy moment), and one call bounds what that costs.
RUNNER_UP_MARGIN = 2.0
#: Candidates measured at size within this factor of the fastest are timed there ``RECHECK_CALLS``
#: times each, in turn, and compared by their medians before the choice is final: on a loaded
#: machine one call can run slow (or, the first at a new size, pay for allocations) by more than
#: the gap between them. Each further call costs at most this factor minus one of a call.
RECHECK_MARGIN = 1.5
RECHECK_CALLS = 3
# auto's own cap on the directions of one call: none (the candidates chunk them, see max_directions).
UNCAPPED_DIRECTIONS = 2**62


@dataclass(frozen=True)
class AutoBatch(PreparedBatch):
    """The batch as the generic engines keep it (x, y), and the native engine's form of it where
    that engine takes the model."""
    native: Optional[PreparedBatch] = None

    @property
    def nbytes(self) -> int:
        """Bytes held, each storage once (the native engine's rows are x itself without a prefix)."""
        tensors = [t for _, t in input_tensors(self.inputs)] + [self.target]
        if self.native is not None:
            tensors += [self.native.inputs, self.native.target]
        seen = {}
        for t in tensors:
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())] = t.numel() * t.element_size()
        return sum(seen.values())


def default_engine(native: bool, directions: int) -> str:
    """The deterministic rule: native where it takes the model, else the loop for one direction,
    else func."""
    return "native" if native else ("loop" if directions == 1 else "func")


def _timing_possible(V: torch.Tensor) -> bool:
    if not probe.enabled():
        return False
    if torch.compiler.is_compiling():
        return False
    return not (V.is_cuda and torch.cuda.is_current_stream_capturing())


def _sync(V: torch.Tensor) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers the products themselves."""
    if V.is_cuda:
        torch.cuda.synchronize(V.device)


def _timed(call: Callable[[], torch.Tensor], V: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """``call()`` and its seconds (V's device synchronised before and after), less what probes
    inside it spent measuring: the native engine's first call of a shape class probes its GEMM
    library, which is not what the engine costs."""
    def synced():
        out = call()
        _sync(V)
        return out

    _sync(V)
    return probe.timed_call(synced)


# model -> (what its structure text depends on that can change in place, that text): repr(model)
# costs about as much as a small model's forward pass, and hvp() builds an AutoEngine per call.
_structure_texts: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_structure_lock = threading.Lock()


def _structure_text(model: nn.Module) -> str:
    """The model's modules as printed, its trainable parameters' shapes and its train/eval flags.
    Kept per model while its modules, parameters (identity, shape, requires_grad) and flags stay
    the same; an attribute changed in place (a stride, a dropout rate) is not seen, which can only
    make a speed decision stale, never a product wrong."""
    modules = list(model.modules())
    check = (tuple((id(m), m.training) for m in modules),
             tuple((id(p), p.requires_grad, tuple(p.shape)) for p in model.parameters()))
    with _structure_lock:
        kept = _structure_texts.get(model)
    if kept is not None and kept[0] == check:
        return kept[1]
    text = repr(model) + "|" + ";".join(f"{n}:{tuple(p.shape)}:{p.requires_grad}" for n, p in model.named_parameters())
    text += "|" + "".join("t" if m.training else "e" for m in modules)  # train/eval per module
    with _structure_lock:
        _structure_texts[model] = (check, text)
    return text


def _fingerprint(model: nn.Module, loss: Callable) -> str:
    """The model's structure (:func:`_structure_text`) and loss, as a short digest: models built
    alike share their decisions, within and (through the disk cache) across processes."""
    text = _structure_text(model)
    text += "|" + getattr(loss, "__qualname__", type(loss).__qualname__) + repr(getattr(loss, "keywords", ""))
    return f"{type(model).__name__}#{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _telling_failure(failed: Dict[str, BaseException], default: str) -> BaseException:
    """The error to raise when every candidate failed: the loop's where it ran, since it takes any
    model in any mode and so fails only on what every engine would (a target of the wrong dtype, a
    loss that is not a scalar), where another engine's error can be about itself (torch.func
    refusing a model in training mode); else the rule's engine's."""
    return failed.get("loop") or failed[default]


class AutoEngine:
    """The measured choice among the candidates (see the module docstring).

    Args:
        native: the native engine where it takes the model, else None.
        expected_products: the products the caller expects on this model and batch shape (None:
            no expectation, the compiled engine is not considered).

    Attributes:
        chosen: the engine that computed the last chunk (None before the first).
    """

    name = "auto"

    def __init__(self, model: nn.Module, loss: Callable, native=None, expected_products: Optional[int] = None):
        self.model, self.loss = model, loss
        self.engines: Dict[str, object] = {}
        if native is not None:
            self.engines["native"] = native
        self.engines.update(func=FuncEngine(model, loss), autograd=AutogradEngine(model, loss),
                            loop=LoopEngine(model, loss))
        self.compiled = CompiledEngine(model, loss)
        self.expected_products = expected_products
        self.chosen: Optional[str] = None
        self._fingerprint = _fingerprint(model, loss)
        self._eager_seconds: Dict[str, float] = {}

    def batch(self, x: torch.Tensor, y: torch.Tensor, native_batch: Optional[PreparedBatch] = None) -> AutoBatch:
        """The batch for every candidate; ``native_batch`` the native engine's preparation of it."""
        return AutoBatch(detached(x), y.detach(), native=native_batch)

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> AutoBatch:
        native = self.engines.get("native")
        return self.batch(x, y, native.prepare(x, y) if native is not None else None)

    def _engine_batch(self, name: str, batch: AutoBatch) -> PreparedBatch:
        return batch.native if name == "native" else batch

    def bytes_per_direction(self, batch: AutoBatch) -> int:
        """What the rule's engine (native, else func) needs per direction: the chunks the caller
        makes; each candidate then works in chunks of its own size within the memory budget."""
        name = "native" if "native" in self.engines else "func"
        return int(self.engines[name].bytes_per_direction(self._engine_batch(name, batch)))

    def max_directions(self, batch: AutoBatch) -> int:
        """No cap of its own beyond the memory budget: each candidate chunks the directions by its
        own ``max_directions`` in :meth:`_run`. A cap here would chunk them twice (256 directions
        as two calls of 128, each func's two of 64, where func alone makes three of 86)."""
        return UNCAPPED_DIRECTIONS

    def _engine(self, name: str, batch: AutoBatch):
        """Engine ``name`` (a candidate or ``"compiled"``) and its own preparation of ``batch``."""
        return self.compiled if name == "compiled" else self.engines[name], self._engine_batch(name, batch)

    def _step(self, name: str, batch: AutoBatch, D: int, device: torch.device) -> int:
        """Directions per call of engine ``name`` for D of them: at most its own ``max_directions``,
        within the memory budget (MemoryBudgetError where not one direction fits)."""
        engine, own = self._engine(name, batch)
        return chunk_size(D, int(engine.bytes_per_direction(own)), device, most=max(1, int(engine.max_directions(own))),
                          what="hvp directions")

    def _run(self, name: str, batch: AutoBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        """Engine ``name``'s products, in chunks of :meth:`_step` directions."""
        engine, own = self._engine(name, batch)
        step = self._step(name, batch, V.shape[0], V.device)
        if V.shape[0] <= step:
            return engine.apply(own, V, mode)
        return torch.cat([engine.apply(own, V[s:s + step], mode) for s in range(0, V.shape[0], step)])

    def _key(self, batch: AutoBatch, V: torch.Tensor, mode: str) -> str:
        bucket = 1 << max(0, V.shape[0] - 1).bit_length()
        x = ",".join(f"{n}{tuple(t.shape)}" for n, t in input_tensors(batch.inputs))
        first, y = input_tensors(batch.inputs)[0][1], batch.target
        # The candidates too: two models alike but for a hook or an overridden forward share a
        # fingerprint, and only one of them may be native.
        return (f"{self._fingerprint} {x} {first.dtype} {first.device.type} y={tuple(y.shape)} {y.dtype} "
                f"{mode} D<={bucket} threads={torch.get_num_threads()} {'+'.join(self.engines)}")

    def apply(self, batch: AutoBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        if not _timing_possible(V):
            name = default_engine("native" in self.engines, V.shape[0])
        else:
            key = self._key(batch, V, mode)
            names = list(self.engines)
            name = probe.choose("engine", key, names,
                               measure=lambda: self._measure(names, batch, V, mode))
            if self.expected_products:
                seconds = probe.decision("engine", key).get("seconds", {}).get(name) or self._eager_seconds.get(key)
                if seconds is None:
                    # Decided without timing here (disk cache, override): this product's own time
                    # per direction decides, from the next chunk on, whether compiling pays.
                    out, seconds = _timed(lambda: self._run(name, batch, V, mode), V)
                    self._eager_seconds[key] = seconds / V.shape[0]
                    self.chosen = name
                    return out
                if compile_pays(self.expected_products, seconds):
                    eager = name
                    name = probe.choose("compiled", f"{key} eager={eager}", [eager, "compiled"],
                                        measure=lambda: self._measure_compiled(eager, batch, V, mode))
                    self.chosen = name
                    return self._run(name, batch, V, mode)
            if probe.unsettled("engine", key):
                self.chosen = name
                return self._confirmed_run(key, name, batch, V, mode)
        self.chosen = name
        return self._run(name, batch, V, mode)

    def _confirmed_run(self, key: str, name: str, batch: AutoBatch, V: torch.Tensor, mode: str) -> torch.Tensor:
        """The products of the current choice, timed: the probe predicted each candidate's time at
        the chunk it would compute from calls on fewer directions; these calls measure candidates
        at their real size, at no extra cost (the products are the caller's). After each, the next
        call of the shape class (:func:`probe.revise`) goes to: a candidate not yet measured whose
        prediction is within ``RUNNER_UP_MARGIN`` of the best measured (the best-predicted first);
        else, where several measured candidates are within ``RECHECK_MARGIN`` of the fastest, the
        one of them with the fewest timed calls, until each has ``RECHECK_CALLS``; else the choice
        is final (source "confirmed"): the candidate with the lowest median at size. So each
        candidate runs at size at most ``RECHECK_CALLS`` times per shape class, and only while it
        is within those margins of the fastest."""
        out, seconds = _timed(lambda: self._run(name, batch, V, mode), V)
        entry = probe.decision("engine", key)
        times = {n: list(ts) for n, ts in entry.get("times", {}).items()}
        times.setdefault(name, []).append(seconds / V.shape[0])
        measured = {n: statistics.median(ts) for n, ts in times.items()}
        fastest = min(measured, key=measured.get)
        untried = {n: s for n, s in entry.get("seconds", {}).items()
                   if n not in measured and s <= measured[fastest] * RUNNER_UP_MARGIN}
        if untried:
            following = min(untried, key=untried.get)
            logger.debug("twicediff: auto: %s measured %.3g s per direction at size; %s (predicted %.3g s) next",
                         name, measured[name], following, untried[following])
            probe.revise("engine", key, following, measured, final=False, times=times)
            return out
        close = [n for n in measured if measured[n] <= measured[fastest] * RECHECK_MARGIN]
        again = [n for n in close if len(times[n]) < RECHECK_CALLS] if len(close) > 1 else []
        if again:
            following = min(again, key=lambda n: (len(times[n]), -measured[n]))
            logger.debug("twicediff: auto: %s within %.2gx of %s at size; %s timed again",
                         close, RECHECK_MARGIN, fastest, following)
            probe.revise("engine", key, following, measured, final=False, times=times)
        else:
            probe.revise("engine", key, fastest, measured, final=True, times=times)
        return out

    def _measure(self, names: List[str], batch: AutoBatch, V: torch.Tensor, mode: str) -> Dict[str, float]:
        """Seconds per direction of each candidate at V's number of directions (inf: failed or left
        out), from calls within PROBE_SECONDS (see the module docstring and :meth:`_predicted`)."""
        default = default_engine("native" in names, V.shape[0])
        order = [default] + [n for n in CANDIDATES if n in names and n != default]
        start = time.perf_counter()
        failed: Dict[str, BaseException] = {}
        last: Dict[str, float] = {}  # seconds of each candidate's last call
        timed: Dict[str, Dict[int, float]] = {}  # rows -> best seconds, per candidate

        first: Dict[str, torch.Tensor] = {}  # each candidate's product of the first direction

        def call(n: str, rows: int) -> bool:
            t = time.perf_counter()
            try:
                out, last[n] = _timed(lambda: self._run(n, batch, V[:rows], mode), V)
                if rows == 1:
                    first.setdefault(n, out)
            except (RuntimeError, NotImplementedError, ValueError, TypeError, MemoryBudgetError) as exc:
                failed[n] = exc
                logger.debug("twicediff: probe: engine %s failed (%s)", n, exc)
                last[n] = time.perf_counter() - t
            return n not in failed

        alive: List[str] = []
        for n in order:  # warm-up on one direction, while half the budget allows
            if alive and (time.perf_counter() - start) + max(last.values()) > PROBE_SECONDS / 2:
                break
            if call(n, 1):
                alive.append(n)
        # Past the budget before a reference ran: one more product of one direction, so that no
        # candidate goes unchecked (agreement.py). It checks, and is chosen only where nothing else
        # is left: its time on one direction would favour it over the batched engines.
        late = next((r for r in REFERENCES if r in names and r not in failed), None) \
            if alive and not any(r in first for r in REFERENCES) else None
        if late is not None and call(late, 1):
            alive.append(late)
        wrong = disagreeing(first, self.model)
        alive = [n for n in alive if n not in wrong]
        if not alive:
            raise _telling_failure(failed, default)
        if len(alive) == 1 or late is not None:
            kept = [n for n in alive if n != late] or alive
            return {n: (last[n] if n in kept else math.inf) for n in names}
        D = V.shape[0]
        rows, full_rounds = min(D, 2), 0
        while alive:
            ran = []
            for n in list(alive):
                r = min(rows, LOOP_PROBE_DIRECTIONS) if n == "loop" else rows
                if r in timed.get(n, {}) and rows < D:
                    continue  # the loop, at its most directions already
                if not call(n, r):
                    alive.remove(n)
                    continue
                ran.append(n)
                timed.setdefault(n, {})[r] = min(last[n], timed.get(n, {}).get(r, math.inf))
            spent, cost = time.perf_counter() - start, sum(last[n] for n in ran)
            if rows == D:
                full_rounds += 1
                if full_rounds >= 3 or spent + cost > PROBE_SECONDS:
                    break
            elif spent + 2 * cost > PROBE_SECONDS:
                break
            else:
                rows = min(2 * rows, D)
        if not alive:
            raise _telling_failure(failed, default)
        return {n: (self._predicted(timed[n], self._step(n, batch, D, V.device)) if n in alive else math.inf)
                for n in names}

    @staticmethod
    def _predicted(timed: Dict[int, float], rows: int) -> float:
        """Seconds per direction of a call of ``rows`` directions, from calls timed on fewer or as
        many: t(d) = a + b·d fitted through the two largest (a: what a call costs whatever its
        directions, b: each direction), extrapolated at most EXTRAPOLATION times beyond the
        largest; with one size, its own time per direction."""
        sizes = sorted(timed)
        d2, t2 = sizes[-1], timed[sizes[-1]]
        target = min(rows, EXTRAPOLATION * d2)
        if len(sizes) < 2 or target == d2:
            return t2 / d2
        d1, t1 = sizes[-2], timed[sizes[-2]]
        b = max(0.0, (t2 - t1) / (d2 - d1))
        a = t2 - b * d2
        if a < 0:  # noise: no fixed part
            a, b = 0.0, t2 / d2
        return a / target + b

    def _measure_compiled(self, name: str, batch: AutoBatch, V: torch.Tensor, mode: str) -> Dict[str, float]:
        """Seconds per direction of ``name`` and of the compiled engine (compiled first, outside the
        timing; inf where compilation failed), on the compiled engine's chunk."""
        block = V[:min(V.shape[0], self.compiled.max_directions(batch))]
        self._run("compiled", batch, block, mode)  # compiles (reported in build_info()["compiled"])
        if not self.compiled.is_compiled(batch, mode, block.shape[0]):
            return {name: 0.0, "compiled": math.inf}
        best = {name: math.inf, "compiled": math.inf}
        for _ in range(2):
            for n in (name, "compiled"):
                best[n] = min(best[n], _timed(lambda: self._run(n, batch, block, mode), V)[1] / block.shape[0])
        return best
