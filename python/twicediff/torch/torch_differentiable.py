"""pyDVL 0.7.1's ``pydvl.influence.torch.torch_differentiable`` under its own name: the torch model
wrapper, its tensor utilities, the inverse-HVP solvers and the low-rank Hessian approximation.

Nothing is defined here: every name is twicediff's own implementation
(:mod:`twicediff.torch.twice_differentiable`, :mod:`twicediff.torch.tensor_utilities`,
:mod:`twicediff.torch.solvers`), so that code importing from this module after the rename
``pydvl.influence`` → ``twicediff`` gets the same objects as ``twicediff.torch``. The names pyDVL
imports into this module from its sibling modules are importable from it too.
"""
from ..inversion import InversionMethod, InversionRegistry  # noqa: F401
from ..twice_differentiable import InverseHvpResult, TensorUtilities, TwiceDifferentiable  # noqa: F401
from .functional import get_hvp_function  # noqa: F401
from .solvers import (  # noqa: F401
    LowRankProductRepresentation,
    lanzcos_low_rank_hessian_approx,
    model_hessian_low_rank,
    solve_arnoldi,
    solve_batch_cg,
    solve_cg,
    solve_linear,
    solve_lissa,
)
from .tensor_utilities import TorchTensorUtilities  # noqa: F401
from .twice_differentiable import TorchTwiceDifferentiable  # noqa: F401
from .util import align_structure, as_tensor, flatten_tensors_to_vector  # noqa: F401

__all__ = [
    "TorchTwiceDifferentiable",
    "solve_linear",
    "solve_batch_cg",
    "solve_lissa",
    "solve_arnoldi",
    "lanzcos_low_rank_hessian_approx",
    "model_hessian_low_rank",
]
