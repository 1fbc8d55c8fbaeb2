"""What only the benchmark scripts use: the facts every result table starts with (machine, CPU
ISA, torch version, commit), timing helpers, peak memory in a fresh subprocess, and replays of the
native op's GEMMs. The installed package does none of this: it neither shells out to git nor reads
/proc for benchmarks.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
from typing import Callable, Dict, Iterator, Optional

import torch

from twicediff import build_info, ops
from twicediff.app import bench
from twicediff.app.bench import interleaved_medians

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


# The CPU flags that decide which GEMM and vector kernels run (oneDNN's and MKL's paths, AMX on
# Intel Xeons from Sapphire Rapids on), as /proc/cpuinfo spells them.
GEMM_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The :data:`GEMM_FLAGS` this CPU has, space-separated ("" where /proc/cpuinfo is not there)."""
    from twicediff.torch.engines.probe import cpu_info

    have = cpu_info().get("flags", "").split()
    return " ".join(flag for flag in GEMM_FLAGS if flag in have)


def add_untimed_first(ap) -> None:
    """The benchmarks' ``--untimed-first N`` option (default ``bench.UNTIMED_FIRST``): untimed calls of a method right
    before each of its timings (``twicediff.app.bench.interleaved_medians``), so that no method
    pays for the heap the one before it left."""
    ap.add_argument("--untimed-first", type=int, default=bench.UNTIMED_FIRST,
                    help="untimed calls of a method right before each of its timings (see harness)")


def machine() -> str:
    """The CPU's model name (with its family and model numbers), its ISA level as torch sees it
    and its GEMM-relevant flags, the logical CPU count and the library of the native ops' float32
    GEMMs (with oneDNN's reason when it refused them), as the result tables state the machine."""
    from twicediff.torch.engines.probe import cpu_model

    from twicediff import _C

    isa = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    gemm = _C.cpu_gemm()
    refusal = _C.cpu_gemm_refusal()
    gemm += " (oneDNN refused: " + refusal.split(":")[-1].strip() + ")" if refusal else ""
    return (f"{cpu_model()}; ISA {isa}" + (f", flags {flags}" if flags else "")
            + f"; {os.cpu_count()} logical CPUs; native float32 GEMMs: {gemm}")




def native_gemms(td, x, y, v) -> Callable[[], object]:
    """The GEMMs of ``td.hvp(x, y, v, engine="native")`` (Hessian mode) alone, in the order and
    shapes of the driver in csrc/mlp_hvp_driver.h, chunked over directions as ``hvp`` chunks them;
    the frozen prefix runs first, as in the engine.

    The GEMMs go through the op's own GEMM (:func:`twicediff.ops.gemm_`: oneDNN or the BLAS, as
    ``build_info()["cpu_gemm"]`` says). Each chunk's GEMMs run as one R-pass over all its
    directions, with the GEMM library's own threading:
    what the op does on a GPU and with one CPU thread. With several CPU threads the op instead
    splits the directions into one part per thread (``CpuKernels::direction_parts``), so there it
    can be faster than this replay."""
    from twicediff.memory import chunk_size
    from twicediff.torch.engines import NativeEngine
    from twicediff.torch.engines.base import MAX_DIRECTIONS_PER_CHUNK

    engine = NativeEngine(td.model, td.loss)  # NotNativeError names what it cannot take
    prepared = engine.prepare(x, y)
    n = prepared.rows
    step = min(MAX_DIRECTIONS_PER_CHUNK, chunk_size(v.shape[0], engine.bytes_per_direction(prepared), x.device,
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
        return ops.gemm_(outs[key], a, b)

    def chunk(D: int) -> None:
        b = made[D]
        h = [engine.prepare(x, y).inputs]
        for l, W in enumerate(Ws):  # forward
            h.append(mm(f"a{l}", h[-1], W.t()))
        for l in range(len(Ws) - 1, 0, -1):  # plain backward
            mm(f"gh{l}", b["ga"][l], Ws[l])
        for l, W in enumerate(Ws):  # R-forward
            out, inp = W.shape
            ra = mm(f"ra{l}", b["haug"][l], b["vaug"][l].t())
            if l > 0:
                ops.gemm_(ra.view(n * D, out), b["rh"][l].view(n * D, inp), W.t(), 1.0)
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
            ops.gemm_(rgh.view(n, D * inp), b["ga"][l], b["vt"][l], 1.0)
            rg = rgh.view(n, D * inp)

    def run_chunks() -> None:
        with torch.no_grad():
            for start in range(0, v.shape[0], step):
                chunk(min(step, v.shape[0] - start))

    # The GEMMs run on the library the op's probe picked for this shape class.
    if engine.gemm_library(prepared, v[:step].to(Ws[0].dtype)) == "blas":
        def on_blas() -> None:
            with cpu_gemm("blas"):
                run_chunks()
        return on_blas
    return run_chunks


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` within the block, then as it was."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextlib.contextmanager
def cpu_gemm(backend: str) -> Iterator[None]:
    """Within the block, the native ops' CPU GEMMs go to ``backend`` (``"auto"``: oneDNN where
    possible; ``"blas"``: ATen's), through the ``TWICEDIFF_CPU_GEMM`` environment variable and,
    for ``"auto"``, an override of the op's timed probe (which would otherwise pick per shape)."""
    from twicediff.torch.engines import probe

    probe.set_choice("cpu_gemm", "onednn" if backend == "auto" else None)
    try:
        with environment("TWICEDIFF_CPU_GEMM", backend):
            yield
    finally:
        probe.set_choice("cpu_gemm", None)




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
    (meant to be a fresh subprocess, see :func:`peak_in_subprocess`), :func:`peak_rss_bytes` after
    the warm-up (the peak reset to the resident set where Linux allows) and after the call.
    CUDA: ``max_memory_allocated`` during the call."""
    if threads:
        torch.set_num_threads(threads)
    td, x, y = bench._setup(preset, device)
    v = bench._directions(td, D, x)
    call = EXTRA_METHODS[method](td, x, y, v) if method in EXTRA_METHODS else bench._method_call(method, td, x, y, v)
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


def peak_in_subprocess(preset: str, method: str, D: int, threads: Optional[int]) -> Dict[str, float]:
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import json, sys; sys.path.insert(0, sys.argv[5]); from harness import measure_peak; "
            "print(json.dumps(measure_peak(sys.argv[1], 'cpu', sys.argv[2], int(sys.argv[3]), "
            "int(sys.argv[4]) or None)))")
    proc = subprocess.run([sys.executable, "-c", code, preset, method, str(D), str(threads or 0), here],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench: peak-memory subprocess for {preset}/{method}/D={D} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_of(device: str) -> Callable[[str, str, int, int], Dict[str, float]]:
    """The ``memory`` hook of :func:`twicediff.app.bench.run`: peak memory of one configuration, on
    the CPU in a fresh subprocess, on CUDA in this process."""
    if torch.device(device).type == "cpu":
        return lambda preset, method, D, threads: peak_in_subprocess(preset, method, D, threads)
    return lambda preset, method, D, threads: measure_peak(preset, device, method, D, None)


def _native_blas(td, x, y, v):
    """The native engine with its CPU GEMMs on ATen's BLAS (only where they would go to oneDNN)."""
    if x.device.type != "cpu" or build_info()["cpu_gemm"] != "onednn" or td.native_unsupported_reason(x, y):
        return None

    def call():
        with cpu_gemm("blas"):
            return td.hvp(x, y, v, engine="native")
    return call


def _native_gemms_or_none(td, x, y, v):
    return native_gemms(td, x, y, v) if not td.native_unsupported_reason(x, y) else None


#: The methods bench_mvp.py adds to :func:`twicediff.app.bench.run` (``extra_methods``).
EXTRA_METHODS: Dict[str, Callable] = {"native_gemms": _native_gemms_or_none, "native_blas": _native_blas}


def run_facts(*also: str) -> str:
    """The facts a result table's first line starts with: "Machine: ...; torch ...; commit ...",
    with ``also`` (other versions) after torch's."""
    return "; ".join([f"Machine: {machine()}", f"torch {torch.__version__}", *also, f"commit {git_commit()}"])


def load_average() -> str:
    """The host's load average now, as the tables give it: "1-min / 5-min / 15-min"."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def header(title: str, threads: int) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"## {title}\n\nmachine: {machine()} ({torch.get_num_threads()} torch threads available, "
            f"{threads} used); GPU: {gpu}; torch {torch.__version__}; commit {git_commit()}")


def emit(text: str, out: str = "") -> None:
    """Print a result table and, when ``out`` names a file, write it there too."""
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")


def median_ms(fn, rounds: int) -> float:
    """Milliseconds per call of ``fn``: one warm-up call, then the median of ``rounds`` calls."""
    return 1e3 * interleaved_medians({"fn": fn}, rounds)["fn"]


def preset_args(doc: str, add: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The options of the scripts that time presets at D directions: --preset (repeatable), --directions
    (default 64), --threads (default 2, applied to torch), --repeats (default 7), --untimed-first
    and --out; ``add(parser)`` adds a script's own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", action="append", choices=sorted(bench.PRESETS))
    ap.add_argument("--directions", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    add_untimed_first(ap)
    ap.add_argument("--out", default="")
    if add is not None:
        add(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def bench_args(doc: str, rounds: int, thread_counts: bool = False,
               add: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """--threads (default 2, applied to torch; with ``thread_counts``, a list of counts, default 1 2,
    for the script to apply in turn), --rounds and --out (a markdown path, or print only); ``add``
    adds a script's own options."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if add is not None:
        add(ap)
    if thread_counts:
        ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    else:
        ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not thread_counts:
        torch.set_num_threads(args.threads)
    return args
