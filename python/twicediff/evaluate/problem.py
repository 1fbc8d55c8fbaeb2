"""What an evaluation needs from the user: :class:`Problem`, and the measurements it can take."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..torch.batch import apply_loss, batch_size as _batch_size, index_batch, input_tensors

__all__ = ["PointLoss", "Problem", "margin", "points", "resolve_measurement"]


def points(x: Any, index: Any) -> Any:
    """The points ``index`` (an int array, list or tensor) of an x in any batch form
    (:func:`twicediff.torch.batch.index_batch`)."""
    return index_batch(x, torch.as_tensor(np.asarray(index), dtype=torch.long))


class _Points(Dataset):
    """The n points of (x, y) for a DataLoader whose ``collate_fn`` is :meth:`collate`: item i is
    the index i, and a batch of indices becomes ``(points(x, indices), y[indices])``."""

    def __init__(self, x: Any, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        return index_batch(self.x, index), self.y[index]


class PointLoss:
    """The loss of each point on its own, [B]: ``loss(squeeze(output_i), squeeze(target_i))``, the
    per-point loss whose gradients :mod:`twicediff.influence` uses (a module-level class, so that
    worker processes can receive it)."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.loss = loss

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.stack([apply_loss(self.loss, o, t)
                            for o, t in zip(outputs.split(1), targets.split(1))])

    def __repr__(self) -> str:
        return f"PointLoss({getattr(self.loss, '__name__', self.loss)!r})"


def margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The classification margin of each point, [B]: ``logit_y − logsumexp_{j≠y} logit_j``
    (``log p_y / (1 − p_y)`` under the softmax: TRAK's measurement; larger is better)."""
    if outputs.dim() != 2 or targets.shape != outputs.shape[:1]:
        raise ValueError(f"margin: needs outputs [B, C] and class indices [B], got shapes {tuple(outputs.shape)} "
                         f"and {tuple(targets.shape)}")
    correct = outputs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    others = outputs.scatter(1, targets.long().unsqueeze(1), float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


@dataclasses.dataclass
class Problem:
    """A training problem to evaluate influence methods on.

    Attributes:
        train: ``train(indices, seed) -> nn.Module``: a model trained from scratch with ``seed`` on
            the training points ``indices`` (a sorted int64 array). It must be deterministic given
            its arguments, and picklable to train in worker processes.
        x_train, y_train: the n training points. Each x, like any batch of twicediff, is a tensor
            (``model(x)``), a tuple or list (``model(*x)``) or a dict (``model(**x)``) whose
            tensors share the leading dimension (see :mod:`twicediff.torch.batch`); y a tensor.
        x_test, y_test: the T test points whose measurement the LDS predicts.
        loss: the training loss of a batch, as :class:`twicediff.TorchTwiceDifferentiable` takes it
            (mean over the batch); its Hessian over the training data is inverted.
        measurement: ``"loss"`` (the per-point ``loss``), ``"margin"`` (:func:`margin`) or a function
            ``(outputs [B, ...], targets [B, ...]) -> [B]``.
        hessian_regularization: λ ≥ 0 of (H + λI)⁻¹.
        x_val, y_val: optional validation points, scored for flipped-label detection by their harm.
        flipped: optional [n] bool mask of the training points whose label is wrong.
        name: identifies the problem in the retraining cache: change it when ``train`` changes.
        batch_size: the batch size of the data loaders handed to the solvers.
    """

    train: Callable[[np.ndarray, int], torch.nn.Module]
    x_train: Any
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    measurement: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "loss"
    hessian_regularization: float = 0.0
    x_val: Any = None
    y_val: Optional[torch.Tensor] = None
    flipped: Optional[np.ndarray] = None
    name: str = "problem"
    batch_size: int = 256

    def validate(self) -> None:
        where = "Problem"
        if not callable(self.train):
            raise TypeError(f"{where}: train must be callable as train(indices, seed) -> nn.Module, got "
                            f"{type(self.train).__name__}")
        for a, b in (("x_train", "y_train"), ("x_test", "y_test"), ("x_val", "y_val")):
            x, y = getattr(self, a), getattr(self, b)
            if a == "x_val" and x is None and y is None:
                continue
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"{where}: {b} must be a torch tensor, got {type(y).__name__}")
            if isinstance(x, torch.Tensor) and x.dim() == 0:
                raise ValueError(f"{where}: {a} must hold its points along dim 0, got a 0-d tensor")
            count = _batch_size(x, f"{where}: {a}")
            if y.dim() == 0 or count != y.shape[0] or count == 0:
                raise ValueError(f"{where}: {a} and {b} must hold the same number (>= 1) of points along "
                                 f"dim 0, got {count} and shape {tuple(y.shape)}")
        if self.num_train < 2:
            raise ValueError(f"{where}: x_train must hold at least 2 points, got {self.num_train}")
        resolve_measurement(self.measurement, self.loss)
        if not float(self.hessian_regularization) >= 0:
            raise ValueError(f"{where}: hessian_regularization must be >= 0, got {self.hessian_regularization!r}")
        if self.flipped is not None:
            flipped = np.asarray(self.flipped)
            if flipped.dtype != bool or flipped.shape != (self.num_train,):
                raise ValueError(f"{where}: flipped must be a bool mask of shape ({self.num_train},), got "
                                 f"dtype {flipped.dtype} and shape {flipped.shape}")
            if not 0 < flipped.sum() < flipped.size:
                raise ValueError(f"{where}: flipped must mark at least one point and leave at least one, got "
                                 f"{int(flipped.sum())} of {flipped.size}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be an int >= 1, got {self.batch_size!r}")

    @property
    def num_train(self) -> int:
        """n, the number of training points."""
        return _batch_size(self.x_train, "Problem: x_train")

    def training_loader(self) -> DataLoader:
        """The training points in batches of ``batch_size``, as pairs (x, y) in x's form."""
        data = _Points(self.x_train, self.y_train)
        return DataLoader(data, batch_size=self.batch_size, collate_fn=data.collate)

    def data_tensors(self) -> list:
        """Every tensor of the training and test points, in order (what the retraining cache's key
        hashes: for tensor x, ``[x_train, y_train, x_test, y_test]``)."""
        return [t for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test))
                for t in [*(v for _, v in input_tensors(x)), y]]


def resolve_measurement(measurement: Any, loss: Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The function ``(outputs, targets) -> [B]`` that ``measurement`` names."""
    if measurement == "loss":
        return PointLoss(loss)
    if measurement == "margin":
        return margin
    if callable(measurement) and not isinstance(measurement, str):
        return measurement
    raise ValueError(f"Problem: measurement must be 'loss', 'margin' or a function (outputs, targets) -> [B], "
                     f"got {measurement!r}")
