r"""Influence functions (Koh & Liang, 2017) with pyDVL 0.7's names and values
(``pydvl.influence.general``), computed block by block.

For a model with parameters θ, the loss ℓ of one point (a batch of one, output and target squeezed as
in :meth:`TorchTwiceDifferentiable.grad`), H the Hessian of the mean training loss and λ ≥ 0:

- influence factors of test points z_t: ``factors[t] = (H + λI)⁻¹ ∇θℓ(z_t)``, [N_test, P];
- up-weighting influence: ``result[t, i] = factors[t] · ∇θℓ(z_i)``, [N_test, N_input];
- perturbation influence: ``result[t, i] = factors[t] · ∇x∇θℓ(z_i)``, [N_test, N_input, *x_i.shape];
- self-influence: ``result[i] = ∇θℓ(z_i) · (H + λI)⁻¹ ∇θℓ(z_i)``, [N].

No sign flip: these are the values pyDVL 0.7 returns (a positive up-weighting value means that
up-weighting z_i lowers the loss on z_t).

How: per-sample gradients of a block of samples in one vmapped pass
(:mod:`twicediff.torch.per_sample`), packed into preallocated [N, P] memory by the native pack op
where a matrix is needed (test gradients, the right-hand sides of the solve). Up-weighting scores are
streamed when the input gradients [N_input, P] do not fit the memory budget
(:mod:`twicediff.memory`): each block of per-sample gradients is contracted with the factors block by
block over the parameters and dropped. Perturbation influences are mixed products of whole blocks.
Batches are moved to the model's device and results stay there. A batch's x is a tensor, a tuple
(``model(*x)``) or a dict (``model(**x)``), as everywhere (:mod:`twicediff.torch.batch`);
perturbation influence, a derivative in x, needs x to be one tensor.

With the K-FAC inversion methods (``"ekfac"``, ``"kfac"``, :mod:`twicediff.torch.solvers.kfac`) H is
replaced by the Kronecker-factored curvature F of the tracked Linear / Conv2d layers: the factors
are fitted once (or passed in as ``factors=``), up-weighting scores and self-influences are
streamed layer by layer over the input data (:mod:`twicediff.torch.kfac.scoring`, never
[N_input, P]), and the parameters outside the tracked layers are left out of the influence.
"""
from __future__ import annotations

import inspect
import logging
from enum import Enum
from typing import Any, Callable, Dict, List, Optional

import torch

from . import distributed as _distributed
from . import ops
from .inversion import InversionMethod, InversionRegistry, check_options, options_taken, solve_hvp
from .memory import chunk_size, get_memory_budget, reserved
from .errors import data_errors, describe_inputs
from .torch.per_sample import (finite_gradients, gradient_blocks, gradient_matrix, num_points_of,
                               per_sample_mixed_products, sample_chunks)
from .torch.batch import check_reread
from .torch.solvers.common import check_nonnegative
from .torch.solvers.kfac import kfac_factors, pydvl_loss
from .torch.tensor_utilities import TorchTensorUtilities
from .torch.twice_differentiable import TorchTwiceDifferentiable, check_model
from .twice_differentiable import (DataLoaderType, InverseHvpResult, TensorType,  # noqa: F401  (pyDVL's
                                   TensorUtilities, TwiceDifferentiable)  # names of general.py too)

__all__ = ["InfluenceType", "compute_influence_factors", "compute_influences", "compute_influences_pert",
           "compute_influences_up", "compute_self_influences"]

logger = logging.getLogger(__name__)


class InfluenceType(str, Enum):
    """Which influence to compute: of up-weighting a point, or of perturbing its input."""

    Up = "up"
    Perturbation = "perturbation"


# ---- checks and data ------------------------------------------------------------------------------


def _check_factors(model: TorchTwiceDifferentiable, factors: Any, where: str) -> torch.Tensor:
    if not isinstance(factors, torch.Tensor):
        raise TypeError(f"{where}: influence_factors must be a torch.Tensor [N_test, P], got {type(factors).__name__}")
    P = model.num_params
    if factors.dim() != 2 or factors.shape[1] != P:
        raise ValueError(f"{where}: influence_factors must be [N_test, P] with P = {P} (the model's number of "
                         f"trainable parameters), got shape {tuple(factors.shape)}")
    if factors.dtype != model.dtype:
        raise TypeError(f"{where}: influence_factors have dtype {factors.dtype} but the model's parameters are "
                        f"{model.dtype}")
    return factors.to(model.device)


def _solver_options(model: TorchTwiceDifferentiable, inversion_method: Any, progress: bool, kwargs: dict,
                    where: str) -> dict:
    """The options for :func:`solve_hvp`: ``kwargs``, plus ``progress`` when the solver registered
    for the method takes it. Checks the method and the options before any work is done."""
    solver = InversionRegistry.get(type(model), inversion_method)
    check_options(options_taken(solver), kwargs, InversionMethod(inversion_method).value, where)
    if progress and "progress" in inspect.signature(solver).parameters:
        return {**kwargs, "progress": progress}
    return kwargs


def _as_influence_type(influence_type: Any) -> InfluenceType:
    try:
        return InfluenceType(influence_type)
    except ValueError:
        raise ValueError(f"compute_influences: influence_type must be one of {[t.value for t in InfluenceType]}, "
                         f"got {influence_type!r}") from None


_KFAC_METHODS = {InversionMethod.Ekfac: "ekfac", InversionMethod.Kfac: "kfac"}
_KFAC_OPTIONS = ("factors", "fisher_type", "layers", "relative_damping", "fit_options")


def _kfac_method(inversion_method: Any) -> Optional[str]:
    """"ekfac" / "kfac" for the K-FAC inversion methods, else None."""
    try:
        return _KFAC_METHODS.get(InversionMethod(inversion_method))
    except ValueError:
        return None


def _kfac_setup(model: TorchTwiceDifferentiable, training_data: DataLoaderType, method: str, progress: bool,
                kwargs: dict, where: str):
    """(fitted factors, relative_damping) for a K-FAC influence call (λ checked by the caller);
    unknown options are an error."""
    check_options(_KFAC_OPTIONS, kwargs, method, where)
    relative = kwargs.get("relative_damping", False)
    if not isinstance(relative, bool):
        raise TypeError(f"{where}: relative_damping must be a bool, got {relative!r}")
    factors = kfac_factors(model, training_data, method, where, factors=kwargs.get("factors"),
                           fisher_type=kwargs.get("fisher_type", "empirical"), layers=kwargs.get("layers"),
                           fit_options=kwargs.get("fit_options"), progress=progress)
    if factors.left_out:
        logger.info("%s: %d parameter tensors outside the tracked layers are left out of the influence: %s",
                    where, len(factors.left_out), ", ".join(factors.left_out))
    return factors, relative


# ---- the pyDVL 0.7 functions ------------------------------------------------------------------------


def _test_gradients(group, model: TorchTwiceDifferentiable, test_data: Any, where: str, progress: bool, *,
                    broadcast: bool = True, name: str = "test_data") -> torch.Tensor:
    """The test gradients [N_test, P]: of the test data every rank holds (rank 0's, checked to be the
    same on every rank; ``broadcast=False`` leaves that to a following solve_hvp) or, for :class:`twicediff.distributed.Sharded` test data, of
    every rank's test points gathered in the global order."""
    def gradients(data) -> torch.Tensor:  # inside the guards: a NaN on one rank is reported to all
        return finite_gradients(gradient_matrix(model, data, where, name, progress), where, name)

    if isinstance(test_data, _distributed.Sharded):
        data = test_data.data
        return _distributed.gather_columns(group, where, lambda: gradients(data).unsqueeze(0), data)[0]
    rhs = _distributed.guarded(group, where, lambda: gradients(test_data))
    return _distributed.same_on_every_rank(group, where, "test gradients", rhs) if broadcast else rhs


def compute_influence_factors(model: TorchTwiceDifferentiable, training_data: DataLoaderType,
                              test_data: DataLoaderType, inversion_method: InversionMethod, *,
                              hessian_perturbation: float = 0.0, progress: bool = False,
                              **kwargs: Any) -> InverseHvpResult:
    r"""Influence factors of the test points: ``x[t] = (H + λI)⁻¹ ∇θℓ(z_t)``, [N_test, P].

    Args:
        model: the model and loss.
        training_data: (x, y) batches whose mean loss has the Hessian H.
        test_data: (x, y) batches of the test points z_t.
        inversion_method: how to solve (see :func:`twicediff.inversion.solve_hvp`).
        hessian_perturbation: λ ≥ 0.
        progress: show bars over the test batches and, when the solver takes ``progress``, its own.
        kwargs: options of the inversion method.

    Returns:
        InverseHvpResult: x [N_test, P] (on the model's device) and the solver's info.
    """
    return _influence_factors(model, training_data, test_data, inversion_method, hessian_perturbation, progress,
                              kwargs, "compute_influence_factors", "test_data")


def _influence_factors(model: TorchTwiceDifferentiable, training_data: DataLoaderType, test_data: DataLoaderType,
                       inversion_method: InversionMethod, hessian_perturbation: float, progress: bool, kwargs: dict,
                       where: str, test_name: str) -> InverseHvpResult:
    """:func:`compute_influence_factors` for the entry point ``where``, whose errors about the test
    data name it ``test_name`` (compute_influences takes the training data when none is given)."""
    # With a process group: the ranks agree on the call; the test gradients are computed on every
    # rank, a failure on one reported to all (twicediff.distributed); solve_hvp makes them rank 0's.
    group = _distributed.enter(where, model, inversion_method=inversion_method,
                               hessian_perturbation=hessian_perturbation, options=kwargs)
    model = check_model(model, where)
    options = _solver_options(model, inversion_method, progress, kwargs, where)
    solver = InversionRegistry.get(type(model), inversion_method)
    held = 0
    if group is None and callable(getattr(solver, "prepare", None)):
        # What the solver does without the right-hand sides (Arnoldi's eigen computation) goes first,
        # so that its working memory and the test gradients are not held at once.
        options, held = solver.prepare(model, training_data, hessian_perturbation, **options)
    with reserved(held):
        rhs = _test_gradients(group, model, test_data, where, progress, broadcast=False, name=test_name)
    if group is None and "out" in inspect.signature(solver).parameters and "out" not in options:
        options = {**options, "out": rhs}  # the factors overwrite the test gradients they are solved from
    with reserved(held + rhs.numel() * rhs.element_size()):  # the right-hand sides, held during the solve
        return solve_hvp(inversion_method, model, training_data, rhs, hessian_perturbation=hessian_perturbation,
                         **options)


def _gathered_over_ranks(where: str, compute, model, input_data, influence_factors, progress: bool):
    """Under a process group, ``compute``'s columns of this rank's ``input_data`` gathered in the
    global order on every rank (twicediff.distributed); None without a group."""
    group = _distributed.enter(where, model, influence_factors=influence_factors)
    if group is None:
        return None
    with _distributed.local_only():
        return _distributed.gather_columns(
            group, where, lambda: compute(model, input_data, influence_factors, progress=progress),
            input_data, check=influence_factors)


def compute_influences_up(model: TorchTwiceDifferentiable, input_data: DataLoaderType,
                          influence_factors: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    r"""Up-weighting influences ``result[t, i] = influence_factors[t] · ∇θℓ(z_i)``, [N_test, N_input].

    When the input gradients [N_input, P] fit the memory budget they are packed and contracted in
    one GEMM; otherwise (or when N_input cannot be known up front) each block of per-sample
    gradients is contracted with the factors parameter block by parameter block and dropped, so that
    memory stays flat in N_input.

    Args:
        model: the model and loss.
        input_data: (x, y) batches of the points z_i whose influence is computed.
        influence_factors: [N_test, P], e.g. from :func:`compute_influence_factors`.
        progress: show a bar over the input batches.
    """
    where = "compute_influences_up"
    gathered = _gathered_over_ranks(where, compute_influences_up, model, input_data, influence_factors, progress)
    if gathered is not None:
        return gathered
    model = check_model(model, where)
    factors = _check_factors(model, influence_factors, where)
    n = num_points_of(input_data)
    P = model.num_params
    elem = factors.element_size()
    if n is not None and 2 * n * P * elem <= get_memory_budget(model.device):
        # the packed [N_input, P] gradients are held while their blocks are computed: half the budget
        with reserved(n * P * elem):
            gradients = TorchTensorUtilities.cat_gen(gradient_blocks(model, input_data, where, "input_data",
                                                                     progress), (n, P), model)
        return factors @ gradients.T
    logger.info("%s: streaming the input gradients (N_input = %s, P = %d)", where, n, P)
    factor_blocks = ops.unpack_into(factors, [factors.new_empty(factors.shape[0], *p.shape)
                                               for p in model.parameters])
    scores = [ops.blockwise_contract(factor_blocks, blocks)
              for blocks in gradient_blocks(model, input_data, where, "input_data", progress)]
    return torch.cat(scores, dim=1)


def compute_influences_pert(model: TorchTwiceDifferentiable, input_data: DataLoaderType,
                            influence_factors: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    r"""Perturbation influences ``result[t, i] = influence_factors[t] · ∇x∇θℓ(z_i)``,
    [N_test, N_input, *x_i.shape]: how the loss on z_t moves when the input x_i is perturbed.

    Each block of samples costs N_test backward passes over the block (not N_test per sample).

    Defined for an x that is one floating-point tensor: the result is laid out like x_i. A tuple or
    dict x (``model(*x)``, ``model(**x)``) raises a TypeError; wrap the model so that it takes one
    tensor, or use up-weighting influence, which takes every form of x.

    Args:
        model: the model and loss.
        input_data: (x, y) batches of the points z_i; x must be one floating-point tensor.
        influence_factors: [N_test, P], e.g. from :func:`compute_influence_factors`.
        progress: show a bar over the input batches.
    """
    where = "compute_influences_pert"
    gathered = _gathered_over_ranks(where, compute_influences_pert, model, input_data, influence_factors, progress)
    if gathered is not None:
        return gathered
    model = check_model(model, where)
    factors = _check_factors(model, influence_factors, where)
    T = factors.shape[0]
    parts = []
    for x, y, batch in sample_chunks(model, input_data, where, "input_data", progress, directions=max(T, 1)):
        if not isinstance(x, torch.Tensor):
            form = "a dict" if isinstance(x, dict) else f"a {type(x).__name__}"
            raise TypeError(f"{where}: perturbation influence differentiates the loss in the input x and needs x "
                            f"to be a single floating-point tensor; {batch} gives x as {form} "
                            f"({describe_inputs(x)}); use influence_type='up', or wrap the model so that it "
                            "takes one tensor")
        if not x.is_floating_point():
            raise TypeError(f"{where}: perturbation influence differentiates in x, which must be floating point; "
                            f"input_data yields x of dtype {x.dtype}")
        with data_errors(where, batch, x, y):
            parts.append(per_sample_mixed_products(model, x, y, factors))
    return torch.cat(parts, dim=1)


# pyDVL 0.7.1's public name: compute_influences dispatches through it.
influence_type_registry: Dict[InfluenceType, Callable[..., torch.Tensor]] = {
    InfluenceType.Up: compute_influences_up,
    InfluenceType.Perturbation: compute_influences_pert,
}


def compute_influences(differentiable_model: TorchTwiceDifferentiable, training_data: DataLoaderType, *,
                       test_data: Optional[DataLoaderType] = None, input_data: Optional[DataLoaderType] = None,
                       inversion_method: InversionMethod = InversionMethod.Direct,
                       influence_type: InfluenceType = InfluenceType.Up, hessian_regularization: float = 0.0,
                       progress: bool = False, **kwargs: Any) -> torch.Tensor:
    r"""Influence of each input point z_i on the loss at each test point z_t.

    Computes the factors ``(H + λI)⁻¹ ∇θℓ(z_t)`` of the test points (H from ``training_data``), then
    :func:`compute_influences_up` ([N_test, N_input]) or :func:`compute_influences_pert`
    ([N_test, N_input, *x_i.shape]) over ``input_data``.

    Args:
        differentiable_model: the model and loss.
        training_data: (x, y) batches whose mean loss has the Hessian H.
        test_data: the test points; ``training_data`` when None.
        input_data: the points whose influence is computed; ``training_data`` when None.
        inversion_method: Direct, Cg, Lissa, Arnoldi, Ekfac or Kfac (the K-FAC ones take
            ``factors=``, ``fisher_type=``, ``layers=``, ``relative_damping=``, ``fit_options=``).
        influence_type: ``"up"`` or ``"perturbation"``.
        hessian_regularization: λ ≥ 0.
        progress: show progress bars.
        kwargs: options of the inversion method.
    """
    _distributed.enter("compute_influences", differentiable_model, influence_type=influence_type,
                       inversion_method=inversion_method, hessian_regularization=hessian_regularization,
                       test_data_given=test_data is not None, input_data_given=input_data is not None, options=kwargs)
    model = check_model(differentiable_model, "compute_influences")
    kind = _as_influence_type(influence_type)
    # Checked here, under the name the caller used: the solvers call it hessian_perturbation.
    check_nonnegative(hessian_regularization, "hessian_regularization", "compute_influences")
    if test_data is None or input_data is None:
        reread = "test points (test_data is None)" if test_data is None else "input points (input_data is None)"
        check_reread(training_data, "compute_influences", "training_data", f"it is read again as the {reread}")
    # An error about the test points names what the caller passed: training_data when test_data is None.
    test_name = "test_data" if test_data is not None else "training_data (the test points, as test_data is None)"
    if test_data is None:  # with a process group, the training points of every rank
        test_data = _distributed.Sharded(training_data) if _distributed.current_group() is not None else training_data
    input_data = training_data if input_data is None else input_data
    method = _kfac_method(inversion_method)
    if method is not None:
        return _kfac_influences(model, training_data, test_data, input_data, method, kind, hessian_regularization,
                                progress, kwargs, test_name)
    factors, _ = _influence_factors(model, training_data, test_data, inversion_method, hessian_regularization,
                                    progress, kwargs, "compute_influences", test_name)
    return influence_type_registry[kind](model, input_data, factors, progress=progress)


def _kfac_influences(model: TorchTwiceDifferentiable, training_data: DataLoaderType, test_data: DataLoaderType,
                     input_data: DataLoaderType, method: str, kind: InfluenceType, lam: float, progress: bool,
                     kwargs: dict, test_name: str = "test_data") -> torch.Tensor:
    """compute_influences with K-FAC: the factors fitted once, the test gradients preconditioned
    layer by layer, then up-weighting scores streamed over ``input_data`` (per-sample gradients of the
    tracked layers only, a chunk at a time), or the generic perturbation products (the factors are
    zero outside the tracked layers, so those parameters drop out there too)."""
    where = "compute_influences"
    group = _distributed.current_group()
    fitted, relative = _kfac_setup(model, training_data, method, progress, kwargs, where)
    rhs = _test_gradients(group, model, test_data, where, progress, name=test_name)
    pre = fitted.solve(rhs, damping=float(lam), method=method, relative_damping=relative).to(rhs.dtype)
    if kind is InfluenceType.Perturbation:
        return compute_influences_pert(model, input_data, pre, progress=progress)
    with _distributed.local_only():  # each rank scores its shard; the columns are gathered in order
        scores = _distributed.gather_columns(
            group, where, lambda: fitted.score(model.model, pydvl_loss(model), pre, input_data, progress=progress),
            input_data, check=pre)
    return scores.to(device=model.device, dtype=model.dtype)


# ---- beyond pyDVL 0.7 -----------------------------------------------------------------------------


def compute_self_influences(model: TorchTwiceDifferentiable, training_data: DataLoaderType, *,
                            inversion_method: InversionMethod = InversionMethod.Direct,
                            hessian_regularization: float = 0.0, progress: bool = False,
                            **kwargs: Any) -> torch.Tensor:
    r"""Self-influence of every training point, ``result[i] = ∇θℓ(z_i) · (H + λI)⁻¹ ∇θℓ(z_i)``, [N]:
    the diagonal of ``compute_influences(model, training_data)`` without forming the [N, N]
    matrix. Large values flag points the model fits poorly, e.g. mislabeled ones.

    The per-sample gradients are gathered in blocks of as many rows as the memory budget allows;
    each block is packed into a [rows, P] matrix, solved for in one call of the inversion method
    (Direct thus builds the Hessian once per block: one block unless the budget is small) and
    dotted row by row with its solutions.

    Args:
        model: the model and loss.
        training_data: (x, y) batches: the points, and the mean loss whose Hessian is H.
        inversion_method: Direct, Cg, Lissa, Arnoldi, Ekfac or Kfac (the K-FAC ones stream
            ``G_nᵀ (F + λI)⁻¹ G_n`` in the factors' eigenbasis).
        hessian_regularization: λ ≥ 0.
        progress: show bars over the training batches and, when the solver takes ``progress``, its own.
        kwargs: options of the inversion method.
    """
    where = "compute_self_influences"
    group = _distributed.enter(where, model, inversion_method=inversion_method,
                               hessian_regularization=hessian_regularization, options=kwargs)
    model = check_model(model, where)
    check_nonnegative(hessian_regularization, "hessian_regularization", where)
    check_reread(training_data, where, "training_data", "it is read for the points' gradients and again for H")
    method = _kfac_method(inversion_method)
    if method is not None:  # streamed in the factors' eigenbasis, no solve per block
        fitted, relative = _kfac_setup(model, training_data, method, progress, kwargs, where)
        with _distributed.local_only():  # each rank's points; gathered in the global order
            values = _distributed.gather_columns(
                group, where, lambda: fitted.self_score(model.model, pydvl_loss(model), training_data,
                                                        float(hessian_regularization), method,
                                                        relative_damping=relative, progress=progress).unsqueeze(0),
                training_data)[0]
        return values.to(device=model.device, dtype=model.dtype)
    options = _solver_options(model, inversion_method, progress, kwargs, where)
    P = model.num_params
    elem = torch.finfo(model.dtype).bits // 8
    n = num_points_of(training_data)
    # A row of a block holds its gradient (twice while it is packed), its solution and about 3 more
    # rows of solver work.
    if group is not None:  # every rank's gradients gathered, solved for together (twicediff.distributed)
        n = None  # the rows of all ranks
    rows = chunk_size(n if n is not None else 2 ** 62, 6 * P * elem, model.device, what="self-influence rows")
    if group is not None:
        return _distributed.self_influences(
            group, model, training_data,
            lambda: gradient_matrix(model, training_data, where, "training_data", progress),
            lambda g: solve_hvp(inversion_method, model, training_data, g, hessian_perturbation=hessian_regularization,
                                **options).x, rows)
    results: List[torch.Tensor] = []
    pending: List[List[torch.Tensor]] = []
    filled = 0

    def flush() -> None:
        g = TorchTensorUtilities.cat_gen(pending, (filled, P), model)
        with reserved(g.numel() * g.element_size()):  # held during the solve
            x = solve_hvp(inversion_method, model, training_data, g, hessian_perturbation=hessian_regularization,
                          **options).x
        results.append(torch.einsum("ip,ip->i", g, x.to(g.dtype)))

    for blocks in gradient_blocks(model, training_data, where, "training_data", progress):
        B, start = blocks[0].shape[0], 0
        while start < B:
            take = min(B - start, rows - filled)
            pending.append([b[start:start + take] for b in blocks])
            filled += take
            start += take
            if filled == rows:
                flush()
                pending, filled = [], 0
    if filled:
        flush()
    return torch.cat(results)
