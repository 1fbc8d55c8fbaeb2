"""The torch implementation: TorchTwiceDifferentiable, TorchTensorUtilities, inverse-HVP solvers."""
from .tensor_utilities import TorchTensorUtilities  # noqa: F401
from .twice_differentiable import BoundHvp, TorchTwiceDifferentiable  # noqa: F401

__all__ = ["BoundHvp", "TorchTensorUtilities", "TorchTwiceDifferentiable"]

# ---- inverse-HVP solvers (importing registers them with twicediff.InversionRegistry) ----------
from .operator import HessianOperator, hessian_operator  # noqa: E402,F401
from .solvers import (  # noqa: E402,F401
    LowRankProductRepresentation,
    lanzcos_low_rank_hessian_approx,
    model_hessian_low_rank,
    solve_arnoldi,
    solve_batch_cg,
    solve_cg,
    solve_linear,
    solve_lissa,
)

__all__ += ["HessianOperator", "hessian_operator", "LowRankProductRepresentation", "lanzcos_low_rank_hessian_approx",
            "model_hessian_low_rank", "solve_arnoldi", "solve_batch_cg", "solve_cg", "solve_linear", "solve_lissa"]
