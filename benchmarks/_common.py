"""What every benchmark result table starts with: machine, torch version, commit, threads."""
import argparse

import torch

from twicediff.bench import git_commit, interleaved_medians, machine


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


def bench_args(doc: str, rounds: int, thread_counts: bool = False) -> argparse.Namespace:
    """--threads (default 2, applied to torch; with ``thread_counts``, a list of counts, default 1 2,
    for the script to apply in turn), --rounds and --out (a markdown path, or print only)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
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
