"""Tensor helpers of pyDVL 0.7.1's ``pydvl.influence.torch.util``, under the same names: moving data
to a model's device, a list of parameter-shaped tensors to and from one flat vector, and giving a
direction the structure of a dict of parameters (what :mod:`twicediff.torch.functional` takes).

The flat layout is the one of :meth:`TorchTwiceDifferentiable.grad`: the tensors' elements in
row-major order, one tensor after the other.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Tuple, TypeVar

import torch

__all__ = [
    "to_model_device",
    "flatten_tensors_to_vector",
    "reshape_vector_to_tensors",
    "TorchTensorContainerType",
    "align_structure",
    "as_tensor",
]

logger = logging.getLogger(__name__)

TorchTensorContainerType = TypeVar(
    "TorchTensorContainerType",
    torch.Tensor,
    Tuple[torch.Tensor, ...],
    Dict[str, torch.Tensor],
)
"""A tensor, a tuple of tensors or a dict of named tensors (e.g. a model's parameters)."""


def to_model_device(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``x`` moved to ``model.device`` when the model has a ``device`` attribute, else ``x`` itself
    (a plain ``nn.Module`` has none: its data is expected on the right device already)."""
    if hasattr(model, "device"):
        return x.to(model.device)
    return x


def _check_tensors(tensors: Iterable[torch.Tensor], where: str, name: str) -> List[torch.Tensor]:
    items = list(tensors)
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must hold torch.Tensors, element {i} is a {type(t).__name__}")
    return items


def flatten_tensors_to_vector(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One 1-d tensor: the elements of each tensor in row-major order, the tensors one after the
    other (``torch.cat`` of the flattened tensors; differentiable).

    Raises:
        TypeError: an element is not a tensor.
        ValueError: ``tensors`` is empty (what torch.cat raises in pyDVL's version).
    """
    items = _check_tensors(tensors, "flatten_tensors_to_vector", "tensors")
    if not items:
        raise ValueError("flatten_tensors_to_vector: tensors is empty; it needs at least one tensor")
    return torch.cat([t.reshape(-1) for t in items])


def reshape_vector_to_tensors(input_vector: torch.Tensor, target_shapes: Iterable[Tuple[int, ...]]
                              ) -> Tuple[torch.Tensor, ...]:
    """The inverse of :func:`flatten_tensors_to_vector`: consecutive slices of ``input_vector``
    reshaped to ``target_shapes``, in order (views where the slice allows it).

    Raises:
        ValueError: ``input_vector`` is not 1-d, or its length is not the total size of the shapes.
    """
    if not isinstance(input_vector, torch.Tensor):
        raise TypeError(f"reshape_vector_to_tensors: input_vector must be a 1-d torch.Tensor, got "
                        f"{type(input_vector).__name__}")
    if input_vector.dim() != 1:
        raise ValueError(f"reshape_vector_to_tensors: input_vector must be a 1-d tensor, got shape "
                         f"{tuple(input_vector.shape)}")
    shapes = [tuple(s) for s in target_shapes]  # a generator is read once
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != input_vector.shape[0]:
        raise ValueError(f"reshape_vector_to_tensors: the shapes {shapes} hold {sum(sizes)} elements in all, but "
                         f"input_vector has {input_vector.shape[0]}")
    return tuple(part.reshape(s) for part, s in zip(torch.split(input_vector, sizes), shapes))


def _shapes(values) -> list:
    """Shapes as tuples (the type's name for a value without a shape), for messages."""
    return [tuple(v.shape) if hasattr(v, "shape") else type(v).__name__ for v in values]


def align_structure(source: Dict[str, torch.Tensor], target: TorchTensorContainerType) -> Dict[str, torch.Tensor]:
    """``target`` as a dict with the keys of ``source`` (in its order) and a tensor of the shape of
    ``source[k]`` under each key.

    ``target`` may be a dict with the same keys in the same order and the same shapes (returned as
    it is), a tuple or list of tensors of those shapes in that order, or one flat tensor of the
    total size (cut and reshaped, :func:`reshape_vector_to_tensors`).

    Raises:
        ValueError: the keys, shapes or size do not match, or ``target`` is of another type.
    """
    shapes = [v.shape for v in source.values()]
    if isinstance(target, dict):
        if list(target.keys()) != list(source.keys()):
            raise ValueError(f"align_structure: the keys of target {list(target.keys())} are not those of source "
                             f"{list(source.keys())} (in that order)")
        if [getattr(v, "shape", None) for v in target.values()] != shapes:
            raise ValueError(f"align_structure: the shapes of target's values {_shapes(target.values())} are not "
                             f"those of source's {_shapes(source.values())}")
        return target
    if isinstance(target, (tuple, list)):
        if [getattr(v, "shape", None) for v in target] != shapes:
            raise ValueError(f"align_structure: target is a {type(target).__name__} whose shapes {_shapes(target)} "
                             f"are not those of source's values {_shapes(source.values())}")
        return dict(zip(source.keys(), target))
    if isinstance(target, torch.Tensor):
        try:
            parts = reshape_vector_to_tensors(target, shapes)
        except ValueError as exc:
            raise ValueError(f"align_structure: target is a tensor of shape {tuple(target.shape)} that cannot be cut "
                             f"into source's shapes: {exc}") from exc
        return dict(zip(source.keys(), parts))
    raise ValueError(f"align_structure: target must be a dict, tuple, list or torch.Tensor, got "
                     f"{type(target).__name__}")


def as_tensor(a: Any, warn=True, **kwargs) -> torch.Tensor:
    """``torch.as_tensor(a, **kwargs)``; logs a warning when ``a`` is not a tensor yet and ``warn``."""
    if warn and not isinstance(a, torch.Tensor):
        logger.warning("Converting tensor to type torch.Tensor.")
    return torch.as_tensor(a, **kwargs)
