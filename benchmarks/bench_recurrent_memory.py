"""Working memory per direction of the generic engines' products on recurrent models, against the
estimate a memory budget chunks by (``bytes_per_direction``): each (cell, engine, D) in a fresh
process, the growth of its peak resident set between D = 4 and D = 16 directions divided by 12.

    PYTHONPATH=python python benchmarks/bench_recurrent_memory.py

Model: a 2-layer RNN / GRU / LSTM (8 → 64 → 64, batch_first) read at its last step into a Linear
head; N = 64 sequences of T = 100 steps, float32, cross-entropy. Prints a markdown table.
"""
import json
import os
import subprocess
import sys
import textwrap

_ONE = textwrap.dedent("""
    import json, resource, sys
    import torch, torch.nn.functional as F
    from torch import nn
    from twicediff import TorchTwiceDifferentiable

    class Seq(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.rnn, self.head = cell(16, 64, num_layers=2, batch_first=True), nn.Linear(64, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    cell, engine, d = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    td = TorchTwiceDifferentiable(Seq({"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]).eval(), F.cross_entropy)
    x, y = torch.randn(64, 100, 16), torch.randint(0, 3, (64,))
    td.hvp(x, y, torch.randn(1, td.num_params), engine=engine)
    td.hvp(x, y, torch.randn(d, td.num_params), engine=engine)
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "estimate": td.hvp_function(x, y, engine=engine).bytes_per_direction}))
""")


def run(cell: str, engine: str, d: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _ONE, cell, engine, str(d)], capture_output=True, text=True,
                          check=True, env={**os.environ})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; commit {commit}\n")
    print("| cell | engine | peak growth per direction (MiB) | estimate per direction (MiB) | estimate / growth |")
    print("|---|---|---:|---:|---:|")
    mib = 2 ** 20
    for cell in ("lstm", "gru", "rnn"):
        for engine in ("func", "autograd"):
            small, large = run(cell, engine, 4), run(cell, engine, 16)
            growth = (large["peak"] - small["peak"]) / 12
            print(f"| {cell} | {engine} | {growth / mib:.1f} | {large['estimate'] / mib:.1f} | "
                  f"{large['estimate'] / max(growth, 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
