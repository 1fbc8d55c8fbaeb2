"""Solving (H + λI) x = b for the Hessian H of a model's mean training loss: the inversion methods,
the registry that maps (model type, method) to a solver, and :func:`solve_hvp`, the one entry.

The torch solvers are listed in one table, :data:`twicediff.torch.solvers.SOLVERS`, which importing
:mod:`twicediff.torch` enters here. Another framework registers its own the same way::

    @InversionRegistry.register(MyTwiceDifferentiable, InversionMethod.Cg)
    def my_cg(model, training_data, b, hessian_perturbation=0.0, **kwargs): ...
"""
from __future__ import annotations

import inspect
import warnings
from enum import Enum
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from . import distributed as _distributed
from .twice_differentiable import DataLoaderType, InverseHvpResult, TensorType, TwiceDifferentiable

__all__ = ["InversionMethod", "InversionRegistry", "solve_hvp"]


class InversionMethod(str, Enum):
    """How to solve (H + λI) x = b."""

    Direct = "direct"
    Cg = "cg"
    Lissa = "lissa"
    Arnoldi = "arnoldi"
    Ekfac = "ekfac"
    Kfac = "kfac"


class InversionRegistry:
    """Which function solves (H + λI) x = b for a given model type and inversion method."""

    registry: Dict[Tuple[Type[TwiceDifferentiable], InversionMethod], Callable[..., InverseHvpResult]] = {}

    @classmethod
    def register(cls, model_type: Type[TwiceDifferentiable], inversion_method: InversionMethod,
                 overwrite: bool = False):
        """Decorator registering ``func(model, training_data, b, hessian_perturbation, **kwargs)``
        for ``(model_type, inversion_method)``.

        A second registration for the same pair replaces the first; without ``overwrite=True`` it
        also warns (pyDVL 0.7.1's behaviour).

        Raises:
            TypeError: model_type is not a class or inversion_method not an InversionMethod.
            ValueError: (when decorating) ``func`` cannot be called with the four arguments
                ``(model, training_data, b, hessian_perturbation)`` (pyDVL's type for a solver of
                the wrong signature; annotations are not checked, unlike pyDVL).
        """
        if not isinstance(model_type, type):
            raise TypeError(f"InversionRegistry.register: model_type must be a class, got {model_type!r}")
        if not isinstance(inversion_method, InversionMethod):
            raise TypeError(f"InversionRegistry.register: inversion_method must be an InversionMethod "
                            f"(one of {[m.value for m in InversionMethod]}), got {inversion_method!r}")
        key = (model_type, inversion_method)

        def decorator(func: Callable[..., InverseHvpResult]) -> Callable[..., InverseHvpResult]:
            try:
                inspect.signature(func).bind(None, None, None, 0.0)
            except TypeError as exc:
                raise ValueError(f"InversionRegistry.register: {getattr(func, '__qualname__', func)!s} must take "
                                 f"(model, training_data, b, hessian_perturbation) positionally: {exc}") from None
            except ValueError:  # no signature to inspect (a builtin): trust it
                pass
            if not overwrite and key in cls.registry:
                warnings.warn(f"InversionRegistry.register: a function is already registered for model type "
                              f"{model_type.__name__} and inversion method {inversion_method.value!r} "
                              f"({cls.registry[key].__qualname__}); replacing it with {func.__qualname__}. "
                              f"Pass overwrite=True to replace it without this warning", stacklevel=2)
            cls.registry[key] = func
            return func

        return decorator

    @classmethod
    def get(cls, model_type: Type[TwiceDifferentiable], inversion_method: InversionMethod
            ) -> Callable[..., InverseHvpResult]:
        """The function registered for ``(model_type, inversion_method)``.

        Raises:
            ValueError: nothing is registered for that pair (the message lists what is).
        """
        method = _as_method(inversion_method, "InversionRegistry.get")
        func = cls.registry.get((model_type, method))
        if func is None:
            known = sorted(f"({t.__name__}, {m.value!r})" for t, m in cls.registry)
            raise ValueError(f"InversionRegistry.get: no function registered for model type "
                             f"{getattr(model_type, '__name__', model_type)} and inversion method {method.value!r}; "
                             f"registered: {', '.join(known) or 'none'}")
        return func

    @classmethod
    def call(cls, inversion_method: InversionMethod, model: TwiceDifferentiable, training_data: DataLoaderType,
             b: TensorType, hessian_perturbation: float, **kwargs: Any) -> InverseHvpResult:
        """Runs the function registered for ``(type(model), inversion_method)``."""
        return cls.get(type(model), inversion_method)(model, training_data, b, hessian_perturbation, **kwargs)


def options_taken(solver: Callable[..., InverseHvpResult]) -> Optional[List[str]]:
    """The options a registered solver takes after its four arguments (model, training_data, b,
    hessian_perturbation); None where it takes any (``**kwargs``, or no signature to read)."""
    try:
        params = list(inspect.signature(solver).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params[4:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)]


def check_options(takes: Optional[Sequence[str]], options: Dict[str, Any], method: str, where: str) -> None:
    """A TypeError naming ``where``, the inversion method and the options it ``takes`` (None: any)
    for options it does not take, instead of Python's error naming the solver's own function."""
    unknown = sorted(set(options) - set(takes)) if takes is not None else []
    if unknown:
        raise TypeError(f"{where}: unexpected options {unknown} for inversion method {method!r}; it takes "
                        f"{list(takes)}")


def _as_method(inversion_method: Any, where: str) -> InversionMethod:
    try:
        return InversionMethod(inversion_method)
    except ValueError:
        raise ValueError(f"{where}: inversion_method must be one of {[m.value for m in InversionMethod]}, "
                         f"got {inversion_method!r}") from None


def solve_hvp(inversion_method: InversionMethod, model: TwiceDifferentiable, training_data: DataLoaderType,
              b: TensorType, *, hessian_perturbation: float = 0.0, **kwargs: Any) -> InverseHvpResult:
    r"""x with (H + λI) x = b, for H the Hessian of the model's mean loss over ``training_data``.

    Args:
        inversion_method: Direct, Cg, Lissa, Arnoldi, Ekfac or Kfac (or its string value).
        model: the model, e.g. a :class:`twicediff.torch.TorchTwiceDifferentiable`.
        training_data: a loader of (x, y) batches; H averages the batch Hessians weighted by size.
        b: [N, P] right-hand sides, one per row (or one [P] vector).
        hessian_perturbation: λ ≥ 0.
        kwargs: the method's own options (see the solvers in :mod:`twicediff.torch.solvers`).

    Returns:
        InverseHvpResult with x of b's shape and the method's info dict.
    """
    # With a process group: the ranks agree on the call, then hold rank 0's b (twicediff.distributed).
    group = _distributed.enter("solve_hvp", model, inversion_method=inversion_method, b=b,
                               hessian_perturbation=hessian_perturbation, options=kwargs)
    b = _distributed.same_on_every_rank(group, "solve_hvp", "b", b)
    method = _as_method(inversion_method, "solve_hvp")
    check_options(options_taken(InversionRegistry.get(type(model), method)), kwargs, method.value, "solve_hvp")
    return InversionRegistry.call(method, model, training_data, b, hessian_perturbation=hessian_perturbation,
                                  **kwargs)
