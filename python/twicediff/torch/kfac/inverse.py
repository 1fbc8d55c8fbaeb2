r"""Applying (F + λI)⁻¹ of a Kronecker-factored curvature to gradients, layer by layer.

In a layer's eigenbasis (Q_A of A, Q_S of S) the curvature is diagonal with eigenvalues Λ [O, I']
(K-FAC: Λ[o, i] = λ_S[o] λ_A[i]; EK-FAC: the corrected Λ̃ = E[(Q_Sᵀ G_n Q_A)²]), so for the layer's
block of a gradient, V [O, I'] (weight, then the bias as the last column),

    (F_l + λ_l I)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ_l)] Q_Aᵀ

(entries with Λ + λ_l = 0 are set to 0: the pseudo-inverse of an undamped singular block).

Gradients are given in the model's flat parameter layout (the trainable parameters in
``model.parameters()`` order, twicediff's P) as [N, P] rows, as per-parameter blocks [N, *shape_k]
(a list in that order, or a dict by parameter name); parameters outside the tracked layers are
left out of the curvature, and their entries of the result are zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

import torch

from .layers import TrackedLayer

__all__ = ["ParameterLayout", "precondition_block", "layer_blocks", "blocks_to_layout"]

GradsLike = Union[torch.Tensor, Sequence[torch.Tensor], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ParameterLayout:
    """The flat layout of the trainable parameters: names, shapes and column offsets."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @property
    def numels(self) -> List[int]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return out

    @property
    def offsets(self) -> Dict[str, int]:
        offs, c = {}, 0
        for name, n in zip(self.names, self.numels):
            offs[name] = c
            c += n
        return offs

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def describe(self) -> dict:
        return dict(names=list(self.names), shapes=[list(s) for s in self.shapes])

    @classmethod
    def from_description(cls, d: dict) -> "ParameterLayout":
        return cls(tuple(d["names"]), tuple(tuple(int(x) for x in s) for s in d["shapes"]))


def precondition_block(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, eigenvalues: torch.Tensor,
                       damping: float) -> torch.Tensor:
    """Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ for V [N, O, I'], computed in V's dtype (float32 for
    float16 / bfloat16 V, whose result is cast back)."""
    if v.dtype in (torch.float16, torch.bfloat16):
        return precondition_block(v.float(), q_s, q_a, eigenvalues, damping).to(v.dtype)
    q_s = q_s.to(device=v.device, dtype=v.dtype)
    q_a = q_a.to(device=v.device, dtype=v.dtype)
    lam = eigenvalues.to(device=v.device, dtype=v.dtype) + damping
    # Where Λ + λ is 0 (an undamped rank-deficient factor) the inverse is taken on the range only
    # (a pseudo-inverse) instead of dividing by zero.
    inv = torch.where(lam > 0, 1.0 / torch.where(lam > 0, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    u = torch.matmul(torch.matmul(q_s.T, v), q_a)
    u = u * inv
    return torch.matmul(torch.matmul(q_s, u), q_a.T)


def _as_blocks(grads: GradsLike, layout: ParameterLayout, where: str) -> Tuple[str, Dict[str, torch.Tensor], int]:
    """(form, name -> [N, *shape] block, N) of the accepted gradient forms."""
    if isinstance(grads, torch.Tensor):
        single = grads.dim() == 1
        rows = grads[None] if single else grads
        if rows.dim() != 2 or rows.shape[1] != layout.num_params:
            raise ValueError(f"{where}: grads must be [N, P] or [P] with P = {layout.num_params} (the model's trainable "
                             f"parameters), got shape {tuple(grads.shape)}")
        N = rows.shape[0]
        blocks, c = {}, 0
        for name, shape, n in zip(layout.names, layout.shapes, layout.numels):
            blocks[name] = rows[:, c:c + n].reshape(N, *shape)
            c += n
        return ("vector" if single else "rows"), blocks, N
    if isinstance(grads, dict):
        blocks = dict(grads)
        form = "dict"
    elif isinstance(grads, (list, tuple)):
        if len(grads) != len(layout.names):
            raise ValueError(f"{where}: grads as a list must hold one [N, *shape] block per trainable parameter "
                             f"({len(layout.names)}), got {len(grads)}")
        blocks = dict(zip(layout.names, grads))
        form = "list"
    else:
        raise TypeError(f"{where}: grads must be an [N, P] tensor, a list of per-parameter blocks or a dict of them, "
                        f"got {type(grads).__name__}")
    N = None
    shapes = dict(zip(layout.names, layout.shapes))
    for name, b in blocks.items():
        if name not in shapes:
            raise ValueError(f"{where}: grads names {name!r}, which is not a trainable parameter of the model")
        if not isinstance(b, torch.Tensor) or tuple(b.shape[1:]) != shapes[name]:
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{where}: grads[{name!r}] must be [N, {', '.join(map(str, shapes[name]))}], got {got}")
        if N is None:
            N = b.shape[0]
        elif b.shape[0] != N:
            raise ValueError(f"{where}: grads[{name!r}] has {b.shape[0]} rows, the other blocks {N}")
    return form, blocks, (N or 0)


def layer_blocks(layer: TrackedLayer, blocks: Dict[str, torch.Tensor], N: int, where: str) -> torch.Tensor:
    """The layer's [N, O, I'] block (weight columns, then the bias column)."""
    if layer.weight_name not in blocks:
        raise ValueError(f"{where}: grads lack the tracked parameter {layer.weight_name!r}")
    w = blocks[layer.weight_name].reshape(N, layer.out_features, layer.in_features)
    if not layer.has_bias:
        return w
    if layer.bias_name not in blocks:
        raise ValueError(f"{where}: grads lack the tracked parameter {layer.bias_name!r}")
    return torch.cat([w, blocks[layer.bias_name].reshape(N, layer.out_features, 1)], 2)


def blocks_to_layout(form: str, out_layers: Dict[str, torch.Tensor], layers: Sequence[TrackedLayer],
                     layout: ParameterLayout, like: Dict[str, torch.Tensor], N: int) -> GradsLike:
    """Scatter each layer's [N, O, I'] result back into the input's form; untracked entries zero.

    ``out_layers`` is consumed: each layer's result is released once it has been copied out, so the
    results exist once (not twice) at any moment."""
    offs, shapes = layout.offsets, dict(zip(layout.names, layout.shapes))
    flat = None
    if form in ("rows", "vector"):
        flat = next(iter(like.values())).new_zeros(N, layout.num_params)
    per_param: Dict[str, torch.Tensor] = {}
    for layer in layers:
        r = out_layers.pop(layer.name)
        parts = [(layer.weight_name, r[:, :, :layer.in_features])]
        if layer.has_bias:
            parts.append((layer.bias_name, r[:, :, layer.in_features]))
        for name, part in parts:
            if flat is not None:
                n = part.shape[1:].numel()  # not part[0]: N may be 0
                flat[:, offs[name]:offs[name] + n] = part.reshape(N, n)
            else:
                per_param[name] = part.reshape(N, *shapes[name]).contiguous()
        del r, parts
    if flat is not None:
        return flat[0] if form == "vector" else flat
    result = {name: per_param[name] if name in per_param else torch.zeros_like(like[name])
              for name in (layout.names if form == "list" else like.keys())}
    return [result[n] for n in layout.names] if form == "list" else result
