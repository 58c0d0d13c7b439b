"""CNN+LSTM caption decoders over cached image features (lecture §5.3). All tensors batch-first.

Inputs shared by both decoders:

- ``features`` [images, positions, channels]: the CNN's 7x7 grid flattened (49 positions),
  the "annotation vectors" a_1..a_L of Xu et al. (2015);
- ``tokens`` [captions, steps]: teacher-forcing inputs ``<bos> w_1 .. w_n`` padded with ``<pad>``;
  the targets are the same captions shifted left (``w_1 .. w_n <eos>``), so the two share a mask;
- ``image_index`` [captions] (optional): caption row -> image row, so the 5 captions of an image
  share one copy of its features and the image-side projections are computed once per image.

``forward`` returns :class:`CaptionerOutput`: ``logits`` [real steps, vocab], computed only at
non-pad steps, row ``i`` for the ``i``-th True of ``tokens != pad`` (row-major), so the loss is
``cross_entropy(logits, targets[tokens != pad])`` and no work goes into padding; ``attention``
[captions, steps, positions] (zeros at padded steps) or None; ``regularizer``: a scalar added to
the loss, the doubly stochastic attention penalty for soft attention, 0 otherwise.

Free-running decoding goes through :func:`incremental_decoder`, which returns an object with the
``rnnlab.decoding.IncrementalDecoder`` protocol (``step``/``reorder_state``) and the initial state,
so greedy and beam search are shared with translation.

- :class:`ShowAndTell` (Vinyals et al. 2015): the mean-pooled image feature, projected to the word
  embedding size, is the LSTM's input at step -1 (from a zero state); then the words follow.
- :class:`ShowAttendTell` (Xu et al. 2015, soft attention): initial h/c from the mean feature;
  at every step an MLP scores the 49 positions against h_{t-1}, the softmax weights alpha_t
  average the features into a context z_t, a gating *scalar* beta_t = sigmoid(f_beta(h_{t-1}))
  scales it, and the LSTM cell reads [E y_{t-1}; beta_t z_t]. Regularizer: mean over images and
  positions of (1 - sum_t alpha_ti)^2, which pushes the model to look at every part of the image.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnlab.errors import ConfigError


class CaptionerOutput(NamedTuple):
    logits: Tensor  # [real steps, vocab]: one row per non-pad token, in the order of tokens[tokens != pad]
    attention: Tensor | None  # [captions, steps, positions]; zeros at padded steps
    regularizer: Tensor  # scalar


def _rows(features: Tensor, tokens: Tensor, image_index: Tensor | None) -> Tensor:
    if image_index is None:
        if features.size(0) != tokens.size(0):
            raise ValueError(
                f"{features.size(0)} images but {tokens.size(0)} captions: pass image_index to map captions to images"
            )
        return torch.arange(tokens.size(0), device=tokens.device)
    if image_index.shape != tokens.shape[:1]:
        raise ValueError(f"image_index shape {tuple(image_index.shape)} != captions {tokens.size(0)}")
    return image_index


class _CaptionDecoderBase(nn.Module):
    def __init__(
        self, vocab_size: int, feature_size: int, embedding_size: int, hidden_size: int, dropout: float, pad_id: int
    ):
        super().__init__()
        for key, value in (
            ("vocab_size", vocab_size),
            ("feature_size", feature_size),
            ("embedding_size", embedding_size),
            ("hidden_size", hidden_size),
        ):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.pad_id = pad_id
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.drop = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, vocab_size)

    def _init_output_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embedding.weight[self.pad_id].zero_()
        nn.init.uniform_(self.output.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)


class ShowAndTell(_CaptionDecoderBase):
    """Image -> first LSTM input; words -> ``nn.LSTM`` -> linear (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        feature_size: int,
        *,
        embedding_size: int,
        hidden_size: int,
        dropout: float,
        pad_id: int = 0,
    ):
        super().__init__(vocab_size, feature_size, embedding_size, hidden_size, dropout, pad_id)
        self.hparams = dict(
            vocab_size=vocab_size,
            feature_size=feature_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            dropout=dropout,
            pad_id=pad_id,
        )
        self.image_embedding = nn.Linear(feature_size, embedding_size)
        self.lstm = nn.LSTM(embedding_size, hidden_size, batch_first=True)
        self._init_output_weights()

    def image_state(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [images, positions, channels] -> (h, c) [images, hidden] after reading the image."""
        image = self.drop(self.image_embedding(features.mean(dim=1)))  # [images, emb]
        _, (h, c) = self.lstm(image.unsqueeze(1))  # h, c: [1, images, hidden]
        return h.squeeze(0), c.squeeze(0)

    def forward(self, features: Tensor, tokens: Tensor, image_index: Tensor | None = None) -> CaptionerOutput:
        rows = _rows(features, tokens, image_index)
        mask = tokens != self.pad_id  # [captions, steps]
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("every caption needs at least its <bos> token")
        h0, c0 = self.image_state(features)
        h0, c0 = h0[rows].unsqueeze(0), c0[rows].unsqueeze(0)  # [1, captions, hidden]
        emb = self.drop(self.embedding(tokens))  # [captions, steps, emb]
        # Packing skips the padded steps (and keeps a padded caption's result equal to it alone).
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed, (h0, c0))
        hidden, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))  # [captions, steps, hidden]
        logits = self.output(self.drop(hidden[mask]))  # [real steps, vocab]
        return CaptionerOutput(logits, None, hidden.new_zeros(()))

    # -- incremental decoding ----------------------------------------------------------------
    def initial_state(self, features: Tensor) -> tuple[Tensor, ...]:
        return self.image_state(features)

    def decode_step(self, tokens: Tensor, state: tuple[Tensor, ...]):
        h, c = state  # [rows, hidden] each
        emb = self.embedding(tokens).unsqueeze(1)  # [rows, 1, emb]
        out, (h, c) = self.lstm(emb, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        log_probs = F.log_softmax(self.output(out[:, 0]), dim=-1)  # [rows, vocab]
        return log_probs, (h.squeeze(0), c.squeeze(0))


class ShowAttendTell(_CaptionDecoderBase):
    """Soft attention over the spatial positions at every step (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        feature_size: int,
        *,
        embedding_size: int,
        hidden_size: int,
        attention_size: int,
        dropout: float,
        pad_id: int = 0,
    ):
        super().__init__(vocab_size, feature_size, embedding_size, hidden_size, dropout, pad_id)
        if attention_size < 1:
            raise ConfigError(f"attention_size must be >= 1, got {attention_size}")
        self.hparams = dict(
            vocab_size=vocab_size,
            feature_size=feature_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            attention_size=attention_size,
            dropout=dropout,
            pad_id=pad_id,
        )
        self.init_h = nn.Linear(feature_size, hidden_size)
        self.init_c = nn.Linear(feature_size, hidden_size)
        self.feature_attention = nn.Linear(feature_size, attention_size)  # W_a a_i (once per image)
        self.hidden_attention = nn.Linear(hidden_size, attention_size)  # W_h h_{t-1}
        self.attention_score = nn.Linear(attention_size, 1)  # v^T tanh(.)
        self.gate = nn.Linear(hidden_size, 1)  # f_beta: the gating scalar
        self.cell = nn.LSTMCell(embedding_size + feature_size, hidden_size)
        self._init_output_weights()

    def image_state(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """features [images, positions, channels] -> h0, c0 [images, hidden], keys [images, positions, att]."""
        mean = features.mean(dim=1)  # [images, channels]
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), self.feature_attention(features)

    def _attend(self, h: Tensor, features: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """h [rows, hidden], features [rows, P, C], keys [rows, P, A] -> gated context [rows, C], alpha [rows, P]."""
        scores = self.attention_score(torch.tanh(keys + self.hidden_attention(h).unsqueeze(1))).squeeze(2)  # [rows, P]
        alpha = F.softmax(scores, dim=1)  # [rows, P]
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # [rows, C]
        beta = torch.sigmoid(self.gate(h))  # [rows, 1]
        return beta * context, alpha

    def forward(self, features: Tensor, tokens: Tensor, image_index: Tensor | None = None) -> CaptionerOutput:
        rows = _rows(features, tokens, image_index)
        mask = tokens != self.pad_id  # [captions, steps]
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("every caption needs at least its <bos> token")
        n_captions, steps = tokens.shape
        # Longest captions first: at step t the captions still running are a prefix of the batch,
        # so each step computes only on them (no work on padding); rows are cut only when that
        # prefix shrinks, since every slice costs a zero-filled gradient buffer in backward.
        order = lengths.argsort(descending=True, stable=True)
        sorted_lengths = lengths[order].tolist()
        h0, c0, keys = self.image_state(features)
        image_rows = rows[order]
        h, c = h0[image_rows], c0[image_rows]  # [captions, hidden]
        feats, keys = features[image_rows], keys[image_rows]  # [captions, P, C], [captions, P, A]
        emb = self.drop(self.embedding(tokens[order]))  # [captions, steps, emb]
        descending = [-n for n in sorted_lengths]
        hidden_steps, alpha_steps, flat_positions = [], [], []
        running = n_captions
        for t in range(sorted_lengths[0]):
            n = bisect.bisect_left(descending, -t)  # captions with length > t
            if n < running:
                h, c, feats, keys, running = h[:n], c[:n], feats[:n], keys[:n], n
            context, alpha = self._attend(h, feats, keys)
            h, c = self.cell(torch.cat([emb[:n, t], context], dim=1), (h, c))  # [n, hidden]
            hidden_steps.append(h)
            alpha_steps.append(alpha)
            flat_positions.append(order[:n] * steps + t)  # where these rows sit in [captions, steps]
        # Time-major "packed" rows -> the row-major order of tokens[mask].
        to_mask_order = torch.cat(flat_positions).argsort()
        hidden = torch.cat(hidden_steps)[to_mask_order]  # [real steps, hidden]
        attention = hidden.new_zeros(n_captions, steps, feats.size(1))
        attention[mask] = torch.cat(alpha_steps)[to_mask_order]  # [captions, steps, P], zeros at pads
        regularizer = ((1.0 - attention.sum(dim=1)) ** 2).mean()  # doubly stochastic (Xu et al. eq. 14)
        return CaptionerOutput(self.output(self.drop(hidden)), attention, regularizer)

    # -- incremental decoding ----------------------------------------------------------------
    def initial_state(self, features: Tensor) -> tuple[Tensor, ...]:
        h, c, keys = self.image_state(features)
        return h, c, features, keys

    def decode_step(self, tokens: Tensor, state: tuple[Tensor, ...]):
        h, c, features, keys = state  # [rows, hidden] x2, [rows, P, C], [rows, P, A]
        context, alpha = self._attend(h, features, keys)
        h, c = self.cell(torch.cat([self.embedding(tokens), context], dim=1), (h, c))
        log_probs = F.log_softmax(self.output(h), dim=-1)  # [rows, vocab]
        return log_probs, (h, c, features, keys), alpha


class CaptionStepper:
    """``rnnlab.decoding.IncrementalDecoder`` adapter: one token per row per step.

    ``step`` returns ``(log_probs [rows, vocab], state)`` for Show and Tell and additionally the
    step's attention weights ``[rows, positions]`` for soft attention (collected by the decoding
    functions with ``return_attention=True`` for visualisation). The state is a tuple of row-aligned
    tensors; ``reorder_state`` selects/repeats rows of every one of them (features included).
    """

    def __init__(self, model: ShowAndTell | ShowAttendTell):
        self.model = model

    def step(self, tokens: Tensor, state: tuple[Tensor, ...]):
        return self.model.decode_step(tokens, state)

    def reorder_state(self, state: tuple[Tensor, ...], index: Tensor) -> tuple[Tensor, ...]:
        return tuple(s.index_select(0, index) for s in state)


def incremental_decoder(model: ShowAndTell | ShowAttendTell, features: Tensor) -> tuple[CaptionStepper, tuple]:
    """(decoder adapter, initial state with one row per image of ``features`` [images, P, C])."""
    return CaptionStepper(model), model.initial_state(features)


CAPTION_DECODERS: dict[str, type[nn.Module]] = {
    "show_tell": ShowAndTell,
    "soft_attention": ShowAttendTell,
}


def build_captioner(name: str, **hparams) -> ShowAndTell | ShowAttendTell:
    """``name``: show_tell | soft_attention; ``attention_size`` is ignored by show_tell."""
    if name not in CAPTION_DECODERS:
        raise ConfigError(f"unknown caption decoder {name!r}; valid names: {sorted(CAPTION_DECODERS)}")
    if name == "show_tell":
        hparams.pop("attention_size", None)
    return CAPTION_DECODERS[name](**hparams)
