r"""K-FAC / EK-FAC factors: fit once over a DataLoader, apply to many gradients, save and load.

Per tracked layer l (see :mod:`.layers`), with N samples, sample n having tokens t:

    A_l = (1 / Σ_n T_n) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ      [I', I']  (ā: input with an implied trailing 1)
    S_l = (1 / N)       Σ_{n,t} g_{n,t} g_{n,t}ᵀ      [O, O]    (g: gradient of Σ_n ℓ_n at the output)

(the "expand" form of K-FAC for layers with shared tokens: for one token per sample it is the
usual A = E[ā āᵀ], S = E[g gᵀ], and F_l ≈ A_l ⊗ S_l approximates the layer's block of
F = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ, G_n = Σ_t g_{n,t} ā_{n,t}ᵀ). A_l = Q_A diag(λ_A) Q_Aᵀ and
S_l = Q_S diag(λ_S) Q_Sᵀ in float64. K-FAC's eigenvalues are λ_S λ_Aᵀ; EK-FAC replaces them by
the exact second moments of the per-sample gradients in that basis (George et al., 2018):

    Λ̃_l = (1/N) Σ_n (Q_Sᵀ G_n Q_A)²     [O, I']   (a second pass over the data, or over the
                                                first pass's captures kept in memory: :mod:`.passes`)

The loss convention (Σ_n ℓ_n, mean-reduction scaling) and the Fisher types are those of
:mod:`.batches`. Fitting leaves the model as it was: hooks are removed, parameters, buffers and
their ``.grad`` are not touched (gradients are taken with ``torch.autograd.grad``, to the layers' outputs), and the
train/eval mode is restored. No [N, P] or [P, P] tensor is formed: per batch only the layers'
inputs and output gradients, and [O, I'] per sample for a bounded chunk of samples.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from ... import distributed as _distributed
from ...progress import progress_bar
from ...ops import kfac as _kops
from . import batches as _b
from .eigen import symmetric_eigh
from .inverse import GradsLike, ParameterLayout, _as_blocks, blocks_to_layout, layer_blocks, precondition_block
from .layers import (DEFAULT_MAX_FACTOR_DIM, TrackedLayer, find_layers, report_left_out, report_shared_uses,
                     trainable_parameters)
from .passes import CaptureCache, batch_captures

__all__ = ["KFACFactors", "fit_factors", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("kfac", "ekfac")
_STATE_VERSION = 1


def _covariance_accumulate(out, x, weights, bias):
    return _kops.covariance_accumulate(out, x, weights, bias)


def _eigen_correction_accumulate(out, g, a, q_s, q_a, weights, bias):
    return _kops.eigen_correction_accumulate(out, g, a, q_s, q_a, weights, bias)


class _ModelState:
    """Restores the model's train/eval mode on exit (parameters and buffers are never written)."""

    def __init__(self, model: nn.Module, eval_mode: bool):
        self.model, self.eval_mode = model, eval_mode

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        if self.eval_mode:
            self.model.eval()
        return self

    def __exit__(self, *exc):
        for m, t in self.modes:
            m.training = t


class KFACFactors:
    """Kronecker factors, their eigendecompositions and (EK-FAC) corrected eigenvalues per layer.

    Build with :meth:`fit` (or :func:`fit_factors`); apply with :meth:`solve`; persist with
    :meth:`state_dict` / :meth:`from_state_dict` (plain tensors, lists and numbers: ``torch.save``
    compatible); move with :meth:`to`.

    Attributes:
        layers: the tracked layers (:class:`TrackedLayer`), in module order.
        layout: the model's flat parameter layout at fit time (:class:`ParameterLayout`).
        A, S: name -> the normalised factors (float64, or ``factor_dtype``).
        eig_A, Q_A, eig_S, Q_S: name -> eigenvalues (ascending, ≥ 0; float64) and eigenvectors
            (float64, or ``factor_dtype``).
        corrected: name -> Λ̃ [O, I'] (float64), or None when fitted without the EK-FAC pass.
        num_samples: N; num_tokens: name -> Σ_n T_n; fisher_type, reduction, seed.
        left_out: the trainable parameters outside the tracked layers.
    """

    def __init__(self, layers: List[TrackedLayer], layout: ParameterLayout):
        self.layers = list(layers)
        self.layout = layout
        self.A: Dict[str, torch.Tensor] = {}
        self.S: Dict[str, torch.Tensor] = {}
        self.eig_A: Dict[str, torch.Tensor] = {}
        self.Q_A: Dict[str, torch.Tensor] = {}
        self.eig_S: Dict[str, torch.Tensor] = {}
        self.Q_S: Dict[str, torch.Tensor] = {}
        self.corrected: Optional[Dict[str, torch.Tensor]] = None
        self.num_samples = 0
        self.num_tokens: Dict[str, int] = {}
        self.fisher_type = "empirical"
        self.reduction = "mean"
        self.seed = 0
        inside = {n for t in self.layers for n in (t.weight_name, t.bias_name) if n}
        self.left_out = [n for n in layout.names if n not in inside]

    # ---- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, model: nn.Module, loss: Callable, data: Iterable, *,
            layers: Optional[Iterable[Union[str, nn.Module]]] = None, fisher_type: str = "empirical",
            reduction: str = "mean", ekfac: bool = True, seed: int = 0,
            sample_targets: Optional[Callable] = None, accumulate_dtype: Optional[torch.dtype] = None,
            token_mask: Optional[Callable[[Any], torch.Tensor]] = None, eval_mode: bool = True,
            max_factor_dim: Optional[int] = DEFAULT_MAX_FACTOR_DIM, factor_dtype: Optional[torch.dtype] = None,
            progress: bool = False) -> "KFACFactors":
        """Fit the factors of ``model`` under ``loss`` over ``data``.

        Args:
            model: any ``nn.Module``; its tracked layers (``layers``, default every Linear / Conv1d / Conv2d
                whose parameters require grad) get factors; the rest is reported and left out.
            loss: ``loss(output, target) -> scalar`` on a batch (e.g. ``F.cross_entropy``).
            data: an iterable of ``(x, y)`` batches (a DataLoader); ``x`` a tensor, tuple or dict.
            fisher_type: "empirical" (true labels), "true" (labels sampled from the model) or "ggn"
                (the Gauss-Newton matrix, exact in the loss Hessian: cross-entropy and MSE).
            reduction: "mean" if ``loss`` averages over the batch's samples, "sum" if it sums.
            ekfac: also run the second pass for EK-FAC's corrected eigenvalues.
            seed: seeds the label sampling of the true Fisher (reproducible).
            sample_targets: ``(output, generator) -> target`` for the true Fisher of another loss.
            accumulate_dtype: dtype of the running sums (default float64 for a float64 model,
                else float32); eigendecompositions are always float64.
            factor_dtype: dtype of A, S, Q_A, Q_S once decomposed in float64 (default float64;
                float32 halves the factors' memory and loses nothing for a float32 model, whose
                gradients are preconditioned in float32). Eigenvalues and Λ̃ stay float64.
            token_mask: ``token_mask(x) -> [B, *positions]`` (bool, or 0/1 floats) marking the
                tokens that count, e.g. the attention mask of padded sequences: applied to every
                Linear layer whose input is [B, *positions, d]; a masked token is left out of A, S
                and the EK-FAC per-sample sums, and A is normalised by the weight of the tokens kept.
            max_factor_dim: without ``layers``, leave out (and log) layers whose A or S would be
                wider than this (see :func:`find_layers`); None for no limit.
            eval_mode: fit with the model in eval mode (dropout off, batch-norm statistics frozen);
                the mode is restored afterwards.
            progress: show progress bars.
        """
        where = "KFACFactors.fit"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"{where}: loss must be callable (output, target) -> scalar, got {type(loss).__name__}")
        if fisher_type not in _b.FISHER_TYPES:
            raise ValueError(f"{where}: fisher_type must be one of {_b.FISHER_TYPES}, got {fisher_type!r}")
        if reduction not in _b.REDUCTIONS:
            raise ValueError(f"{where}: reduction must be one of {_b.REDUCTIONS}, got {reduction!r}")
        factor_dtype = torch.float64 if factor_dtype is None else factor_dtype
        if factor_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{where}: factor_dtype must be torch.float32 or torch.float64, got {factor_dtype!r}")
        if accumulate_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"{where}: accumulate_dtype must be None, torch.float32 or torch.float64, got "
                             f"{accumulate_dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # numpy's ints too
            raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__} {seed!r}")
        sampler = _b.TargetSampler(loss, seed, sample_targets) if fisher_type == "true" else None
        tracked = find_layers(model, layers, max_factor_dim=max_factor_dim)
        params = trainable_parameters(model)
        layout = ParameterLayout(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params))
        first = params[0][1] if params else next(model.parameters())
        device = first.device
        if accumulate_dtype is None:
            accumulate_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32

        self = cls(tracked, layout)
        self.fisher_type, self.reduction, self.seed = fisher_type, reduction, int(seed)
        # Under a process group each rank passes over its own shard; the sums and counts are then
        # all-reduced, so the factors are those of one process over the concatenated shards, and
        # every rank computes the same eigendecompositions from the same bits.
        group = _distributed.enter(where, None, layers=[(t.name, t.in_dim, t.out_features) for t in tracked],
                                   P=layout.num_params, fisher_type=fisher_type, reduction=reduction,
                                   ekfac=ekfac, seed=int(seed), accumulate_dtype=accumulate_dtype)
        with _ModelState(model, eval_mode):
            sums_A = {t.name: torch.zeros(t.in_dim, t.in_dim, dtype=accumulate_dtype, device=device) for t in tracked}
            sums_S = {t.name: torch.zeros(t.out_features, t.out_features, dtype=accumulate_dtype, device=device)
                      for t in tracked}

            # With the empirical Fisher the EK-FAC pass would recompute the first pass's inputs and
            # output gradients; they are kept instead while they fit in a quarter of the memory
            # budget (as HessianOperator keeps its batches). Sampled targets (the true Fisher) are
            # drawn afresh on the second pass, and the GGN backpropagates several columns per batch:
            # those go over the data twice.
            cache = CaptureCache(device, enabled=ekfac and fisher_type == "empirical")

            def first_pass():
                # [calls, tokens] per layer (float64: token weights may be fractional), and N
                counts = torch.zeros(2, len(tracked), dtype=torch.float64)
                N = 0
                if sampler is not None:
                    sampler.restart(0)
                for batch in progress_bar(data, progress, desc="K-FAC factors", unit="batch"):
                    for cap, B, first in self._passes(model, loss, batch, reduction, sampler, device, where,
                                                      token_mask):
                        N += B if first else 0
                        for i, t in enumerate(tracked):
                            if not cap.called(t.name):
                                continue
                            a, g, w = cap.inputs(t.name), cap.grads(t.name), cap.weights(t.name)
                            wr = None if w is None else w.reshape(-1)
                            if first:
                                _covariance_accumulate(sums_A[t.name], a.reshape(-1, t.in_features), wr, t.has_bias)
                                counts[0, i] += 1
                                counts[1, i] += a.shape[0] * a.shape[1] if w is None else float(w.sum())
                            _covariance_accumulate(sums_S[t.name], g.reshape(-1, t.out_features), wr, False)
                        if first:
                            cache.add(cap, tracked, B)
                        del cap
                cache.finish()
                return counts, N

            counts, N = _distributed.sum_over_ranks(group, where, first_pass)
            if N == 0:
                raise ValueError(f"{where}: data yielded no batch; the factors need at least one sample")
            self._drop_uncalled(model, {t.name for i, t in enumerate(tracked) if counts[0, i] > 0})
            self.num_samples = N
            kept = {t.name for t in self.layers}
            for i, t in enumerate(tracked):
                if t.name not in kept:
                    continue
                tokens = float(counts[1, i])
                self.num_tokens[t.name] = int(tokens) if tokens.is_integer() else tokens
                if group is not None:
                    _distributed.all_reduce_sum_(group, sums_A[t.name])
                    _distributed.all_reduce_sum_(group, sums_S[t.name])
                # One layer at a time: each running sum is released once decomposed.
                A = sums_A.pop(t.name).double() / (tokens if tokens > 0 else 1)
                S = sums_S.pop(t.name).double() / N
                self.eig_A[t.name], Q_A = symmetric_eigh(A, f"input (A) of layer {t.name!r}")
                self.eig_S[t.name], Q_S = symmetric_eigh(S, f"output-gradient (S) of layer {t.name!r}")
                self.A[t.name], self.S[t.name] = A.to(factor_dtype), S.to(factor_dtype)
                self.Q_A[t.name], self.Q_S[t.name] = Q_A.to(factor_dtype), Q_S.to(factor_dtype)
                del A, S, Q_A, Q_S
            del sums_A, sums_S
            if ekfac:
                self._fit_correction(model, loss, data, sampler, device, accumulate_dtype, progress, token_mask,
                                     group, cache)
        return self

    def _passes(self, model, loss, batch, reduction, sampler, device, where, token_mask=None):
        return batch_captures(self.layers, self.fisher_type, model, loss, batch, reduction, sampler, device, where,
                              token_mask)

    def _drop_uncalled(self, model: nn.Module, called: set) -> None:
        never = [t for t in self.layers if t.name not in called]
        if never:
            logger.info("K-FAC: %d tracked layers were never called by the model's forward and are left out: %s",
                        len(never), ", ".join(t.name for t in never))
            self.layers = [t for t in self.layers if t.name in called]
            if not self.layers:
                raise ValueError("K-FAC: none of the tracked layers is called by the model's forward")
        inside = {n for t in self.layers for n in (t.weight_name, t.bias_name) if n}
        self.left_out = [n for n in self.layout.names if n not in inside]
        report_left_out(model, self.layers)
        report_shared_uses(model, self.layers)

    def _fit_correction(self, model, loss, data, sampler, device, accumulate_dtype, progress, token_mask,
                        group=None, cache: Optional[CaptureCache] = None) -> None:
        where = "KFACFactors.fit (EK-FAC pass)"
        sums = {t.name: torch.zeros(t.out_features, t.in_dim, dtype=accumulate_dtype, device=device)
                for t in self.layers}
        q_s = {n: q.to(device=device, dtype=accumulate_dtype) for n, q in self.Q_S.items()}
        q_a = {n: q.to(device=device, dtype=accumulate_dtype) for n, q in self.Q_A.items()}

        def second_pass():
            if cache is not None and cache.complete:
                # Layer by layer over the kept batches, each layer's captures released once used.
                N = cache.num_samples
                for t in self.layers:
                    for a, g, w in cache.layer(t.name):
                        _eigen_correction_accumulate(sums[t.name], g, a, q_s[t.name], q_a[t.name], w, t.has_bias)
                cache.drop()
                return torch.zeros(1, dtype=torch.float64), N
            if sampler is not None:
                sampler.restart(1)
            N = 0
            for batch in progress_bar(data, progress, desc="EK-FAC eigenvalue correction", unit="batch"):
                for cap, B, first in self._passes(model, loss, batch, self.reduction, sampler, device, where,
                                                  token_mask):
                    N += B if first else 0
                    for t in self.layers:
                        if cap.called(t.name):
                            _eigen_correction_accumulate(sums[t.name], cap.grads(t.name), cap.inputs(t.name),
                                                         q_s[t.name], q_a[t.name], cap.weights(t.name), t.has_bias)
                    del cap
            return torch.zeros(1, dtype=torch.float64), N

        _, N = _distributed.sum_over_ranks(group, where, second_pass)
        if N != self.num_samples:
            raise ValueError(f"{where}: data yielded {N} samples on the second pass but {self.num_samples} on the "
                             "first; EK-FAC needs a DataLoader that can be iterated twice over the same data")
        if group is not None:
            for s in sums.values():
                _distributed.all_reduce_sum_(group, s)
        self.corrected = {n: s.double() / N for n, s in sums.items()}

    # ---- applying ------------------------------------------------------------------------------
    def eigenvalues(self, name: str, method: str = "ekfac") -> torch.Tensor:
        """Λ [O, I'] of layer ``name`` in its eigenbasis: λ_S λ_Aᵀ (K-FAC) or Λ̃ (EK-FAC)."""
        method = self._check_method(method)
        if method == "ekfac":
            return self.corrected[name]
        return torch.outer(self.eig_S[name], self.eig_A[name])

    def _check_method(self, method: str) -> str:
        if not isinstance(method, str) or method.lower() not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        method = method.lower()
        if method == "ekfac" and self.corrected is None:
            raise ValueError("method='ekfac' needs the corrected eigenvalues; these factors were fitted with "
                             "ekfac=False (use method='kfac' or refit)")
        return method

    def damping_for(self, name: str, damping: float, method: str = "ekfac", relative: bool = False) -> float:
        """λ_l: ``damping`` itself, or ``damping`` × the mean of the layer's eigenvalues Λ."""
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0:
            raise ValueError(f"damping must be a non-negative number, got {damping!r}")
        if not relative:
            return float(damping)
        return float(damping) * float(self.eigenvalues(name, method).mean())

    def precondition_layer(self, name: str, v: torch.Tensor, damping: float, method: str = "ekfac",
                           relative: bool = False) -> torch.Tensor:
        """(F_l + λ_l I)⁻¹ V for the layer's block V [N, O, I'] (weight columns, then bias)."""
        lam = self.damping_for(name, damping, method, relative)
        return precondition_block(v, self.Q_S[name], self.Q_A[name], self.eigenvalues(name, method), lam)

    def solve(self, grads: GradsLike, damping: float = 0.0, method: str = "ekfac",
              relative_damping: bool = False) -> GradsLike:
        """(F + λI)⁻¹ grads layer by layer, in the form ``grads`` came in: [N, P] (or [P]) rows in
        the model's flat parameter layout, a list of per-parameter blocks [N, *shape_k], or a dict by
        parameter name. Entries of parameters outside the tracked layers are zero in the result.

        Args:
            damping: λ ≥ 0 (pyDVL's ``hessian_regularization``); with ``relative_damping`` the
                damping of layer l is λ × mean(Λ_l).
            method: "ekfac" (corrected eigenvalues) or "kfac" (λ_S λ_Aᵀ).
        """
        method = self._check_method(method)
        form, blocks, N = _as_blocks(grads, self.layout, "KFACFactors.solve")
        out = {}
        for t in self.layers:
            v = layer_blocks(t, blocks, N, "KFACFactors.solve")
            out[t.name] = self.precondition_layer(t.name, v, damping, method, relative_damping)
        return blocks_to_layout(form, out, self.layers, self.layout, blocks, N)

    def score(self, model: nn.Module, loss: Callable, query_preconditioned: GradsLike, data: Iterable,
              **kwargs) -> torch.Tensor:
        """[N_q, N_train] contractions of preconditioned queries with the training per-sample
        gradients of ``data``, streamed (see :func:`twicediff.torch.kfac.scoring.score`)."""
        from .scoring import score

        return score(self, model, loss, query_preconditioned, data, **kwargs)

    def self_score(self, model: nn.Module, loss: Callable, data: Iterable, damping: float = 0.0,
                   method: str = "ekfac", **kwargs) -> torch.Tensor:
        """[N_train] ``G_nᵀ (F + λI)⁻¹ G_n`` of every training sample, streamed (see
        :func:`twicediff.torch.kfac.scoring.self_score`)."""
        from .scoring import self_score

        return self_score(self, model, loss, data, damping, method, **kwargs)

    # ---- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors, lists and numbers (``torch.save`` / ``torch.load(weights_only=True)``)."""
        names = [t.name for t in self.layers]
        return dict(
            version=_STATE_VERSION, layers=[t.describe() for t in self.layers], layout=self.layout.describe(),
            num_samples=self.num_samples, num_tokens=[self.num_tokens[n] for n in names],
            fisher_type=self.fisher_type, reduction=self.reduction, seed=self.seed,
            A=[self.A[n] for n in names], S=[self.S[n] for n in names],
            eig_A=[self.eig_A[n] for n in names], Q_A=[self.Q_A[n] for n in names],
            eig_S=[self.eig_S[n] for n in names], Q_S=[self.Q_S[n] for n in names],
            corrected=None if self.corrected is None else [self.corrected[n] for n in names],
        )

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any], model: Optional[nn.Module] = None) -> "KFACFactors":
        """Factors from :meth:`state_dict`. With ``model``, the layers are re-attached to its modules
        (needed to score new data) and its parameter layout is checked against the saved one."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"KFACFactors.from_state_dict: expected a state of version {_STATE_VERSION}, got {got!r}")
        layers = [TrackedLayer.from_description(d) for d in state["layers"]]
        layout = ParameterLayout.from_description(state["layout"])
        self = cls(layers, layout)
        names = [t.name for t in layers]
        self.num_samples = int(state["num_samples"])
        self.num_tokens = dict(zip(names, (int(x) for x in state["num_tokens"])))
        self.fisher_type, self.reduction, self.seed = state["fisher_type"], state["reduction"], int(state["seed"])
        for key in ("A", "S", "eig_A", "Q_A", "eig_S", "Q_S"):
            setattr(self, key, dict(zip(names, state[key])))
        self.corrected = None if state["corrected"] is None else dict(zip(names, state["corrected"]))
        if model is not None:
            self.attach(model)
        return self

    def load_state_dict(self, state: Dict[str, Any]) -> "KFACFactors":
        other = KFACFactors.from_state_dict(state)
        self.__dict__.update(other.__dict__)
        return self

    def attach(self, model: nn.Module) -> "KFACFactors":
        """Bind the tracked layers to ``model``'s modules (after loading), checking the layout."""
        params = trainable_parameters(model)
        got = ParameterLayout(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params))
        if got != self.layout:
            raise ValueError("KFACFactors.attach: the model's trainable parameters differ from those the factors were "
                             f"fitted on ({len(got.names)} tensors, P = {got.num_params} vs {len(self.layout.names)}, "
                             f"P = {self.layout.num_params})")
        modules = dict(model.named_modules())
        for t in self.layers:
            t.module = modules[t.name]
        return self

    def to(self, device: Union[str, torch.device]) -> "KFACFactors":
        """Move every tensor to ``device`` (in place; returns self)."""
        for key in ("A", "S", "eig_A", "Q_A", "eig_S", "Q_S"):
            setattr(self, key, {n: v.to(device) for n, v in getattr(self, key).items()})
        if self.corrected is not None:
            self.corrected = {n: v.to(device) for n, v in self.corrected.items()}
        return self

    def info(self) -> Dict[str, Any]:
        """A summary: layers with their factor sizes, samples, Fisher type, what is left out."""
        return dict(
            method="ekfac" if self.corrected is not None else "kfac", fisher_type=self.fisher_type,
            reduction=self.reduction, num_samples=self.num_samples,
            layers=[dict(name=t.name, kind=t.kind, A=[t.in_dim, t.in_dim], S=[t.out_features, t.out_features],
                         params=t.num_params, tokens=self.num_tokens.get(t.name, 0)) for t in self.layers],
            tracked_params=sum(t.num_params for t in self.layers), total_params=self.layout.num_params,
            left_out=list(self.left_out),
        )


def fit_factors(model: nn.Module, loss: Callable, data: Iterable, **kwargs) -> KFACFactors:
    """:meth:`KFACFactors.fit`."""
    return KFACFactors.fit(model, loss, data, **kwargs)
