"""``nn.EmbeddingBag`` as second derivatives need it.

torch (2.14) has no derivative of EmbeddingBag's backward (``_embedding_bag_backward``) and no
forward-mode rule for its forward, so every Hessian product through one failed, in every engine,
though a bag is linear in the embedding weight in its ``sum`` and ``mean`` modes and piecewise
linear in ``max``. :func:`embedding_bag` computes the same values as ``F.embedding_bag`` from a
lookup (``F.embedding``) and a reduction, which torch differentiates to any order in reverse and
forward mode and batches under vmap. :func:`twicediff.torch.guard.model_call` routes the model's
``F.embedding_bag`` calls to it whenever the model has an ``nn.EmbeddingBag`` module
(:mod:`twicediff.torch.derivative_routes`); a model that calls ``F.embedding_bag`` without one can
call :func:`embedding_bag` itself.

The price is memory: the looked-up rows ([B, L, E] for a 2D input, [T, E] for a flat one) are
materialised before the reduction, where torch's bag reduces as it looks up.

What differs from torch's op, on purpose: ``scale_grad_by_freq=True`` is refused (it rescales the
gradient torch's backward returns, which then is not the loss's derivative, and its "Hessian" is
not symmetric; :mod:`twicediff.torch.guard` refuses such modules before anything runs), and so is
``sparse=True`` (sparse gradients). In ``max`` mode, where two different rows tie for a bag's
maximum in one coordinate, the derivative goes to one of them (torch's op picks one too).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["embedding_bag"]

MODES = ("sum", "mean", "max")


def embedding_bag(input: torch.Tensor, weight: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                  max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                  mode: str = "mean", sparse: bool = False, per_sample_weights: Optional[torch.Tensor] = None,
                  include_last_offset: bool = False, padding_idx: Optional[int] = None) -> torch.Tensor:
    """``F.embedding_bag`` (same arguments, same values) in ops with derivatives of every order.

    Raises:
        ValueError: an argument ``F.embedding_bag`` refuses (named, with what was given), or
            ``scale_grad_by_freq`` / ``sparse`` set (see the module docstring).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"embedding_bag: weight must be a 2D tensor [rows, dim], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if mode not in MODES:
        raise ValueError(f"embedding_bag: mode must be one of {MODES}, got {mode!r}")
    if scale_grad_by_freq:
        raise ValueError("embedding_bag: scale_grad_by_freq=True rescales the gradient torch's backward returns by "
                         "each index's frequency in the batch, so it is not the loss's derivative and its Jacobian "
                         "(the 'Hessian') is not symmetric; twicediff differentiates the loss: pass "
                         "scale_grad_by_freq=False")
    if sparse:
        raise ValueError("embedding_bag: sparse=True gives sparse gradients; twicediff works with dense ones: pass "
                         "sparse=False (the same function)")
    if per_sample_weights is not None:
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"embedding_bag: per_sample_weights must have input's shape {tuple(input.shape)}, got "
                             f"{tuple(per_sample_weights.shape)}")
        if mode != "sum":
            raise ValueError(f"embedding_bag: per_sample_weights needs mode='sum', got mode={mode!r}")
        if per_sample_weights.dtype != weight.dtype:
            raise ValueError(f"embedding_bag: per_sample_weights must have weight's dtype {weight.dtype}, got "
                             f"{per_sample_weights.dtype}")
    rows_in_table = weight.shape[0]
    if padding_idx is not None:
        if not -rows_in_table <= padding_idx < rows_in_table:
            raise ValueError(f"embedding_bag: padding_idx must be in [{-rows_in_table}, {rows_in_table}), got "
                             f"{padding_idx}")
        padding_idx %= rows_in_table
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("embedding_bag: a 2D input is a batch of bags of one length, so offsets must be None, "
                             f"got a tensor of shape {tuple(offsets.shape)}")
        rows = F.embedding(input, weight, max_norm=max_norm, norm_type=norm_type)  # [B, L, E]
        return _reduce(rows, input, per_sample_weights, padding_idx, mode, bags=None, count=input.shape[0])
    if input.dim() != 1:
        raise ValueError(f"embedding_bag: input must be 1D (with offsets) or 2D [bags, length], got shape "
                         f"{tuple(input.shape)}")
    if offsets is None or offsets.dim() != 1:
        raise ValueError("embedding_bag: a 1D input needs offsets, a 1D tensor of where each bag starts; got "
                         f"{'None' if offsets is None else 'shape ' + str(tuple(offsets.shape))}")
    count = offsets.shape[0] - (1 if include_last_offset else 0)
    if count < 0:
        raise ValueError("embedding_bag: include_last_offset=True needs offsets of at least one entry, got none")
    starts = offsets[:count]
    if count:
        torch._assert_async(starts[0] == 0, "embedding_bag: offsets[0] must be 0 (the first bag starts at the "
                                            "input's first index)")
        torch._assert_async((starts[1:] >= starts[:-1]).all(), "embedding_bag: offsets must not decrease")
    if include_last_offset:  # torch checks the last offset against the input's length, then (on the CPU)
        # ends the last bag at the input's end whatever it says: so does this function
        torch._assert_async(offsets[count] <= input.shape[0], "embedding_bag: with include_last_offset=True, "
                                                              "offsets[-1] must be at most the input's length")
    rows = F.embedding(input, weight, max_norm=max_norm, norm_type=norm_type)  # [T, E]
    if count == 0:  # no bags: torch gives [0, E] (and the reductions below would index bag 0)
        return rows.new_zeros(0, rows.shape[1]) + 0 * rows.sum()  # still a function of weight
    position = torch.arange(input.shape[0], device=input.device)
    bags = torch.bucketize(position, starts.to(position.dtype), right=True) - 1  # the last start at or before
    return _reduce(rows, input, per_sample_weights, padding_idx, mode, bags=bags, count=count)


def _reduce(rows: torch.Tensor, input: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
            padding_idx: Optional[int], mode: str, bags: Optional[torch.Tensor], count: int) -> torch.Tensor:
    """Each bag's reduction of its rows. ``bags`` None: rows [B, L, E], a bag per row; else rows [T, E]
    and each row's bag. Entries at the padding index belong to no bag: masked with ``where``, not a
    product, so that a padding row holding inf or nan changes nothing."""
    member = input != padding_idx if padding_idx is not None else torch.ones_like(input, dtype=torch.bool)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    zero = rows.new_zeros(())
    if mode == "max":
        kept = torch.where(member.unsqueeze(-1), rows, rows.new_full((), float("-inf")))
        if bags is None:
            if rows.shape[1] == 0:
                return rows.new_zeros(rows.shape[0], rows.shape[2])
            best = kept.max(dim=1).values
        else:
            index = bags.clamp(min=0).unsqueeze(-1).expand_as(rows)
            best = rows.new_full((count, rows.shape[1]), float("-inf")).scatter_reduce(0, index, kept, "amax")
        return torch.where(best == float("-inf"), zero, best)  # an empty bag is zeros
    kept = torch.where(member.unsqueeze(-1), rows, zero)
    if bags is None:
        total, size = kept.sum(dim=1), member.sum(dim=1)
    else:
        index = bags.clamp(min=0)
        total = rows.new_zeros(count, rows.shape[1]).index_add(0, index, kept)
        size = torch.zeros(count, dtype=torch.long, device=rows.device).index_add(0, index, member.long())
    if mode == "sum":
        return total
    return total / size.clamp(min=1).unsqueeze(-1).to(total.dtype)  # an empty bag's mean is zeros
