"""One evaluation: influences of every method on the fully trained model, retrainings on the
subsets, and from both the LDS with its interval and the flipped-label detection figures."""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.func import grad, vmap

from ..influence import compute_influences_up
from ..torch import TorchTwiceDifferentiable
from ..torch.batch import model_args, move_inputs, num_points, per_point, slice_batch, vmap_dims
from ..torch.stateless import functional_call, slot_names, split_params
from .lds import bootstrap_ci, lds, predict_subsets, sample_subsets, spearman_per_column
from .methods import METHODS, Solve, available_methods, describe
from .problem import Problem, points, resolve_measurement
from .retrain import fingerprint, retrain_measurements

__all__ = ["Evaluation", "evaluate", "point_gradients"]


def point_gradients(module: torch.nn.Module, fn, x: Any, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[N, P]: row i is ∇θ fn(module(x_i), y_i) for a batch of one, over the trainable parameters in
    ``module.parameters()`` order (the order of :class:`twicediff.TorchTwiceDifferentiable`); x is
    a tensor, tuple or dict of inputs (:mod:`twicediff.torch.batch`)."""
    names, params, fixed = split_params(module)
    slots = slot_names(module)

    dims = vmap_dims(x)

    def point(p, xi, yi):
        args, kwargs = model_args(per_point(xi, dims))
        return fn(functional_call(module, (p, fixed), args, kwargs, slots), yi.unsqueeze(0)).sum()

    rows = []
    for s in range(0, num_points(x), chunk):
        g = vmap(grad(point), in_dims=(None, dims, 0))(params, slice_batch(x, s, s + chunk), y[s:s + chunk])
        rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1))
    return torch.cat(rows)


@dataclasses.dataclass
class Evaluation:
    """What :func:`evaluate` found. ``methods[name]`` holds ``lds``, ``lds_ci`` (low, high),
    ``lds_per_test`` [T], ``seconds`` (``solve``: the one solve of all right-hand sides;
    ``total``: with the dot products that turn its factors into scores), and where the problem allows,
    ``self_influence``/``validation_harm`` detection figures (``auc``, ``precision_at_k``)."""

    config: Dict[str, Any]
    subsets: np.ndarray            # [M, s] training indices
    seeds: List[int]               # the K retraining seeds
    measurements: np.ndarray       # [M, K, T] measurement of each retrained model at each test point
    methods: Dict[str, Dict[str, Any]]
    retrain: Dict[str, Any]        # trained / reused counts, seconds, split-half noise figure
    facts: Dict[str, Any]          # machine and versions

    def summary(self, per_test: bool = False) -> Dict[str, Any]:
        """JSON-ready: configuration, seeds and subsets (to reproduce the run), results per method."""
        methods = {name: {k: v for k, v in m.items() if per_test or k != "lds_per_test"}
                   for name, m in self.methods.items()}
        for m in methods.values():
            if "lds_per_test" in m:
                m["lds_per_test"] = [None if not np.isfinite(v) else float(v) for v in m["lds_per_test"]]
        return {"config": self.config, "seeds": self.seeds, "subsets": self.subsets.tolist(), "methods": methods,
                "retrain": self.retrain, "facts": self.facts}


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"evaluate: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _facts() -> Dict[str, Any]:
    """What the JSON output records of the machine (the benchmark scripts add the CPU's model name)."""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()})",
            "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def evaluate(problem: Problem, *, methods: Optional[Sequence[str]] = None, num_subsets: int = 50,
             num_seeds: int = 3, fraction: float = 0.5, seed: int = 0, workers: int = 1,
             cache_dir: Optional[str] = None, bootstrap: int = 2000, progress: bool = False,
             method_table: Optional[Mapping[str, Solve]] = None,
             self_influence_points: Optional[int] = None) -> Evaluation:
    """Linear datamodeling score and flipped-label detection of influence methods on ``problem``.

    1. Train the full model, ``problem.train(arange(n), seed)``, and compute with each method the
       influences of the n training points on each test point's measurement (its scores), the
       self-influences and, given validation points, their harm (minus the mean influence on the
       validation loss). Each method's steps are timed.
    2. Draw ``num_subsets`` subsets of ``round(fraction · n)`` training points
       (:func:`twicediff.evaluate.lds.sample_subsets`, from ``seed``), the same for every method;
       train on each with the seeds ``seed + 1 .. seed + num_seeds`` (``workers`` processes;
       finished retrainings cached under ``cache_dir`` and reused); average each test point's
       measurement over the seeds.
    3. LDS per method: the mean over test points of the Spearman correlation between the predicted
       ``−Σ_{i∈S} score[t, i]`` (the sign convention of :mod:`twicediff.evaluate.lds`) and the
       measured values over the subsets, with a percentile bootstrap interval over the test points
       (95 %, ``bootstrap`` resamples). Given ``problem.flipped``: ROC AUC and precision at k (k =
       the number flipped) of ranking the training points by self-influence and by validation harm.

    ``method_table`` maps the names in ``methods`` to their solvers (default :data:`METHODS`; the
    CLI's ``--quick`` passes :data:`twicediff.evaluate.methods.QUICK_METHODS`, cheaper options). The
    options of each method used are recorded in ``config["method_options"]``.
    ``self_influence_points`` (default: all n) scores self-influence on that many training points,
    drawn at random from ``seed`` (the same for every method), and the detection figures are those
    of the flipped labels among them: the self-influence of a point costs one right-hand side.

    Cost: ``num_subsets · num_seeds`` trainings on ``fraction`` of the data (divided among the
    workers), plus for each method one solve of (H + λI) x = b with T + V + n' right-hand sides (T
    test points, V validation points, n' = ``self_influence_points`` or n training points for the
    self-influences), timed.
    The noise of the measurement itself is reported as ``retrain["split_half"]``: the mean Spearman
    correlation over test points between the averages of two halves of the seeds, a rough ceiling
    for any method's LDS with half the seeds.
    """
    problem.validate()
    table = METHODS if method_table is None else method_table
    available = available_methods(table)
    names = list(available if methods is None else methods)
    unknown = [n for n in names if n not in table]
    unavailable = [n for n in names if n in table and n not in available]
    if not names or unknown or unavailable:
        raise ValueError(f"evaluate: methods must be names among {available}, got {names!r}"
                         + (f" (unknown: {unknown})" if unknown else "")
                         + (f" (not available in this twicediff: {unavailable})" if unavailable else ""))
    num_subsets = _check_int(num_subsets, "num_subsets", 2)
    num_seeds = _check_int(num_seeds, "num_seeds", 1)
    seed = _check_int(seed, "seed", 0)
    workers = _check_int(workers, "workers", 1)
    bootstrap = _check_int(bootstrap, "bootstrap", 1)
    n = problem.num_train
    self_points = np.arange(n, dtype=np.int64)
    if self_influence_points is not None:
        count = _check_int(self_influence_points, "self_influence_points", 2)
        if count > n:
            raise ValueError(f"evaluate: self_influence_points must be at most the {n} training points, got {count}")
        # A stream of its own (spawn key 1), apart from the subsets' [seed, m] streams.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        self_points = np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)
    subsets = sample_subsets(n, num_subsets, fraction, seed)
    seeds = [seed + 1 + k for k in range(num_seeds)]
    measurement = resolve_measurement(problem.measurement, problem.loss)
    measurement_name = problem.measurement if isinstance(problem.measurement, str) else \
        getattr(problem.measurement, "__qualname__", repr(problem.measurement))
    lam = float(problem.hessian_regularization)

    start = time.perf_counter()
    full = problem.train(np.arange(n, dtype=np.int64), seed)
    train_seconds = time.perf_counter() - start
    if not isinstance(full, torch.nn.Module):
        raise TypeError(f"evaluate: train(indices, seed) must return a torch.nn.Module, got {type(full).__name__}")
    model = TorchTwiceDifferentiable(full, problem.loss)
    train_loader = problem.training_loader()

    def rhs(fn, x, y):
        return point_gradients(full, fn, move_inputs(x, model.device), y.to(model.device))

    loss_fn = resolve_measurement("loss", problem.loss)
    rows = {"test": rhs(measurement, problem.x_test, problem.y_test)}
    if problem.x_val is not None:
        rows["validation"] = rhs(loss_fn, problem.x_val, problem.y_val)
    if problem.flipped is not None:
        rows["self"] = rhs(loss_fn, points(problem.x_train, self_points), problem.y_train[self_points])

    # One solve per method with every right-hand side stacked (the Direct Hessian or the Arnoldi
    # eigenvectors are then computed once), split afterwards.
    stacked = torch.cat(list(rows.values()))
    bounds = np.cumsum([0] + [b.shape[0] for b in rows.values()])
    results: Dict[str, Dict[str, Any]] = {}
    scores: Dict[str, np.ndarray] = {}
    flipped = None if problem.flipped is None else np.asarray(problem.flipped)
    if flipped is not None and not 0 < flipped[self_points].sum() < self_points.size:
        raise ValueError(f"evaluate: the {self_points.size} self_influence_points drawn hold "
                         f"{int(flipped[self_points].sum())} flipped labels: detection needs at least one flipped "
                         f"and one clean point; pass more self_influence_points")
    for name in names:
        start = time.perf_counter()
        factors = table[name](model, train_loader, stacked, lam).to(model.dtype)
        solved = time.perf_counter()
        out: Dict[str, Any] = {}
        for (step, b), lo, hi in zip(rows.items(), bounds[:-1], bounds[1:]):
            if step == "self":
                values = torch.einsum("ip,ip->i", b.double(), factors[lo:hi].double())
            else:
                values = compute_influences_up(model, train_loader, factors[lo:hi])
            values = values.detach().cpu().double().numpy()
            if step == "test":
                scores[name] = values
            else:
                out["self_influence" if step == "self" else "validation_harm"] = \
                    values if step == "self" else -values.mean(axis=0)
        done = time.perf_counter()
        results[name] = {"seconds": {"solve": solved - start, "total": done - start}, **out}

    start = time.perf_counter()
    measured, stats = retrain_measurements(
        problem.train, measurement, problem.x_test, problem.y_test, subsets, seeds,
        problem_key=fingerprint(problem.name, measurement_name, *problem.data_tensors()),
        workers=workers, cache_dir=cache_dir, progress=progress)
    retrain_seconds = time.perf_counter() - start
    actual = measured.mean(axis=1)
    split_half = None
    if num_seeds >= 2:
        half = num_seeds // 2
        r = spearman_per_column(measured[:, :half].mean(1), measured[:, half:].mean(1))
        split_half = float(np.nanmean(r)) if np.isfinite(r).any() else None

    from ..app.demo import precision_at_k, roc_auc  # the demo's detection metrics, shared

    for name in names:
        value, per_test = lds(predict_subsets(scores[name], subsets), actual)
        low, high = bootstrap_ci(per_test, resamples=bootstrap, seed=seed)
        entry = {"lds": value, "lds_ci": [low, high], "lds_per_test": per_test,
                 "test_points_without_correlation": int((~np.isfinite(per_test)).sum())}
        for key in ("self_influence", "validation_harm"):
            ranking = results[name].pop(key, None)
            if ranking is not None and flipped is not None:
                truth = flipped[self_points] if key == "self_influence" else flipped
                k = int(truth.sum())
                entry[key] = {"auc": roc_auc(ranking, truth), "precision_at_k": precision_at_k(ranking, truth, k)}
        entry["seconds"] = results[name]["seconds"]
        results[name] = entry
    config = {"num_subsets": num_subsets, "num_seeds": num_seeds, "fraction": float(fraction), "seed": seed,
              "workers": workers, "measurement": measurement_name, "hessian_regularization": lam,
              "n_train": n, "n_test": num_points(problem.x_test), "subset_size": int(subsets.shape[1]),
              "n_val": None if problem.x_val is None else num_points(problem.x_val),
              "num_flipped": None if flipped is None else int(flipped.sum()), "problem": problem.name,
              "num_params": model.num_params, "methods": names, "bootstrap_resamples": bootstrap,
              "method_options": {name: describe(table[name]) for name in names},
              "self_influence_points": None if flipped is None else int(self_points.size),
              "self_influence_flipped": None if flipped is None else int(flipped[self_points].sum()),
              # The sample itself where it is one (it also follows from the seed).
              "self_influence_indices": None if flipped is None or self_points.size == n else self_points.tolist()}
    retrain = {"trained": stats.trained, "reused": stats.reused, "seconds": retrain_seconds,
               "full_model_seconds": train_seconds, "split_half": split_half}
    return Evaluation(config=config, subsets=subsets, seeds=seeds, measurements=measured, methods=results,
                      retrain=retrain, facts=_facts())
