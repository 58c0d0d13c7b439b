"""Word/char language models sharing one interface (time-first tensors).

Every neural LM here is a plain ``nn.Module`` with:

- ``forward(tokens, state) -> (logits, state)``: ``tokens`` [seq, batch] int64,
  ``logits`` [seq, batch, vocab]; ``state`` is whatever the model carries between
  consecutive BPTT windows (a tensor, a tuple of tensors, or None).
- ``init_state(batch_size, device)``: the state at the start of a stream.
- ``hparams``: the constructor's keyword arguments, so a checkpoint can rebuild the model.

``LANGUAGE_MODELS`` maps the params name (``train_lm.runs[*].model``) to the class;
``build_language_model`` is the only place that turns a name into a module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnlab.errors import ConfigError


def detach_state(state: Any) -> Any:
    """Cut the autograd graph at a BPTT window boundary while keeping the values (truncated BPTT)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    raise TypeError(f"cannot detach state of type {type(state).__name__}")


class LSTMLanguageModel(nn.Module):
    """Embedding -> multi-layer ``nn.LSTM`` (cuDNN/oneDNN fast path) -> linear, as in
    pytorch/examples word_language_model; optional weight tying (Press & Wolf 2017)."""

    cell_type = "lstm"

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int = 200,
        hidden_size: int = 200,
        num_layers: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = False,
    ):
        super().__init__()
        if tie_weights and embedding_size != hidden_size:
            raise ConfigError(
                f"tie_weights needs embedding_size == hidden_size, got {embedding_size} and {hidden_size}"
            )
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
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[self.cell_type]
        self.rnn = rnn_cls(embedding_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # Same uniform init as pytorch/examples, so results compare with its reference numbers.
        init_range = 0.1
        nn.init.uniform_(self.embedding.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)
        if self.decoder.weight is not self.embedding.weight:
            nn.init.uniform_(self.decoder.weight, -init_range, init_range)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu"):
        shape = (self.num_layers, batch_size, self.hidden_size)
        weight = self.decoder.weight
        zeros = torch.zeros(shape, device=device, dtype=weight.dtype)
        return (zeros, zeros.clone()) if self.cell_type == "lstm" else zeros

    def forward(self, tokens: torch.Tensor, state=None):
        if state is None:
            state = self.init_state(tokens.size(1), tokens.device)
        emb = self.drop(self.embedding(tokens))  # [seq, batch, emb]
        output, state = self.rnn(emb, state)  # output: [seq, batch, hidden]
        logits = self.decoder(self.drop(output))  # [seq, batch, vocab]
        return logits, state

    def embedding_matrix(self) -> torch.Tensor:
        return self.embedding.weight


class GRULanguageModel(LSTMLanguageModel):
    """Same as the LSTM LM with ``nn.GRU`` as the recurrent core."""

    cell_type = "gru"


# The hand-written models live in their own modules (they import nothing from this one).
from rnnlab.models.lstm_cell import HandLSTMLanguageModel, PeepholeLSTMLanguageModel  # noqa: E402
from rnnlab.models.mlp_lm import MLPLanguageModel  # noqa: E402
from rnnlab.models.rnn import ElmanRNNLanguageModel  # noqa: E402

LANGUAGE_MODELS: dict[str, type[nn.Module]] = {
    "lstm": LSTMLanguageModel,
    "gru": GRULanguageModel,
    "rnn": ElmanRNNLanguageModel,
    "lstm_hand": HandLSTMLanguageModel,
    "lstm_peephole": PeepholeLSTMLanguageModel,
    "mlp": MLPLanguageModel,
}


def build_language_model(name: str, vocab_size: int, **hparams) -> nn.Module:
    if name not in LANGUAGE_MODELS:
        raise ConfigError(f"unknown language model {name!r}; valid names: {sorted(LANGUAGE_MODELS)}")
    return LANGUAGE_MODELS[name](vocab_size=vocab_size, **hparams)


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
