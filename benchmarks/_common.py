"""What every benchmark result table starts with: machine, torch version, commit, threads."""
import platform
import subprocess

import torch


def machine() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(title: str, threads: int) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"## {title}\n\nmachine: {machine()} ({torch.get_num_threads()} torch threads available, "
            f"{threads} used); GPU: {gpu}; torch {torch.__version__}; commit {commit()}")


def emit(text: str, out: str = "") -> None:
    """Print a result table and, when ``out`` names a file, write it there too."""
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
