"""Pure-torch references of every native op in ``twicediff._ops``: same arguments, same results.

Tests compare the native kernels with these (in float64 where the maths is checked); they are also
readable statements of what each op computes.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

# ---- parameter-space ops ------------------------------------------------------------------------


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """out[row_offset:row_offset+B] = pack(blocks)."""
    out[row_offset:row_offset + blocks[0].shape[0]] = pack(blocks)
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """outs[k] = rows[:, col_k:col_k+n_k].reshape(outs[k].shape)."""
    col = 0
    for o in outs:
        n = o.shape[1:].numel()
        o.copy_(rows[:, col:col + n].reshape(o.shape))
        col += n
    return list(outs)


def pack(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, P] = cat_k(blocks[k].reshape(B, n_k)) along columns."""
    rows = blocks[0].shape[0]
    return torch.cat([b.reshape(rows, b.shape[1:].numel()) for b in blocks], dim=1)


def blockwise_contract(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """C [T, V] = pack(a) @ pack(b)^T = sum_k a[k].reshape(T, n_k) @ b[k].reshape(V, n_k)^T."""
    return pack(a) @ pack(b).mT


def blockwise_dot(v: Sequence[torch.Tensor], g: Sequence[torch.Tensor]) -> torch.Tensor:
    """z [D] = pack(v) @ cat_k(g[k].flatten()) = sum_k <v[k][d], g[k]>."""
    return pack(v) @ torch.cat([gk.reshape(-1) for gk in g])


# ---- HVP engine ops -----------------------------------------------------------------------------


# ---- solver ops ---------------------------------------------------------------------------------
