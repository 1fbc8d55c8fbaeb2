"""Kronecker-factored curvature (K-FAC and EK-FAC) for the Linear, Conv1d and Conv2d layers of any model.

- :mod:`.layers`: which layers are tracked (module hooks), and how their inputs / output
  gradients are read as [B, T, ·] tokens.
- :mod:`.batches`: the loss convention (Σ_n ℓ_n) and the Fisher type (batch forms: :mod:`twicediff.torch.batch`).
- :mod:`.factors`: :class:`KFACFactors`, fitted over a DataLoader, saved / loaded, applied.
- :mod:`.inverse`: (F + λI)⁻¹ applied layer by layer in the model's parameter layout.
- :mod:`.scoring`: queries against training per-sample gradients, streamed.
- :mod:`.eigen`: robust float64 eigendecompositions of the factors.
"""
from .factors import METHODS, KFACFactors, fit_factors  # noqa: F401
from .inverse import ParameterLayout  # noqa: F401
from .layers import TrackedLayer, find_layers  # noqa: F401
from .scoring import score, self_score  # noqa: F401

__all__ = ["KFACFactors", "fit_factors", "find_layers", "TrackedLayer", "ParameterLayout", "METHODS", "score", "self_score"]
