"""twicediff: second-order information of a model's loss for PyTorch.

Gradients, Hessians, batched Hessian-vector products, inverse-HVP solvers and influence functions,
with the API of pyDVL 0.7's ``pydvl.influence`` on native CPU/CUDA kernels.
"""
from ._build import build_info  # noqa: F401  (loads the native ops first, with a clear error)
from . import ops  # noqa: F401
from .influence import (  # noqa: F401
    InfluenceType,
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
    compute_self_influences,
)
from .inversion import InversionMethod, InversionRegistry, solve_hvp  # noqa: F401
from .errors import BadBatchError, DistributedError, GraphInputError, MemoryBudgetError, NotNativeError  # noqa: F401
from . import general  # noqa: F401,E402  (pyDVL's pydvl.influence.general, an alias of .influence)
from .memory import (  # noqa: F401
    cpu_block_cache_bytes,
    get_memory_budget,
    memory_budget,
    native_scratch_bytes,
    release_cpu_block_cache,
    release_native_scratch,
    set_memory_budget,
)
from .torch import TorchTensorUtilities, TorchTwiceDifferentiable  # noqa: F401
from .twice_differentiable import (  # noqa: F401
    DataLoaderType,
    InverseHvpResult,
    ModelType,
    TensorType,
    TensorUtilities,
    TwiceDifferentiable,
)

__version__ = "0.1.0"
