"""Explicit float64 second-order references for tests: the full Hessian [P, P] and the generalized
Gauss-Newton matrix [P, P] of ``loss(squeeze(model(x)), squeeze(y))`` in the flat vector θ of the
parameters that require grad (``model.parameters()`` order), built with torch.autograd.functional.
Only for small models (P up to a few hundred)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn
from torch.func import functional_call


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """θ [P]: the parameters that require grad, flattened in model.parameters() order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def _as_function_of_theta(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """out(θ, x) = model(x) with its trainable parameters replaced by the pieces of θ."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def out(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = [t.view(s) for t, s in zip(torch.split(theta, sizes), shapes)]
        return functional_call(model, dict(zip(names, pieces)), (x,))
    return out


def explicit_hessian(model: nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H [P, P] = ∂² loss(squeeze(model(x)), squeeze(y)) / ∂θ²."""
    out = _as_function_of_theta(model)
    theta = flat_parameters(model)
    return torch.autograd.functional.hessian(
        lambda t: loss(torch.squeeze(out(t, x)), torch.squeeze(y)), theta, vectorize=True)


def explicit_gauss_newton(model: nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G [P, P] = Jᵀ H_ℓ J, J = ∂ vec(model(x)) / ∂θ [M, P], H_ℓ = ∂² loss / ∂ vec(model(x))² [M, M]."""
    out = _as_function_of_theta(model)
    theta = flat_parameters(model)
    z = out(theta, x).detach()
    J = torch.autograd.functional.jacobian(lambda t: out(t, x).reshape(-1), theta, vectorize=True)
    H_out = torch.autograd.functional.hessian(
        lambda o: loss(torch.squeeze(o.view(z.shape)), torch.squeeze(y)), z.reshape(-1), vectorize=True)
    return J.T @ H_out @ J


def hessian_and_gauss_newton(model: nn.Module, loss: Callable, x: torch.Tensor,
                             y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(explicit_hessian, explicit_gauss_newton) of the same batch."""
    return explicit_hessian(model, loss, x, y), explicit_gauss_newton(model, loss, x, y)
