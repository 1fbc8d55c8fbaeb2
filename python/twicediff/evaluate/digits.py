"""The embedded default problem: the demo's digits (:mod:`twicediff.app.demo`).

The same split, flipped labels, MLP 64-32-10 (Tanh), L-BFGS training to convergence and Hessian
damping as ``python -m twicediff demo`` with the same seed: 1,200 training digits of which 10 % carry
a flipped label, 300 validation digits, and the remaining 297 as the test points of the LDS.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from ..app.demo import DemoConfig, make_model, split_digits, train_model
from .problem import Problem

__all__ = ["DigitsTrainer", "digits_problem"]


@dataclasses.dataclass
class DigitsTrainer:
    """``train(indices, seed)`` for the digits: a fresh MLP seeded with ``seed``, trained on the
    given rows of ``x``/``y`` as the demo trains (a module-level class: worker processes get it)."""

    x: np.ndarray
    y: np.ndarray
    hidden: int
    weight_decay: float
    max_iterations: int
    dtype: str = "float32"

    def __call__(self, indices: np.ndarray, seed: int) -> torch.nn.Module:
        dtype = getattr(torch, self.dtype)
        torch.manual_seed(int(seed))
        model = make_model(self.hidden).to(dtype=dtype)
        x = torch.as_tensor(self.x[indices], dtype=dtype)
        y = torch.as_tensor(self.y[indices], dtype=torch.long)
        train_model(model, x, y, self.weight_decay, self.max_iterations, False)
        return model.eval()


def digits_problem(config: Optional[DemoConfig] = None, measurement: str = "loss") -> Problem:
    """The demo's problem for ``config`` (default: the demo's defaults) as a :class:`Problem`:
    training on the noisy labels, validation and test with the true ones."""
    config = config or DemoConfig()
    images, labels, (train_idx, val_idx, test_idx), given, flipped = split_digits(config)  # the demo's split
    if test_idx.size < 2:
        raise ValueError(f"digits_problem: n_train + n_val must leave at least 2 of the {images.shape[0]} "
                         f"digits for testing, got {config.n_train} + {config.n_val}")
    dtype = str(config.dtype).replace("torch.", "")

    def tensors(idx: np.ndarray, y: np.ndarray):
        return torch.as_tensor(images[idx], dtype=config.dtype), torch.as_tensor(y, dtype=torch.long)

    x_train, y_train = tensors(train_idx, given)
    x_val, y_val = tensors(val_idx, labels[val_idx])
    x_test, y_test = tensors(test_idx, labels[test_idx])
    trainer = DigitsTrainer(images[train_idx], given, config.hidden, config.weight_decay,
                            config.max_lbfgs_iterations, dtype)
    name = (f"digits(hidden={config.hidden}, weight_decay={config.weight_decay}, "
            f"max_lbfgs_iterations={config.max_lbfgs_iterations}, dtype={dtype})")
    return Problem(train=trainer, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   measurement=measurement, hessian_regularization=config.regularization, x_val=x_val,
                   y_val=y_val, flipped=flipped, name=name)
