"""pyDVL 0.7.1's ``pydvl.influence.general`` under its own name: the influence functions of
:mod:`twicediff.influence` (the same objects), so that ``from pydvl.influence.general import ...``
becomes ``from twicediff.general import ...`` by the plain rename."""
from .influence import (  # noqa: F401
    InfluenceType,
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
    influence_type_registry,
)
from .inversion import InversionMethod, solve_hvp  # noqa: F401
from .twice_differentiable import (  # noqa: F401
    DataLoaderType,
    InverseHvpResult,
    TensorType,
    TensorUtilities,
    TwiceDifferentiable,
)

__all__ = ["compute_influences", "InfluenceType", "compute_influence_factors"]
