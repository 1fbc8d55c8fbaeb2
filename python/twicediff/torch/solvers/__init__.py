r"""Inverse-HVP solvers for torch models: x with (H + λI) x = b, b [N, P] one right-hand side per row.

H is the Hessian of the mean training loss (batch losses weighted by batch size), applied through
:class:`twicediff.torch.operator.HessianOperator`: a block of vectors costs one pass over the data.
Names, signatures and info keys are pyDVL 0.7.1's; the fused updates of CG and LiSSA are native
ops (:mod:`twicediff.ops.solver_step`).

==========  =======================  ===================  ===========================================
method      function                 module               how
==========  =======================  ===================  ===========================================
Direct      :func:`solve_linear`     ``direct``           explicit H, Cholesky (LU beyond its PD block)
Cg          :func:`solve_batch_cg`   ``cg``, ``block_cg``  block CG, optional ``preconditioners``
Lissa       :func:`solve_lissa`      ``lissa``            stochastic Neumann series, all columns at once
Arnoldi     :func:`solve_arnoldi`    ``low_rank``,        top eigenpairs of H + λI (Lanczos or ARPACK)
                                     ``lanczos``
Ekfac       :func:`solve_ekfac`      ``kfac``             EK-FAC curvature of the Linear/Conv layers
Kfac        :func:`solve_kfac`       ``kfac``             K-FAC curvature (A ⊗ S) of those layers
==========  =======================  ===================  ===========================================

:data:`SOLVERS` below is the one table of which function solves which :class:`InversionMethod`;
:func:`register` enters it into :class:`twicediff.inversion.InversionRegistry` (``twicediff.torch``
calls it on import).
"""
from ...inversion import InversionMethod, InversionRegistry
from ..twice_differentiable import TorchTwiceDifferentiable
from .cg import solve_batch_cg, solve_cg
from .direct import solve_linear
from .kfac import solve_ekfac, solve_kfac
from .lissa import solve_lissa
from .low_rank import LowRankProductRepresentation, lanzcos_low_rank_hessian_approx, model_hessian_low_rank, solve_arnoldi

__all__ = ["SOLVERS", "LowRankProductRepresentation", "lanzcos_low_rank_hessian_approx", "model_hessian_low_rank",
           "register", "solve_arnoldi", "solve_batch_cg", "solve_cg", "solve_ekfac", "solve_kfac", "solve_linear",
           "solve_lissa"]

#: Which function solves each inversion method for a TorchTwiceDifferentiable.
SOLVERS = {
    InversionMethod.Direct: solve_linear,
    InversionMethod.Cg: solve_batch_cg,
    InversionMethod.Lissa: solve_lissa,
    InversionMethod.Arnoldi: solve_arnoldi,
    InversionMethod.Ekfac: solve_ekfac,
    InversionMethod.Kfac: solve_kfac,
}


def register() -> None:
    """Enter :data:`SOLVERS` into the InversionRegistry for TorchTwiceDifferentiable (idempotent)."""
    for method, func in SOLVERS.items():
        if InversionRegistry.registry.get((TorchTwiceDifferentiable, method)) is not func:
            InversionRegistry.register(TorchTwiceDifferentiable, method, overwrite=True)(func)
