"""LightningModule for CNN+LSTM captioning on cached image features.

Loss: token-level cross-entropy over the non-pad target tokens (teacher forcing), plus
``alpha_c`` times the doubly stochastic attention penalty for the soft-attention decoder.
Logged: ``train/loss`` (the optimised total), ``train/ce``, ``val/loss`` (token-weighted
cross-entropy over the whole dev split) and ``val/ppl``. BLEU is never computed here under
teacher forcing; it comes from free-running decoding (:meth:`CaptioningTask.caption`,
:mod:`rnnlab.caption_eval`).

The checkpoint carries the vocabulary and tokenizer (``on_save_checkpoint``), so captioning a
new image needs nothing but the checkpoint and the encoder it names (``hparams.encoder``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab.data.tokenize import Tokenizer, WordTokenizer, build_tokenizer
from rnnlab.data.vocab import Vocab
from rnnlab.decoding import beam_search, greedy_decode
from rnnlab.errors import RnnlabError, TrainingError
from rnnlab.models.captioner import build_captioner, incremental_decoder


@dataclass
class Captions:
    tokens: list[list[str]]  # without <bos>/<eos>
    scores: list[float]
    attention: list[torch.Tensor] | None  # per caption [steps (incl. <eos>), positions]

    def texts(self, tokenizer: Tokenizer) -> list[str]:
        return [tokenizer.detokenize(t) for t in self.tokens]


class CaptioningTask(pl.LightningModule):
    def __init__(
        self,
        decoder: str,
        vocab_size: int,
        feature_size: int,
        embedding_size: int = 256,
        hidden_size: int = 512,
        attention_size: int = 256,
        dropout: float = 0.5,
        lr: float = 4e-4,
        alpha_c: float = 1.0,
        max_len: int = 30,
        encoder: str = "efficientnet_lite0",
        tokenizer: dict | None = None,
        vocab_fingerprint: str = "",
        vocab: Vocab | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["vocab"])
        if vocab is not None and len(vocab) != vocab_size:
            raise RnnlabError(f"vocab_size {vocab_size} != vocabulary of {len(vocab)} tokens")
        self.model = build_captioner(
            decoder, vocab_size=vocab_size, feature_size=feature_size, embedding_size=embedding_size,
            hidden_size=hidden_size, attention_size=attention_size, dropout=dropout, pad_id=Vocab.pad_id,
        )
        self.vocab = vocab
        self.tokenizer = build_tokenizer(tokenizer) if tokenizer else WordTokenizer(lowercase=True)
        self._val_sums = [0.0, 0]
        self.last_validated_step = -1  # global step whose weights the last val/loss measured

    # -- loss ------------------------------------------------------------------------------
    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        out = self.model(batch.features, batch.inputs, batch.image_index)
        mask = batch.inputs != Vocab.pad_id  # inputs and targets share the padding
        targets = batch.targets[mask]  # [real steps]
        ce = F.cross_entropy(out.logits.float(), targets)
        total = ce + self.hparams.alpha_c * out.regularizer if out.attention is not None else ce
        return total, ce, int(targets.numel())

    def training_step(self, batch, batch_idx):
        total, ce, n_tokens = self._losses(batch)
        if not torch.isfinite(total):
            raise TrainingError(
                f"train loss is {total.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "lower train_captioner lr or set gradient_clip_val"
            )
        self.log("train/loss", total, on_step=True, on_epoch=True, batch_size=n_tokens)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=n_tokens)
        return total

    def on_validation_epoch_start(self) -> None:
        self._val_sums = [0.0, 0]

    def validation_step(self, batch, batch_idx):
        _, ce, n_tokens = self._losses(batch)
        self._val_sums[0] += ce.item() * n_tokens
        self._val_sums[1] += n_tokens

    def on_validation_epoch_end(self) -> None:
        loss = self._val_sums[0] / max(self._val_sums[1], 1)
        self.last_validated_step = self.global_step
        self.log("val/loss", loss)
        self.log("val/ppl", math.exp(min(loss, 50.0)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)

    # -- checkpoint ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.vocab is None:
            raise RnnlabError("CaptioningTask has no vocabulary to save")
        checkpoint["vocab"] = self.vocab.to_dict()
        checkpoint["tokenizer"] = self.tokenizer.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        vocab = Vocab.from_dict(checkpoint["vocab"])
        if len(vocab) != self.hparams.vocab_size:
            raise RnnlabError(
                f"checkpoint vocabulary has {len(vocab)} tokens but the model has {self.hparams.vocab_size} outputs"
            )
        self.vocab = vocab
        self.tokenizer = build_tokenizer(checkpoint.get("tokenizer", {"name": "word", "lowercase": True}))

    # -- free-running decoding -------------------------------------------------------------
    @torch.no_grad()
    def caption(self, features: torch.Tensor, beam_size: int = 1, max_len: int | None = None,
                length_penalty: float = 0.0, return_attention: bool = False, batch_size: int = 100) -> Captions:
        """Caption images from features [images, positions, channels]; greedy when ``beam_size == 1``."""
        if self.vocab is None:
            raise RnnlabError("CaptioningTask has no vocabulary (load it from a checkpoint)")
        was_training = self.training
        self.eval()
        max_steps = (max_len or self.hparams.max_len) + 1  # + the <eos> step
        tokens, scores, attention = [], [], [] if return_attention else None
        try:
            for start in range(0, features.size(0), batch_size):
                chunk = features[start: start + batch_size].to(self.device, torch.float32)
                stepper, state = incremental_decoder(self.model, chunk)
                common = dict(batch_size=chunk.size(0), bos_id=Vocab.bos_id, eos_id=Vocab.eos_id, max_len=max_steps,
                              return_attention=return_attention)
                if beam_size == 1:
                    result = greedy_decode(stepper, state, **common)
                else:
                    result = beam_search(stepper, state, beam_size=beam_size, length_penalty=length_penalty, **common)
                tokens.extend(self.vocab.decode(t) for t in result.tokens)
                scores.extend(result.scores)
                if return_attention:
                    attention.extend(result.attention or [None] * chunk.size(0))
        finally:
            self.train(was_training)
        return Captions(tokens, scores, attention)


def load_captioner(path: str | Path, map_location: str = "cpu") -> CaptioningTask:
    """Rebuild a trained :class:`CaptioningTask` (eval mode, vocabulary inside) from a checkpoint,
    reading it with ``torch.load(weights_only=True)``."""
    from rnnlab.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path)
    if "vocab" not in ckpt or "hyper_parameters" not in ckpt:
        raise RnnlabError(f"{path}: not a captioning checkpoint (no vocab/hyper_parameters)")
    vocab = Vocab.from_dict(ckpt["vocab"])
    hp = dict(ckpt["hyper_parameters"])
    if hp.get("vocab_fingerprint") and hp["vocab_fingerprint"] != vocab.fingerprint():
        raise RnnlabError(f"{path}: vocabulary fingerprint {vocab.fingerprint()} != {hp['vocab_fingerprint']} in hparams")
    task = CaptioningTask(**hp, vocab=vocab)
    task.load_state_dict(ckpt["state_dict"])
    task.on_load_checkpoint(ckpt)
    return task.to(map_location).eval()
