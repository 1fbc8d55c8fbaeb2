"""The torch implementation: TorchTwiceDifferentiable, TorchTensorUtilities, inverse-HVP solvers.

Importing this package enters the torch solvers into :class:`twicediff.inversion.InversionRegistry`
(:func:`twicediff.torch.solvers.register`).
"""
from . import solvers as _solvers
from .engines.bound_hvp import BoundHvp
from .operator import HessianOperator, hessian_operator
from .solvers import (
    LowRankProductRepresentation,
    lanzcos_low_rank_hessian_approx,
    model_hessian_low_rank,
    solve_arnoldi,
    solve_batch_cg,
    solve_cg,
    solve_linear,
    solve_lissa,
)
from .tensor_utilities import TorchTensorUtilities
from .twice_differentiable import TorchTwiceDifferentiable

_solvers.register()

__all__ = ["BoundHvp", "HessianOperator", "LowRankProductRepresentation", "TorchTensorUtilities",
           "TorchTwiceDifferentiable", "hessian_operator", "lanzcos_low_rank_hessian_approx", "model_hessian_low_rank",
           "solve_arnoldi", "solve_batch_cg", "solve_cg", "solve_linear", "solve_lissa"]

# ---- pyDVL 0.7.1's module tree: pydvl.influence.torch.{functional, util, torch_differentiable} --
from . import functional, torch_differentiable, util  # noqa: E402,F401
from .util import as_tensor  # noqa: E402,F401

__all__ += ["as_tensor"]
