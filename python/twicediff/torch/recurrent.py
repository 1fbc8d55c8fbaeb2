"""torch's recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) as batched forward mode needs them.

Their modules call one fused op per layer stack (``torch._VF.rnn_tanh``, ``rnn_relu``, ``gru``,
``lstm``). On the CPU in float32 torch (2.14) runs the LSTM through oneDNN, whose op has no
forward-mode rule, so the forward-over-reverse engine (func) could not take an LSTM model there.
:func:`recurrent` computes the same layers step by step from ``F.linear`` and elementwise ops,
which torch differentiates in both modes and batches under vmap: the same values to rounding (the
fused kernels sum in another order). :mod:`twicediff.torch.forward_mode` routes the modules' calls
to it inside forward-mode products (:data:`ROUTED`). A Python loop over the time steps costs more
per call than the fused op, so reverse-mode products keep torch's.

Not taken (torch's op runs): a packed sequence (``nn.utils.rnn.PackedSequence``) and dropout
between layers in training mode (random).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ROUTED", "recurrent"]


def _cell(kind: str, x_t: torch.Tensor, h: torch.Tensor, c: Optional[torch.Tensor], w_hh: torch.Tensor,
          b_hh: Optional[torch.Tensor], w_hr: Optional[torch.Tensor]):
    """One step: (h, c) from the step's input projection ``x_t`` (W_ih x + b_ih) and the state."""
    hidden = F.linear(h, w_hh, b_hh)
    if kind == "lstm":
        i, f, g, o = (x_t + hidden).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    if kind == "gru":
        x_r, x_z, x_n = x_t.chunk(3, dim=-1)
        h_r, h_z, h_n = hidden.chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return n + z * (h - n), None  # (1 - z) n + z h
    return (torch.tanh if kind == "rnn_tanh" else torch.relu)(x_t + hidden), None


def recurrent(kind: str, input: torch.Tensor, hx, params: Sequence[torch.Tensor], has_biases: bool,
              num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool):
    """``torch._VF.<kind>`` on a tensor input: (output, h_n) or, for "lstm", (output, h_n, c_n)."""
    directions = 2 if bidirectional else 1
    x = input.transpose(0, 1) if batch_first else input  # [T, N, F]
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    per = len(params) // (num_layers * directions)  # w_ih, w_hh, (b_ih, b_hh), (w_hr: LSTM projections)
    projected = kind == "lstm" and per == 2 + 2 * has_biases + 1
    steps = x.shape[0]
    finals_h: List[torch.Tensor] = []
    finals_c: List[torch.Tensor] = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w = params[index * per:(index + 1) * per]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if projected else None
            projections = F.linear(x, w[0], b_ih)  # every step's input term at once: [T, N, gates]
            h, c = h0[index], (c0[index] if c0 is not None else None)
            out: List[Optional[torch.Tensor]] = [None] * steps
            for t in (range(steps) if direction == 0 else reversed(range(steps))):
                h, c = _cell(kind, projections[t], h, c, w[1], b_hh, w_hr)
                out[t] = h
            outputs.append(torch.stack(out) if steps else projections.new_zeros(0, *h.shape))
            finals_h.append(h)
            if c is not None:
                finals_c.append(c)
        x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
    output = x.transpose(0, 1) if batch_first else x
    if kind == "lstm":
        return output, torch.stack(finals_h), torch.stack(finals_c)
    return output, torch.stack(finals_h)


def _route(kind: str, function):
    def call(*args, **kwargs):
        # The tensor-input overload: (input, hx, params, has_biases, num_layers, dropout, train,
        # bidirectional, batch_first); the packed one has the batch sizes second and the parameters
        # fourth. Dropout between layers in training mode is random: torch's op.
        if kwargs or len(args) != 9 or not isinstance(args[3], bool) or (args[6] and args[5] > 0 and args[4] > 1):
            return function(*args, **kwargs)
        return recurrent(kind, *args)
    return call


#: torch's fused recurrent ops and what computes them step by step (tensor inputs; others pass through).
ROUTED = {op: _route(kind, op) for kind, op in (("rnn_tanh", torch._VF.rnn_tanh), ("rnn_relu", torch._VF.rnn_relu),
                                                ("gru", torch._VF.gru), ("lstm", torch._VF.lstm))}
