r"""The linear datamodeling score (LDS; Park et al. 2023, "TRAK"), from numbers alone.

Given the training-point scores of a method, ``scores[t, i]`` = pyDVL's up-weighting influence of
training point z_i on the measurement f at test point z_t (:mod:`twicediff.influence`: a positive
value means that up-weighting z_i *lowers* f(z_t)), and the measurements ``actual[m, t]`` of models
trained on the subsets S_m of the training set:

**Sign convention.** Removing z_i from the n training points changes f(z_t) by about
``+scores[t, i] / n`` (up-weighting by ε changes it by ``-ε · scores[t, i]``). A model trained on S
lacks the complement of S, so its measurement is predicted as

    f_S(z_t) ≈ f(z_t) + (1/n) Σ_{i∉S} scores[t, i] = const_t − (1/n) Σ_{i∈S} scores[t, i],

and, every subset being of the same size, the prediction ranked against the measurements is
``predicted[m, t] = −Σ_{i∈S_m} scores[t, i]`` (:func:`predict_subsets`). This holds for any
measurement: the test loss (a harmful training point has a negative score and its presence raises
the predicted loss) as well as the margin (larger is better; its scores are its own up-influences).

**Score.** ``LDS = mean over test points t of Spearman(predicted[:, t], actual[:, t])``
(:func:`spearman_per_column`, :func:`lds`), with a percentile bootstrap over the test points for its
confidence interval (:func:`bootstrap_ci`). Test points whose measurement does not vary over the
subsets have no correlation and are left out (and counted).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["bootstrap_ci", "lds", "predict_subsets", "ranks", "sample_subsets", "spearman_per_column"]


def sample_subsets(n: int, num_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """``num_subsets`` random subsets of ``round(fraction · n)`` of the indices 0..n-1, [M, s] int64,
    each row sorted. Subset m is drawn from ``numpy.random.default_rng([seed, m])`` alone, so the
    first M subsets of a larger M are the same (a longer run reuses a shorter one's retrainings)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"sample_subsets: n (the number of training points) must be an int >= 2, got {n!r}")
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, (int, np.integer)) or num_subsets < 2:
        raise ValueError(f"sample_subsets: num_subsets must be an int >= 2 (a correlation needs two), got "
                         f"{num_subsets!r}")
    size = int(round(float(fraction) * n))
    if not 0 < float(fraction) < 1 or not 1 <= size < n:
        raise ValueError(f"sample_subsets: fraction must be in (0, 1) and keep between 1 and {n - 1} of the "
                         f"{n} training points, got {fraction!r} ({size} points)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"sample_subsets: seed must be an int >= 0, got {seed!r}")
    return np.stack([np.sort(np.random.default_rng([int(seed), m]).choice(n, size=size, replace=False))
                     for m in range(int(num_subsets))]).astype(np.int64)


def predict_subsets(scores: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """``predicted[m, t] = −Σ_{i∈S_m} scores[t, i]`` (see the module's sign convention), [M, T].

    Args:
        scores: [T, n] up-weighting influences of the n training points on the T test measurements.
        subsets: [M, s] training indices of each subset.
    """
    scores = np.asarray(scores, dtype=np.float64)
    subsets = np.asarray(subsets)
    if scores.ndim != 2 or subsets.ndim != 2:
        raise ValueError(f"predict_subsets: scores must be [T, n] and subsets [M, s], got shapes "
                         f"{scores.shape} and {subsets.shape}")
    if subsets.size and (subsets.min() < 0 or subsets.max() >= scores.shape[1]):
        raise ValueError(f"predict_subsets: subsets must index the {scores.shape[1]} training points of "
                         f"scores, got indices from {subsets.min()} to {subsets.max()}")
    mask = np.zeros((subsets.shape[0], scores.shape[1]))
    np.put_along_axis(mask, subsets, 1.0, axis=1)
    return -(mask @ scores.T)


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks along axis 0 of ``values`` [M, T], ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    M = values.shape[0]
    order = np.argsort(values, axis=0, kind="mergesort")
    sorted_values = np.take_along_axis(values, order, axis=0)
    out = np.empty_like(values)
    for t in range(values.shape[1]):
        column = sorted_values[:, t]
        starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
        ends = np.r_[starts[1:], M]
        average = np.repeat(0.5 * (starts + 1 + ends), ends - starts)
        out[order[:, t], t] = average
    return out


def spearman_per_column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of ``a[:, t]`` with ``b[:, t]`` for every column t, [T]: the
    Pearson correlation of the (average-tie) ranks; NaN where either column is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"spearman_per_column: a and b must both be [M, T] with M >= 2, got shapes "
                         f"{a.shape} and {b.shape}")
    ra = ranks(a) - (a.shape[0] + 1) / 2
    rb = ranks(b) - (a.shape[0] + 1) / 2
    norm = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(0) / np.where(norm > 0, norm, 1.0), np.nan)


def lds(predicted: np.ndarray, actual: np.ndarray) -> Tuple[float, np.ndarray]:
    """(mean over test points of the Spearman correlation, the per-test-point correlations [T]):
    ``predicted`` and ``actual`` are [M, T]; NaN correlations (constant columns) are left out of
    the mean."""
    per_test = spearman_per_column(predicted, actual)
    finite = per_test[np.isfinite(per_test)]
    if finite.size == 0:
        raise ValueError("lds: no test point has a measurement and a prediction that vary over the subsets")
    return float(finite.mean()), per_test


def bootstrap_ci(values: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs left out), resampling them with
    replacement ``resamples`` times."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("bootstrap_ci: values holds no finite number")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(int(resamples), values.size))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
