"""The torch implementation: TorchTwiceDifferentiable, TorchTensorUtilities, inverse-HVP solvers."""
from .tensor_utilities import TorchTensorUtilities  # noqa: F401
from .twice_differentiable import TorchTwiceDifferentiable  # noqa: F401

__all__ = ["TorchTensorUtilities", "TorchTwiceDifferentiable"]
