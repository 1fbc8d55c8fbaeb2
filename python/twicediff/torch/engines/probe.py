"""Choices made by measurement: a short timed probe on first use per shape class, cached.

Where two implementations compute the same thing and which is faster depends on the CPU, its
BLAS and the shapes (the native op's float32 GEMMs on torch's bundled oneDNN or on ATen's BLAS),
the first call of a shape class runs each candidate and keeps the fastest for the rest of the
process. The cost is bounded: one untimed warm-up call of each candidate (first-call costs such
as oneDNN's kernel generation stay out), one timed round, then more timed rounds alternating the
candidates while the probe has spent less than ``max_seconds`` (default 0.2 s), three rounds at
most: a probe costs about max(``max_seconds``, two calls of each candidate). The
candidates' results are discarded (each call is a pure function of its inputs): only speed
depends on the choice, and the candidates differ at most in floating-point rounding. Probes nest:
the native engine's first call of a shape class probes its GEMM library while auto times the
engines, and a timed call counts without the probes inside it (:func:`timed_call`), nor the timing of
new matmul shape classes in generic products (twicediff.torch.matmul_route).

A choice is overridden by :func:`set_choice` (for example ``set_choice("cpu_gemm", "blas")``) or,
for the GEMM backend, by ``TWICEDIFF_CPU_GEMM=blas`` / ``torch.backends.mkldnn.enabled = False``
(which the native op honours whatever the probe says). :func:`choices` lists what was decided
(``twicediff.build_info()["probe"]``). Setting ``TWICEDIFF_PROBE_CACHE`` to a file path keeps the
decisions on disk between processes (JSON, keyed by the CPU model with its family and model numbers,
its ISA level, the torch version and the shape class).
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..matmul_route import thread_seconds

__all__ = ["choices", "choose", "clear", "cpu_info", "cpu_model", "decision", "decisions", "enabled", "revise",
           "seconds_measuring", "set_choice", "timed_call", "unsettled"]

_lock = threading.Lock()
_decided: Dict[Tuple[str, str], Dict] = {}
_overrides: Dict[str, str] = {}
MAX_SECONDS = 0.2
MAX_ROUNDS = 3
# The sources of a decision this process's probe made that :func:`revise` may still change.
_REVISABLE = ("probe", "revised")


def enabled() -> bool:
    """False where ``TWICEDIFF_PROBE`` is 0 / off / no / false: the callers then use their fixed
    rules instead of timing."""
    return os.environ.get("TWICEDIFF_PROBE", "1").strip().lower() not in ("0", "off", "no", "false")


def set_choice(kind: str, name: Optional[str]) -> None:
    """Always pick ``name`` for decisions of ``kind`` (None: measure again)."""
    if not isinstance(kind, str):
        raise TypeError(f"set_choice: kind must be a str, got {type(kind).__name__}")
    with _lock:
        if name is None:
            _overrides.pop(kind, None)
        else:
            _overrides[kind] = str(name)


def clear() -> None:
    """Forget every decision of this process (not the disk cache) and every override."""
    with _lock:
        _decided.clear()
        _overrides.clear()


def choices() -> Dict[str, Dict]:
    """What was decided: ``"kind: key"`` → {choice, seconds (per candidate, best timed call),
    source ("probe", "revised" or "confirmed" (:func:`revise`), "given", "disk"), measured (where
    revised: the seconds measured at size), times (where the reviser gives them: the timed calls
    behind each measured figure)}, plus the overrides as
    ``"kind: *"``."""
    with _lock:
        out = {f"{k}: {key}": dict(v) for (k, key), v in _decided.items()}
        out.update({f"{k}: *": {"choice": v, "source": "override"} for k, v in _overrides.items()})
    return out


def decision(kind: str, key: str) -> Dict:
    """This process's decision for ``key`` of ``kind`` as :func:`choices` reports it ({} if none)."""
    with _lock:
        return dict(_decided.get((kind, key), {}))


def decisions(kind: str) -> Dict[str, Dict]:
    """This process's decisions of ``kind``: key → the entry :func:`choices` reports."""
    with _lock:
        return {key: dict(v) for (k, key), v in _decided.items() if k == kind}


def unsettled(kind: str, key: Optional[str] = None) -> bool:
    """Whether a decision of ``kind`` (``key``'s, or any) was made by this process's probe and not
    yet confirmed: its caller may still revise it (:func:`revise`), so its choice can change."""
    with _lock:
        if key is not None:  # auto asks on every call: one lookup
            return _decided.get((kind, key), {}).get("source") in _REVISABLE
        return any(v.get("source") in _REVISABLE for (k, _), v in _decided.items() if k == kind)


def revise(kind: str, key: str, name: str, measured: Mapping[str, float], *, final: bool,
           times: Optional[Mapping[str, Sequence[float]]] = None) -> None:
    """Replace the probe's decision for ``key`` of ``kind`` by ``name``, given the seconds of the
    candidates the caller ``measured`` at the size it uses (where the probe could only predict):
    they replace the probe's figures and are kept under ``"measured"`` (and the timings behind
    them under ``"times"``, where the caller gives them); ``final``: the caller measured enough
    (source ``"confirmed"``), else source ``"revised"``. On disk too where decisions are kept
    there. A decision not made by a probe of this process (an override, the disk cache, given
    timings) or already confirmed is left as it is."""
    with _lock:
        entry = _decided.get((kind, key))
        if entry is None or entry.get("source") not in _REVISABLE or name not in entry.get("seconds", {}):
            return
        _decided[(kind, key)] = {"choice": name, "seconds": {**entry["seconds"], **measured},
                                 "measured": dict(measured), "source": "confirmed" if final else "revised"}
        if times is not None:
            _decided[(kind, key)]["times"] = {n: list(ts) for n, ts in times.items()}
    _disk_store(kind, key, name)


def cpu_info() -> Dict[str, str]:
    """The first CPU's fields of Linux's /proc/cpuinfo ("model name", "cpu family", "flags", ...);
    empty where there is no such file."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name with its x86 family and model numbers (:func:`cpu_info`; else what
    the platform module says). Virtual machines often show a bare "AMD EPYC" for every generation,
    and the generations differ in their GEMM libraries' speed; the numbers tell them apart (Zen 4 is
    family 25, Zen 5 family 26), in the probe's disk cache and in the benchmark tables."""
    fields = cpu_info()
    model = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return model


def _machine() -> str:
    """What a cached choice is valid for: the CPU, its ISA level and the torch version."""
    return f"{cpu_model()}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}"


def _disk_path() -> Optional[str]:
    return os.environ.get("TWICEDIFF_PROBE_CACHE") or None


def _disk_load(kind: str, key: str, names) -> Optional[str]:
    path = _disk_path()
    if not path:
        return None
    try:
        with open(path) as f:
            entry = json.load(f).get(_machine(), {}).get(f"{kind}: {key}")
    except (OSError, ValueError):
        return None
    return entry if entry in names else None


def _disk_store(kind: str, key: str, name: str) -> None:
    path = _disk_path()
    if not path:
        return
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data.setdefault(_machine(), {})[f"{kind}: {key}"] = name
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


# Seconds this thread has spent measuring in probes (each probe's whole measurement, nested ones
# counted once): a probe runs inside the calls of another (the native engine's first call of a
# shape class probes its GEMM library while auto times the engines), and the outer one must leave
# that out of the candidate's time, or the candidate looks as slow as the inner probe's calls.
_spent = threading.local()


def seconds_measuring() -> float:
    """Seconds this thread's probes have spent measuring so far (see :func:`timed_call`), the timing
    of new matmul shape classes in the generic engines' products included (twicediff.torch.matmul_route)."""
    return getattr(_spent, "seconds", 0.0) + thread_seconds()


def timed_call(call: Callable[[], object]) -> Tuple[object, float]:
    """``call()`` and the seconds it took, less what probes that ran inside it spent measuring."""
    before = seconds_measuring()
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start - (seconds_measuring() - before)


def _measure(candidates: Mapping[str, Callable[[], object]], max_seconds: float) -> Dict[str, float]:
    start = time.perf_counter()
    best: Dict[str, float] = {}
    for name, call in candidates.items():  # warm-up: first-call costs (kernel generation) stay out
        best[name] = timed_call(call)[1]
    timed = False
    for r in range(MAX_ROUNDS):
        if r and time.perf_counter() - start >= max_seconds:
            break
        for name, call in candidates.items():
            s = timed_call(call)[1]
            best[name] = s if not timed else min(best[name], s)
        timed = True
    return best


def choose(kind: str, key: str, candidates: Union[Mapping[str, Callable[[], object]], Sequence[str]], *,
           timings: Optional[Mapping[str, float]] = None, max_seconds: float = MAX_SECONDS,
           measure: Optional[Callable[[], Mapping[str, float]]] = None) -> str:
    """The name of the fastest of ``candidates`` (name → call of no arguments) for the shape class
    ``key`` of decision ``kind``: an override, else this process' earlier decision, else the disk
    cache, else a probe (see the module docstring). ``timings`` (name → seconds) decides without
    running anything, as a probe that measured them would; ``measure`` replaces the probe's own
    timing (called only when nothing decided before; name → seconds, ``inf`` for a candidate that
    failed). With ``timings`` or ``measure`` the candidates may be given by name alone."""
    if not candidates:
        raise ValueError(f"probe.choose: candidates must name at least one call, got {candidates!r}")
    if timings is None and measure is None and not isinstance(candidates, Mapping):
        raise TypeError(f"probe.choose: candidates must map names to calls when neither timings nor measure is "
                        f"given, got {type(candidates).__name__}")
    names = list(candidates)
    with _lock:
        if kind in _overrides:
            if _overrides[kind] not in names:
                raise ValueError(f"probe: the override for {kind!r} must be one of {names}, got {_overrides[kind]!r}")
            return _overrides[kind]
        if (kind, key) in _decided and _decided[(kind, key)]["choice"] in names:
            return _decided[(kind, key)]["choice"]
    if timings is not None:
        missing = [n for n in names if n not in timings]
        if missing:
            raise ValueError(f"probe.choose: timings must give seconds for every candidate {names}, missing {missing}")
        seconds, source = {n: float(timings[n]) for n in names}, "given"
    else:
        cached = _disk_load(kind, key, names)
        if cached is not None:
            with _lock:
                _decided[(kind, key)] = {"choice": cached, "source": "disk"}
            return cached
        before, start = seconds_measuring(), time.perf_counter()
        try:
            seconds = dict(measure()) if measure is not None else _measure(candidates, max_seconds)
        finally:  # this measurement's time, the probes nested in it included once
            _spent.seconds = before + (time.perf_counter() - start) - thread_seconds()
        source = "probe"
    name = min(names, key=lambda n: (seconds.get(n, float("inf")), names.index(n)))
    with _lock:
        _decided[(kind, key)] = {"choice": name, "seconds": seconds, "source": source}
    if source == "probe":
        _disk_store(kind, key, name)
    return name
