"""Retraining on subsets: every (subset, seed) pair trained once, in worker processes, cached.

Each retraining calls the user's ``train(indices, seed) -> torch.nn.Module`` and records the
measurement of every test point on the trained model ([T] float64). A finished retraining is written
at once to ``<cache_dir>/<key>.npy`` (written to a temporary name, then renamed, so a file is either
whole or absent); its key hashes the problem's fingerprint (name, data, measurement), the subset's
indices and the seed. A run that is interrupted keeps every retraining that finished, and a later
run with the same cache folder trains only the missing ones; a run with more subsets or seeds reuses
the first ones (:func:`twicediff.evaluate.lds.sample_subsets` draws subsets prefix-stably).

Workers are spawned processes (a fork after torch has started its thread pools can hang), each
with one torch thread; ``train`` and the measurement must then be picklable (module-level functions
or instances of module-level classes), and a script that starts them needs the usual
``if __name__ == "__main__":`` guard (each worker imports the main module). ``workers=1`` trains in
this process.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..progress import progress_bar
from ..torch.batch import call_model

__all__ = ["RetrainStats", "fingerprint", "measure", "retrain_measurements"]


def measure(model: torch.nn.Module, measurement: Callable, x: Any, y: torch.Tensor) -> np.ndarray:
    """``measurement(model(x), y)`` without gradients (``model(*x)`` / ``model(**x)`` for a tuple /
    dict x), as a float64 [T] array."""
    with torch.no_grad():
        values = measurement(call_model(model, x), y)
    values = values.detach().to("cpu", torch.float64).numpy().reshape(-1)
    if values.shape[0] != y.shape[0]:
        raise ValueError(f"measurement must return one value per test point ({y.shape[0]}), got {values.shape[0]}")
    return values


def fingerprint(name: str, measurement_name: str, *arrays) -> str:
    """A hex digest identifying a problem in the cache: its name, measurement and data."""
    h = hashlib.sha256(f"{name}|{measurement_name}".encode())
    for a in arrays:
        a = a.detach().cpu().contiguous().numpy() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a)
        h.update(f"|{a.dtype}{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _key(problem_key: str, subset: np.ndarray, seed: int) -> str:
    h = hashlib.sha256(problem_key.encode())
    h.update(np.ascontiguousarray(subset, dtype=np.int64).tobytes())
    h.update(f"|seed={int(seed)}".encode())
    return h.hexdigest()[:32]


def _one(train: Callable, measurement: Callable, x: torch.Tensor, y: torch.Tensor, subset: np.ndarray,
         seed: int) -> np.ndarray:
    model = train(subset, seed)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"train(indices, seed) must return a torch.nn.Module, got {type(model).__name__}")
    return measure(model, measurement, x, y)


def _init_worker() -> None:
    torch.set_num_threads(1)


def _save(path: str, values: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, values)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class RetrainStats:
    """How the measurements were obtained: ``trained`` now, ``reused`` from the cache."""

    trained: int = 0
    reused: int = 0


def retrain_measurements(train: Callable, measurement: Callable, x_test: torch.Tensor, y_test: torch.Tensor,
                         subsets: np.ndarray, seeds: Sequence[int], *, problem_key: str, workers: int = 1,
                         cache_dir: Optional[str] = None, progress: bool = False
                         ) -> Tuple[np.ndarray, RetrainStats]:
    """The measurements of the models trained on every subset with every seed, [M, K, T] float64.

    Args:
        train: ``train(indices, seed) -> nn.Module``.
        measurement: ``measurement(outputs, targets) -> [T]`` per test point.
        x_test, y_test: the test points.
        subsets: [M, s] training indices.
        seeds: the K training seeds.
        problem_key: identifies the problem in the cache (:func:`fingerprint`).
        workers: processes training at once (1: in this process).
        cache_dir: folder of finished retrainings (created if missing); None keeps nothing.
        progress: a bar over the retrainings.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"retrain_measurements: workers must be an int >= 1, got {workers!r}")
    if workers > 1:
        for name, obj in (("train", train), ("measurement", measurement)):
            try:
                pickle.dumps(obj)
            except Exception as exc:
                raise ValueError(f"retrain_measurements: with workers={workers}, {name} must be picklable (a "
                                 f"module-level function or an instance of a module-level class), got {obj!r}: "
                                 f"{exc}; pass workers=1 to train in this process") from None
    M, K, T = subsets.shape[0], len(seeds), y_test.shape[0]
    out = np.full((M, K, T), np.nan)
    stats = RetrainStats()
    todo: List[Tuple[int, int, Optional[str]]] = []
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    for m in range(M):
        for k, seed in enumerate(seeds):
            path = os.path.join(cache_dir, _key(problem_key, subsets[m], seed) + ".npy") if cache_dir else None
            if path is not None and os.path.exists(path):
                values = np.load(path)
                if values.shape == (T,):
                    out[m, k] = values
                    stats.reused += 1
                    continue
            todo.append((m, k, path))

    def record(m: int, k: int, path: Optional[str], values: np.ndarray) -> None:
        out[m, k] = values
        stats.trained += 1
        if path is not None:
            _save(path, values)

    bar = progress_bar(range(len(todo)), progress, desc="retrain on subsets", total=len(todo), unit="model")
    ticks = iter(bar)
    if workers == 1 or len(todo) <= 1:
        try:
            for m, k, path in todo:
                record(m, k, path, _one(train, measurement, x_test, y_test, subsets[m], seeds[k]))
                next(ticks, None)
        finally:
            getattr(bar, "close", lambda: None)()
        return out, stats
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context, initializer=_init_worker)
    try:
        pending: Dict = {pool.submit(_one, train, measurement, x_test, y_test, subsets[m], seeds[k]): (m, k, path)
                         for m, k, path in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                m, k, path = pending.pop(future)
                record(m, k, path, future.result())
                next(ticks, None)
    finally:
        # On an error or an interrupt, drop what has not started; what finished is already on disk.
        pool.shutdown(wait=True, cancel_futures=True)
        getattr(bar, "close", lambda: None)()
    return out, stats
