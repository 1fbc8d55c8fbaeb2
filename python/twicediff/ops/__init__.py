"""``twicediff.ops``: the Python face of the native ops in ``csrc/``, one module per op family
(named like its C++ files), each op a typed wrapper over ``torch.ops.twicediff.<op>`` with its fake
kernel; :mod:`twicediff.ops.reference` holds the pure-torch twin of every op.

===================  ==========================================  =============================
module               ops                                         what they do
===================  ==========================================  =============================
``pack``             pack, pack_into, unpack_into                parameter lists <-> [B, P] rows
``blockwise``        blockwise_contract, blockwise_dot           contractions block by block
``gemm``             gemm_                                       the native kernels' GEMM
``solver_step``      cg_step, cg_direction, lissa_step           fused solver updates on [D, P]
``mlp_hvp``          mlp_hvp                                     batched HVPs of an MLP's loss
``kfac``             covariance_accumulate,                      K-FAC factors and EK-FAC
                     eigen_correction_accumulate                 eigenvalue corrections
``layer_norm``       layer_norm_tangent,                         LayerNorm's forward-mode
                     layer_norm_backward_tangent                 rules, one pass per row
===================  ==========================================  =============================
"""
from .blockwise import blockwise_contract, blockwise_dot
from .gemm import gemm_
from .kfac import covariance_accumulate, eigen_correction_accumulate
from .layer_norm import layer_norm_backward_tangent, layer_norm_tangent
from .mlp_hvp import mlp_hvp
from .pack import pack, pack_into, unpack_into
from .solver_step import cg_direction, cg_step, lissa_step

__all__ = ["blockwise_contract", "blockwise_dot", "cg_direction", "cg_step", "covariance_accumulate",
           "eigen_correction_accumulate", "gemm_", "layer_norm_backward_tangent", "layer_norm_tangent", "lissa_step",
           "mlp_hvp", "pack", "pack_into", "unpack_into"]
