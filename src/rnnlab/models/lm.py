"""The language models (time-first tensors): one shell, a pluggable recurrent core.

:class:`RecurrentLanguageModel` is embedding -> dropout -> recurrent core -> dropout -> linear
output (optionally tied to the embedding), as pytorch/examples word_language_model. The core
(params ``train_lm.runs.<run>.model``):

- ``lstm`` / ``gru``: ``nn.LSTM`` / ``nn.GRU`` (the fused library kernels);
- ``rnn``: the lecture's Elman network written out by hand (:class:`rnnlab.models.rnn.ElmanRNN`,
  ``h(t) = tanh(U x(t) + W h(t-1) + b)``; the shell's output layer is ``y(t) = V h(t) + c``);
- ``lstm_hand`` / ``lstm_peephole``: the hand-written LSTM cell with BPTT written out, without /
  with peepholes (:class:`rnnlab.models.lstm_cell.HandLSTM`), tested against ``nn.LSTM``.

Output layer (``output``): ``full`` (default) is one linear layer and a softmax over the whole
vocabulary, the cost that dominates a 10k-33k-word LM at hidden size 200. ``adaptive`` is
``nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017, "Efficient softmax approximation for GPUs"):
the ids (frequency-ordered by :class:`rnnlab.data.vocab.Vocab`) below ``cutoffs[0]`` plus one token
per tail cluster form the head; a rare word costs the head softmax plus its cluster's softmax
through a smaller projection. It descends from Mikolov et al. 2011 ("Extensions of recurrent neural
network language model", ICASSP): the class-based RNNLM factorises P(w | h) = P(class(w) | h)
P(w | class(w), h) with classes by frequency binning. Training uses the cheap target-only loss;
``forward`` returns the exact log-probabilities over the full vocabulary (``log_prob``: normalised,
so softmax / cross-entropy / sampling on them are exact), so perplexity and generation are exact.

``mlp`` (Bengio et al. 2003) is feed-forward: its "state" is the last n-1 tokens, so it is its
own module (:class:`rnnlab.models.mlp_lm.MLPLanguageModel`) on the same interface and init.

Every LM: ``forward(tokens [seq, batch], state) -> (logits [seq, batch, vocab], state)``;
``init_state(batch_size, device)``; ``hparams`` (the constructor's kwargs, so a checkpoint
rebuilds it). :func:`build_language_model` is the only place a name becomes a module.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnlab.errors import ConfigError
from rnnlab.models.lm_parts import (
    INIT_RANGE,
    OUTPUT_LAYERS,
    check_adaptive_output,
    check_lm_hparams,
    init_output_layer,
)
from rnnlab.models.lstm_cell import HandLSTM
from rnnlab.models.mlp_lm import MLPLanguageModel
from rnnlab.models.rnn import ElmanRNN

RECURRENT_CORES = ("lstm", "gru", "rnn", "lstm_hand", "lstm_peephole")


def build_core(core: str, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> nn.Module:
    between = dropout if num_layers > 1 else 0.0  # dropout between stacked layers only
    if core == "lstm":
        return nn.LSTM(input_size, hidden_size, num_layers, dropout=between)
    if core == "gru":
        return nn.GRU(input_size, hidden_size, num_layers, dropout=between)
    if core == "rnn":
        return ElmanRNN(input_size, hidden_size, num_layers, dropout=between)
    if core in ("lstm_hand", "lstm_peephole"):
        return HandLSTM(input_size, hidden_size, num_layers, dropout=between, peepholes=core == "lstm_peephole")
    raise ConfigError(f"unknown recurrent core {core!r}; valid names: {list(RECURRENT_CORES)}")


class RecurrentLanguageModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        core: str,
        *,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        tie_weights: bool = False,
        output: str = "full",
        cutoffs: list[int] | None = None,
    ):
        super().__init__()
        check_lm_hparams(embedding_size, hidden_size, num_layers, dropout, tie_weights)
        self.hparams = dict(
            vocab_size=vocab_size,
            core=core,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            tie_weights=tie_weights,
        )
        self.core_name, self.hidden_size, self.num_layers = core, hidden_size, num_layers
        self.adaptive = output == "adaptive"
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = build_core(core, embedding_size, hidden_size, num_layers, dropout)
        if self.adaptive:
            cutoffs = check_adaptive_output(vocab_size, cutoffs, tie_weights)
            self.hparams.update(output=output, cutoffs=cutoffs)
            # div_value 4 (PyTorch's and Grave et al.'s): each tail cluster's projection is 4x narrower
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, cutoffs, div_value=4.0)
            # the full layer's init for every weight (head, tail projections and outputs): PyTorch's
            # kaiming default is ~3x larger at width 200 and made SGD lr 20 blow up in its first steps
            for weight in (self.embedding.weight, *self.decoder.parameters()):
                nn.init.uniform_(weight, -INIT_RANGE, INIT_RANGE)
        elif output == "full":
            self.decoder = nn.Linear(hidden_size, vocab_size)  # the lecture's V (weight) and c (bias)
            init_output_layer(self.embedding, self.decoder, tie_weights)
        else:
            raise ConfigError(f"output: expected one of {list(OUTPUT_LAYERS)}, got {output!r}")

    @property
    def cell_type(self) -> str:
        """What the state is: ``lstm`` (h, c) for every LSTM core, else the core's name."""
        return "lstm" if self.core_name in ("lstm", "lstm_hand", "lstm_peephole") else self.core_name

    # The lecture's names for the output layer: y(t) = V h(t) + c.
    @property
    def V(self) -> torch.Tensor:  # noqa: N802
        if self.adaptive:
            raise AttributeError("the adaptive output layer has no single V (head + tail clusters)")
        return self.decoder.weight

    @property
    def c(self) -> torch.Tensor:
        if self.adaptive:
            raise AttributeError("the adaptive output layer has no single c (head + tail clusters)")
        return self.decoder.bias

    @property
    def layers(self) -> nn.ModuleList:
        """The hand-written cores' layers (``rnn``, ``lstm_hand``, ``lstm_peephole``)."""
        if not hasattr(self.rnn, "layers"):
            raise AttributeError(f"the {self.core_name!r} core is a library module without hand-written layers")
        return self.rnn.layers

    def init_state(self, batch_size: int, device: torch.device | str = "cpu"):
        zeros = torch.zeros(
            self.num_layers, batch_size, self.hidden_size, device=device, dtype=self.embedding.weight.dtype
        )
        return (zeros, zeros.clone()) if self.cell_type == "lstm" else zeros

    def forward(self, tokens: torch.Tensor, state=None):
        output, state = self._hidden(tokens, state)  # output: [seq, batch, hidden]
        if self.adaptive:  # exact log-probabilities over the full vocabulary (they are logits too)
            seq, batch, hidden = output.shape
            return self.decoder.log_prob(output.reshape(seq * batch, hidden)).view(seq, batch, -1), state
        return self.decoder(output), state  # logits: [seq, batch, vocab]

    def _hidden(self, tokens: torch.Tensor, state):
        if state is None:
            state = self.init_state(tokens.size(1), tokens.device)
        emb = self.drop(self.embedding(tokens))  # [seq, batch, emb]
        output, state = self.rnn(emb, state)  # [seq, batch, hidden]
        return self.drop(output), state

    def adaptive_loss(self, tokens: torch.Tensor, targets: torch.Tensor, state=None):
        """Adaptive output only: mean negative log-likelihood of ``targets`` [seq, batch] computed
        from the head and the targets' clusters only (the training speed-up); equal to the mean of
        ``-forward(...)`` gathered at the targets."""
        output, state = self._hidden(tokens, state)
        return self.decoder(output.reshape(-1, output.size(-1)), targets.reshape(-1)).loss, state

    @torch.no_grad()
    def copy_from_torch_lstm(self, lstm: nn.LSTM) -> None:
        """Hand-written LSTM cores: load an ``nn.LSTM``'s weights (peepholes set to 0)."""
        self.rnn.copy_from_torch_lstm(lstm)

    def embedding_matrix(self) -> torch.Tensor:
        return self.embedding.weight


LANGUAGE_MODELS = (*RECURRENT_CORES, "mlp")  # the names train_lm.runs.<run>.model accepts (+ ngram)


def build_language_model(name: str, vocab_size: int, **hparams) -> nn.Module:
    if name == "mlp":
        return MLPLanguageModel(vocab_size=vocab_size, **hparams)
    if name not in RECURRENT_CORES:
        raise ConfigError(f"unknown language model {name!r}; valid names: {sorted(LANGUAGE_MODELS)}")
    hparams.pop("core", None)
    return RecurrentLanguageModel(vocab_size=vocab_size, core=name, **hparams)
