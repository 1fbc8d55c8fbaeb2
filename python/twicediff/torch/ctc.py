"""The CTC loss as second derivatives need it.

``F.ctc_loss`` (``nn.CTCLoss``, speech and handwriting recognition) has a first derivative in torch
(2.14) but no derivative of its backward and no forward-mode rule, so every engine, ``hessian`` and
influence failed on a model trained with it. :func:`ctc_loss` computes the same loss with the
forward (alpha) recursion of Graves et al. (2006) in log space, written with ops that torch
differentiates to any order in both modes: its value and gradient are torch's to rounding, and its
second derivatives are those of the same function.
:mod:`twicediff.torch.derivative_routes` routes calls of ``F.ctc_loss`` to it wherever a loss is
evaluated.

The recursion runs over the extended label sequence ``blank, l1, blank, l2, …, blank`` of each
target, one step per input frame, so it costs T steps of [N, 2S + 1] element-wise work (torch's
kernel runs the same recursion). Unreachable states hold a large finite negative number rather than
−inf, so no derivative is ever NaN; a target that no alignment reaches (longer than its input
allows) gets torch's loss of inf, or 0 with ``zero_infinity=True``, with zero gradient.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .losses import _check_targets, _reduction_of

__all__ = ["ctc_loss"]

Lengths = Union[torch.Tensor, Sequence[int], int]


def _lengths(where: str, name: str, lengths: Lengths, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(lengths, device=device)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.numel() != n:
        raise ValueError(f"{where}: {name} must hold {n} integer length(s), one per sequence, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    return t.reshape(n).long()


def _padded(where: str, targets: torch.Tensor, target_lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[N, S] targets: as given, or the 1-D concatenation of the N targets split and padded."""
    if targets.dim() == 2:
        if targets.shape[0] != n:
            raise ValueError(f"{where}: targets [N, S] must have N = {n} rows (the batch of log_probs), got shape "
                             f"{tuple(targets.shape)}")
        return targets
    if targets.dim() != 1:
        raise ValueError(f"{where}: targets must be [N, S] padded or the 1-D concatenation of the N targets, got "
                         f"shape {tuple(targets.shape)}")
    sizes = [int(s) for s in target_lengths.tolist()]  # concatenated targets: their split needs the lengths
    if sum(sizes) != targets.shape[0]:
        raise ValueError(f"{where}: 1-D targets must hold sum(target_lengths) = {sum(sizes)} labels, got "
                         f"{targets.shape[0]}")
    width = max(sizes, default=0)
    rows = [torch.cat([part, part.new_zeros(width - part.shape[0])]) for part in targets.split(sizes)]
    return torch.stack(rows) if rows else targets.new_zeros(0, width)


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: Lengths, target_lengths: Lengths,
             blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> torch.Tensor:
    """``F.ctc_loss``: minus the log-probability of ``targets`` summed over all CTC alignments of it
    to the first ``input_lengths[n]`` frames of ``log_probs`` [T, N, C] (or [T, C] for one sequence).
    ``reduction="mean"`` divides each sequence's loss by its target length (at least 1), then
    averages over the batch, as torch does."""
    where = "ctc_loss"
    reduction = _reduction_of(where, None, None, reduction)
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs, targets = log_probs.unsqueeze(1), targets.unsqueeze(0)
    if log_probs.dim() != 3 or log_probs.shape[0] == 0 or log_probs.shape[-1] == 0:
        raise ValueError(f"{where}: log_probs must be [T, N, C] (or [T, C]) with T > 0 and C > 0, got shape "
                         f"{tuple(log_probs.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{where}: targets must hold class indices (an integer dtype), got {targets.dtype}")
    T, N, C = log_probs.shape
    if not 0 <= blank < C:
        raise ValueError(f"{where}: blank must be a class index in [0, {C}), got {blank}")
    device = log_probs.device
    input_lengths = _lengths(where, "input_lengths", input_lengths, N, device)
    target_lengths = _lengths(where, "target_lengths", target_lengths, N, device)
    targets = _padded(where, targets, target_lengths, N).long()
    S = targets.shape[1]
    _check_targets((input_lengths >= 0) & (input_lengths <= T) & (target_lengths >= 0) & (target_lengths <= S),
                   f"{where}: every input length must be in [0, {T}] and every target length in [0, {S}]")
    width = torch.arange(S, device=device)
    listed = width < target_lengths.unsqueeze(1)
    _check_targets(((targets >= 0) & (targets < C) & (targets != blank)) | ~listed,
                   f"{where}: every target label must be a class index in [0, {C}) other than blank = {blank}")
    labels = torch.where(listed, targets, torch.full_like(targets, blank))

    # The extended sequence [N, 2S + 1]: blank, l1, blank, l2, ..., blank.
    L = 2 * S + 1
    blanks = torch.full_like(labels, blank)
    ext = torch.cat([torch.stack([blanks, labels], -1).reshape(N, 2 * S), blanks[:, :1] if S else
                     torch.full((N, 1), blank, dtype=torch.long, device=device)], 1)
    position = torch.arange(L, device=device)
    valid = position < (2 * target_lengths + 1).unsqueeze(1)  # states of this sequence's own target
    # A label may be reached from two states back (skipping the blank between) unless it repeats.
    before = torch.cat([ext.new_full((N, 2), blank), ext], 1)[:, :L]
    skip = (ext != blank) & (ext != before)

    neg = torch.finfo(log_probs.dtype).min / 4  # "log 0", finite so that no derivative is NaN
    emit = log_probs.gather(2, ext.unsqueeze(0).expand(T, N, L))  # [T, N, L]
    floor = emit.new_full((), neg)
    alpha = torch.where(valid & (position < 2), emit[0], floor)
    pad1, pad2 = emit.new_full((N, 1), neg), emit.new_full((N, 2), neg)
    for t in range(1, T):
        from_left = torch.cat([pad1, alpha], 1)[:, :L]
        from_skip = torch.where(skip, torch.cat([pad2, alpha], 1)[:, :L], floor)
        step = torch.logsumexp(torch.stack([alpha, from_left, from_skip]), 0) + emit[t]
        step = torch.where(valid, step, floor)
        alpha = torch.where((t < input_lengths).unsqueeze(1), step, alpha)  # a finished sequence keeps its alpha

    last = 2 * target_lengths  # the final blank; the final label is one before it
    ends = torch.stack([alpha.gather(1, last.unsqueeze(1)).squeeze(1),
                        torch.where(target_lengths > 0, alpha.gather(1, (last - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                                    floor)], 1)
    losses = -torch.logsumexp(ends, 1)
    # No alignment: the target is longer than its input allows (or the input is empty).
    impossible = (losses > -neg / 2) | ((input_lengths == 0) & (target_lengths > 0))
    empty = (input_lengths == 0) & (target_lengths == 0)
    losses = torch.where(empty, losses.new_zeros(()), losses)
    losses = torch.where(impossible, losses.new_full((), 0.0 if zero_infinity else float("inf")), losses)
    if reduction == "mean":
        return (losses / target_lengths.clamp(min=1).to(losses.dtype)).mean()
    if reduction == "sum":
        return losses.sum()
    return losses.squeeze(0) if unbatched else losses
