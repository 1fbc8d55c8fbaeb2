"""twicediff against curvlinops 3.0.1's ``HessianLinearOperator``: one matmat of D columns on the same
model, batch and D, eager and compiled, timed interleaved in one process.

curvlinops is a peer, not a dependency: it lives in its own venv, with the same torch as twicediff's
extension (torch==2.14.1, taken from local disk):

    python3 -m venv benchmarks/.venv-curvlinops
    benchmarks/.venv-curvlinops/bin/pip install torch==2.14.1 curvlinops-for-pytorch==3.0.1
    flock /tmp/bench.lock env PYTHONPATH=python benchmarks/.venv-curvlinops/bin/python \\
        benchmarks/bench_curvlinops.py --out benchmarks/results/curvlinops_cpu.md

Methods (each computes H V for V [P, D], H the Hessian of the mean loss on the batch):
- ``curvlinops``: ``HessianLinearOperator(model, loss, params, [(x, y)]) @ V`` (vmap over the D
  columns of jvp(jacrev(loss)), all at once), under the attention settings twicediff's calls use
  (math SDPA, no fast path: torch's attention layers need them for second derivatives; a no-op on
  the other presets);
- ``curvlinops_compiled``: the same with its per-batch product function (``_mp``) under
  ``torch.compile`` (curvlinops has no compiled mode of its own);
- ``twicediff_auto``: ``TorchTwiceDifferentiable.hvp(x, y, V.T)`` as a user calls it (eager), with the
  engine auto kept in parentheses;
- ``twicediff_compiled``: ``hvp(..., engine="compiled")``.
Compile times (first call minus a steady one) are reported apart.
"""
import time

import torch
from torch import nn

import harness
from twicediff import TorchTwiceDifferentiable
from twicediff.app import bench
from twicediff.torch.guard import attention_for_derivatives

LOSSES = {"F.cross_entropy": nn.CrossEntropyLoss, "F.mse_loss": nn.MSELoss}


def _first_minus_steady(fn) -> float:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    t = time.perf_counter()
    fn()
    return first - (time.perf_counter() - t)


def run(preset: str, D: int, repeats: int, untimed_first: int):
    from curvlinops import HessianLinearOperator

    torch.manual_seed(0)
    model, loss, x, y = bench.PRESETS[preset][1](torch.device("cpu"))
    loss_module = LOSSES[f"F.{loss.__name__}"]()
    td = TorchTwiceDifferentiable(model, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    V = torch.randn(td.num_params, D)
    Vt = V.T.contiguous()
    H = HessianLinearOperator(model, loss_module, params, [(x, y)], check_deterministic=False)
    Hc = HessianLinearOperator(model, loss_module, params, [(x, y)], check_deterministic=False)
    Hc.__dict__["_mp"] = torch.compile(Hc._mp)  # its cached per-batch product function, compiled
    def under_math_attention(f):  # as curvlinops' users must run it on torch's attention layers
        def call():
            with attention_for_derivatives():
                return f()
        return call

    fns = {"curvlinops": under_math_attention(lambda: H @ V),
           "curvlinops_compiled": under_math_attention(lambda: Hc @ V),
           "twicediff_auto": lambda: td.hvp(x, y, Vt),
           "twicediff_compiled": lambda: td.hvp(x, y, Vt, engine="compiled")}
    first = {m: _first_minus_steady(fns[m]) for m in fns}  # compile, probe
    bench.settle_auto(fns["twicediff_auto"])  # time the engine auto keeps, not its first choices
    from twicediff.torch.engines import probe

    # This model's decisions only: presets of one class (d_cnn and a are Sequentials) differ in x.
    kept = sorted({e["choice"] for k, e in probe.decisions("engine").items()
                   if k.startswith(type(model).__name__) and f" x{tuple(x.shape)} " in k})
    want = td.hvp(x, y, Vt, engine="autograd")
    gaps = {m: float((fns[m]().T if m.startswith("curvlinops") else fns[m]()).sub(want).abs().max()) for m in fns}
    med = bench.interleaved_medians(fns, repeats, untimed_first=untimed_first)
    best_cl = min(med["curvlinops"], med["curvlinops_compiled"])
    lines = []
    for m in fns:
        label = f"{m} ({'+'.join(kept)})" if m == "twicediff_auto" else m
        lines.append(f"| {preset} | {D} | {label} | {med[m] * 1e3:.1f} | {med['curvlinops'] / med[m]:.2f} | "
                     f"{med['curvlinops_compiled'] / med[m]:.2f} | {best_cl / med[m]:.2f} | {first[m]:.1f} | "
                     f"{gaps[m]:.1e} |")
    return lines


def main():
    args = harness.preset_args(__doc__)
    import curvlinops  # noqa: F401  (fails early outside its venv)
    from importlib.metadata import version

    presets = args.preset or ["d_cnn", "d_transformer", "a"]
    peer = "curvlinops-for-pytorch " + version("curvlinops-for-pytorch")
    text = ["# twicediff against curvlinops' HessianLinearOperator (cpu)", "",
            f"{harness.run_facts(peer)}; {args.threads} threads; float32; "
            f"{bench.timing_words(args.repeats, args.untimed_first)}; load average at start "
            f"{harness.load_average()}.", "",
            "Command: `flock /tmp/bench.lock env PYTHONPATH=python benchmarks/.venv-curvlinops/bin/python "
            f"benchmarks/bench_curvlinops.py {' '.join('--preset ' + p for p in presets)} --directions "
            f"{args.directions} --repeats {args.repeats} --untimed-first {args.untimed_first}`", "",
            "One call: H V for V of D columns on one batch. × curvlinops (eager / compiled / best of the two): its "
            "time over this method's (> 1: this method is faster). first − steady s: compile time (compiled "
            "methods), the probe (twicediff_auto). max |Δ|: against twicediff's autograd engine.", "",
            "| preset | D | method | ms / call | × curvlinops | × curvlinops compiled | × best curvlinops | "
            "first − steady s | max abs Δ |", "|---|---|---|---|---|---|---|---|---|"]
    for p in presets:
        text += run(p, args.directions, args.repeats, args.untimed_first)
        print("\n".join(text[-4:]), flush=True)
    text += ["", "curvlinops_compiled: `torch.compile` (default options) of curvlinops' per-batch product. Dynamo "
             "cannot trace it whole: with `TORCH_LOGS=graph_breaks` it reports a graph break inside the vmapped "
             "function, in curvlinops' `split_list` (a data-dependent `cumsum` used as a slice bound), and with "
             "`fullgraph=True` compilation fails; so most of it runs eagerly. No change to curvlinops was made to "
             "help it compile."]
    harness.emit("\n".join(text), args.out)


if __name__ == "__main__":
    main()
