r"""The curvature of a model's mean training loss as a linear operator, A = H + λI (or G + λI with
G the generalized Gauss-Newton matrix), applied to blocks of vectors with one pass over the data.

H is the Hessian of the mean loss over all N training points: the batch Hessians weighted by batch
size, \(H = \sum_b (n_b / N) H_b\), each \(H_b\) the Hessian of the batch's loss as in
:meth:`TorchTwiceDifferentiable.grad`. Every product goes through the batched
:meth:`TorchTwiceDifferentiable.hvp` (the native engine when the model qualifies), so a block of D
vectors costs one pass over the loader, not D. This is the one place that averages batch products:
the solvers in :mod:`twicediff.torch.solvers` use it, and ``to_scipy()`` hands it to scipy.

The first pass keeps each batch's product function (:meth:`TorchTwiceDifferentiable.hvp_function`:
the batch on the model's device in the product dtype, the engine chosen, a native model's frozen
prefix already applied) while the batches take at most a quarter of the memory budget, and later
passes use those: an iterative solver makes tens of passes, and re-reading a DataLoader of small
samples, or re-running a large frozen feature extractor, costs about as much as the products
themselves. Larger data is read from the loader on every pass.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, TypeVar

import numpy as np
import torch

from .. import distributed as _distributed
from ..memory import KeptWhileFits, reserved
from ..progress import progress_bar
from ..errors import _DATA_ERRORS, data_errors
from .batch import check_training_data, move_inputs, num_points, split_batch
from .finite import CAUSE, all_finite
from .engines.amortise import products_expected
from .engines.base import MODES
from .engines.bound_hvp import BoundHvp
from .twice_differentiable import TorchTwiceDifferentiable

__all__ = ["HessianOperator", "hessian_operator"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class HessianOperator:
    r"""A = H + λI on P-dimensional vectors; H the (Gauss-Newton) Hessian of the mean training loss.

    Args:
        dtype: the dtype the products are computed in; default the model's. Another dtype computes
            with a copy of the model in it (:meth:`TorchTwiceDifferentiable.with_dtype`) and casts
            the floating tensors of each batch: float64 products of a float32 model cost about
            twice as much on a CPU but resolve residuals far below float32's rounding. A loss that
            is a module is cast with the model; where the model or loss still fails in ``dtype`` on
            the first pass (a forward that builds tensors of a fixed dtype), the products are
            computed in the model's own dtype instead, with one warning.
        expected_products: products expected with each batch's shape over the operator's life
            (rows × passes); where they repay compiling, ``engine="auto"`` considers the compiled
            engine (twicediff.torch.engines.amortise).

    Attributes:
        model, training_data, hessian_perturbation (λ), mode, shape (P, P), dtype (of the products),
        device.
        num_points: N, the number of training points seen by the last pass (None before any).
        num_passes: how many passes over the data this operator has made.
        cached: whether the batches are held in memory (decided by the first pass; see the module
            docstring). The data and the frozen prefix's weights must then not change between passes.
    """

    def __init__(self, model: TorchTwiceDifferentiable, training_data: Iterable, *,
                 hessian_perturbation: float = 0.0, mode: str = "hessian", progress: bool = False,
                 dtype: Optional[torch.dtype] = None, expected_products: Optional[int] = None):
        # With a process group: the ranks must agree on P, dtype, mode and λ (twicediff.distributed).
        self._group = _distributed.enter("hessian_operator", model, mode=mode,
                                         hessian_perturbation=hessian_perturbation, dtype=dtype)
        if not isinstance(model, TorchTwiceDifferentiable):
            raise TypeError(f"hessian_operator: model must be a TorchTwiceDifferentiable, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"hessian_operator: mode must be one of {MODES}, got {mode!r}")
        check_training_data(training_data, "hessian_operator")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"hessian_operator: dtype must be None or a floating torch.dtype, got {dtype!r}")
        lam = float(hessian_perturbation)
        if not np.isfinite(lam):
            raise ValueError(f"hessian_operator: hessian_perturbation must be a finite number, got {hessian_perturbation!r}")
        self._own = model
        self.model = model if dtype is None else model.with_dtype(dtype)
        self.training_data = training_data
        self.hessian_perturbation = lam
        self.mode = mode
        self.progress = progress
        P = model.num_params
        self.shape: Tuple[int, int] = (P, P)
        self.dtype = self.model.dtype
        self.device = self.model.device
        self.num_points: Optional[int] = None
        self.num_passes = 0
        self.expected_products = products_expected(expected_products, "hessian_operator")
        self._products: List[Tuple[int, BoundHvp]] = []
        self._kept_bytes = 0  # bytes of the batches kept so far (held between the products)
        # (the loader's iterator, n, product function) of a batch read ahead by bytes_per_direction
        self._ahead: Optional[Tuple[Iterator, int, BoundHvp]] = None

    def apply_rows(self, V: torch.Tensor) -> torch.Tensor:
        r"""A applied to each row of V: [D, P] → [D, P], \(\sum_b (n_b/N) H_b V_d + λ V_d\).

        One pass over the data for all D rows. V may have any floating dtype: the products are taken
        in the model's dtype and returned in V's dtype (on the model's device).
        """
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.shape[0]:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"HessianOperator.apply_rows: V must be [D, P] with P = {self.shape[0]}, got {got}")
        return self._in_own_dtype_on_failure(lambda: self._apply_rows(V))

    def _in_own_dtype_on_failure(self, compute: Callable[[], T]) -> T:
        """``compute()``; where it fails in the product dtype before any pass has completed, the
        products move to the model's own dtype from then on and ``compute()`` runs again.

        The model or loss may not run in the product dtype (a loss or forward that builds tensors of
        a fixed dtype): computing in the model's own dtype is what product_dtype=None does. Said
        only when that works; bad data fails there too, with its own error."""
        try:
            return compute()
        except _DATA_ERRORS as exc:
            if self.model is self._own or self.num_passes > 0:
                raise
            tried = self.dtype
            self.model, self.dtype, self._products, self._ahead = self._own, self._own.dtype, [], None
            out = compute()
            logger.warning("HessianOperator: products in %s failed (%s); computing them in the model's dtype %s",
                           tried, str(exc).splitlines()[0][:300], self.dtype)
            return out

    def _apply_rows(self, V: torch.Tensor) -> torch.Tensor:
        out_dtype = V.dtype
        V = V.to(self.device)
        Vm = V.to(self.dtype)
        if V.shape[0] == 0 and self._group is None:  # with a group, every rank still takes part
            return torch.zeros(V.shape, dtype=out_dtype, device=self.device)
        # With a process group: one local pass, then one all-reduce of the sums and counts; every rank
        # must apply the operator to the same block (checked by the exchange, see twicediff.distributed).
        copy = Vm.numel() * Vm.element_size() if Vm is not V else 0  # V in the product dtype, held meanwhile
        acc, total = _distributed.sum_over_ranks(self._group, "HessianOperator",
                                                 lambda: self._local_sums(Vm, out_dtype, copy), key=V.shape[0],
                                                 check=V)
        if total == 0:
            if self.num_passes > 0:  # it held points on the first pass
                raise TypeError("HessianOperator: training_data yielded no points on a later pass: it is a one-shot "
                                f"iterator ({type(self.training_data).__name__}), read up by the first pass, and its "
                                "batches did not fit the memory budget to be kept; every product needs a pass: pass a "
                                "DataLoader or a list of (x, y) batches")
            raise ValueError("HessianOperator: training_data yielded no points; the Hessian of the mean loss "
                             "needs at least one batch")
        self.num_points = total
        self.num_passes += 1
        acc.div_(total)
        if self.hessian_perturbation:
            acc.add_(V, alpha=self.hessian_perturbation)
        return acc

    def _local_sums(self, Vm: torch.Tensor, out_dtype: torch.dtype, held: int = 0) -> Tuple[torch.Tensor, int]:
        r"""(\(\sum_b n_b H_b V\) in ``out_dtype``, the number of points) over this process's data.

        The sum starts as the first batch's product (scaled in place) and takes the others' in
        place, in their dtype: besides the sum, only one batch's product is held at a time. The
        products' chunks are sized against the budget less the sum, ``held`` bytes and the batches
        kept so far."""
        acc: Optional[torch.Tensor] = None
        total = 0
        acc_bytes = Vm.shape[0] * Vm.shape[1] * torch.empty(0, dtype=out_dtype).element_size()
        passing = self._pass(acc_bytes + held)
        # A non-finite product of finite directions is the data's (or the loss's) doing: said here,
        # naming the batch, or CG would iterate on NaN to maxiter and return it.
        finite_directions = all_finite(Vm)
        for i, (n, product) in enumerate(progress_bar(passing, self.progress, desc="hvp pass", unit="batch")):
            with data_errors("HessianOperator", f"training_data batch {i}"), \
                    reserved(acc_bytes + held + self._kept_bytes):  # shapes: from hvp's own
                part = product(Vm)
            if finite_directions and not all_finite(part):
                raise ValueError(f"HessianOperator: the Hessian products on training_data batch {i} hold NaN or inf: "
                                 f"the loss or its curvature is not finite on some of its points ({CAUSE})")
            if acc is None:
                acc = part.to(out_dtype).mul_(n)
            else:
                acc.add_(part, alpha=n)
            del part
            total += n
        if acc is None:
            acc = torch.zeros(Vm.shape, dtype=out_dtype, device=self.device)
        return acc, total

    def bytes_per_direction(self) -> int:
        """The working memory one direction of a product takes (the engine's estimate,
        :attr:`BoundHvp.bytes_per_direction`): the largest over the kept batches, else that of the
        loader's first batch, prepared to tell and handed to the next pass, which goes on with the
        same iterator. Solvers size their groups of right-hand sides with it."""
        if self._products:
            return max(product.bytes_per_direction for _, product in self._products)
        if self._ahead is not None:
            return self._ahead[2].bytes_per_direction
        # The next pass goes on from this batch and this iterator (a one-shot iterable is read once).
        batches = iter(self.training_data)
        batch = next(batches, None)
        if batch is None:
            return 0
        self._ahead = self._in_own_dtype_on_failure(lambda: (batches, *self._prepared(0, batch)))
        return self._ahead[2].bytes_per_direction

    def _prepared(self, i: int, batch) -> Tuple[int, BoundHvp]:
        """(n, product function) of the loader's batch ``i``."""
        x, y = (self._moved(t) for t in split_batch(batch, f"HessianOperator (training_data batch {i})"))
        with data_errors("HessianOperator", f"training_data batch {i}", x, y):
            product = self.model.hvp_function(x, y, mode=self.mode, expected_products=self.expected_products)
        return num_points(x), product  # x checked by hvp_function

    @property
    def model_copy_bytes(self) -> int:
        """Bytes of the copy of the model in the product dtype (0 when the products use the model)."""
        if self.model is self._own:
            return 0
        return sum(p.numel() * p.element_size() for p in self.model.model.parameters())

    def _pass(self, beside: int = 0) -> Iterator[Tuple[int, BoundHvp]]:
        """(n, V ↦ H_b V) of each batch of one pass: from the cache, or from the loader (filling the
        cache on the first pass while the batches fit a quarter of the budget and leave one
        direction of their products room beside ``beside`` bytes held for the pass)."""
        if self._products:
            self._kept_bytes = sum(product.nbytes for _, product in self._products)
            yield from self._products
            return
        keep = KeptWhileFits(self.device, beside) if self.num_passes == 0 else None
        self._kept_bytes = 0
        for i, n, product in self._prepared_batches():
            if keep is not None:
                keep.offer((n, product), product.nbytes, product.bytes_per_direction)
                self._kept_bytes = keep.nbytes
            yield n, product
        if keep is not None and keep.items:
            self._products = keep.items

    def _prepared_batches(self) -> Iterator[Tuple[int, int, BoundHvp]]:
        """(i, n, product function) of every batch of the loader; the first from
        :meth:`bytes_per_direction`'s look ahead when it took one (it read it from the iterator this
        pass goes on with)."""
        ahead, self._ahead = self._ahead, None
        batches = iter(self.training_data) if ahead is None else ahead[0]
        i = 0
        if ahead is not None:
            yield 0, ahead[1], ahead[2]
            i = 1
        for i, batch in enumerate(batches, start=i):
            yield (i, *self._prepared(i, batch))

    def _moved(self, t):
        """x or y of a batch (a tensor, tuple, list or dict) with its tensors on the model's device,
        the floating ones in the product dtype."""
        return move_inputs(t, self.device, self.dtype)

    @property
    def cached(self) -> bool:
        """Whether the batches' product functions are kept (see the module docstring)."""
        return bool(self._products)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A v for v [P] → [P]."""
        if not isinstance(v, torch.Tensor) or v.shape != (self.shape[0],):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"HessianOperator.matvec: v must be [P] = [{self.shape[0]}], got {got}")
        return self.apply_rows(v.unsqueeze(0))[0]

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """A X for X [P, K] → [P, K] (one pass over the data for all K columns)."""
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[0] != self.shape[0]:
            got = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"HessianOperator.matmat: X must be [P, K] with P = {self.shape[0]}, got {got}")
        return self.apply_rows(X.T).T

    def to_scipy(self):
        """A as a ``scipy.sparse.linalg.LinearOperator`` (matvec, matmat, rmatvec: A is symmetric) on
        numpy arrays, computed in the model's dtype on its device and returned as numpy arrays."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype

        def rows(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.ascontiguousarray(X), device=self.device).to(self.dtype)
            return self.apply_rows(V).cpu().numpy()

        def mv(v):
            return rows(np.asarray(v).reshape(1, -1))[0]

        def mm(X):
            return rows(np.asarray(X).T).T

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np_dtype)


def hessian_operator(model: TorchTwiceDifferentiable, training_data: Iterable, *, hessian_perturbation: float = 0.0,
                     mode: str = "hessian", progress: bool = False, dtype: Optional[torch.dtype] = None,
                     expected_products: Optional[int] = None) -> HessianOperator:
    r"""A = H + λI for H the Hessian (``mode="hessian"``) or Gauss-Newton matrix (``"gauss_newton"``)
    of the model's mean loss over ``training_data``; see :class:`HessianOperator`.

    ``matvec`` ([P] → [P]) and ``matmat`` ([P, K] → [P, K]) take torch tensors, one pass over the
    data per call; ``to_scipy()`` gives a ``scipy.sparse.linalg.LinearOperator`` for scipy's cg,
    minres, eigsh, ...; ``dtype`` the dtype of the products (default the model's).
    """
    return HessianOperator(model, training_data, hessian_perturbation=hessian_perturbation, mode=mode,
                           progress=progress, dtype=dtype, expected_products=expected_products)
