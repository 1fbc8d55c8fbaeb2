"""nn.MultiheadAttention's self-attention, written for derivatives.

``F.multi_head_attention_forward`` (under ``nn.MultiheadAttention`` and so
``nn.TransformerEncoderLayer``) splits its packed in-projection into q, k and v by stacking the
three along a new leading axis, copying them to contiguous memory and indexing it: ``proj[0]``,
``proj[1]``, ``proj[2]``. Differentiated, each index is a ``select`` whose backward fills a zero
tensor three times the size of one part, and the three are summed: in a batched forward-over-reverse
product those fills, sums and copies run over every direction's tangents (what they cost and what
this saves: the commit that added this module).

:func:`self_attention` computes the same attention (the same in-projection, scaled-dot-product
attention and out-projection, in the same order) from views of the projection, whose backward is
one stack. It takes the common case only (:func:`applies`): self-attention (query, key and value
the same tensor, batched), the packed in-projection, no extra key/value biases or zero attention,
no dropout, no attention weights returned, no mask but a key-padding one; anything else goes to
torch's function.
The func engine's forward-mode context routes the calls it takes (twicediff.torch.forward_mode).
Values agree with torch's to rounding (the GEMMs see other memory layouts).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["applies", "self_attention"]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
# The parameters whose meaning the case below knows; any other (a later torch's) must be at its default.
_KNOWN = {"query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
          "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
          "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
          "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal"}


def applies(args: Tuple, kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The call's arguments by name (bound to torch's signature) when :func:`self_attention` takes
    it, else None."""
    try:
        call = _SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None
    call.apply_defaults()
    bound = call.arguments
    if any(bound[name] is not _SIGNATURE.parameters[name].default for name in bound if name not in _KNOWN):
        return None
    if any(name not in bound for name in _KNOWN):
        return None
    q, w = bound["query"], bound["in_proj_weight"]
    if not (isinstance(q, torch.Tensor) and q.dim() == 3 and bound["key"] is q and bound["value"] is q):
        return None
    E, heads = q.shape[-1], bound["num_heads"]
    if not (isinstance(heads, int) and heads > 0 and E % heads == 0 and bound["embed_dim_to_check"] == E):
        return None
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (3 * E, E) or bound["use_separate_proj_weight"]:
        return None
    unused = ("bias_k", "bias_v", "attn_mask", "static_k", "static_v")
    if any(bound[name] is not None for name in unused) or bound["add_zero_attn"] or bound["is_causal"]:
        return None
    pad = bound["key_padding_mask"]  # [N, L]: True (or -inf) where a key is padding
    if pad is not None and not (isinstance(pad, torch.Tensor) and tuple(pad.shape) == (q.shape[1], q.shape[0])
                                and pad.device == q.device and pad.dtype in (torch.bool, q.dtype)):
        return None
    if bound["need_weights"] or (bound["training"] and bound["dropout_p"] > 0.0):
        return None
    return bound


def self_attention(query: torch.Tensor, num_heads: int, in_proj_weight: torch.Tensor,
                   in_proj_bias: Optional[torch.Tensor], out_proj_weight: torch.Tensor,
                   out_proj_bias: Optional[torch.Tensor],
                   key_padding_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, None]:
    """(attention output [L, N, E], None) of ``query`` [L, N, E] attending to itself, as
    ``F.multi_head_attention_forward`` computes it in the case :func:`applies` admits;
    ``key_padding_mask`` [N, L]: True (or -inf, added to the scores) at keys no query attends to."""
    L, N, E = query.shape
    head = E // num_heads
    proj = F.linear(query, in_proj_weight, in_proj_bias)  # [L, N, 3E]: q, k, v side by side
    # [L, N, 3, H, head] -> [3, N, H, L, head]: views, and unbind's backward is one stack
    q, k, v = proj.view(L, N, 3, num_heads, head).permute(2, 1, 3, 0, 4).unbind(0)
    mask = None
    if key_padding_mask is not None:  # as torch's: an additive float mask, broadcast over heads and queries
        mask = key_padding_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(mask, float("-inf"))
        mask = mask.view(N, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, H, L, head]
    out = out.permute(2, 0, 1, 3).reshape(L * N, E)
    return F.linear(out, out_proj_weight, out_proj_bias).view(L, N, E), None
