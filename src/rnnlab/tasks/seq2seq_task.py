"""LightningModule for seq2seq translation (batch-first tensors, see rnnlab.models.seq2seq).

- Loss: cross-entropy over target tokens, ``<pad>`` ignored, label smoothing by hparam
  (``train/loss`` includes the smoothing; ``val/loss``/``val/ppl`` are plain token-level
  cross-entropy and its exponential, teacher-forced, so they are true perplexities).
- Optional ``val/bleu``: greedy decoding of the whole validation split at each validation end,
  detokenized and scored with sacreBLEU against the raw references (never teacher-forced).
- The vocabularies and tokenizers travel inside the checkpoint (``on_save_checkpoint``), so
  ``TranslationTask.load_from_checkpoint(path)`` can translate without any data files; a stored
  vocabulary whose size differs from the model's embedding/output size is an error naming both.
- ``translate(sentences, beam_size, max_len)`` runs rnnlab.decoding (greedy for beam 1 is the same
  result; beam search is batched over all sentences).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab.data.bpe import tokenizer_from_dict
from rnnlab.data.parallel import TranslationBatch, pad_sequences
from rnnlab.data.tokenize import Tokenizer
from rnnlab.data.vocab import Vocab
from rnnlab.decoding import DecodeResult, beam_search, greedy_decode
from rnnlab.errors import DataError, TrainingError
from rnnlab.models.lm import count_parameters
from rnnlab.models.seq2seq import Seq2Seq

log = logging.getLogger(__name__)

MODEL_KEYS = ("embedding_size", "hidden_size", "num_layers", "dropout", "attention", "input_feeding",
              "summary_each_step")


class TranslationTask(pl.LightningModule):
    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embedding_size: int = 256,
        hidden_size: int = 256,
        num_layers: int = 1,
        dropout: float = 0.3,
        attention: str = "bahdanau",
        input_feeding: bool = False,
        summary_each_step: bool = True,
        lr: float = 2e-3,
        label_smoothing: float = 0.1,
        teacher_forcing: float = 1.0,
        val_bleu: bool = True,
        decode_max_len: int = 50,
        length_penalty: float = 0.0,
        lr_plateau_factor: float | None = None,
        monitor: str = "val/loss",
        src_vocab_fingerprint: str = "",
        tgt_vocab_fingerprint: str = "",
        src_vocab: Vocab | None = None,
        tgt_vocab: Vocab | None = None,
        src_tokenizer: Tokenizer | None = None,
        tgt_tokenizer: Tokenizer | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["src_vocab", "tgt_vocab", "src_tokenizer", "tgt_tokenizer"])
        hp = self.hparams
        self.model = Seq2Seq(
            src_vocab_size, tgt_vocab_size, src_pad_id=Vocab.pad_id, tgt_pad_id=Vocab.pad_id,
            **{k: hp[k] for k in MODEL_KEYS},
        )
        self.src_vocab = self.tgt_vocab = None
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        if src_vocab is not None or tgt_vocab is not None:
            self.attach_vocabs(src_vocab, tgt_vocab)
        self._sums = [0.0, 0]
        self._val_hyps: dict[int, list[int]] = {}
        self.last_truncated = 0

    # -- vocabularies ------------------------------------------------------------------------
    def attach_vocabs(self, src_vocab: Vocab, tgt_vocab: Vocab, where: str = "TranslationTask") -> None:
        """Check that the vocabularies fit the model's embedding/output sizes, then keep them."""
        for side, vocab, size in (("source", src_vocab, self.hparams.src_vocab_size),
                                  ("target", tgt_vocab, self.hparams.tgt_vocab_size)):
            if vocab is None:
                raise DataError(f"{where}: the {side} vocabulary is missing")
            if len(vocab) != size:
                raise DataError(
                    f"{where}: the {side} vocabulary has {len(vocab)} tokens but the model was built for {size}"
                )
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extra = {}
        if self.src_vocab is not None:
            extra["src_vocab"] = self.src_vocab.to_dict()
            extra["tgt_vocab"] = self.tgt_vocab.to_dict()
        if self.src_tokenizer is not None:
            extra["src_tokenizer"] = self.src_tokenizer.to_dict()
            extra["tgt_tokenizer"] = self.tgt_tokenizer.to_dict()
        checkpoint["translation"] = extra

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("translation", {})
        if "src_vocab" in extra:
            self.attach_vocabs(Vocab.from_dict(extra["src_vocab"]), Vocab.from_dict(extra["tgt_vocab"]), "checkpoint")
        if "src_tokenizer" in extra:
            self.src_tokenizer = tokenizer_from_dict(extra["src_tokenizer"])
            self.tgt_tokenizer = tokenizer_from_dict(extra["tgt_tokenizer"])

    def num_parameters(self) -> int:
        return count_parameters(self.model)

    # -- training ----------------------------------------------------------------------------
    def forward(self, src, src_lengths, tgt_in):
        return self.model(src, src_lengths, tgt_in)

    def _loss(self, batch: TranslationBatch, label_smoothing: float, reduction: str = "mean") -> torch.Tensor:
        teacher_forcing = self.hparams.teacher_forcing if self.training else 1.0
        logits = self.model(batch.src, batch.src_lengths, batch.tgt_in, teacher_forcing)  # [batch, T, V]
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), batch.tgt_out.reshape(-1),
            ignore_index=Vocab.pad_id, label_smoothing=label_smoothing, reduction=reduction,
        )

    def training_step(self, batch: TranslationBatch, batch_idx: int):
        loss = self._loss(batch, self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"train loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "lower train_seq2seq.lr or set clip"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch.src.size(0))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.lr_plateau_factor:
            return optimizer
        # Multiply the learning rate by the factor whenever the monitored metric stops improving.
        mode = "max" if self.hparams.monitor == "val/bleu" else "min"
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode,
                                                               factor=self.hparams.lr_plateau_factor, patience=0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.monitor, "interval": "epoch"}}

    # -- evaluation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._sums = [0.0, 0]
        self._val_hyps = {}

    def validation_step(self, batch: TranslationBatch, batch_idx: int) -> None:
        self._sums[0] += self._loss(batch, 0.0, reduction="sum").item()
        self._sums[1] += int((batch.tgt_out != Vocab.pad_id).sum())
        if self.hparams.val_bleu and self.tgt_tokenizer is not None:
            result = self.decode(batch.src, batch.src_lengths, beam_size=1)
            self._val_hyps.update(zip(batch.index.tolist(), result.tokens))

    def on_validation_epoch_end(self) -> None:
        total, n = self._sums
        mean = total / max(n, 1)
        self.log("val/loss", mean)
        self.log("val/ppl", math.exp(min(mean, 50.0)))
        refs = self._references("val")
        if self._val_hyps and refs is not None and len(self._val_hyps) == len(refs):
            import sacrebleu

            hyps = [self.ids_to_text(self._val_hyps[i]) for i in range(len(refs))]
            self.log("val/bleu", sacrebleu.corpus_bleu(hyps, [refs]).score)

    def _references(self, split: str) -> list[str] | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.references(split) if datamodule is not None and hasattr(datamodule, "references") else None

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int = 1, max_len: int | None = None,
               length_penalty: float | None = None, return_attention: bool = False,
               greedy: bool | None = None) -> DecodeResult:
        """Batched beam search for a padded batch [batch, S]; greedy decoding when ``greedy`` (by
        default when beam_size is 1: the same output, without the beam bookkeeping)."""
        was_training = self.model.training
        self.model.eval()
        try:
            decoder = self.model.incremental_decoder()
            state = decoder.start(src, src_lengths)
            max_len = max_len or self.hparams.decode_max_len
            common = dict(batch_size=src.size(0), bos_id=Vocab.bos_id, eos_id=Vocab.eos_id, max_len=max_len,
                          return_attention=return_attention)
            if greedy or (greedy is None and beam_size == 1):
                return greedy_decode(decoder, state, **common)
            alpha = self.hparams.length_penalty if length_penalty is None else length_penalty
            return beam_search(decoder, state, beam_size=beam_size, length_penalty=alpha, **common)
        finally:
            self.model.train(was_training)

    def ids_to_text(self, ids: list[int]) -> str:
        return self.tgt_tokenizer.detokenize(self.tgt_vocab.decode(ids, strip_specials=True))

    def encode_sources(self, sentences: list[str], max_len: int | None = None) -> list[np.ndarray]:
        """Raw sentences -> id arrays (unknown words -> <unk>, cut to max_len with a warning count).

        An empty or whitespace-only sentence is an error naming its 1-based position."""
        if self.src_tokenizer is None or self.src_vocab is None:
            raise DataError("this model has no tokenizer/vocabulary attached (load it from a train_seq2seq checkpoint)")
        max_len = max_len or self.hparams.decode_max_len
        encoded, truncated = [], 0
        for i, sentence in enumerate(sentences, start=1):
            ids = self.src_vocab.encode(self.src_tokenizer.tokenize(sentence))
            if not ids:
                raise DataError(f"sentence {i} is empty or whitespace-only: nothing to translate")
            truncated += len(ids) > max_len
            encoded.append(np.asarray(ids[:max_len], dtype=np.int64))
        self.last_truncated = truncated
        if truncated:
            log.warning("truncated %d of %d source sentences to %d tokens", truncated, len(sentences), max_len)
        return encoded

    def decode_sentences(self, sentences: list[str], beam_size: int = 5, max_len: int | None = None,
                         length_penalty: float | None = None, batch_size: int = 256,
                         return_attention: bool = False, greedy: bool | None = None
                         ) -> tuple[list[np.ndarray], DecodeResult]:
        """Encode and decode raw sentences (sorted by length into batches, results in input order)."""
        encoded = self.encode_sources(sentences, max_len)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        merged = DecodeResult([None] * len(encoded), [0.0] * len(encoded), [0.0] * len(encoded),
                              [False] * len(encoded), [None] * len(encoded) if return_attention else None)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_sequences([encoded[i] for i in chunk], Vocab.pad_id).to(self.device)
            lengths = torch.as_tensor([len(encoded[i]) for i in chunk], dtype=torch.long, device=self.device)
            result = self.decode(src, lengths, beam_size, max_len, length_penalty, return_attention, greedy)
            for j, i in enumerate(chunk):
                merged.tokens[i], merged.scores[i] = result.tokens[j], result.scores[j]
                merged.normalized_scores[i], merged.finished[i] = result.normalized_scores[j], result.finished[j]
                if return_attention and result.attention is not None:
                    merged.attention[i] = result.attention[j][:, : len(encoded[i])]
        return encoded, merged

    def translate(self, sentences: list[str], beam_size: int = 5, max_len: int | None = None,
                  length_penalty: float | None = None, batch_size: int = 256) -> list[str]:
        """Raw English sentences -> detokenized German translations (same order)."""
        if not sentences:
            return []
        _, result = self.decode_sentences(sentences, beam_size, max_len, length_penalty, batch_size)
        return [self.ids_to_text(ids) for ids in result.tokens]


def load_translation_task(path, expected_src_vocab: Vocab | None = None, expected_tgt_vocab: Vocab | None = None,
                          map_location: str | torch.device = "cpu") -> TranslationTask:
    """Load a train_seq2seq checkpoint for inference (eval mode).

    The checkpoint's own vocabularies must match the model's sizes (checked on load), and, when
    given, the vocabularies saved next to the model: a mismatch names both sizes."""
    from rnnlab.checkpoints import check_vocab

    task = TranslationTask.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    if task.src_vocab is None or task.src_tokenizer is None:
        raise DataError(f"{path}: checkpoint carries no vocabulary/tokenizer (not written by train_seq2seq?)")
    check_vocab(task.src_vocab, expected_src_vocab, f"{path} (source side)")
    check_vocab(task.tgt_vocab, expected_tgt_vocab, f"{path} (target side)")
    task.eval()
    return task
