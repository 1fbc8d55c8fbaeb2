r"""The loss convention and the Fisher type of the K-FAC path.

Batches are what :mod:`twicediff.torch.batch` says they are, as everywhere in twicediff: a
DataLoader yields ``(x, y)`` where ``x`` is a tensor (``model(x)``), a tuple or list (``model(*x)``)
or a dict (``model(**x)``, the form transformer models take); the batch size B is the leading
dimension of the tensors in ``x``, which must agree.

Loss convention: ``loss(output, target)`` is the user's scalar loss of a batch (e.g.
``F.cross_entropy``, ``F.mse_loss``). With ``reduction="mean"`` (the default, what those functions
do) it is taken to be the mean over the batch's B samples of the per-sample losses ℓ_n, so the
summed per-sample loss is ``B · loss``; with ``reduction="sum"`` it already is the sum. The
pseudo-gradients g at the layers' outputs come from the backward of Σ_n ℓ_n, so each sample's
gradient is ∇ℓ_n whatever the batch size (a loss that also averages over tokens gives ℓ_n the
mean over the sample's tokens, as pyDVL's loss of a batch of one does).

Fisher type:
- ``"empirical"``: the targets are the batch's true labels.
- ``"true"``: the targets are sampled from the model's predictive distribution (seeded torch
  generator): a categorical over the last dimension of the output for ``F.cross_entropy`` /
  ``nn.CrossEntropyLoss`` (class indices), a Gaussian N(output, 1/2) for ``F.mse_loss`` /
  ``nn.MSELoss`` (for which E[∇ℓ∇ℓᵀ] then equals the Gauss-Newton matrix of the squared error), or
  the user's ``sample_targets(output, generator)`` for any other loss.
- ``"ggn"``: the Gauss-Newton matrix E_n[J_nᵀ H_n J_n] itself (the true Fisher's expectation, no
  sampling), where the loss Hessian H_n in the outputs is known: ``F.cross_entropy`` (H = diag(p) -
  p pᵀ) and ``F.mse_loss`` (H = (2/C) I, the per-sample loss being the mean over the C outputs),
  with mean reduction and [B, C] outputs. H_n = Σ_c v_c v_cᵀ with C columns v_c, and each column
  is backpropagated as a pseudo-gradient: C backward passes per batch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["summed_loss", "TargetSampler", "FISHER_TYPES", "REDUCTIONS"]

FISHER_TYPES = ("empirical", "true", "ggn")
REDUCTIONS = ("mean", "sum")


def summed_loss(loss: Callable, output: torch.Tensor, target: Any, reduction: str, B: int) -> torch.Tensor:
    """Σ_n ℓ_n over the batch, under the convention of the module docstring."""
    value = loss(output, target)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"K-FAC: loss must return a scalar tensor for a batch, got {shape}; pass a loss with "
                         "reduction 'mean' or 'sum' and say which with reduction=")
    value = value.reshape(())
    return value * B if reduction == "mean" else value


def _is(loss: Callable, fn, cls) -> bool:
    return loss is fn or isinstance(loss, cls)


class TargetSampler:
    """Draws the targets of the true Fisher from the model's predictive distribution, reproducibly
    (a torch generator seeded once per pass over the data, on the output's device)."""

    def __init__(self, loss: Callable, seed: int, sample_targets: Optional[Callable] = None):
        if sample_targets is not None:
            if not callable(sample_targets):
                raise TypeError(f"sample_targets must be callable (output, generator) -> target, got "
                                f"{type(sample_targets).__name__}")
            self.kind, self.fn = "custom", sample_targets
        elif _is(loss, F.cross_entropy, nn.CrossEntropyLoss):
            self.kind, self.fn = "categorical", None
        elif _is(loss, F.mse_loss, nn.MSELoss):
            self.kind, self.fn = "gaussian", None
        else:
            raise ValueError(f"fisher_type='true' needs the model's predictive distribution: the loss "
                             f"{getattr(loss, '__name__', type(loss).__name__)} is neither F.cross_entropy nor "
                             f"F.mse_loss (or their modules); pass sample_targets=(output, generator) -> target")
        self.seed = int(seed)
        self._gen: Optional[torch.Generator] = None

    def restart(self, offset: int = 0) -> None:
        """Start a new pass: the same seed and offset give the same draws."""
        self._gen = None
        self._offset = offset

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if self._gen is None or self._gen.device != output.device:
            self._gen = torch.Generator(device=output.device)
            self._gen.manual_seed(self.seed + getattr(self, "_offset", 0))
        out = output.detach()
        with torch.no_grad():
            if self.kind == "custom":
                return self.fn(out, self._gen)
            if self.kind == "categorical":
                probs = torch.softmax(out.float(), dim=-1).reshape(-1, out.shape[-1])
                return torch.multinomial(probs, 1, generator=self._gen).reshape(out.shape[:-1])
            noise = torch.randn(out.shape, generator=self._gen, device=out.device, dtype=out.dtype)
            return out + noise * math.sqrt(0.5)


def loss_hessian_columns(loss: Callable, output: torch.Tensor, reduction: str, where: str) -> torch.Tensor:
    """[C, B, C] columns v_c with Σ_c v_c v_cᵀ = H_n, the Hessian of the per-sample loss ℓ_n in the
    outputs z_n, for the losses where it is known (the ``"ggn"`` Fisher type)."""
    if output.dim() != 2:
        raise ValueError(f"{where}: fisher_type='ggn' needs [B, C] model outputs, got {tuple(output.shape)}")
    if reduction != "mean":
        raise ValueError(f"{where}: fisher_type='ggn' supports the losses' default reduction 'mean', got {reduction!r}")
    z = output.detach()
    C = z.shape[1]
    if _is(loss, F.cross_entropy, nn.CrossEntropyLoss) and _plain(loss):
        p = torch.softmax(z.double(), -1)
        eye = torch.eye(C, dtype=p.dtype, device=p.device)
        # v_c[n] = sqrt(p_nc) (e_c - p_n): Σ_c v_c v_cᵀ = diag(p) - p pᵀ.
        v = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None, :, :])
        return v.to(z.dtype)
    if _is(loss, F.mse_loss, nn.MSELoss) and _plain(loss):
        eye = torch.eye(C, dtype=z.dtype, device=z.device)
        return (eye[:, None, :] * (2.0 / C) ** 0.5).expand(C, z.shape[0], C)
    raise ValueError(f"{where}: fisher_type='ggn' needs a loss whose Hessian is known: F.cross_entropy or F.mse_loss "
                     f"(or their modules with default settings), got {getattr(loss, '__name__', type(loss).__name__)}")


def _plain(loss: Callable) -> bool:
    """A loss module with default settings (no class weights, smoothing or other reduction)."""
    if isinstance(loss, nn.CrossEntropyLoss):
        return loss.weight is None and loss.label_smoothing == 0.0 and loss.reduction == "mean"
    if isinstance(loss, nn.MSELoss):
        return loss.reduction == "mean"
    return True
