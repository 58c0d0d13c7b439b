"""Feed-forward n-gram language model of Bengio et al. (2003), on the streaming LM interface.

For each position the embeddings of the last ``context_size`` (= n-1) tokens, the current one
included, are concatenated into x and mapped to next-token logits::

    y = b + D x + O tanh(d + H x)        (D: optional direct input-to-output connections)

Time-first tensors, like every LM in :mod:`rnnlab.models.lm`. To fit the BPTT-window
interface the carried ``state`` is the token history: the last ``context_size`` tokens read
so far, [context_size, batch] int64. Each window is read after that history, so every position
(the first of a window too) predicts from its true n-1 predecessors, and results do not
depend on where the stream was cut into windows. At the start of a stream the history is
filled with ``<eos>`` (id 3), the same "previous sentence ended" context the stream uses
between sentences.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnlab.errors import ConfigError
from rnnlab.models.lm_parts import check_lm_hparams, init_output_layer

EOS_ID = 3  # rnnlab.data.vocab.Vocab.eos_id


class MLPLanguageModel(nn.Module):
    cell_type = "mlp"

    def __init__(
        self,
        vocab_size: int,
        *,
        embedding_size: int,
        hidden_size: int,
        dropout: float,
        context_size: int = 4,
        direct_connections: bool = False,
        tie_weights: bool = False,
        num_layers: int = 1,
    ):
        super().__init__()
        if not isinstance(context_size, int) or context_size < 1:
            raise ConfigError(f"context_size must be an integer >= 1 (n-1 of an n-gram), got {context_size!r}")
        if num_layers != 1:
            raise ConfigError(f"num_layers must be 1 for the mlp model (one tanh hidden layer), got {num_layers!r}")
        check_lm_hparams(embedding_size, hidden_size, num_layers, dropout, tie_weights)
        self.hparams = dict(
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            context_size=context_size,
            dropout=dropout,
            direct_connections=direct_connections,
            tie_weights=tie_weights,
            num_layers=num_layers,
        )
        self.context_size = context_size
        self.embedding = nn.Embedding(vocab_size, embedding_size)  # Bengio's C
        self.drop = nn.Dropout(dropout)
        self.hidden = nn.Linear(context_size * embedding_size, hidden_size)  # H, d
        self.output = nn.Linear(hidden_size, vocab_size)  # O, b
        self.direct = nn.Linear(context_size * embedding_size, vocab_size, bias=False) if direct_connections else None
        init_output_layer(self.embedding, self.output, tie_weights)
        if self.direct is not None:
            nn.init.zeros_(self.direct.weight)  # start as the plain MLP; the direct path learns what it adds

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.full((self.context_size, batch_size), EOS_ID, dtype=torch.long, device=device)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        if state is None:
            state = self.init_state(tokens.size(1), tokens.device)
        if state.shape != (self.context_size, tokens.size(1)):
            raise ValueError(
                f"mlp state must be the last {self.context_size} tokens, [context_size, batch] = "
                f"{[self.context_size, tokens.size(1)]}, got {list(state.shape)}"
            )
        seq_len, batch = tokens.shape
        history = torch.cat([state, tokens])  # [context + seq, batch]
        # Position t's context is history[t+1 : t+1+context], i.e. tokens[t] and its predecessors.
        contexts = history[1:].unfold(0, self.context_size, 1)  # [seq, batch, context]
        x = self.embedding(contexts).view(seq_len, batch, -1)  # x: [seq, batch, context*emb]
        x = self.drop(x)
        hidden = self.drop(torch.tanh(self.hidden(x)))  # [seq, batch, hidden]
        logits = self.output(hidden)  # [seq, batch, vocab]
        if self.direct is not None:
            logits = logits + self.direct(x)
        return logits, history[-self.context_size :]  # new state: [context, batch]

    def embedding_matrix(self) -> torch.Tensor:
        return self.embedding.weight
