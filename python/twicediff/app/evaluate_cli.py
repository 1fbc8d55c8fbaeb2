"""``python -m twicediff evaluate``: the command-line face of :func:`twicediff.evaluate.evaluate`
on the demo's digits (:func:`twicediff.evaluate.digits_problem`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .arguments import at_least_two as _at_least_two, fraction as _fraction, positive_float as _positive_float
from .arguments import positive_int as _positive_int

__all__ = ["DESCRIPTION", "FULL", "QUICK", "QUICK_SELF_INFLUENCE", "add_arguments", "run"]

# (subsets M, seeds K): the full run and --quick.
FULL = (64, 4)
QUICK = (16, 2)
# --quick scores self-influence on this many training points drawn at random, not all 1,200: each
# is one more right-hand side for every method, and CG and LiSSA pay for each.
QUICK_SELF_INFLUENCE = 300

DESCRIPTION = f"""\
How good is each influence method? Measured on the demo's digits (MLP 64-32-10, 1,200 training
digits with 10% flipped labels, 297 test digits; see `twicediff demo --help`).

Linear datamodeling score (LDS; Park et al. 2023, "TRAK"): draw M random subsets holding a fraction
alpha of the training points (the same subsets for every method), train a fresh model on each with
K seeds, and record each test point's measurement (its loss, or its margin) averaged over the seeds.
A method predicts the measurement of the model trained on a subset S as -sum over i in S of the
influence of z_i on the test point (pyDVL's sign: a positive influence lowers the loss); the LDS is
the mean over test points of the Spearman correlation between predictions and measurements (1:
perfect ranking of the subsets; 0: none), with a 95% bootstrap interval over the test points. The
split-half line is the same correlation between two halves of the seeds: how much of the measurement
is retraining noise.

Flipped-label detection: ROC AUC and precision at k of ranking the training points by self-influence
and by harm to the validation loss, k = the number flipped.

Methods: identity (plain gradient dot products, the baseline), Direct (exact inverse of H + lambda*I),
CG, LiSSA, Arnoldi at ranks 10 and 100, K-FAC and EK-FAC (each with the empirical Fisher and with the
Gauss-Newton matrix; each damped by lambda and, in the "0.1 x mean eigenvalue" rows, by their own rule,
0.1 times each layer's mean eigenvalue, whatever lambda is); each timed.

Cost: M*K trainings (L-BFGS to convergence, 1-3 s of one core each), spread over --workers processes,
plus one solve per method with 1,797 right-hand sides (297 test + 300 validation + 1,200 training
points for self-influence): under a second for identity and the K-FAC family, a few seconds for Direct and Arnoldi, a
minute or more each for CG and LiSSA. The full run (M={FULL[0]}, K={FULL[1]}: {FULL[0] * FULL[1]} trainings) takes
about 10-20 minutes on 2 cores.

--quick is a cheaper, less accurate run, for a first look: M={QUICK[0]} subsets, K={QUICK[1]} seeds
({QUICK[0] * QUICK[1]} trainings), self-influence on {QUICK_SELF_INFLUENCE} random training points (897 right-hand
sides), CG to a relative residual of 1e-4 (at most 100 steps, instead of 1e-6) and LiSSA with 100
steps (instead of 300): under a minute on an idle 2-core machine, a few on a busy one. Its LDS
intervals are wider (fewer subsets), and the LDS of CG and LiSSA may be lower than in the full run
(looser solves); the table and the JSON name every method's options.

Finished trainings are cached under --cache (default OUTPUT/evaluate_cache): an interrupted run
resumes where it stopped, and a larger M or K reuses the smaller run's trainings.

Writes OUTPUT/evaluate_digits_seedS.json (every figure, the seeds and the subsets, to reproduce the
run) and, with matplotlib, OUTPUT/evaluate_digits_seedS.png (LDS against time per method)."""


def _methods(text: str):
    from ..evaluate.methods import available_methods

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in available_methods()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated names among {','.join(available_methods())}, "
                                         f"got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``evaluate`` (``--seed``, ``--output``, ``--device`` and ``--progress`` come
    from the CLI's common options)."""
    from .demo import DemoConfig

    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: M={QUICK[0]} subsets, K={QUICK[1]} seeds, self-influence on "
                             f"{QUICK_SELF_INFLUENCE} training points, CG to rtol 1e-4 and LiSSA 100 steps "
                             f"(default: M={FULL[0]}, K={FULL[1]}, all points, CG 1e-6, LiSSA 300)")
    parser.add_argument("--subsets", type=_at_least_two, default=None, metavar="M",
                        help=f"number of random subsets, >= 2 (default: {FULL[0]}; --quick: {QUICK[0]})")
    parser.add_argument("--seeds", type=_positive_int, default=None, metavar="K",
                        help=f"trainings per subset, averaged (default: {FULL[1]}; --quick: {QUICK[1]})")
    parser.add_argument("--fraction", type=_fraction, default=0.5, metavar="ALPHA",
                        help="fraction of the training points in each subset (default: 0.5)")
    parser.add_argument("--measurement", choices=("loss", "margin"), default="loss",
                        help="what is predicted at each test point (default: loss)")
    parser.add_argument("--methods", type=_methods, default=None, metavar="M1,M2,...",
                        help="methods to compare (default: all this twicediff has)")
    parser.add_argument("--regularization", type=_positive_float, default=DemoConfig.regularization,
                        metavar="LAMBDA", help=f"Hessian damping (default: the demo's {DemoConfig.regularization}; the "
                             f"K-FAC rows marked 0.1 x mean eigenvalue keep their own)")
    parser.add_argument("--workers", type=_positive_int, default=min(2, os.cpu_count() or 1),
                        help="processes training at once, one torch thread each (default: min(2, cores))")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="folder of finished trainings (default: OUTPUT/evaluate_cache)")
    parser.add_argument("--no-cache", action="store_true", help="keep no trainings on disk")
    parser.add_argument("--bootstrap", type=_positive_int, default=2000,
                        help="bootstrap resamples of the interval (default: 2000)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads of this process, for the influences (default: 1)")


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` for parsed arguments; print the table, write the JSON (and PNG). Returns 0."""
    from .demo import DemoConfig
    from ..evaluate.core import evaluate
    from ..evaluate.digits import digits_problem
    from ..evaluate.methods import METHODS, QUICK_METHODS
    from ..evaluate.report import format_table, plot_lds_time

    if getattr(args, "device", "cpu") != "cpu":
        message = f"argument --device: evaluate trains and scores on the cpu only, got {args.device!r}"
        if getattr(args, "parser", None) is not None:
            args.parser.error(message)  # exits with status 2, as every usage error
        raise ValueError(message)
    M, K = QUICK if args.quick else FULL
    M = args.subsets if args.subsets is not None else M
    K = args.seeds if args.seeds is not None else K
    problem = digits_problem(DemoConfig(seed=args.seed, regularization=args.regularization), args.measurement)
    os.makedirs(args.output, exist_ok=True)
    cache = None if args.no_cache else (args.cache or os.path.join(args.output, "evaluate_cache"))
    ev = evaluate(problem, methods=args.methods, num_subsets=M, num_seeds=K, fraction=args.fraction,
                  seed=args.seed, workers=args.workers, cache_dir=cache, bootstrap=args.bootstrap,
                  progress=args.progress, method_table=QUICK_METHODS if args.quick else METHODS,
                  self_influence_points=QUICK_SELF_INFLUENCE if args.quick else None)
    print(format_table(ev))
    stem = os.path.join(args.output, f"evaluate_digits_seed{args.seed}")
    with open(stem + ".json", "w") as f:
        json.dump(ev.summary(per_test=True), f, indent=1)
    print(f"\nsaved {stem}.json: the figures above, the seeds and the subsets")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("twicediff evaluate: matplotlib is not installed, so no PNG was written "
              "(pip install 'twicediff[plot]')", file=sys.stderr)
        return 0
    plot_lds_time(ev, stem + ".png")
    print(f"saved {stem}.png: LDS against time per method")
    return 0
