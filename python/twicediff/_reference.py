"""Pure-torch references of every native op in ``twicediff._ops``: same arguments, same results.

Tests compare the native kernels with these (in float64 where the maths is checked); they are also
readable statements of what each op computes.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

# ---- parameter-space ops ------------------------------------------------------------------------


def pack_into(blocks: Sequence[torch.Tensor], out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """out[row_offset:row_offset+B] = cat_k(blocks[k].reshape(B, -1)) along columns."""
    rows = blocks[0].shape[0]
    flat = [b.reshape(rows, -1) for b in blocks]
    out[row_offset:row_offset + rows] = torch.cat(flat, dim=1)
    return out


def unpack_into(rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """outs[k] = rows[:, col_k:col_k+n_k].reshape(outs[k].shape)."""
    col = 0
    for o in outs:
        n = o[0].numel() if o.shape[0] else o.numel()
        o.copy_(rows[:, col:col + n].reshape(o.shape))
        col += n
    return list(outs)


# ---- HVP engine ops -----------------------------------------------------------------------------


# ---- solver ops ---------------------------------------------------------------------------------
