"""TorchTensorUtilities: the tensor operations of the TensorUtilities interface for torch,
registered for TorchTwiceDifferentiable."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Tuple, Union

import torch

from .. import ops
from ..twice_differentiable import TensorUtilities
from .twice_differentiable import TorchTwiceDifferentiable

__all__ = ["TorchTensorUtilities"]

Block = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


class TorchTensorUtilities(TensorUtilities[torch.Tensor, TorchTwiceDifferentiable]):
    twice_differentiable_type = TorchTwiceDifferentiable

    @staticmethod
    def einsum(equation: str, *operands) -> torch.Tensor:
        """``torch.einsum``."""
        return torch.einsum(equation, *operands)

    @staticmethod
    def cat(a: Sequence[torch.Tensor], **kwargs) -> torch.Tensor:
        """Concatenates a sequence of tensors into a single torch tensor (``torch.cat``)."""
        return torch.cat(a, **kwargs)

    @staticmethod
    def stack(a: Sequence[torch.Tensor], **kwargs) -> torch.Tensor:
        """Stacks a sequence of tensors into a single torch tensor (``torch.stack``)."""
        return torch.stack(a, **kwargs)

    @staticmethod
    def unsqueeze(x: torch.Tensor, dim: int) -> torch.Tensor:
        """Adds a singleton dimension at ``dim``."""
        return x.unsqueeze(dim)

    @staticmethod
    def get_element(x: torch.Tensor, idx: int) -> torch.Tensor:
        """``x[idx]``."""
        return x[idx]

    @staticmethod
    def slice(x: torch.Tensor, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        """``x[start:stop]`` along ``axis``."""
        index = [slice(None)] * x.dim()
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    @staticmethod
    def shape(x: torch.Tensor) -> Tuple[int, ...]:
        """``x.shape``."""
        return x.shape

    @staticmethod
    def reshape(x: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        """``x.reshape(shape)``."""
        return x.reshape(shape)

    @staticmethod
    def cat_gen(a: Iterable[Block], resulting_shape: Tuple[int, ...], model: TorchTwiceDifferentiable,
                axis: int = 0) -> torch.Tensor:
        """Fills a new tensor of ``resulting_shape`` (dtype and device of ``model``) from a
        generator of blocks stacked along ``axis``.

        A block is a tensor (its extent along ``axis`` is taken), or — for a 2-d [N, P] result
        and ``axis=0`` — a list, tuple or dict of per-parameter tensors [B, *shape_k] (as vmapped
        per-sample gradients come), written into B rows by one call of the native pack op.

        Raises:
            ValueError: when the blocks overflow ``resulting_shape`` or do not fill it.
        """
        shape = tuple(resulting_shape)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"cat_gen: axis must index resulting_shape {shape}, got {axis}")
        axis %= len(shape)
        result = torch.empty(shape, dtype=model.dtype, device=model.device)
        start = 0
        for i, block in enumerate(a):
            if isinstance(block, torch.Tensor):
                stop = start + block.shape[axis]
                if stop > shape[axis]:
                    raise ValueError(f"cat_gen: block {i} (shape {tuple(block.shape)}) overflows "
                                     f"resulting_shape {shape} along axis {axis} ({stop} > {shape[axis]})")
                index = [slice(None)] * len(shape)
                index[axis] = slice(start, stop)
                result[tuple(index)] = block
            else:
                parts = list(block.values()) if isinstance(block, Mapping) else list(block)
                if len(shape) != 2 or axis != 0:
                    raise ValueError(f"cat_gen: blocks of per-parameter tensors need a 2-d [N, P] "
                                     f"resulting_shape and axis=0, got {shape} and axis={axis}")
                if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
                    raise TypeError(f"cat_gen: block {i} must be a tensor or a non-empty list/tuple/dict "
                                    f"of tensors [B, *shape_k]")
                rows = parts[0].shape[0] if parts[0].dim() else 0
                stop = start + rows
                if stop > shape[0]:
                    raise ValueError(f"cat_gen: block {i} ({rows} rows) overflows resulting_shape {shape} "
                                     f"({stop} > {shape[0]})")
                ops.pack_into([p.detach().to(device=result.device, dtype=result.dtype) for p in parts],
                               result, start)
            start = stop
        if start != shape[axis]:
            raise ValueError(f"cat_gen: the blocks fill {start} of the {shape[axis]} entries of "
                             f"resulting_shape {shape} along axis {axis}")
        return result
