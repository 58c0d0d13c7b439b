"""Encoder-decoder translation model: bidirectional LSTM encoder, LSTM decoder with attention.

Tensors are **batch-first**: ``[batch, time, features]``; LSTM states are ``[layers, batch, hidden]``
as ``nn.LSTM`` keeps them. ``S`` is the (padded) source length, ``T`` the target length.

- ``Encoder``: embedding -> bidirectional ``nn.LSTM`` over packed sequences (padding never enters
  the recurrence) -> outputs ``[batch, S, 2 * hidden]``; each layer's final forward and backward
  states are concatenated and bridged by ``tanh(Linear(.))`` to the decoder's initial ``(h, c)``.
- ``Attention``: score functions of Bahdanau et al. 2015 (``"bahdanau"``, additive:
  ``v^T tanh(W_q q + W_k k)``) and Luong et al. 2015 (``"luong"``, multiplicative "general":
  ``q^T W k``); pads are masked to -inf before the softmax. ``"none"`` means no attention.
- ``Decoder``: Luong's global-attention architecture for both score functions (as OpenNMT does):
  the LSTM output ``h_t`` queries the encoder outputs, ``h~_t = tanh(W_c [h_t; c_t])`` feeds the
  output layer; with ``input_feeding`` ``h~_{t-1}`` is concatenated to the next input embedding.
  ``attention="none"`` is the fixed-context encoder-decoder of Sutskever et al. 2014: the
  decoder only sees the bridged final encoder state, plus (``summary_each_step``, as in Cho et
  al. 2014) the top layer's final forward/backward states concatenated to every input;
  ``input_feeding`` has no effect then.
- ``Seq2Seq.forward(src, src_lengths, tgt_in)`` -> logits ``[batch, T, tgt_vocab]`` under teacher
  forcing. Without input feeding and with ``teacher_forcing=1`` the decoder LSTM runs over the
  whole target in one call; otherwise step by step (the same ``decode_step`` that inference uses).
  ``teacher_forcing < 1`` feeds, at each position independently with probability
  ``1 - teacher_forcing``, the model's own previous argmax prediction instead of the gold token.
- ``Seq2SeqDecoder`` adapts the model to :class:`rnnlab.decoding.IncrementalDecoder`; its state is
  a :class:`DecoderState` whose every piece is row-selected by ``reorder_state``.

``Seq2Seq.hparams`` holds the constructor arguments so a checkpoint rebuilds the model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnlab.errors import ConfigError, DataError

ATTENTION_KINDS = ("bahdanau", "luong", "none")


@dataclass
class EncoderOutput:
    outputs: Tensor  # [batch, S, 2 * enc_hidden]; zeros at padded positions
    mask: Tensor  # [batch, S] bool, True at real tokens
    state: tuple[Tensor, Tensor]  # decoder's initial (h, c): [layers, batch, dec_hidden] each
    summary: Tensor  # [batch, 2 * enc_hidden]: top layer's final forward and backward states


@dataclass
class DecoderState:
    """Everything one decoding step needs, one row per hypothesis."""

    h: Tensor  # [layers, rows, hidden]
    c: Tensor  # [layers, rows, hidden]
    feed: Tensor | None  # [rows, hidden]: previous attentional vector (input feeding) or None
    memory: Tensor  # [rows, S, 2 * enc_hidden]: encoder outputs (attention values)
    keys: Tensor | None  # [rows, S, key]: encoder outputs projected once for the score function
    mask: Tensor  # [rows, S] bool
    summary: Tensor  # [rows, 2 * enc_hidden]

    def index_select(self, index: Tensor) -> DecoderState:
        """Row j of the result is row index[j] (beams: repeat, reorder, drop finished rows)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif f.name in ("h", "c"):
                picked[f.name] = value.index_select(1, index)  # rows are dim 1 in LSTM states
            else:
                picked[f.name] = value.index_select(0, index)
        return DecoderState(**picked)


def lengths_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[batch] lengths -> [batch, max_len] bool mask, True at real positions."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class Encoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        pad_id: int,
        decoder_hidden_size: int,
    ):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.LSTM(
            embedding_size,
            hidden_size,
            num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        # One bridge for h and one for c, shared by all layers: [fwd; bwd] -> decoder hidden.
        self.bridge_h = nn.Linear(2 * hidden_size, decoder_hidden_size)
        self.bridge_c = nn.Linear(2 * hidden_size, decoder_hidden_size)

    def forward(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        batch, src_len = src.shape
        if src_lengths.numel() and int(src_lengths.min()) < 1:
            row = int(src_lengths.argmin())
            raise DataError(f"source sentence at batch row {row} is empty (length 0); nothing to translate")
        emb = self.dropout(self.embedding(src))  # [batch, S, emb]
        packed = pack_padded_sequence(emb, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, (h_n, c_n) = self.rnn(packed)  # h_n: [layers * 2, batch, hidden], in input order
        outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=src_len)  # [batch, S, 2H]

        def both_directions(state: Tensor) -> Tensor:
            # [layers * 2, batch, H] -> [layers, batch, 2H] (forward state first)
            state = state.view(self.num_layers, 2, batch, self.hidden_size)
            return torch.cat([state[:, 0], state[:, 1]], dim=-1)

        h_cat, c_cat = both_directions(h_n), both_directions(c_n)  # [layers, batch, 2H]
        init = (torch.tanh(self.bridge_h(h_cat)), torch.tanh(self.bridge_c(c_cat)))  # [layers, batch, dec_H]
        return EncoderOutput(
            outputs=outputs, mask=lengths_mask(src_lengths.to(src.device), src_len), state=init, summary=h_cat[-1]
        )


class Attention(nn.Module):
    """Scores a query against every encoder position; returns (context, weights)."""

    def __init__(self, kind: str, query_size: int, key_size: int):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"attention kind {kind!r} is unknown; expected one of {list(ATTENTION_KINDS)}")
        self.kind = kind
        if kind == "bahdanau":
            self.key_proj = nn.Linear(key_size, query_size, bias=False)
            self.query_proj = nn.Linear(query_size, query_size)
            self.v = nn.Linear(query_size, 1, bias=False)
        elif kind == "luong":
            self.key_proj = nn.Linear(key_size, query_size, bias=False)  # the W of q^T W k

    def project_keys(self, memory: Tensor) -> Tensor | None:
        """Done once per sentence, not once per step: [batch, S, key] -> [batch, S, query]."""
        return None if self.kind == "none" else self.key_proj(memory)

    def forward(self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query [batch, T, q], keys [batch, S, q], memory [batch, S, m], mask [batch, S]
        -> context [batch, T, m], weights [batch, T, S] (exactly 0 at pads)."""
        if self.kind == "none":
            raise RuntimeError("Attention(kind='none') has nothing to attend with")
        if self.kind == "bahdanau":
            q = self.query_proj(query)  # [batch, T, q]
            scores = self.v(torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)  # [batch, T, S]
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))  # [batch, T, S]
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # [batch, T, S]
        return torch.bmm(weights, memory), weights  # context: [batch, T, m]


class Decoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        attention: str,
        input_feeding: bool,
        memory_size: int,
        summary_each_step: bool,
        pad_id: int,
    ):
        super().__init__()
        self.attends = attention != "none"
        self.input_feeding = input_feeding and self.attends
        self.summary_each_step = summary_each_step and not self.attends
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        input_size = embedding_size
        input_size += hidden_size if self.input_feeding else 0
        input_size += memory_size if self.summary_each_step else 0
        self.rnn = nn.LSTM(
            input_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.attention = Attention(attention, hidden_size, memory_size)
        if self.attends:
            self.combine = nn.Linear(hidden_size + memory_size, hidden_size, bias=False)  # Luong's W_c
        self.output = nn.Linear(hidden_size, vocab_size)

    def initial_state(self, enc: EncoderOutput) -> DecoderState:
        batch = enc.outputs.size(0)
        feed = enc.outputs.new_zeros(batch, self.hidden_size) if self.input_feeding else None
        return DecoderState(
            h=enc.state[0],
            c=enc.state[1],
            feed=feed,
            memory=enc.outputs,
            keys=self.attention.project_keys(enc.outputs),
            mask=enc.mask,
            summary=enc.summary,
        )

    def _inputs(self, emb: Tensor, state: DecoderState) -> Tensor:
        """emb [batch, T, emb] -> LSTM inputs (with input feed / fixed summary appended)."""
        parts = [emb]
        if self.input_feeding:
            parts.append(state.feed.unsqueeze(1).expand(-1, emb.size(1), -1))
        if self.summary_each_step:
            parts.append(state.summary.unsqueeze(1).expand(-1, emb.size(1), -1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else emb

    def _attend(self, rnn_out: Tensor, state: DecoderState) -> tuple[Tensor, Tensor | None]:
        """rnn_out [batch, T, H] -> attentional vectors [batch, T, H], weights [batch, T, S]."""
        if not self.attends:
            return rnn_out, None
        context, weights = self.attention(rnn_out, state.keys, state.memory, state.mask)
        return torch.tanh(self.combine(torch.cat([rnn_out, context], dim=-1))), weights

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState, Tensor | None]:
        """tokens [rows] -> logits [rows, vocab], new state, attention weights [rows, S] or None."""
        emb = self.dropout(self.embedding(tokens.unsqueeze(1)))  # [rows, 1, emb]
        rnn_out, (h, c) = self.rnn(self._inputs(emb, state), (state.h, state.c))  # [rows, 1, H]
        attentional, weights = self._attend(rnn_out, state)  # [rows, 1, H], [rows, 1, S]
        logits = self.output(self.dropout(attentional)).squeeze(1)  # [rows, vocab]
        new_state = DecoderState(
            h=h,
            c=c,
            feed=attentional.squeeze(1) if self.input_feeding else None,
            memory=state.memory,
            keys=state.keys,
            mask=state.mask,
            summary=state.summary,
        )
        return logits, new_state, None if weights is None else weights.squeeze(1)

    def forward(self, tgt_in: Tensor, enc: EncoderOutput, teacher_forcing: float = 1.0) -> Tensor:
        """tgt_in [batch, T] (starts with <bos>) -> logits [batch, T, vocab]."""
        state = self.initial_state(enc)
        if teacher_forcing >= 1.0 and not self.input_feeding:
            # Whole target in one LSTM call: inputs do not depend on earlier outputs.
            emb = self.dropout(self.embedding(tgt_in))  # [batch, T, emb]
            rnn_out, _ = self.rnn(self._inputs(emb, state), (state.h, state.c))  # [batch, T, H]
            attentional, _ = self._attend(rnn_out, state)
            return self.output(self.dropout(attentional))  # [batch, T, vocab]
        logits_steps = []
        tokens = tgt_in[:, 0]
        for t in range(tgt_in.size(1)):
            if t > 0 and teacher_forcing < 1.0:
                own = logits_steps[-1].argmax(dim=-1)  # [batch]
                use_gold = torch.rand(tokens.shape, device=tokens.device) < teacher_forcing
                tokens = torch.where(use_gold, tgt_in[:, t], own)
            elif t > 0:
                tokens = tgt_in[:, t]
            logits, state, _ = self.step(tokens, state)
            logits_steps.append(logits)
        return torch.stack(logits_steps, dim=1)  # [batch, T, vocab]


class Seq2Seq(nn.Module):
    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        *,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        attention: str,
        input_feeding: bool = False,
        summary_each_step: bool = True,
        src_pad_id: int = 0,
        tgt_pad_id: int = 0,
    ):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention: {attention!r} is unknown; expected one of {list(ATTENTION_KINDS)}")
        for key, value in (
            ("src_vocab_size", src_vocab_size),
            ("tgt_vocab_size", tgt_vocab_size),
            ("embedding_size", embedding_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        self.hparams = dict(
            src_vocab_size=src_vocab_size,
            tgt_vocab_size=tgt_vocab_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            attention=attention,
            input_feeding=input_feeding,
            summary_each_step=summary_each_step,
            src_pad_id=src_pad_id,
            tgt_pad_id=tgt_pad_id,
        )
        self.encoder = Encoder(
            src_vocab_size,
            embedding_size,
            hidden_size,
            num_layers,
            dropout,
            src_pad_id,
            decoder_hidden_size=hidden_size,
        )
        self.decoder = Decoder(
            tgt_vocab_size,
            embedding_size,
            hidden_size,
            num_layers,
            dropout,
            attention,
            input_feeding,
            memory_size=2 * hidden_size,
            summary_each_step=summary_each_step,
            pad_id=tgt_pad_id,
        )

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        return self.encoder(src, src_lengths)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, teacher_forcing: float = 1.0) -> Tensor:
        """src [batch, S], src_lengths [batch], tgt_in [batch, T] -> logits [batch, T, tgt_vocab]."""
        return self.decoder(tgt_in, self.encode(src, src_lengths), teacher_forcing)

    def incremental_decoder(self) -> Seq2SeqDecoder:
        return Seq2SeqDecoder(self)


class Seq2SeqDecoder:
    """``rnnlab.decoding.IncrementalDecoder`` over a :class:`Seq2Seq` (call under ``eval()``)."""

    def __init__(self, model: Seq2Seq):
        self.model = model

    def start(self, src: Tensor, src_lengths: Tensor) -> DecoderState:
        """Encode a batch once; the returned state has one row per sentence."""
        return self.model.decoder.initial_state(self.model.encode(src, src_lengths))

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState, Tensor | None]:
        logits, state, weights = self.model.decoder.step(tokens, state)
        return torch.log_softmax(logits.float(), dim=-1), state, weights  # weights: [rows, S]

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        return state.index_select(index)
