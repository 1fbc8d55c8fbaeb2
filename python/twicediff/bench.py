"""The batched-HVP benchmark: Hessian-vector products per second of each engine against two
baselines, the cost of one HVP in plain gradients, and peak memory.

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
  caches and the allocator warm as in a training loop's steady state; its note gives the fastest
  engine's HVP in these units. It is often twice as fast as ``grad`` on a small model;
- ``auto@budget``: the ``auto`` engine under ``twicediff.memory_budget(budget)``, for the chunking
  target (peak at D = 64 within 1.5× of D = 1; throughput within 20% of unchunked ``auto``);
- ``native_gemms`` (when the native engine takes the model): the frozen prefix and the GEMMs the
  native op runs for the same D, chunked alike, on buffers of the same shapes and nothing else —
  the floor of the engine's algorithm on this GEMM library; ``native / native_gemms`` is the
  overhead of everything else (the fused elementwise kernels, copies, the launch and dispatch costs);
- ``native_blas`` (CPU, when the native op's float32 GEMMs go to oneDNN): the native engine with
  its GEMMs sent to ATen's BLAS instead (``TWICEDIFF_CPU_GEMM=blas``), what oneDNN brings.

Times are medians of interleaved repeats in one process (all methods of one D take turns, the order
reversed every other round), so the ratios hold on a busy machine. Peak memory: on CPU each configuration runs twice more (warm-up, then
measured) in a fresh subprocess that reports its peak resident set (``peak_mb``, see :func:`peak_rss_bytes`) and its growth over the set-up (``extra_mb``); on
CUDA ``torch.cuda.max_memory_allocated`` around one call.

API (used by ``python -m twicediff bench`` and ``benchmarks/bench_mvp.py``): :data:`PRESETS`,
:func:`run`, :func:`format_table`, :func:`plot`, :func:`to_json`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _build, _ops
from .memory import memory_budget
from .progress import progress_bar

__all__ = ["PRESETS", "cpu_gemm", "format_table", "git_commit", "interleaved_medians", "machine", "native_gemms",
           "plot", "run", "to_json"]

ENGINES = ("native", "func", "autograd")
BASELINES = ("loop", "vmap_jvp_grad")
LOOP_MAX_DIRECTIONS = 16
BUDGET_BYTES = 256 * 2**20
BUDGET_DIRECTIONS = 64
GRAD_CALLS = 10  # the "grad_warm" row: plain gradients timed back to back per round


class _TinyTransformer(nn.Module):
    """One pre-norm transformer block (single-head softmax attention written out, GELU MLP) over
    [N, L, d] token sequences, mean-pooled into a linear classifier."""

    def __init__(self, d: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj(att @ v)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def make_mlp(widths: Sequence[int], activation: Callable[[], nn.Module], n: int, loss: str = "ce",
             dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, loss, x [n, widths[0]], y): Linear layers of ``widths`` with ``activation`` between
    them, in eval mode, under cross-entropy (``"ce"``, class-index targets) or MSE (``"mse"``)."""
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([activation()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).to(dtype=dtype, device=device).eval()
    x = torch.randn(n, widths[0], dtype=dtype, device=device)
    if loss == "ce":
        return model, F.cross_entropy, x, torch.randint(0, widths[-1], (n,), device=device)
    return model, F.mse_loss, x, torch.randn(n, widths[-1], dtype=dtype, device=device)


def _preset_a(device):
    return make_mlp([64, 128, 128, 10], nn.Tanh, 512, device=device)


def _preset_b(device):
    return make_mlp([512, 1024, 1024, 100], nn.ReLU, 1024, device=device)


def _preset_c(device):
    # The last-layer case: a frozen feature extractor (256 -> 4096, ReLU) and a trainable
    # 4096 -> 1000 linear head over N = 2048 rows.
    model = nn.Sequential(nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 1000)).to(device).eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(2048, 256, device=device)
    return model, F.cross_entropy, x, torch.randint(0, 1000, (2048,), device=device)


def _preset_cnn(device):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).to(device).eval()
    x = torch.randn(128, 3, 16, 16, device=device)
    return model, F.cross_entropy, x, torch.randint(0, 10, (128,), device=device)


def _preset_transformer(device):
    model = _TinyTransformer().to(device).eval()
    x = torch.randn(64, 16, 32, device=device)
    return model, F.cross_entropy, x, torch.randint(0, 10, (64,), device=device)


# name -> (description, builder(device) -> (model, loss, x, y))
PRESETS: Dict[str, Tuple[str, Callable]] = {
    "a": ("MLP 64-128-128-10 Tanh, cross-entropy, N=512", _preset_a),
    "b": ("MLP 512-1024-1024-100 ReLU, cross-entropy, N=1024", _preset_b),
    "c": ("linear head 4096->1000 behind a frozen 256->4096 ReLU prefix, cross-entropy, N=2048", _preset_c),
    "d_cnn": ("CNN conv8-pool-conv16-pool-linear on 3x16x16, cross-entropy, N=128", _preset_cnn),
    "d_transformer": ("transformer block d=32, 16 tokens, mean-pool head, cross-entropy, N=64", _preset_transformer),
}


def git_commit() -> str:
    """Short commit of the working tree this module lies in, marked "(with uncommitted changes)" when
    tracked files differ from it ("unknown" outside git): the commit every result table names."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=os.path.dirname(__file__), capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") if sha else ""
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + (" (with uncommitted changes)" if dirty else "")) if sha else "unknown"


def machine() -> str:
    """The CPU's model name and logical CPU count, as the result tables state the machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int,
                        device: torch.device = torch.device("cpu"), *, calls: Optional[Dict[str, int]] = None,
                        clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds per call of each function: one warm-up call each, then ``repeats`` rounds in
    which every function is timed once, in turn (so load changes hit all of them alike), the order
    reversed every other round (so none always follows the same neighbour). ``calls[name]`` runs
    that function so many times back to back per timing and keeps the mean: for calls of a
    millisecond or two, which one preemption would otherwise dominate. ``clock``: wall time by
    default; ``time.process_time`` gives the process's CPU time over all threads."""
    calls = calls or {}
    for f in fns.values():
        f()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            n = max(1, int(calls.get(k, 1)))
            _sync(device)
            t0 = clock()
            for _ in range(n):
                fns[k]()
            _sync(device)
            times[k].append((clock() - t0) / n)
    return {k: statistics.median(t) for k, t in times.items()}


def _loop_mvp(model, loss, x, y, v):
    """pyDVL 0.7's mvp: a gradient with a graph, then one backward pass per direction."""
    from .torch.hvp import squeezed_loss

    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(squeezed_loss(loss, model(x), y), params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in g])
    z = (g * v).sum(dim=1)
    return torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(z[d], params, retain_graph=True)])
                        for d in range(v.shape[0])])


def _vmap_jvp_grad(model, loss, x, y, v):
    """Plain torch.func forward-over-reverse: vmap(jvp(grad(L))) over all directions at once."""
    from torch.func import functional_call, grad, jvp, vmap

    from .torch.hvp import squeezed_loss

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    tangents, col = {}, 0
    for n, p in named:
        tangents[n] = v[:, col:col + p.numel()].reshape(v.shape[0], *p.shape)
        col += p.numel()
    grad_fn = grad(lambda p: squeezed_loss(loss, functional_call(model, p, (x,)), y))
    out = vmap(lambda t: jvp(grad_fn, (params,), (t,))[1])(tangents)
    return torch.cat([out[n].reshape(v.shape[0], -1) for n, _ in named], dim=1)


def _plain_grad(model, loss, x, y):
    from .torch.hvp import squeezed_loss

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(squeezed_loss(loss, model(x), y), params)


def native_gemms(td, x, y, v) -> Callable[[], object]:
    """The GEMMs of ``td.hvp(x, y, v, engine="native")`` (Hessian mode) alone, in the order and
    shapes of the driver in csrc/mlp_hvp_common.h, chunked over directions as ``hvp`` chunks them;
    the frozen prefix runs first, as in the engine.

    The GEMMs go through the op's own GEMM (:func:`twicediff._ops.gemm_`: oneDNN or the BLAS, as
    ``build_info()["cpu_gemm"]`` says). Each chunk's GEMMs run as one R-pass over all its
    directions, with the GEMM library's own threading:
    what the op does on a GPU and with one CPU thread. With several CPU threads the op instead
    splits the directions into one part per thread (``CpuKernels::direction_parts``), so there it
    can be faster than this replay."""
    from .memory import chunk_size
    from .torch.hvp import MAX_DIRECTIONS_PER_CHUNK
    from .torch.native_engine import build_native_engine

    engine, reason = build_native_engine(td.model, td.loss)
    if engine is None:
        raise ValueError(f"bench: native_gemms needs a model the native engine takes: {reason}")
    n = engine.prepare(x, y)[0].shape[0]
    step = min(MAX_DIRECTIONS_PER_CHUNK, chunk_size(v.shape[0], engine.bytes_per_direction(n), x.device,
                                                     what="hvp directions"))
    Ws = [lin.weight.detach() for lin in engine.linears]
    opts = dict(dtype=Ws[0].dtype, device=Ws[0].device)
    # CpuKernels::weight_grad_input_major: float64 on the CPU takes h^T R(g_a), the rest R(g_a)^T h.
    input_major = Ws[0].dtype == torch.float64 and Ws[0].device.type == "cpu"
    with_bias = [lin.bias is not None for lin in engine.linears]

    def buffers(D: int) -> dict:
        """The GEMMs' inputs that the driver builds by copies (direction blocks, augmented rows,
        R-quantities), made once: only the GEMMs are timed."""
        out_last = Ws[-1].shape[0]
        return {
            "ga": [torch.randn(n, W.shape[0], **opts) for W in Ws],
            "haug": [torch.randn(n, W.shape[1] + with_bias[l], **opts) for l, W in enumerate(Ws)],
            "vaug": [torch.randn(D * W.shape[0], W.shape[1] + with_bias[l], **opts) for l, W in enumerate(Ws)],
            "rh": [torch.randn(n, D * W.shape[1], **opts) for W in Ws],
            "vt": [torch.randn(W.shape[0], D * W.shape[1], **opts) for W in Ws],
            "rg": torch.randn(n, D * out_last, **opts),
        }

    sizes = sorted({min(step, v.shape[0] - start) for start in range(0, v.shape[0], step)})
    made = {D: buffers(D) for D in sizes}

    outs: Dict[tuple, torch.Tensor] = {}

    def mm(site: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a b through the op's own GEMM, into an output kept per call site and shape (the op takes
        its outputs from a scratch buffer kept between calls)."""
        key = (site, a.shape[0], b.shape[1])
        if key not in outs:
            outs[key] = torch.empty(a.shape[0], b.shape[1], **opts)
        return _ops.gemm_(outs[key], a, b)

    def chunk(D: int) -> None:
        b = made[D]
        h = [engine.prepare(x, y)[0]]
        for l, W in enumerate(Ws):  # forward
            h.append(mm(f"a{l}", h[-1], W.t()))
        for l in range(len(Ws) - 1, 0, -1):  # plain backward
            mm(f"gh{l}", b["ga"][l], Ws[l])
        for l, W in enumerate(Ws):  # R-forward
            out, inp = W.shape
            ra = mm(f"ra{l}", b["haug"][l], b["vaug"][l].t())
            if l > 0:
                _ops.gemm_(ra.view(n * D, out), b["rh"][l].view(n * D, inp), W.t(), 1.0)
        rg = b["rg"]
        for l in range(len(Ws) - 1, -1, -1):  # R-backward
            out, inp = Ws[l].shape
            if input_major:
                mm(f"gw{l}", h[l].t(), rg)
            else:
                mm(f"gw{l}", rg.t(), h[l])
            if l == 0:
                break
            mm(f"second{l}", b["ga"][l].t(), b["rh"][l])
            rgh = mm(f"rgh{l}", rg.view(n * D, out), Ws[l])
            _ops.gemm_(rgh.view(n, D * inp), b["ga"][l], b["vt"][l], 1.0)
            rg = rgh.view(n, D * inp)

    def run_chunks() -> None:
        with torch.no_grad():
            for start in range(0, v.shape[0], step):
                chunk(min(step, v.shape[0] - start))

    return run_chunks


@contextlib.contextmanager
def cpu_gemm(backend: str) -> Iterator[None]:
    """Within the block, the native ops' CPU GEMMs go to ``backend`` (``"auto"``: oneDNN where
    possible; ``"blas"``: ATen's), through the ``TWICEDIFF_CPU_GEMM`` environment variable."""
    old = os.environ.get("TWICEDIFF_CPU_GEMM")
    os.environ["TWICEDIFF_CPU_GEMM"] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ["TWICEDIFF_CPU_GEMM"]
        else:
            os.environ["TWICEDIFF_CPU_GEMM"] = old


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
    if method == "native_gemms":
        return native_gemms(td, x, y, v)
    if method == "native_blas":
        def native_on_blas():
            with cpu_gemm("blas"):
                return td.hvp(x, y, v, engine="native")
        return native_on_blas
    raise ValueError(f"bench: unknown method {method!r}")


def _setup(preset: str, device: str, seed: int = 0):
    from .torch.twice_differentiable import TorchTwiceDifferentiable

    if preset not in PRESETS:
        raise ValueError(f"bench: preset must be one of {sorted(PRESETS)}, got {preset!r}")
    torch.manual_seed(seed)
    model, loss, x, y = PRESETS[preset][1](torch.device(device))
    return TorchTwiceDifferentiable(model, loss), x, y


def _directions(td, D: int, x) -> torch.Tensor:
    return torch.randn(D, td.num_params, dtype=td.dtype, device=x.device)


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` of /proc/self/status where it exists, else
    ``ru_maxrss``. (Linux carries ``ru_maxrss`` over from the parent into a fork-and-exec'd child,
    so a fresh subprocess of a big benchmark process would report the parent's peak; ``VmHWM``
    belongs to the child's own address space.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Make the peak resident set the current one (Linux ``/proc/self/clear_refs``); False where
    that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(preset: str, device: str, method: str, D: int, threads: Optional[int]) -> Dict[str, float]:
    """Peak memory of one call of ``method`` at D directions, in MiB, after one warm-up call (so that
    one-time costs — torch.func's decompositions, lazy imports — do not count). CPU: in this process
    (meant to be a fresh subprocess, see :func:`_peak_in_subprocess`), :func:`peak_rss_bytes` after
    the warm-up (the peak reset to the resident set where Linux allows) and after the call.
    CUDA: ``max_memory_allocated`` during the call."""
    if threads:
        torch.set_num_threads(threads)
    td, x, y = _setup(preset, device)
    v = _directions(td, D, x)
    call = _method_call(method, td, x, y, v)
    call()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        call()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"peak_mb": peak / 2**20, "extra_mb": (peak - base) / 2**20}
    reset_peak_rss()
    before = peak_rss_bytes()
    call()
    after = peak_rss_bytes()
    return {"peak_mb": after / 2**20, "extra_mb": (after - before) / 2**20}


def _peak_in_subprocess(preset: str, method: str, D: int, threads: Optional[int]) -> Dict[str, float]:
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))
    code = ("import json, sys; from twicediff.bench import measure_peak; "
            "print(json.dumps(measure_peak(sys.argv[1], 'cpu', sys.argv[2], int(sys.argv[3]), "
            "int(sys.argv[4]) or None)))")
    proc = subprocess.run([sys.executable, "-c", code, preset, method, str(D), str(threads or 0)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench: peak-memory subprocess for {preset}/{method}/D={D} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(preset: str = "a", device: str = "cpu", directions: Iterable[int] = (1, 16, 64, 256),
        engines: Optional[Sequence[str]] = None, threads: Optional[int] = None, repeats: int = 5,
        progress: bool = False, memory: bool = True) -> List[dict]:
    """Benchmark one preset on one device; returns one row (dict) per (D, method).

    Args:
        preset: a key of :data:`PRESETS`.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        directions: the values of D.
        engines: subset of ``("native", "func", "autograd")`` (default all; ``native`` is left out
            when the model does not qualify). The baselines ``loop`` and ``vmap_jvp_grad``, the
            plain gradient and, when 64 or 1 is among ``directions``, the 256 MiB budget run of
            ``auto`` are always measured; with ``native``, its GEMMs alone (``native_gemms``).
        threads: ``torch.set_num_threads`` for the run (CPU; default: leave as is).
        repeats: interleaved rounds per D (medians are reported).
        progress: a bar over the values of D.
        memory: also measure peak memory (CPU: one fresh subprocess per row).

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
        methods = engines + list(BASELINES) + (["native_gemms"] if "native" in engines else [])
        if "native" in engines and dev.type == "cpu" and _build._C.cpu_gemm() == "onednn":
            methods.append("native_blas")
        if D in (1, BUDGET_DIRECTIONS):
            methods += ["auto", f"auto@{BUDGET_BYTES}"]
        fns = {m: _method_call(m, td, x, y, v) for m in methods}
        # "grad", the unit of hvp_in_grads, is timed like every other method (one call per
        # round); "grad_warm" is the same gradient run GRAD_CALLS times back to back, caches and
        # allocator warm, as in a training loop's steady state.
        fns["grad"] = fns["grad_warm"] = lambda: _plain_grad(td.model, td.loss, x, y)
        med = interleaved_medians(fns, repeats, dev, calls={"grad_warm": GRAD_CALLS})
        per_hvp = {m: med[m] / (min(D, LOOP_MAX_DIRECTIONS) if m == "loop" else D) for m in methods}
        for m in methods + ["grad", "grad_warm"]:
            row = {"preset": preset, "device": str(dev), "threads": threads, "D": D, "method": m,
                   "seconds": med[m], "peak_mb": None, "extra_mb": None, "note": ""}
            if m in ("grad", "grad_warm", "native_gemms"):
                row.update(hvps_per_s=None, hvp_in_grads=None, vs_loop=None, vs_vmap_jvp_grad=None)
            else:
                row.update(hvps_per_s=1.0 / per_hvp[m], hvp_in_grads=per_hvp[m] / med["grad"],
                           vs_loop=per_hvp["loop"] / per_hvp[m],
                           vs_vmap_jvp_grad=per_hvp["vmap_jvp_grad"] / per_hvp[m])
            if m == "loop" and D > LOOP_MAX_DIRECTIONS:
                row["note"] = f"timed on {LOOP_MAX_DIRECTIONS} directions (linear in D)"
            if m.startswith("auto@"):
                row["note"] = f"memory budget {BUDGET_BYTES // 2**20} MiB"
            if m == "native":
                row["note"] = f"{med['native'] / med['native_gemms']:.2f}× its GEMMs alone"
            if m == "native_gemms":
                row["note"] = "the native op's GEMMs (and frozen prefix) alone, no products"
            if m == "native_blas":
                row["note"] = (f"native with ATen's BLAS GEMMs instead of oneDNN's: "
                               f"{med['native_blas'] / med['native']:.2f}× native's time")
            if m == "grad_warm":
                row["note"] = f"{GRAD_CALLS} back to back per round"
                if engines:
                    fastest = min(engines, key=lambda e: per_hvp[e])
                    row["note"] += f"; one {fastest} HVP costs {per_hvp[fastest] / med['grad_warm']:.2f} of these"
            if memory and m not in ("grad", "grad_warm", "native_gemms"):
                row.update(_peak_in_subprocess(preset, m, D, threads) if dev.type == "cpu"
                           else measure_peak(preset, str(dev), m, D, None))
            rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`run`'s rows, and the budget check when its rows are present."""
    lines = ["| preset | D | method | ms / call | HVPs / s | × loop | × vmap(jvp(grad)) | HVP in grads | "
             "peak MiB | extra MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['D']} | {r['method']} | {r['seconds'] * 1e3:.2f} | "
                     f"{_fmt(r['hvps_per_s'], '.1f')} | {_fmt(r['vs_loop'], '.2f')} | "
                     f"{_fmt(r['vs_vmap_jvp_grad'], '.2f')} | {_fmt(r['hvp_in_grads'], '.2f')} | "
                     f"{_fmt(r['peak_mb'], '.0f')} | {_fmt(r['extra_mb'], '.0f')} | {r['note']} |")
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
