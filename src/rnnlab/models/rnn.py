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

from rnnlab.errors import ConfigError


def check_lm_hparams(embedding_size: int, hidden_size: int, num_layers: int, dropout: float, tie_weights: bool):
    """Range checks shared by the hand-written LMs; errors name the offending key."""
    for key, value in (("embedding_size", embedding_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if tie_weights and embedding_size != hidden_size:
        raise ConfigError(f"tie_weights needs embedding_size == hidden_size, got {embedding_size} and {hidden_size}")


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


class ElmanRNNLanguageModel(nn.Module):
    """Embedding x(t) -> stacked hand-written Elman layers -> ``y(t) = V h(t) + c`` logits.

    Interface as :class:`rnnlab.models.lm.LSTMLanguageModel`: ``forward(tokens [seq, batch],
    state [num_layers, batch, hidden]) -> (logits [seq, batch, vocab], state)``.
    """

    cell_type = "rnn"

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int = 200,
        hidden_size: int = 200,
        num_layers: int = 1,
        dropout: float = 0.2,
        tie_weights: bool = False,
    ):
        super().__init__()
        check_lm_hparams(embedding_size, hidden_size, num_layers, dropout, tie_weights)
        self.hparams = dict(
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            tie_weights=tie_weights,
        )
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.layers = nn.ModuleList(
            ElmanRNNLayer(embedding_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        init_range = 0.1  # same output/embedding init as the nn.LSTM LM
        nn.init.uniform_(self.embedding.weight, -init_range, init_range)
        if tie_weights:
            self.V = self.embedding.weight  # [q, p] shared with the input embedding
        else:
            self.V = nn.Parameter(torch.empty(vocab_size, hidden_size).uniform_(-init_range, init_range))
        self.c = nn.Parameter(torch.zeros(vocab_size))  # [q]

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=self.c.dtype)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        if state is None:
            state = self.init_state(tokens.size(1), tokens.device)
        x = self.drop(self.embedding(tokens))  # x: [seq, batch, emb]
        last_states = []
        for i, layer in enumerate(self.layers):
            x, h_last = layer(x, state[i])  # x: [seq, batch, hidden]
            x = self.drop(x)  # between layers and before the output, as in the nn.LSTM LM
            last_states.append(h_last)
        logits = torch.matmul(x, self.V.t()) + self.c  # y(t) = V h(t) + c: [seq, batch, vocab]
        return logits, torch.stack(last_states)  # state: [num_layers, batch, hidden]

    def embedding_matrix(self) -> torch.Tensor:
        return self.embedding.weight
