"""The lecture's vanilla (Elman) recurrent network, written out by hand (time-first tensors).

One layer with the lecture's names (p hidden units, d inputs, q = vocabulary size)::

    h(t) = tanh(U x(t) + W h(t-1) + b)      U: [p, d]  W: [p, p]  b: [p]
    y(t) = V h(t) + c                       V: [q, p]  c: [q]   (on the top layer only)

The same ``U, W, b, V, c`` are used at every time step; gradients reach them through every
step by backpropagation through time (autograd unrolls the Python loop). ``U x(t) + b`` does
not depend on the recurrence, so it is computed for the whole window in one matmul and only
``W h(t-1)`` stays inside the loop. ``num_layers > 1`` stacks layers: layer l's input x(t) is
layer l-1's h(t).

State: ``h`` [num_layers, batch, hidden], the layout ``nn.RNN`` uses, so the two are
interchangeable in tests and in the LM task.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ElmanRNNLayer(nn.Module):
    """One tanh recurrent layer: ``h(t) = tanh(U x(t) + W h(t-1) + b)``."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.U = nn.Parameter(torch.empty(hidden_size, input_size))  # input -> hidden, [p, d]
        self.W = nn.Parameter(torch.empty(hidden_size, hidden_size))  # hidden -> hidden, [p, p]
        self.b = nn.Parameter(torch.empty(hidden_size))  # [p]
        # nn.RNN's init, U(-1/sqrt(p), 1/sqrt(p)): keeps W's spectral radius below 1 at the start.
        bound = 1.0 / math.sqrt(hidden_size)
        for param in (self.U, self.W, self.b):
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [seq, batch, d], h0: [batch, p] -> (h for every step [seq, batch, p], last h [batch, p])."""
        return elman_rnn_layer(x, h0, self.U, self.W, self.b)


def elman_rnn_layer(
    x: torch.Tensor, h0: torch.Tensor, U: torch.Tensor, W: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll ``h(t) = tanh(U x(t) + W h(t-1) + b)`` over a window.

    x: [seq, batch, d], h0: [batch, p] -> (h(1..seq) [seq, batch, p], h(seq) [batch, p]).
    """
    seq_len, batch = x.size(0), x.size(1)
    input_part = torch.addmm(b, x.reshape(seq_len * batch, -1), U.t()).view(seq_len, batch, -1)  # [seq, batch, p]
    w_t = W.t()
    h = h0
    outputs = []
    # unbind, not input_part[t]: indexing's backward would write a full-size zero tensor every step.
    for input_part_t in input_part.unbind(0):
        h = torch.tanh(torch.addmm(input_part_t, h, w_t))  # h: [batch, p]
        outputs.append(h)
    return torch.stack(outputs), h


class ElmanRNN(nn.Module):
    """The recurrent core ``rnn`` of the language model (:class:`rnnlab.models.lm.RecurrentLanguageModel`):
    stacked Elman layers, dropout between them. With the shell's output layer (``V``, ``c``) this is the
    lecture's network: ``y(t) = V h(t) + c`` on the top layer's ``h(t)``.

    ``forward(x [seq, batch, in], h0 [num_layers, batch, hidden]) -> (h [seq, batch, hidden], h_last)``,
    the call signature of ``nn.RNN``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.layers = nn.ModuleList(
            ElmanRNNLayer(input_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        last_states = []
        for i, layer in enumerate(self.layers):
            x, h_last = layer(x, state[i])  # x: [seq, batch, hidden]
            if i < self.num_layers - 1:
                x = self.drop(x)  # between layers, as nn.RNN's dropout
            last_states.append(h_last)
        return x, torch.stack(last_states)  # state: [num_layers, batch, hidden]
