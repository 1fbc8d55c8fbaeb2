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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-json", default=None, help="a finished run's JSON (else run the evaluation now)")
    ap.add_argument("--commit", default=None, help="the commit whose code produced --from-json (default: HEAD)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "evaluate_digits"), help="output stem")
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
    if os.path.abspath(source) != os.path.abspath(args.out + ".json"):
        shutil.copyfile(source, args.out + ".json")
    plot_lds_time(ev, args.out + ".png")
    print(open(args.out + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
