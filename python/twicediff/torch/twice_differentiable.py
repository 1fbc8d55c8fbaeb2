"""TorchTwiceDifferentiable: a torch model and loss, with gradients, Hessians and batched
Hessian-vector products of the loss with respect to the parameters that require grad."""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Callable, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..memory import chunk_size, get_memory_budget
from ..progress import progress_bar
from ..twice_differentiable import TwiceDifferentiable
from . import hvp as _hvp
from .hessian_assembly import assemble_hessian, assemble_hessian_batches
from .native_engine import BadBatchError, build_native_engine

__all__ = ["BoundHvp", "TorchTwiceDifferentiable", "data_errors"]

logger = logging.getLogger(__name__)

MODES = ("hessian", "gauss_newton")
ENGINES = ("auto", "native", "func", "autograd")
HESSIAN_METHODS = ("auto", "columns")

# What a model or loss raises on data it cannot take: a shape mismatch in a layer, a class index
# out of range, a target of the wrong dtype or length.
_DATA_ERRORS = (RuntimeError, IndexError, ValueError, TypeError)


def _batch_summary(x, y) -> str:
    """``x (B, ...) dtype, y (B, ...) dtype``, for error messages."""
    def one(name, t):
        return f"{name} {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else f"{name} {type(t).__name__}"
    return f"{one('x', x)}, {one('y', y)}"


@contextlib.contextmanager
def data_errors(where: str, name: str = "", x=None, y=None) -> Iterator[None]:
    """Re-raises an error of the model or loss (or a native kernel's check) on a batch as the same
    exception type with ``"{where}: the model or loss failed on {name} ({_batch_summary(x, y)}): "``
    before its message: torch's own messages (e.g. ``mat1 and mat2 shapes cannot be multiplied``)
    name neither the function nor the data. Nothing is formatted unless something fails. Nested
    uses keep the outermost ``where`` and ``name`` (the user's argument) and the innermost batch
    shapes (the batch that failed); out-of-memory errors pass unchanged."""
    try:
        yield
    except _DATA_ERRORS as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        original = getattr(exc, "_twicediff_original", exc)
        batch = getattr(exc, "_twicediff_batch", "") or (_batch_summary(x, y) if x is not None else "")
        data = f"{name} ({batch})" if name and batch else name or batch
        message = f"{where}: the model or loss failed on {data}: {original}"
        try:
            wrapped = type(original)(message)
        except Exception:  # a type that takes other arguments: the builtin one it derives from
            wrapped = next(t for t in _DATA_ERRORS if isinstance(original, t))(message)
        wrapped._twicediff_original, wrapped._twicediff_batch = original, batch
        raise wrapped from original


class TorchTwiceDifferentiable(TwiceDifferentiable[torch.Tensor]):
    r"""Wraps a ``torch.nn.Module`` and a loss \(L(\hat y, y)\).

    The loss of a batch is ``loss(torch.squeeze(model(x)), torch.squeeze(y))`` (pyDVL 0.7's
    convention) and derivatives are taken with respect to the parameters that require grad, in
    ``model.parameters()`` order, flattened into one vector of P elements.

    Args:
        model: the model; its parameters that require grad are differentiated.
        loss: a differentiable scalar loss mapping (prediction, target) to a 0-d tensor.

    Attributes:
        model, loss, device and dtype (of the first parameter).
    """

    def __init__(self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchTwiceDifferentiable: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"TorchTwiceDifferentiable: loss must be callable (prediction, target) -> scalar, "
                            f"got {type(loss).__name__}")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError(f"TorchTwiceDifferentiable: model {type(model).__name__} has no parameters")
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
        else a deep copy of the model cast to ``dtype`` (which parameters require grad is kept)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"with_dtype: dtype must be a floating torch.dtype, got {dtype!r}")
        if dtype == self.dtype:
            return self
        return TorchTwiceDifferentiable(copy.deepcopy(self.model).to(dtype), self.loss)

    @property
    def parameters(self) -> List[torch.Tensor]:
        """All model parameters that require differentiating."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        """P, the number of elements of the parameters that require grad."""
        return sum(p.numel() for p in self.parameters)

    # ---- data --------------------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor, y: torch.Tensor, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() > 0 and y.dim() > 0 and x.shape[0] != y.shape[0]:
            raise ValueError(f"{where}: x and y must hold the same number of points (first dimension), got "
                             f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}")
        if x.is_floating_point() and x.dtype != self.dtype:
            raise TypeError(f"{where}: x has dtype {x.dtype} but the model's parameters are {self.dtype}; "
                            f"convert one of them (x.to({self.dtype}) or model.to(...))")
        return x.to(self.device), y.to(self.device)

    def check_vectors(self, v: torch.Tensor, where: str, name: str = "v", rows: str = "D") -> torch.Tensor:
        """``v`` as [P] or [rows, P] vectors in parameter space, on the model's device; a TypeError or
        ValueError naming ``where`` and ``name`` otherwise (wrong type, width or dtype)."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(v).__name__}")
        P = self.num_params
        if v.dim() not in (1, 2) or v.shape[-1] != P:
            raise ValueError(f"{where}: {name} must be [{rows}, P] or [P] with P = {P} (the model's number of "
                             f"trainable parameters), got shape {tuple(v.shape)}")
        if v.dtype != self.dtype:
            raise TypeError(f"{where}: {name} has dtype {v.dtype} but the model's parameters are {self.dtype}")
        return v.to(self.device)

    # ---- first and second derivatives -------------------------------------------------------
    def grad(self, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        r"""∇θ L(x, y) as a flat [P] vector.

        With ``create_graph=True`` the result keeps its graph for a second differentiation (see
        :meth:`mvp`), and an ``x`` that does not require grad is made to (in place, as pyDVL does),
        so that mixed products ∇x∇θ L can be taken with ``backprop_on=x``.
        """
        x, y = self._to_device(x, y, "grad")
        if create_graph and not x.requires_grad:
            x = x.requires_grad_(True)
        with data_errors("grad", "", x, y):
            value = _hvp.squeezed_loss(self.loss, self.model(x), y)
            grads = torch.autograd.grad(value, self.parameters, create_graph=create_graph)
        return torch.cat([g.reshape(-1) for g in grads])

    def hessian(self, x: torch.Tensor, y: torch.Tensor, *, method: str = "auto",
                progress: bool = False) -> torch.Tensor:
        r"""The explicit Hessian ∇²θ L(x, y), [P, P] (see :meth:`add_hessian_`)."""
        P = self.num_params
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        return self.add_hessian_(x, y, out, method=method, progress=progress)

    def add_hessian_(self, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, *, alpha: float = 1.0,
                     method: str = "auto", progress: bool = False) -> torch.Tensor:
        r"""``out += alpha · ∇²θ L(x, y)`` in place and returned; ``out`` [P, P] in the model's dtype
        and on its device (so that the Hessian of a mean over batches needs no P² temporary each).

        ``method="auto"``: for a model the native engine takes, assembled block by block from
        per-sample curvature (:func:`twicediff.torch.hessian_assembly.assemble_hessian`, several
        times fewer flops than P products), otherwise as with ``"columns"``: from batched
        Hessian-vector products (:meth:`hvp`, engine ``"auto"``) on chunks of unit vectors.
        Either way the work is sized by the memory budget (:mod:`twicediff.memory`): memory is P²
        plus one chunk.
        """
        if method not in HESSIAN_METHODS:
            raise ValueError(f"hessian: method must be one of {HESSIAN_METHODS}, got {method!r}")
        x, y = self._to_device(x, y, "hessian")
        P = self.num_params
        if not isinstance(out, torch.Tensor) or out.shape != (P, P) or out.dtype != self.dtype \
                or out.device != self.device:
            got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) \
                else type(out).__name__
            raise ValueError(f"add_hessian_: out must be [P, P] = [{P}, {P}] {self.dtype} on {self.device}, "
                             f"got {got}")
        with data_errors("hessian", "", x, y):
            native, prepared, _ = self._native_engine(x, y) if method == "auto" else (None, None, "")
            if native is not None:
                return assemble_hessian(native, prepared, out, alpha=alpha)
            # A chunk of c columns holds the c unit directions, their products and the engine's work.
            per_column = 2 * P * out.element_size() + self._bytes_per_direction(x)
            step = min(_hvp.MAX_DIRECTIONS_PER_CHUNK,
                       chunk_size(P, per_column, self.device, what="Hessian columns"))
            for start in progress_bar(range(0, P, step), progress, desc="hessian", unit="chunk"):
                stop = min(P, start + step)
                eye = torch.zeros(stop - start, P, dtype=self.dtype, device=self.device)
                eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
                # H is symmetric: the products H e_j are its rows as well as its columns.
                out[start:stop].add_(self.hvp(x, y, eye), alpha=alpha)
            return out

    def mean_hessian(self, training_data, *, progress: bool = False) -> torch.Tensor:
        r"""The Hessian of the mean loss over the batches of ``training_data``,
        \(H = \sum_b (n_b / N) \nabla^2_\theta L(x_b, y_b)\), [P, P].

        For a model the native engine takes, the batches are prepared (frozen prefix applied) and
        assembled together, a group at a time (:func:`~twicediff.torch.hessian_assembly.assemble_hessian_batches`:
        one pass over the P² result per block for the whole group, instead of one per batch); the
        group is cut where its prepared rows would exceed an eighth of the memory budget. Other
        models go batch by batch through :meth:`add_hessian_`.

        Raises:
            ValueError: ``training_data`` yields no points.
        """
        from .operator import check_training_data  # the operator module imports this one

        check_training_data(training_data, "mean_hessian")
        P = self.num_params
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        room = get_memory_budget(self.device) // 8
        group: List[Tuple[Tuple[torch.Tensor, torch.Tensor], float]] = []
        held, total, engine = 0, 0, None

        def flush():
            nonlocal group, held
            if group:
                assemble_hessian_batches(engine, group, out)
            group, held = [], 0

        for i, (x, y) in enumerate(progress_bar(training_data, progress, desc="hessian", unit="batch")):
            x, y = self._to_device(x, y, "mean_hessian")
            n = int(x.shape[0]) if x.dim() > 0 else 1
            total += n
            with data_errors("mean_hessian", f"training_data batch {i}", x, y):
                native, prepared, _ = self._native_engine(x, y)
                if native is None:
                    self.add_hessian_(x, y, out, alpha=n)
                    continue
            engine = native
            size = sum(t.numel() * t.element_size() for t in prepared)
            if group and held + size > room:
                flush()
            group.append((prepared, float(n)))
            held += size
        flush()
        if total == 0:
            raise ValueError("mean_hessian: training_data yielded no points")
        return out.div_(total)

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
            the memory budget, or one by one where that is faster (see ``hvp.use_batched_backward``).
        """
        return _hvp.batched_mvp(grad_xy, v, backprop_on, progress=progress)

    def hvp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, mode: str = "hessian",
            engine: str = "auto", progress: bool = False) -> torch.Tensor:
        r"""H(x, y) v for v [D, P] (→ [D, P]) or [P] (→ [P]), H the Hessian of the loss on (x, y).

        Args:
            mode: ``"hessian"`` (exact) or ``"gauss_newton"`` (the generalized Gauss-Newton matrix
                JᵀH_ℓJ, J the Jacobian of the model output, H_ℓ the Hessian of the loss in it).
            engine: ``"native"`` (twicediff's fused R-operator kernels, for Sequential stacks of
                Linear layers and elementwise activations under MSE / cross-entropy / BCE-with-logits,
                optionally behind a frozen prefix), ``"func"`` (torch.func forward-over-reverse,
                vmapped over chunks of directions), ``"autograd"`` (double backward), or
                ``"auto"``: native when the model qualifies, else func, else autograd.
            progress: show a bar over the chunks of directions.
        """
        v = self.check_vectors(v, "hvp")
        product = self.hvp_function(x, y, mode=mode, engine=engine, progress=progress)
        return product(v.unsqueeze(0))[0] if v.dim() == 1 else product(v)

    def hvp_function(self, x: torch.Tensor, y: torch.Tensor, *, mode: str = "hessian", engine: str = "auto",
                     progress: bool = False) -> "BoundHvp":
        r"""``V ↦ H(x, y) V`` for V [D, P] in the model's dtype (→ [D, P]): :meth:`hvp` with the engine
        chosen and the batch prepared once (for the native engine, the frozen prefix applied), for
        many products on one batch. The trainable parameters are read at each call; the batch (or
        the prefix's output) is held until the function is dropped (``nbytes``)."""
        if mode not in MODES:
            raise ValueError(f"hvp: mode must be one of {MODES}, got {mode!r}")
        if engine not in ENGINES:
            raise ValueError(f"hvp: engine must be one of {ENGINES}, got {engine!r}")
        x, y = self._to_device(x, y, "hvp")
        x, y = x.detach(), y.detach()  # products are not differentiated further
        compute, per_direction, nbytes, most = self._engine(engine, x, y)

        def product(V: torch.Tensor) -> torch.Tensor:
            with data_errors("hvp", "", x, y):
                return compute(V, mode)

        def checked(V: torch.Tensor) -> torch.Tensor:
            V = self.check_vectors(V, "hvp_function", "V")
            if V.dim() != 2:
                raise ValueError(f"hvp_function: V must be [D, P] with P = {self.num_params}, got shape "
                                 f"{tuple(V.shape)}")
            return V

        return BoundHvp(product, per_direction, nbytes, self.device, progress, max_directions=most,
                        check=checked)

    # ---- engines -----------------------------------------------------------------------------
    def native_unsupported_reason(self, x: torch.Tensor, y: torch.Tensor) -> str:
        """"" when the native engine (fused HVP kernels, blockwise Hessian assembly) takes this model,
        loss and batch; otherwise why not, naming the module, loss option or input it cannot take.
        Raises BadBatchError (a ValueError) for a batch that is wrong for the model itself (a
        feature count or class index no engine can take)."""
        x, y = self._to_device(x, y, "native_unsupported_reason")
        return self._native_engine(x, y)[2]

    def _native_engine(self, x: torch.Tensor, y: torch.Tensor):
        """(the native engine, its prepared batch, "") for this model, loss and batch (the frozen
        prefix run once), or (None, None, the reason)."""
        native, reason = build_native_engine(self.model, self.loss)
        if native is None:
            return None, None, reason
        try:
            return native, native.prepare(x, y), ""
        except BadBatchError:
            raise
        except ValueError as exc:
            return None, None, str(exc)

    def _engine(self, engine: str, x: torch.Tensor, y: torch.Tensor):
        """(compute(v, mode) -> [D, P] on the batch (x, y), bytes one direction needs, bytes of batch data
        held, most directions per chunk: ``MAX_DIRECTIONS_PER_CHUNK`` for the native engine, about
        ``GENERIC_CHUNK_BYTES`` of working memory but at least ``MIN_GENERIC_DIRECTIONS`` for the
        others; the memory budget may cut chunks further)."""
        # Both the native engine's preparation (BadBatchError) and the generic estimate (one
        # forward pass) run the model on the batch.
        with data_errors("hvp", "", x, y):
            native, prepared, reason = self._native_engine(x, y) if engine in ("auto", "native") \
                else (None, None, "")
            per_direction = self._bytes_per_direction(x) if native is None and engine != "native" else 0
        if native is not None:
            # the chunks of directions share the batch prepared here
            return (lambda v, mode: native.hvp_prepared(prepared, v, mode)), \
                native.bytes_per_direction(x.shape[0]), sum(t.numel() * t.element_size() for t in prepared), \
                _hvp.MAX_DIRECTIONS_PER_CHUNK
        if engine == "native":
            raise ValueError(f"hvp: engine='native' cannot take this model: {reason}")
        most = _hvp.generic_directions_per_chunk(per_direction)
        held = sum(t.numel() * t.element_size() for t in (x, y))
        if engine == "autograd":
            return (lambda v, mode: _hvp.autograd_hvp(self.model, self.loss, x, y, v, mode)), per_direction, held, most
        if engine == "func":
            return (lambda v, mode: _hvp.func_hvp(self.model, self.loss, x, y, v, mode)), per_direction, held, most

        def func_else_autograd(v, mode):
            try:
                return _hvp.func_hvp(self.model, self.loss, x, y, v, mode)
            except (RuntimeError, NotImplementedError) as exc:  # an op without a torch.func rule
                logger.info("hvp: torch.func engine failed (%s); using autograd", exc)
                return _hvp.autograd_hvp(self.model, self.loss, x, y, v, mode)

        return func_else_autograd, per_direction, held, most

    def _bytes_per_direction(self, x: torch.Tensor) -> int:
        """Estimate for the generic engines: a direction carries tangents of every activation
        (forward) and cotangents (backward), about 6 copies of the activations, plus 3 copies of
        the parameters."""
        elem = torch.finfo(self.dtype).bits // 8
        return elem * (3 * self.num_params + 6 * _activation_numel(self.model, x))


_activation_cache: dict = {}


def _activation_numel(model: nn.Module, x: torch.Tensor) -> int:
    """Elements of all leaf-module outputs for a batch shaped like x (one no_grad forward pass,
    cached by model identity and input shape)."""
    key = (id(model), tuple(x.shape), x.dtype, x.device)
    hit = _activation_cache.get(key)
    if hit is not None:
        return hit
    total = [x.numel()]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + (o.numel() if isinstance(o, torch.Tensor) else 0)))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if len(_activation_cache) > 256:
        _activation_cache.clear()
    _activation_cache[key] = total[0]
    return total[0]


class BoundHvp:
    """``V ↦ H V`` on one batch (:meth:`TorchTwiceDifferentiable.hvp_function`): V [D, P] goes
    through the engine in chunks of directions sized by the memory budget.

    Attributes:
        bytes_per_direction: the engine's working memory for one direction.
        max_directions: the most directions in one chunk, whatever the budget.
        nbytes: bytes of batch data the function holds (x and y, or the native engine's prepared rows).
    """

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor], bytes_per_direction: int, nbytes: int,
                 device: torch.device, progress: bool = False, max_directions: int = _hvp.MAX_DIRECTIONS_PER_CHUNK,
                 check: Callable[[torch.Tensor], torch.Tensor] = lambda V: V):
        self._compute = compute
        self._check = check
        self.max_directions = int(max_directions)
        self.bytes_per_direction = int(bytes_per_direction)
        self.nbytes = int(nbytes)
        self._device = device
        self._progress = progress

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        V = self._check(V)
        D = V.shape[0]
        if D == 0:
            return torch.empty_like(V)
        step = min(self.max_directions, chunk_size(D, self.bytes_per_direction, self._device, what="hvp directions"))
        if step >= D and not self._progress:  # one chunk: the engine's own result, without a copy
            return self._compute(V)
        out = torch.empty_like(V)
        for start in progress_bar(range(0, D, step), self._progress, desc="hvp", unit="chunk"):
            out[start:start + step] = self._compute(V[start:start + step])
        return out
