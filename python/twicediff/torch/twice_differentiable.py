"""TorchTwiceDifferentiable: a torch model and loss, with gradients, Hessians and batched
Hessian-vector products of the loss with respect to the parameters that require grad.

The class is the public face; the work is done by :mod:`twicediff.torch.engines` (products),
:mod:`twicediff.torch.hessian` (explicit Hessians) and :mod:`twicediff.torch.mvp` (pyDVL's mvp),
with argument checks from :mod:`twicediff.torch.batch`.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import distributed as _distributed
from ..errors import NotNativeError, data_errors
from ..twice_differentiable import TwiceDifferentiable
from . import hessian as _hessian
from . import batch as _batch
from .batch import Inputs, check_vectors, squeezed_loss
from .engines import select
from .engines.amortise import products_expected
from .engines.base import MODES
from .engines.bound_hvp import BoundHvp
from .guard import model_call
from .mvp import batched_mvp, flat_grads
from .weight_norm import deep_copy

__all__ = ["TorchTwiceDifferentiable", "check_model"]

logger = logging.getLogger(__name__)


def check_model(model, where: str) -> "TorchTwiceDifferentiable":
    """``model`` itself when it is a TorchTwiceDifferentiable, else a TypeError naming ``where``."""
    if not isinstance(model, TorchTwiceDifferentiable):
        raise TypeError(f"{where}: model must be a TorchTwiceDifferentiable, got {type(model).__name__}")
    return model


class TorchTwiceDifferentiable(TwiceDifferentiable[torch.Tensor]):
    r"""Wraps a ``torch.nn.Module`` and a loss \(L(\hat y, y)\).

    The loss of a batch is ``loss(torch.squeeze(model(x)), torch.squeeze(y))`` (pyDVL 0.7's
    convention; ``model(*x)`` for a tuple or list x, ``model(**x)`` for a dict, see
    :mod:`twicediff.torch.batch`) and derivatives are taken with respect to the parameters that
    require grad, in ``model.parameters()`` order, flattened into one vector of P elements.

    Args:
        model: the model; its parameters that require grad are differentiated.
        loss: a differentiable scalar loss mapping (prediction, target) to a 0-d tensor.

    Attributes:
        model, loss, device and dtype (of the first parameter).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
        >>> wrapped = TorchTwiceDifferentiable(model, F.cross_entropy)
        >>> wrapped.num_params
        26
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> wrapped.grad(x, y).shape
        torch.Size([26])
    """

    def __init__(self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchTwiceDifferentiable: model must be a torch.nn.Module, got {type(model).__name__}")
        model = _distributed.unwrap_model(model)  # DDP: its .module; FSDP: a TypeError
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError("TorchTwiceDifferentiable: model is a torch.jit.ScriptModule, whose parameters torch.func "
                            "cannot swap and whose forward takes no hooks; pass the nn.Module before scripting it")
        if not callable(loss):
            raise TypeError(f"TorchTwiceDifferentiable: loss must be callable (prediction, target) -> scalar, "
                            f"got {type(loss).__name__}")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError(f"TorchTwiceDifferentiable: model {type(model).__name__} has no parameters")
        lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ValueError(f"TorchTwiceDifferentiable: model {type(model).__name__} has uninitialized lazy "
                             f"parameters ('{lazy[0]}'); run one forward pass on a batch first, which sets their "
                             "shapes")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"TorchTwiceDifferentiable: model {type(model).__name__} has no parameter that "
                             "requires grad; there is nothing to differentiate")
        if model.training:
            logger.warning("Passed model not in evaluation mode. This can create several issues in influence "
                           "computation, e.g. due to batch normalization. Please call model.eval() before "
                           "computing influences.")
        self.model = model
        self.loss = loss
        self.device = first.device
        self.dtype = first.dtype

    @classmethod
    def tensor_type(cls):
        return torch.Tensor

    def with_dtype(self, dtype: torch.dtype) -> "TorchTwiceDifferentiable":
        """The same model and loss computing in ``dtype``: self when its parameters already are,
        else a deep copy of the model cast to ``dtype`` (which parameters require grad is kept). A
        loss that is a module (``nn.CrossEntropyLoss(weight=...)``) is copied and cast too, so that
        the tensors it holds match."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"with_dtype: dtype must be a floating torch.dtype, got {dtype!r}")
        if dtype == self.dtype:
            return self
        loss = copy.deepcopy(self.loss).to(dtype) if isinstance(self.loss, nn.Module) else self.loss
        with model_call(self.model, "with_dtype"):
            model = deep_copy(self.model).to(dtype)
        return TorchTwiceDifferentiable(model, loss)

    @property
    def parameters(self) -> List[torch.Tensor]:
        """All model parameters that require differentiating."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        """P, the number of elements of the parameters that require grad."""
        return sum(p.numel() for p in self.parameters)

    # ---- data --------------------------------------------------------------------------------
    def checked_batch(self, x, y, where: str) -> Tuple[Inputs, torch.Tensor]:
        """(x, y) on the model's device after the checks of :func:`twicediff.torch.batch.checked_batch`:
        x a tensor, a tuple / list (``model(*x)``) or a dict (``model(**x)``) whose tensors agree on
        the batch size, its floating tensors in the model's dtype."""
        return _batch.checked_batch(x, y, self.dtype, self.device, where)

    def check_vectors(self, v: torch.Tensor, where: str, name: str = "v", rows: str = "D") -> torch.Tensor:
        """``v`` as [P] or [rows, P] vectors in parameter space, on the model's device; a TypeError or
        ValueError naming ``where`` and ``name`` otherwise (wrong type, width or dtype)."""
        return check_vectors(v, self.num_params, self.dtype, self.device, where, name, rows)

    # ---- first and second derivatives -------------------------------------------------------
    def grad(self, x: Inputs, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        r"""∇θ L(x, y) as a flat [P] vector.

        ``x`` is a tensor, a tuple / list (the model is called ``model(*x)``) or a dict
        (``model(**x)``); see :mod:`twicediff.torch.batch`.

        With ``create_graph=True`` the result keeps its graph for a second differentiation (see
        :meth:`mvp`), and a floating x that does not require grad is made to (in place, as pyDVL
        does; for a tuple or dict x, each of its floating leaf tensors), so that mixed products
        ∇x∇θ L can be taken with ``backprop_on=x`` (or the list of x's floating tensors).
        """
        x, y = self.checked_batch(x, y, "grad")
        if create_graph:
            for t in _batch.floating_inputs(x):
                if not t.requires_grad and t.is_leaf:
                    t.requires_grad_(True)
        with model_call(self.model, "grad"), data_errors("grad", "", x, y):
            value = squeezed_loss(self.loss, _batch.call_model(self.model, x), y)
            params = self.parameters
            # A parameter the loss does not reach (unused, or used under torch.no_grad): zeros.
            return flat_grads(torch.autograd.grad(value, params, create_graph=create_graph, allow_unused=True), params)

    def hessian(self, x: Inputs, y: torch.Tensor, *, method: str = "auto",
                progress: bool = False) -> torch.Tensor:
        r"""The explicit Hessian ∇²θ L(x, y), [P, P] (see :meth:`add_hessian_`)."""
        P = self.num_params
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        return self.add_hessian_(x, y, out, method=method, progress=progress)

    def add_hessian_(self, x: Inputs, y: torch.Tensor, out: torch.Tensor, *, alpha: float = 1.0,
                     method: str = "auto", progress: bool = False) -> torch.Tensor:
        r"""``out += alpha · ∇²θ L(x, y)`` in place and returned; ``out`` [P, P] in the model's dtype
        and on its device (so that the Hessian of a mean over batches needs no P² temporary each).

        ``method="auto"``: for a model the native engine takes, assembled block by block from
        per-sample curvature (:func:`twicediff.torch.engines.hessian_assembly.assemble_hessian`, several
        times fewer flops than P products), otherwise as with ``"columns"``: from batched
        Hessian-vector products (:meth:`hvp`, engine ``"auto"``) on chunks of unit vectors.
        Either way the work is sized by the memory budget (:mod:`twicediff.memory`): memory is P²
        plus one chunk.
        """
        if method not in _hessian.HESSIAN_METHODS:
            raise ValueError(f"hessian: method must be one of {_hessian.HESSIAN_METHODS}, got {method!r}")
        x, y = self.checked_batch(x, y, "hessian")
        P = self.num_params
        if not isinstance(out, torch.Tensor) or out.shape != (P, P) or out.dtype != self.dtype \
                or out.device != self.device:
            got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) \
                else type(out).__name__
            raise ValueError(f"add_hessian_: out must be [P, P] = [{P}, {P}] {self.dtype} on {self.device}, "
                             f"got {got}")
        with model_call(self.model, "hessian"):
            return _hessian.add_hessian_(self, x, y, out, alpha=alpha, method=method, progress=progress)

    def mean_hessian(self, training_data, *, progress: bool = False) -> torch.Tensor:
        r"""The Hessian of the mean loss over the batches of ``training_data``,
        \(H = \sum_b (n_b / N) \nabla^2_\theta L(x_b, y_b)\), [P, P].

        For a model the native engine takes, the batches are prepared (frozen prefix applied) and
        assembled together, a group at a time (:func:`~twicediff.torch.engines.hessian_assembly.assemble_hessian_batches`:
        one pass over the P² result per block for the whole group, instead of one per batch); the
        group is cut where its prepared rows would exceed an eighth of the memory budget. Other
        models go batch by batch through :meth:`add_hessian_`.

        Raises:
            ValueError: ``training_data`` yields no points.
        """
        with model_call(self.model, "mean_hessian"):
            return _hessian.mean_hessian(self, training_data, progress=progress)

    @staticmethod
    def mvp(grad_xy: torch.Tensor, v: torch.Tensor,
            backprop_on: Union[torch.Tensor, Sequence[torch.Tensor]], *, progress: bool = False) -> torch.Tensor:
        r"""Second derivatives along directions: ``out[d] = ∂(v[d] · grad_xy) / ∂backprop_on``.

        Args:
            grad_xy: [P] gradient with its graph, typically ``grad(x, y, create_graph=True)``.
            v: [D, P] directions, or [P] for one (the output is then [1, M]).
            backprop_on: the parameters (→ Hessian-vector products) or an input x (→ mixed
                products ∇x∇θ L), a tensor or a list of tensors with M elements in all.
            progress: show a bar over the chunks of directions.

        Returns:
            [D, M], detached. Directions go through batched backward passes in chunks sized by
            the memory budget, or one by one where that is faster (see :func:`twicediff.torch.mvp.use_batched_backward`).

        Raises:
            GraphInputError: (a RuntimeError, as autograd raises, and a ValueError) a tensor of
                ``backprop_on`` does not require grad or grad_xy does not depend on it.
        """
        return batched_mvp(grad_xy, v, backprop_on, progress=progress)

    def hvp(self, x: Inputs, y: torch.Tensor, v: torch.Tensor, *, mode: str = "hessian",
            engine: str = "auto", progress: bool = False, expected_products: Optional[int] = None) -> torch.Tensor:
        r"""H(x, y) v for v [D, P] (→ [D, P]) or [P] (→ [P]), H the Hessian of the loss on (x, y).

        Args:
            mode: ``"hessian"`` (exact) or ``"gauss_newton"`` (the generalized Gauss-Newton matrix
                JᵀH_ℓJ, J the Jacobian of the model output, H_ℓ the Hessian of the loss in it).
            engine: ``"native"`` (twicediff's fused R-operator kernels, for Sequential stacks of
                Linear layers and elementwise activations under MSE / cross-entropy / BCE-with-logits,
                optionally behind a frozen prefix; x one tensor), ``"func"`` (torch.func
                forward-over-reverse, vmapped over chunks of directions), ``"autograd"`` (double
                backward), ``"loop"`` (one backward pass per direction), ``"compiled"``
                (torch.compile of the batched product), or ``"auto"``: the fastest of native (where
                the model qualifies), func, autograd and loop, measured on first use per shape class
                (engines/auto.py), with compiled added where ``expected_products`` repay compiling.
                ``TWICEDIFF_ENGINE`` sets what ``"auto"`` means.
            progress: show a bar over the chunks of directions.
            expected_products: products the caller expects on this model and batch shape in all
                (default: the enclosing ``expected_products`` block's, engines/amortise.py).

        Returns:
            v's shape: row d is H v[d] (or JᵀH_ℓJ v[d]), detached, in the model's dtype.

        Raises:
            TypeError, ValueError: v not [D, P] / [P] in the model's dtype; an unknown mode or
                engine; ``engine="native"`` for a model it cannot take (the message says why).

        Example:
            >>> import torch, torch.nn.functional as F
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
            >>> wrapped = TorchTwiceDifferentiable(model, F.cross_entropy)
            >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> v = torch.randn(5, wrapped.num_params)          # [D, P]
            >>> Hv = wrapped.hvp(x, y, v)
            >>> torch.allclose(Hv, v @ wrapped.hessian(x, y), atol=1e-5)
            True
        """
        v = self.check_vectors(v, "hvp")
        product = self.hvp_function(x, y, mode=mode, engine=engine, progress=progress,
                                    expected_products=expected_products)
        return product(v.unsqueeze(0))[0] if v.dim() == 1 else product(v)

    def hvp_function(self, x: Inputs, y: torch.Tensor, *, mode: str = "hessian", engine: str = "auto",
                     progress: bool = False, expected_products: Optional[int] = None) -> "BoundHvp":
        r"""``V ↦ H(x, y) V`` for V [D, P] in the model's dtype (→ [D, P]): :meth:`hvp` with the engine
        chosen and the batch prepared once (for the native engine, the frozen prefix applied), for
        many products on one batch. The trainable parameters' values are read at each call (a
        change of which parameters are trainable is refused: make a new function); the batch (or
        the prefix's output) is held until the function is dropped (``nbytes``). ``expected_products``
        as for :meth:`hvp`."""
        if mode not in MODES:
            raise ValueError(f"hvp: mode must be one of {MODES}, got {mode!r}")
        engine = select.resolve(engine)  # "auto" may stand for TWICEDIFF_ENGINE's engine
        expected = products_expected(expected_products, "hvp_function")
        x, y = self.checked_batch(x, y, "hvp")
        x, y = _batch.detached(x), y.detach()  # products are not differentiated further
        bound_params = self.num_params  # the native engine's plan is of these parameters

        def checked(V: torch.Tensor) -> torch.Tensor:
            P = self.num_params  # a walk over the parameters: once per call
            if P != bound_params:
                raise ValueError(f"hvp_function: the model's trainable parameters changed since this function was "
                                 f"made (P = {bound_params} then, {P} now: requires_grad was switched); "
                                 "make a new one with hvp_function")
            return _batch.check_vectors(V, P, self.dtype, self.device, "hvp_function", "V", dims=(2,))

        # preparing runs the model (or its frozen prefix) on the batch
        with model_call(self.model, "hvp"), data_errors("hvp", "", x, y):
            chosen, batch = select.prepare(engine, self.model, self.loss, x, y, expected_products=expected)
            bound = BoundHvp(chosen, batch, mode, self.device, progress=progress, check=checked,
                             errors=lambda: data_errors("hvp", "", x, y))
        return bound



    # ---- engines -----------------------------------------------------------------------------
    def native_unsupported_reason(self, x: Inputs, y: torch.Tensor) -> str:
        """"" when the native engine (fused HVP kernels, blockwise Hessian assembly) takes this model,
        loss and batch; otherwise why not, naming the module, loss option or input it cannot take
        (a tuple or dict x: the native engine takes one tensor).
        Raises BadBatchError (a ValueError) for a batch that is wrong for the model itself (a
        feature count or class index no engine can take)."""
        x, y = self.checked_batch(x, y, "native_unsupported_reason")
        try:
            with model_call(self.model, "native_unsupported_reason"):
                select.native_engine(self.model, self.loss, x, y)
        except NotNativeError as exc:
            return str(exc)
        return ""
