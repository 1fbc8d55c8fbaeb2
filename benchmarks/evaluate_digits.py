"""Attribution quality of every influence method on the demo's digits: the full
``python -m twicediff evaluate`` run, written to benchmarks/results/evaluate_digits.{md,json,png}.

    flock /tmp/bench.lock python benchmarks/evaluate_digits.py            # run it (minutes)
    python benchmarks/evaluate_digits.py --from-json out/evaluate_digits_seed0.json --commit SHA
                                                                          # format a finished CLI run

The table states the machine, torch version and the commit of the code that ran; the analysis
against published figures is written by hand under the table (see the committed file).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from harness import git_commit, machine
from twicediff.evaluate import Evaluation
from twicediff.evaluate.report import format_table, plot_lds_time

HERE = os.path.dirname(os.path.abspath(__file__))


def from_json(path: str) -> Evaluation:
    with open(path) as f:
        d = json.load(f)
    return Evaluation(config=d["config"], subsets=np.array(d["subsets"]), seeds=d["seeds"],
                      measurements=np.empty(0), methods=d["methods"], retrain=d["retrain"], facts=d["facts"])


def retime(ev: Evaluation, rounds: int) -> str:
    """A table of each method's solve time (the same right-hand-side count as the run, gradients of
    random training points), measured ``rounds`` times with the methods interleaved in each round;
    one torch thread, as in the run."""
    import time

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from twicediff import TorchTwiceDifferentiable
    from twicediff.evaluate.core import point_gradients
    from twicediff.evaluate.digits import digits_problem
    from twicediff.evaluate.methods import METHODS

    torch.set_num_threads(1)
    problem = digits_problem()
    n = problem.x_train.shape[0]
    full = problem.train(np.arange(n, dtype=np.int64), ev.config.get("seed", 0))
    model = TorchTwiceDifferentiable(full, problem.loss)
    loader = DataLoader(TensorDataset(problem.x_train, problem.y_train), batch_size=problem.batch_size)
    rows = ev.facts.get("right_hand_sides") or (problem.x_test.shape[0] + problem.x_val.shape[0] + n)
    pick = torch.randint(0, n, (rows,), generator=torch.Generator().manual_seed(0))
    rhs = point_gradients(full, problem.loss, problem.x_train[pick], problem.y_train[pick])
    lam = float(problem.hessian_regularization)
    names = list(ev.methods)
    times = {name: [] for name in names}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            METHODS[name](model, loader, rhs, lam)
            times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    lines = [f"Solve times re-measured after the run: {rows} right-hand sides, {rounds} rounds with the methods "
             f"interleaved (order reversed every other round), one torch thread; load average {load[0]:.1f} at the "
             f"start and {load[1]:.1f} at the end, commit {git_commit()}.", "",
             "| method | median s | min s | max s | × Direct |", "|---|---:|---:|---:|---:|"]
    direct = float(np.median(times["direct"])) if "direct" in times else None
    for name in names:
        med = float(np.median(times[name]))
        ratio = f"{med / direct:.2f}" if direct else "—"
        lines.append(f"| {name} | {med:.2f} | {min(times[name]):.2f} | {max(times[name]):.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-json", default=None, help="a finished run's JSON (else run the evaluation now)")
    ap.add_argument("--commit", default=None, help="the commit whose code produced --from-json (default: HEAD)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "evaluate_digits"), help="output stem")
    ap.add_argument("--retime", type=int, default=0, metavar="R",
                    help="time each method's solve again, R rounds interleaved across methods (medians), and add "
                         "that table: the run's own times are each one measurement, taken minutes apart")
    args = ap.parse_args()
    source = args.from_json
    if source is None:
        work = os.path.join(HERE, ".evaluate_run")
        subprocess.run([sys.executable, "-m", "twicediff", "evaluate", "--output", work, "--no-progress"], check=True)
        source = os.path.join(work, "evaluate_digits_seed0.json")
    ev = from_json(source)
    f, r = ev.facts, ev.retrain
    header = (f"## Attribution quality on the digits: `python -m twicediff evaluate`\n\n"
              f"machine: {machine()} (shared with other jobs while it ran: absolute times are inflated, the "
              f"ratios between methods less so); torch {f['torch']}; Python {f['python']}; "
              f"commit {args.commit or git_commit()}; {ev.config['workers']} worker processes of one torch "
              f"thread for the retrainings ({r['trained']} trained, {r['seconds']:.0f} s), one torch thread "
              f"for the influences; full model trained in {r['full_model_seconds']:.1f} s.\n")
    with open(args.out + ".md", "w") as fh:
        fh.write(header + "\n" + format_table(ev) + "\n")
        if args.retime:
            fh.write("\n" + retime(ev, args.retime) + "\n")
    if os.path.abspath(source) != os.path.abspath(args.out + ".json"):
        shutil.copyfile(source, args.out + ".json")
    plot_lds_time(ev, args.out + ".png")
    print(open(args.out + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
