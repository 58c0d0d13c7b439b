"""Translation (Multi30k English -> German by default): the ``train_seq2seq`` task of the one stage loop.

``params.yaml`` section ``train_seq2seq`` (:mod:`rnnlab.stages.train`)::

    experiment: rnnlab-seq2seq
    trainer: {...}            # over the top-level ``trainer`` (num_threads, progress_bar, resume ...)
    defaults: {...}           # RunConfig keys shared by every run
    runs:                     # run name -> its keys over ``defaults``
      multi30k-attention: {attention: bahdanau}
      multi30k-none: {attention: none}

Every key a run may set, and its one default, is a field of :class:`RunConfig`. ``corpus`` names a
``parallel`` corpus of params ``corpora`` (default the built-in Multi30k; README "Your own corpora"):
its prepared ``pairs.parquet`` is read, its validation split (``val``, or a carve rule's ``valid``)
drives early stopping and its ``test`` split is scored. ``max_train_pairs``
/ ``max_val_pairs`` (null = all) keep the first N pairs of train / val (corpus line order), for tiny
profiles; the test split (test_2016_flickr) is always scored whole, so :func:`score`, rescoring it
from the saved folder, reproduces the training row exactly.

Scores (:mod:`rnnlab.metrics`): ``sacrebleu_*`` sacreBLEU on detokenized cased text (13a, signature
in ``sacrebleu_signature``), ``chrf_*`` chrF on the same text, ``tok_lc_bleu_*`` BLEU on
word-tokenized lower-cased text (what Multi30k papers report). Decoding settings are named by beam
size (:func:`rnnlab.metrics.decode_name`): beam 1 is greedy decoding (``greedy``), beam k > 1 batched
beam search (``beam<k>``); greedy is always scored, whatever ``beam_sizes`` holds. Perplexities are
teacher-forced (plain cross-entropy per target token incl. ``<eos>``, no label smoothing).

The model folder ``ctx.out_dir`` (``data/models/seq2seq/<run>/``): ``model.ckpt`` (best by
``monitor``; vocabularies and tokenizers inside), ``vocab.{src,tgt}.json`` and
``tokenizer.{src,tgt}.json`` (the same, checked against the checkpoint by :func:`load`),
``config.json``, ``history.json``, ``bleu_vs_beam.json`` (+ ``.png``), ``test_hyps_<setting>.txt``,
``attention/val_XX.png``. The folder alone is enough to translate (``rnnlab translate --run
<folder>``, :func:`translate_command`) and to rescore (:func:`score`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab.config import parse_section, require, require_corpus_task
from rnnlab.data.bpe import tokenizer_from_dict
from rnnlab.data.parallel import ParallelDataModule, TranslationBatch, pad_sequences
from rnnlab.data.tokenize import Tokenizer
from rnnlab.data.vocab import EOS, Vocab
from rnnlab.decoding import DecodeResult, LengthNorm, OutputRules, beam_search, greedy_decode
from rnnlab.errors import ConfigError, DataError, RnnlabError, TrainingError
from rnnlab.inference import DEFAULT_MODELS, resolve_model, resolve_model_path
from rnnlab.io import atomic_path
from rnnlab.metrics import decode_name, perplexity, score_translations, sentence_sacrebleu
from rnnlab.models.lm_parts import count_parameters
from rnnlab.models.seq2seq import Seq2Seq
from rnnlab.tasks.base import RunContext, StagePaths, TrainOutput

log = logging.getLogger(__name__)

SECTION = "train_seq2seq"
TASK = "translation"
EXPERIMENT = "rnnlab-seq2seq"
CORPUS = "multi30k"  # the default corpus of a run
TEST_SET = "test_2016_flickr"  # the name of the built-in's test split in the rows (other corpora: "test")
VALID_SPLITS = ("val", "valid", "dev")  # the validation split, by the name a corpus gives it
SCORES = ("sacrebleu", "chrf", "tok_bleu")
SCORE_NAMES = {"sacrebleu": "sacrebleu", "chrf": "chrf", "tok_bleu": "tok_lc_bleu"}  # library name -> row name
MODEL_FILES = (
    "model.ckpt",
    "vocab.src.json",
    "vocab.tgt.json",
    "tokenizer.src.json",
    "tokenizer.tgt.json",
    "config.json",
)
DEFAULT_RUN = DEFAULT_MODELS[TASK]  # ``rnnlab translate`` without --run: data/models/seq2seq/multi30k-attention
STDIN_BATCH = 256  # lines translated together when stdin is a file or a pipe
DECODE_BATCH = 256  # sentences per decoding batch (sorted by length)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """One run's keys (``train_seq2seq.defaults`` merged with ``train_seq2seq.runs.<name>``)."""

    corpus: str = CORPUS  # a parallel corpus of params corpora
    tokenizer: Literal["word", "bpe"] = "bpe"  # bpe: learned on the train split with HF tokenizers
    bpe_vocab_size: int = 5000  # per side, used when tokenizer is bpe
    lowercase_target: bool = False  # the source is always lower-cased; German keeps its case by default
    min_freq: int = 1  # vocab: train tokens seen fewer times become <unk>
    max_len: int = 50  # tokens per sentence; longer ones are truncated (counted); also the decode limit
    embedding_size: int = 128
    hidden_size: int = 128  # encoder: per direction; decoder LSTM and attention
    num_layers: int = 1
    dropout: float = 0.2
    attention: Literal["bahdanau", "luong", "none"] = "bahdanau"  # none: Sutskever fixed context
    input_feeding: bool = False  # Luong input feeding (step-by-step decoder in training: slower)
    summary_each_step: bool = True  # attention none: final encoder states concatenated to every input
    teacher_forcing: float = 1.0  # < 1: feed own argmax predictions with probability 1 - ratio
    label_smoothing: float = 0.1
    lr: float = 0.003  # Adam
    lr_plateau_factor: float | None = None  # e.g. 0.5: lr x factor when `monitor` stops improving (null: constant)
    batch_size: int = 64
    eval_batch_size: int = 256
    max_epochs: int = 12
    max_time_minutes: float | None = None  # wall-clock cap (interactive use; results then depend on speed)
    limit_train_batches: int | float = 1.0  # float fraction or int batches per epoch
    clip: float | None = 1.0  # gradient-norm clipping (null: none)
    monitor: Literal["val/bleu", "val/loss"] = "val/bleu"  # best checkpoint + early stopping
    patience: int = 3  # early stopping, in validation rounds
    val_bleu: bool = True  # decode val greedily at each validation (needed for monitor val/bleu)
    beam_sizes: list[int] = field(default_factory=lambda: [1, 3, 5, 10])  # 1 = greedy
    length_penalty: float = 1.0  # GNMT alpha for beam search; 0 = rank by raw log-prob
    length_norm: LengthNorm = "gnmt"  # beam ranking: gnmt (alpha above) | average | none (README "Decoding rules")
    block_ngram_repeat: int = 3  # no n-gram twice in one output (0: off); measured, README "Decoding rules"
    allow_unk: bool = False  # true: <unk> may be emitted (<pad>/<bos> never are)
    heatmaps: int = 4  # attention PNGs for the first N validation sentences
    max_train_pairs: int | None = None  # first N train pairs (null: all)
    max_val_pairs: int | None = None  # first N val pairs (null: all)
    max_test_pairs: int | None = None  # first N test pairs (null: all; smoke tests only, the test set is scored whole)
    enabled: bool = True  # false: the stage writes a row saying so and trains nothing

    def validate(self, where: str) -> None:
        if not self.corpus or "/" in self.corpus:
            raise ConfigError(f"{where}.corpus: expected a corpus name of params corpora, got {self.corpus!r}")
        for key in (
            "bpe_vocab_size",
            "min_freq",
            "max_len",
            "embedding_size",
            "hidden_size",
            "num_layers",
            "batch_size",
            "eval_batch_size",
            "max_epochs",
            "patience",
        ):
            require(getattr(self, key) >= 1, f"{where}.{key}", "an integer >= 1", getattr(self, key))
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a number in [0, 1)", self.dropout)
        require(
            0.0 < self.teacher_forcing <= 1.0, f"{where}.teacher_forcing", "a number in (0, 1]", self.teacher_forcing
        )
        require(
            0.0 <= self.label_smoothing < 1.0, f"{where}.label_smoothing", "a number in [0, 1)", self.label_smoothing
        )
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(
            self.lr_plateau_factor is None or 0 < self.lr_plateau_factor < 1,
            f"{where}.lr_plateau_factor",
            "null or a number in (0, 1)",
            self.lr_plateau_factor,
        )
        require(self.clip is None or self.clip > 0, f"{where}.clip", "null or a number > 0", self.clip)
        require(
            self.max_time_minutes is None or self.max_time_minutes > 0,
            f"{where}.max_time_minutes",
            "null or a number > 0",
            self.max_time_minutes,
        )
        require(self.limit_train_batches > 0, f"{where}.limit_train_batches", "a number > 0", self.limit_train_batches)
        require(
            bool(self.beam_sizes) and all(k >= 1 for k in self.beam_sizes),
            f"{where}.beam_sizes",
            "a non-empty list of integers >= 1",
            self.beam_sizes,
        )
        require(self.length_penalty >= 0, f"{where}.length_penalty", "a number >= 0", self.length_penalty)
        require(self.block_ngram_repeat >= 0, f"{where}.block_ngram_repeat", "an integer >= 0", self.block_ngram_repeat)
        require(self.heatmaps >= 0, f"{where}.heatmaps", "an integer >= 0", self.heatmaps)
        require(
            self.val_bleu or self.monitor != "val/bleu",
            f"{where}.monitor",
            "val/loss when val_bleu is false",
            self.monitor,
        )
        for key in ("max_train_pairs", "max_val_pairs", "max_test_pairs"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"{where}.{key}", "null or an integer >= 1", value)

    @property
    def mode(self) -> Literal["min", "max"]:
        return "max" if self.monitor == "val/bleu" else "min"


def parse_run(merged: dict, where: str) -> RunConfig:
    """A run's keys, checked (unknown keys and bad values are ConfigErrors naming ``where.key``)."""
    return parse_section(RunConfig, merged, where)


def check_corpus(run: RunConfig, corpora: dict, where: str) -> None:
    """Before anything trains: the run's corpus is declared in params ``corpora`` with task parallel."""
    require_corpus_task(run.corpus, corpora, ("parallel",), "parallel", where)


def data_files(run: RunConfig, paths: StagePaths) -> list[Path]:
    return [pairs_path(paths, run.corpus)]


def tags(run: RunConfig) -> dict:
    return {"corpus": run.corpus, "attention": run.attention, "tokenizer": run.tokenizer}


def test_set_name(corpus: str) -> str:
    return TEST_SET if corpus == CORPUS else "test"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def pairs_path(prepared: str | Path | StagePaths, corpus: str = CORPUS) -> Path:
    """``pairs.parquet`` in ``prepared`` (``data/prepared/<corpus>``) or ``prepared/<corpus>``, or
    ``prepared`` itself when it names the file."""
    prepared = Path(prepared.prepared if isinstance(prepared, StagePaths) else prepared)
    hint = f"run `dvc repro prepare` with {corpus} in prepare.corpora"
    if prepared.suffix == ".parquet":
        if prepared.is_file():
            return prepared
        raise DataError(f"{prepared}: not found ({hint})")
    for path in (prepared / "pairs.parquet", prepared / corpus / "pairs.parquet"):
        if path.is_file():
            return path
    raise DataError(
        f"{prepared / corpus / 'pairs.parquet'}: not found (declare {corpus!r} in params.yaml corpora: with "
        f"task parallel and {hint})"
    )


def read_pairs(prepared: str | Path | StagePaths, corpus: str = CORPUS) -> pd.DataFrame:
    """The prepared pairs, the validation split named ``val`` whatever the corpus calls it
    (:data:`VALID_SPLITS`); extra evaluation sets keep their ``eval_<name>`` splits."""
    path = pairs_path(prepared, corpus)
    pairs = pd.read_parquet(path)
    missing = {"split", "line", "src", "tgt"} - set(pairs.columns)
    if missing:
        raise DataError(f"{path}: lacks columns {sorted(missing)} (has {list(pairs.columns)}); rerun prepare")
    present = set(pairs["split"])
    valid = next((s for s in VALID_SPLITS if s in present), None)
    if valid not in (None, "val"):
        pairs = pairs.assign(split=pairs["split"].replace({valid: "val"}))
    for split in ("train", "val", "test"):
        if not (pairs["split"] == split).any():
            shown = "a validation split (val, valid or dev)" if split == "val" else f"split {split!r}"
            raise DataError(
                f"{path}: {shown} is empty (a translator trains on train, stops early on the validation "
                f"split and is scored on test; a carve rule gives test with `test: FRACTION` or by every_nth)"
            )
    return pairs


def eval_sets(run: RunConfig, paths: StagePaths) -> list[str]:
    """The extra evaluation sets of the run's prepared corpus (``eval_<name>`` splits), sorted."""
    return sorted(s for s in set(read_pairs(paths, run.corpus)["split"]) if s.startswith("eval_"))


def subsample(
    pairs: pd.DataFrame, max_train: int | None, max_val: int | None, max_test: int | None = None
) -> pd.DataFrame:
    """The first N pairs (corpus line order) of train / val (/ test: smoke tests only)."""
    parts = []
    for split, limit in (("train", max_train), ("val", max_val), ("test", max_test)):
        frame = pairs[pairs["split"] == split].sort_values("line")
        parts.append(frame if limit is None else frame.head(limit))
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------
MODEL_KEYS = (
    "embedding_size",
    "hidden_size",
    "num_layers",
    "dropout",
    "attention",
    "input_feeding",
    "summary_each_step",
)
_D = RunConfig  # the defaults below are RunConfig's (one place); decode_max_len is RunConfig.max_len


class TranslationTask(pl.LightningModule):
    """Seq2seq translation (batch-first tensors, :mod:`rnnlab.models.seq2seq`).

    - Loss: cross-entropy over target tokens, ``<pad>`` ignored, label smoothing by hparam
      (``train/loss`` includes the smoothing; ``val/loss`` / ``val/ppl`` are plain teacher-forced
      token-level cross-entropy and :func:`rnnlab.metrics.perplexity` of it).
    - ``val/bleu`` (``val_bleu``): greedy decoding of the whole validation split at each
      validation end, detokenized, sacreBLEU against the raw references (never teacher-forced).
    - The vocabularies and tokenizers travel inside the checkpoint (``on_save_checkpoint``), so
      :func:`load` translates without any data files; a stored vocabulary whose size differs from
      the model's embedding/output size is an error naming both.
    - :meth:`decode`: beam size 1 is greedy decoding, k > 1 batched beam search.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embedding_size: int = _D.embedding_size,
        hidden_size: int = _D.hidden_size,
        num_layers: int = _D.num_layers,
        dropout: float = _D.dropout,
        attention: str = _D.attention,
        input_feeding: bool = _D.input_feeding,
        summary_each_step: bool = _D.summary_each_step,
        lr: float = _D.lr,
        label_smoothing: float = _D.label_smoothing,
        teacher_forcing: float = _D.teacher_forcing,
        val_bleu: bool = _D.val_bleu,
        decode_max_len: int = _D.max_len,
        length_penalty: float = _D.length_penalty,
        length_norm: str = _D.length_norm,
        block_ngram_repeat: int = _D.block_ngram_repeat,
        allow_unk: bool = _D.allow_unk,
        lr_plateau_factor: float | None = _D.lr_plateau_factor,
        monitor: str = _D.monitor,
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
            src_vocab_size,
            tgt_vocab_size,
            src_pad_id=Vocab.pad_id,
            tgt_pad_id=Vocab.pad_id,
            **{k: hp[k] for k in MODEL_KEYS},
        )
        self.src_vocab = self.tgt_vocab = None
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        if src_vocab is not None or tgt_vocab is not None:
            self.attach_vocabs(src_vocab, tgt_vocab)
        # What decoding may emit and how beams are ranked; the CLI may change it (--allow-unk).
        self.rules = OutputRules(
            allow_unk=hp.allow_unk,
            block_ngram_repeat=hp.block_ngram_repeat,
            length_norm=hp.length_norm,
            length_penalty=hp.length_penalty,
        )
        self._sums = [0.0, 0]
        self._val_hyps: dict[int, list[int]] = {}
        self.last_truncated = 0

    @classmethod
    def from_run(cls, run: RunConfig, dm: ParallelDataModule) -> TranslationTask:
        """The module of a run, on the vocabularies/tokenizers ``dm`` fitted (``dm.setup()`` first)."""
        keys = (
            "embedding_size",
            "hidden_size",
            "num_layers",
            "dropout",
            "attention",
            "input_feeding",
            "summary_each_step",
            "lr",
            "label_smoothing",
            "teacher_forcing",
            "val_bleu",
            "length_penalty",
            "length_norm",
            "block_ngram_repeat",
            "allow_unk",
            "lr_plateau_factor",
            "monitor",
        )
        return cls(
            src_vocab_size=len(dm.src_vocab),
            tgt_vocab_size=len(dm.tgt_vocab),
            src_vocab_fingerprint=dm.src_vocab.fingerprint(),
            tgt_vocab_fingerprint=dm.tgt_vocab.fingerprint(),
            src_vocab=dm.src_vocab,
            tgt_vocab=dm.tgt_vocab,
            src_tokenizer=dm.src_tokenizer,
            tgt_tokenizer=dm.tgt_tokenizer,
            decode_max_len=run.max_len,
            **{k: getattr(run, k) for k in keys},
        )

    # -- vocabularies ------------------------------------------------------------------------
    def attach_vocabs(self, src_vocab: Vocab, tgt_vocab: Vocab, where: str = "TranslationTask") -> None:
        """Check that the vocabularies fit the model's embedding/output sizes, then keep them."""
        for side, vocab, size in (
            ("source", src_vocab, self.hparams.src_vocab_size),
            ("target", tgt_vocab, self.hparams.tgt_vocab_size),
        ):
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
            logits.reshape(-1, logits.size(-1)).float(),
            batch.tgt_out.reshape(-1),
            ignore_index=Vocab.pad_id,
            label_smoothing=label_smoothing,
            reduction=reduction,
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
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=self.hparams.lr_plateau_factor, patience=0
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.monitor, "interval": "epoch"},
        }

    # -- validation --------------------------------------------------------------------------
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
        self.log("val/ppl", perplexity(mean))
        refs = self._references("val")
        if self._val_hyps and refs is not None and len(self._val_hyps) == len(refs):
            hyps = [self.ids_to_text(self._val_hyps[i]) for i in range(len(refs))]
            self.log("val/bleu", sentence_sacrebleu(hyps, refs))

    def _references(self, split: str) -> list[str] | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.references(split) if datamodule is not None and hasattr(datamodule, "references") else None

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        src: torch.Tensor,
        src_lengths: torch.Tensor,
        beam_size: int = 1,
        max_len: int | None = None,
        length_penalty: float | None = None,
        return_attention: bool = False,
    ) -> DecodeResult:
        """A padded batch [batch, S] -> best hypotheses: greedy decoding for ``beam_size`` 1, batched
        beam search otherwise (beam search of width 1 gives the same result; it stays reachable
        as :func:`rnnlab.decoding.beam_search` on ``self.model.incremental_decoder()``)."""
        if beam_size < 1:
            raise ValueError(f"beam_size: expected an integer >= 1, got {beam_size}")
        was_training = self.model.training
        self.model.eval()
        try:
            decoder = self.model.incremental_decoder()
            state = decoder.start(src, src_lengths)
            max_len = max_len or self.hparams.decode_max_len
            common = dict(
                batch_size=src.size(0),
                bos_id=Vocab.bos_id,
                eos_id=Vocab.eos_id,
                max_len=max_len,
                return_attention=return_attention,
                rules=self.rules,
            )
            if beam_size == 1:
                return greedy_decode(decoder, state, **common)
            return beam_search(decoder, state, beam_size=beam_size, length_penalty=length_penalty, **common)
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

    def decode_sentences(
        self,
        sentences: list[str],
        beam_size: int = 5,
        max_len: int | None = None,
        length_penalty: float | None = None,
        batch_size: int = DECODE_BATCH,
        return_attention: bool = False,
    ) -> tuple[list[np.ndarray], DecodeResult]:
        """Encode and decode raw sentences (sorted by length into batches, results in input order)."""
        encoded = self.encode_sources(sentences, max_len)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        merged = DecodeResult(
            [None] * len(encoded),
            [0.0] * len(encoded),
            [0.0] * len(encoded),
            [False] * len(encoded),
            [None] * len(encoded) if return_attention else None,
        )
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_sequences([encoded[i] for i in chunk], Vocab.pad_id).to(self.device)
            lengths = torch.as_tensor([len(encoded[i]) for i in chunk], dtype=torch.long, device=self.device)
            result = self.decode(src, lengths, beam_size, max_len, length_penalty, return_attention)
            for j, i in enumerate(chunk):
                merged.tokens[i], merged.scores[i] = result.tokens[j], result.scores[j]
                merged.normalized_scores[i], merged.finished[i] = result.normalized_scores[j], result.finished[j]
                if return_attention and result.attention is not None:
                    merged.attention[i] = result.attention[j][:, : len(encoded[i])]
        return encoded, merged

    def translate(
        self,
        sentences: list[str],
        beam_size: int = 5,
        max_len: int | None = None,
        length_penalty: float | None = None,
        batch_size: int = DECODE_BATCH,
    ) -> list[str]:
        """Raw English sentences -> detokenized German translations (same order)."""
        if not sentences:
            return []
        _, result = self.decode_sentences(sentences, beam_size, max_len, length_penalty, batch_size)
        return [self.ids_to_text(ids) for ids in result.tokens]


# ----------------------------------------------------------------------------------------------
# Scoring: the one function behind train() and score()
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced_loss(module: TranslationTask, loader) -> float:
    """Token-weighted mean cross-entropy (nats, no label smoothing) over a whole loader."""
    was_training = module.model.training
    module.model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            batch = type(batch)(*(t.to(module.device) for t in batch))
            logits = module.model(batch.src, batch.src_lengths, batch.tgt_in)  # [batch, T, V]
            total += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(),
                batch.tgt_out.reshape(-1),
                ignore_index=Vocab.pad_id,
                reduction="sum",
            ).item()
            count += int((batch.tgt_out != Vocab.pad_id).sum())
    finally:
        module.model.train(was_training)
    return total / max(count, 1)


def settings(beam_sizes: Iterable[int]) -> list[int]:
    """The beam sizes decoded, in order, once each: greedy (beam 1) first, always."""
    out: list[int] = []
    for beam in [1, *beam_sizes]:
        if int(beam) not in out:
            out.append(int(beam))
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def evaluate(
    module: TranslationTask,
    datamodule: ParallelDataModule,
    beam_sizes: Iterable[int],
    out_dir: Path | None = None,
    ppl_splits: Iterable[str] = ("test",),
    split: str = "test",
) -> dict:
    """Score ``module`` on ``split`` of ``datamodule``: teacher-forced loss/perplexity of each of
    ``ppl_splits`` and free-running decoding of ``split`` at every setting of :func:`settings`.

    Returns the row keys (``test_loss``, ``test_ppl``, ``sacrebleu_greedy``, ``chrf_beam3``,
    ``tok_lc_bleu_beam3``, ``sentences_per_s_beam3``, ``unk_in_output_beam3``, ``*_signature``;
    ``unk_in_output``: the ``<unk>`` tokens of every setting's outputs together) plus ``beams``: one dict
    ``{beam, sacrebleu, chrf, tok_bleu, sentences_per_s}`` per setting (beam 1 = greedy), the rows of
    ``bleu_vs_beam.json``. With ``out_dir`` the hypotheses go to ``<split>_hyps_<setting>.txt``."""
    out: dict = {}
    for name in ppl_splits:
        loss = teacher_forced_loss(module, datamodule.loader(name))
        out[f"{name}_loss"], out[f"{name}_ppl"] = round(loss, 4), round(perplexity(loss), 3)
    sources, references = datamodule.sources(split), datamodule.references(split)
    beams = []
    for beam in settings(beam_sizes):
        decode = decode_name(beam)
        started = time.perf_counter()
        _, result = module.decode_sentences(sources, beam_size=beam)
        per_s = len(sources) / max(time.perf_counter() - started, 1e-9)
        hyps = [module.ids_to_text(ids) for ids in result.tokens]
        scores = score_translations(hyps, references)
        unks = sum(ids.count(Vocab.unk_id) for ids in result.tokens)
        row = {
            "beam": beam,
            **{k: round(scores[k], 2) for k in SCORES},
            "sentences_per_s": round(per_s, 1),
            "unk_in_output": unks,
        }
        beams.append(row)
        out[f"unk_in_output_{decode}"] = unks
        out["unk_in_output"] = out.get("unk_in_output", 0) + unks  # all settings' outputs together
        for key in SCORES:
            out[f"{SCORE_NAMES[key]}_{decode}"] = row[key]
        out[f"sentences_per_s_{decode}"] = row["sentences_per_s"]
        out["sacrebleu_signature"] = scores["sacrebleu_signature"]
        out["chrf_signature"] = scores["chrf_signature"]
        out["tok_lc_bleu_signature"] = scores["tok_bleu_signature"]
        if out_dir is not None:
            _write_lines(Path(out_dir) / f"{split}_hyps_{decode}.txt", hyps)
    out["beams"] = beams
    return out


def attention_heatmaps(
    module: TranslationTask, sentences: list[str], out_dir: str | Path, beam_size: int = 1, prefix: str = "val"
) -> list[Path]:
    """Translate ``sentences`` and draw one heatmap per sentence; [] for a model without attention."""
    from rnnlab.plots import plot_attention

    if module.hparams.attention == "none" or not sentences:
        return []
    encoded, result = module.decode_sentences(sentences, beam_size=beam_size, return_attention=True)
    paths = []
    for i, (ids, out_ids, finished, weights) in enumerate(
        zip(encoded, result.tokens, result.finished, result.attention)
    ):
        source_tokens = module.src_vocab.decode(ids.tolist())
        target_tokens = module.tgt_vocab.decode(out_ids) + ([EOS] if finished else [])
        paths.append(
            plot_attention(
                source_tokens,
                target_tokens,
                weights,
                Path(out_dir) / f"{prefix}_{i:02d}.png",
                title=f"{module.hparams.attention} attention, beam {beam_size}",
            )
        )
    return paths


# ----------------------------------------------------------------------------------------------
# train (the stage loop calls it once per run)
# ----------------------------------------------------------------------------------------------
def _tokens_per_batch(batch: TranslationBatch) -> int:
    return int((batch.tgt_out != Vocab.pad_id).sum())


def train(run: RunConfig, ctx: RunContext) -> TrainOutput:
    """Train run ``ctx.name``, keep its best checkpoint, score it on the whole test split."""
    from rnnlab.io import write_json
    from rnnlab.plots import plot_bleu_vs_beam
    from rnnlab.training import FitSpec, fit, load_best_weights, save_model_checkpoint

    (pairs_file,) = data_files(run, ctx.paths)
    data = subsample(read_pairs(pairs_file, run.corpus), run.max_train_pairs, run.max_val_pairs, run.max_test_pairs)
    counts = {split: int((data["split"] == split).sum()) for split in ("train", "val", "test")}
    dm = ParallelDataModule(
        data,
        tokenizer=run.tokenizer,
        bpe_vocab_size=run.bpe_vocab_size,
        min_freq=run.min_freq,
        max_len=run.max_len,
        batch_size=run.batch_size,
        eval_batch_size=run.eval_batch_size,
        seed=ctx.seed,
        lowercase_target=run.lowercase_target,
    )
    dm.setup("fit")
    module = TranslationTask.from_run(run, dm)
    spec = FitSpec(
        max_epochs=run.max_epochs,
        monitor=run.monitor,
        mode=run.mode,
        patience=run.patience,
        limit_train_batches=run.limit_train_batches,
        max_time_minutes=run.max_time_minutes,
        gradient_clip_val=run.clip,
        tokens_per_batch=_tokens_per_batch,
        distributed=False,
    )
    result = fit(module, dm, ctx.trainer, spec, ctx.resume, ctx.tracker)
    load_best_weights(module, result)
    module.eval()

    out_dir = Path(ctx.out_dir)
    writer = ctx.writer
    eval_started = time.perf_counter()
    scores = evaluate(module, dm, run.beam_sizes, out_dir if writer else None, ppl_splits=("val", "test"))
    pngs = attention_heatmaps(module, dm.sources("val")[: run.heatmaps], out_dir / "attention") if writer else []
    eval_seconds = time.perf_counter() - eval_started

    history = result.history
    beam_rows = scores.pop("beams")
    val_bleus = [h["val/bleu"] for h in history.history if "val/bleu" in h]
    decodes = [decode_name(b) for b in settings(run.beam_sizes)]
    row = {"corpus": run.corpus, "test_set": test_set_name(run.corpus), "attention": run.attention}
    row.update({f"{SCORE_NAMES[s]}_{d}": scores[f"{SCORE_NAMES[s]}_{d}"] for d in decodes for s in SCORES})
    row.update({k: scores[k] for k in ("sacrebleu_signature", "chrf_signature", "tok_lc_bleu_signature")})
    row.update(
        {
            "val_ppl": scores["val_ppl"],
            "test_ppl": scores["test_ppl"],
            "val_loss": scores["val_loss"],
            "test_loss": scores["test_loss"],
            "val_sacrebleu_best": round(max(val_bleus), 2) if val_bleus else float("nan"),
            "params": module.num_parameters(),
            "epochs": len(history.history),
            "steps": result.trainer.global_step,
            "train_wall_s": round(result.wall_s, 1),
            "eval_wall_s": round(eval_seconds, 1),
            "train_tokens_per_s": round(history.tokens_per_second, 1),
            **{f"sentences_per_s_{d}": scores[f"sentences_per_s_{d}"] for d in decodes},
            "unk_in_output": scores["unk_in_output"],
            **{f"unk_in_output_{d}": scores[f"unk_in_output_{d}"] for d in decodes},
            "src_vocab_size": len(dm.src_vocab),
            "tgt_vocab_size": len(dm.tgt_vocab),
            "pairs": counts,
            "truncated": {f"{split}_{side}": n for split, cut in dm.truncated.items() for side, n in cut.items()},
            "model_path": out_dir.as_posix(),
        }
    )
    plotted = [r for r in beam_rows if r["beam"] in set(run.beam_sizes)]
    plot_rows = [{"run": ctx.name, "beam": r["beam"], "bleu": r["sacrebleu"]} for r in plotted]

    artifacts: list[tuple[Path, str | None]] = []
    if writer:
        save_model_checkpoint(result.best_path, out_dir / "model.ckpt")
        # The vocabularies/tokenizers beside the checkpoint (the checkpoint carries them too; load()
        # checks that both agree, so a swapped file is an error naming both sizes).
        dm.src_vocab.save(out_dir / "vocab.src.json")
        dm.tgt_vocab.save(out_dir / "vocab.tgt.json")
        write_json(out_dir / "tokenizer.src.json", dm.src_tokenizer.to_dict())
        write_json(out_dir / "tokenizer.tgt.json", dm.tgt_tokenizer.to_dict())
        write_json(out_dir / "config.json", dataclasses.asdict(run))
        write_json(out_dir / "history.json", history.history)
        write_json(out_dir / "bleu_vs_beam.json", beam_rows)
        png = plot_bleu_vs_beam(plotted, out_dir / "bleu_vs_beam.png", f"{ctx.name}: {test_set_name(run.corpus)}")
        artifacts += [(out_dir / name, "model") for name in MODEL_FILES]
        artifacts += [(out_dir / "history.json", None), (out_dir / "bleu_vs_beam.json", None), (png, None)]
        artifacts += [(path, "hyps") for path in sorted(out_dir.glob("test_hyps_*.txt"))]
        artifacts += [(path, "attention") for path in pngs]
    return TrainOutput(row=row, plot_rows=plot_rows, artifacts=artifacts)


# ----------------------------------------------------------------------------------------------
# A saved model folder: load, score
# ----------------------------------------------------------------------------------------------
def model_files(ref: str | Path) -> tuple[Path, Path]:
    """(folder, model.ckpt) of a model folder, a ``model.ckpt`` path or an MLflow run id (its
    ``model/`` artifact folder is downloaded: :func:`rnnlab.inference.resolve_model_path`)."""
    path = resolve_model_path(ref, artifact="model")
    folder, ckpt = (path, path / "model.ckpt") if path.is_dir() else (path.parent, path)
    if not ckpt.is_file():
        raise RnnlabError(f"{ckpt}: checkpoint not found (expected a train_seq2seq model folder)")
    return folder, ckpt


def load(ref: str | Path, map_location: str | torch.device = "cpu") -> TranslationTask:
    """A trained translator (eval mode) from a model folder, its ``model.ckpt`` or an MLflow run id.

    Nothing is rebuilt from data: the vocabularies and tokenizers come from the checkpoint
    (``weights_only=True``); they must fit the model's sizes, and match the ``vocab.*.json`` beside
    the checkpoint when those exist (a mismatch names both sizes)."""
    from rnnlab.data.vocab import check_vocab

    folder, ckpt = model_files(ref)
    try:
        module = TranslationTask.load_from_checkpoint(ckpt, map_location=map_location, weights_only=True)
    except (DataError, RnnlabError):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise RnnlabError(f"{ckpt}: not a readable train_seq2seq checkpoint ({type(exc).__name__}: {exc})") from exc
    if module.src_vocab is None or module.src_tokenizer is None:
        raise DataError(f"{ckpt}: checkpoint carries no vocabulary/tokenizer (not written by train_seq2seq?)")
    for side, vocab in (("src", module.src_vocab), ("tgt", module.tgt_vocab)):
        saved = folder / f"vocab.{side}.json"
        if saved.is_file():
            check_vocab(vocab, Vocab.load(saved), f"{ckpt} ({'source' if side == 'src' else 'target'} side)")
    module.eval()
    return module


def score(
    folder: str | Path,
    paths: StagePaths | str | Path,
    beam_sizes: Iterable[int] = (1, 5),
    limit: int | None = None,
    rules: OutputRules | None = None,
    split: str = "test",
) -> dict:
    """Rescore a ``train_seq2seq`` model folder on the whole test split of its corpus (Multi30k:
    test_2016_flickr), or on ``split``: an extra evaluation set (``eval_<name>``, params
    ``corpora.<corpus>.eval_sets``), whose keys are then ``<split>_ppl`` ... instead of ``test_*``.

    ``folder``: the model folder, its ``model.ckpt`` or an MLflow run id; ``paths``: the stage
    paths (``paths.prepared`` = ``data/prepared``) or the prepared folder itself (``data/prepared``
    or ``data/prepared/<corpus>``). The corpus, ``max_len`` and ``eval_batch_size`` come from
    ``config.json`` (a folder without ``corpus`` there is Multi30k's);
    ``limit``: the first N test pairs only (smoke tests); ``rules``: decode under these output
    rules instead of the checkpoint's (benchmarks/decoding_rules.py).
    Decoding and perplexity run through :func:`evaluate` exactly as at the end of training, so the
    numbers equal the training row.

    Returns ``{sacrebleu_greedy, sacrebleu_beamK, chrf_*, tok_lc_bleu_*, test_ppl, test_loss,
    *_signature, params, test_sentences, truncated_test_src, beams: [{beam, sacrebleu, chrf,
    tok_lc_bleu}]}`` (one ``beams`` entry per beam size; beam 1 is greedy)."""
    from rnnlab.io import read_json

    beam_sizes = [int(k) for k in beam_sizes]
    if not beam_sizes or any(k < 1 for k in beam_sizes):
        raise ValueError(f"beam_sizes: expected integers >= 1, got {beam_sizes}")
    model_folder, _ = model_files(folder)
    module = load(model_folder)
    if rules is not None:
        module.rules = rules
    config = read_json(model_folder / "config.json") if (model_folder / "config.json").is_file() else {}
    pairs = read_pairs(paths, config.get("corpus", CORPUS))
    pairs = pairs[pairs["split"] == split].sort_values("line")
    if pairs.empty:
        raise DataError(f"{pairs_path(paths, config.get('corpus', CORPUS))}: split {split!r} is empty or missing")
    if limit is not None:
        pairs = pairs.head(limit)
    dm = ParallelDataModule(
        pairs,
        max_len=int(config.get("max_len", module.hparams.decode_max_len)),
        eval_batch_size=int(config.get("eval_batch_size", RunConfig.eval_batch_size)),
        tokenizers=(module.src_tokenizer, module.tgt_tokenizer),
        vocabs=(module.src_vocab, module.tgt_vocab),
    )
    dm.setup_split(split)
    scores = evaluate(module, dm, beam_sizes, ppl_splits=(split,), split=split)
    beam_rows = scores.pop("beams")
    decodes = [decode_name(b) for b in settings(beam_sizes)]
    result = {f"{SCORE_NAMES[s]}_{d}": scores[f"{SCORE_NAMES[s]}_{d}"] for d in decodes for s in SCORES}
    result.update({k: scores[k] for k in ("sacrebleu_signature", "chrf_signature", "tok_lc_bleu_signature")})
    result.update(
        {
            f"{split}_ppl": scores[f"{split}_ppl"],
            f"{split}_loss": scores[f"{split}_loss"],
            "params": module.num_parameters(),
            f"{split}_sentences": len(dm.texts[split]),
            f"truncated_{split}_src": dm.truncated[split]["src"],
            "unk_in_output": sum(r["unk_in_output"] for r in beam_rows if r["beam"] in set(beam_sizes)),
            "beams": [
                {"beam": r["beam"], **{SCORE_NAMES[s]: r[s] for s in SCORES}}
                for r in beam_rows
                if r["beam"] in set(beam_sizes)
            ],
        }
    )
    return result


# ----------------------------------------------------------------------------------------------
# ``rnnlab translate``
# ----------------------------------------------------------------------------------------------
def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\r\n"))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def translate_lines(
    module: TranslationTask, lines: list[str], beam: int, batch_size: int = DECODE_BATCH
) -> tuple[list[str], int, int]:
    """Translations (``""`` for blank lines), number of blank lines, number truncated.

    ``batch_size``: sentences decoded together (sorted by length; answers in input order)."""
    keep = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    truncated = 0
    if keep:
        for i, hyp in zip(keep, module.translate([lines[i] for i in keep], beam_size=beam, batch_size=batch_size)):
            out[i] = hyp
        truncated = module.last_truncated
    return out, len(lines) - len(keep), truncated


def _one_line(text: str) -> str:
    """A translation as exactly one output line (a line break inside would shift the alignment)."""
    return text.replace("\r", " ").replace("\n", " ")


def count_input_lines(path: str | Path) -> int:
    """Check that ``path`` is a readable UTF-8 text file, before any model loads; its number of lines
    (split at line feeds, as ``wc -l`` counts them, plus a last line without one)."""
    path = Path(path)
    if not path.exists():
        raise RnnlabError(f"{path}: input file not found")
    if not path.is_file():
        raise RnnlabError(f"{path}: not a regular file (--input must name a text file, one sentence a line)")
    n = 0
    try:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: line {n} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RnnlabError(f"{path}: cannot read the input file ({exc.strerror or exc})") from None
    return n


def read_input_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 text file without their line ends (a leading byte-order mark dropped)."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh):
            line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            yield line.removeprefix("\ufeff") if n == 0 else line


def check_output_file(path: str | Path, input_path: str | Path | None = None, flag: str = "--output") -> Path:
    """``path`` can be written: not a folder, its folder exists, not the input file itself."""
    path = Path(path)
    if path.is_dir():
        raise RnnlabError(f"{path}: is a folder; {flag} must name a file")
    if not path.parent.is_dir():
        raise RnnlabError(f"{path}: the output folder {path.parent} does not exist")
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise RnnlabError(f"{path}: {flag} is the input file itself; it would be overwritten")
    return path


def translate_stream(
    module: TranslationTask,
    lines: Iterable[str],
    out,
    beam: int,
    batch_size: int = STDIN_BATCH,
    total: int | None = None,
    stderr=None,
    progress: bool = True,
) -> dict:
    """Translate ``lines`` batch by batch into ``out`` (a text stream): output line i for input line i,
    a blank input line gives an empty output line. A tqdm bar on ``stderr`` counts the lines.

    Returns ``{lines, translated, empty, truncated, seconds, sentences_per_s}`` (seconds: the
    translation loop, the model already loaded)."""
    from tqdm.auto import tqdm

    stderr = stderr or sys.stderr
    done = blank = truncated = n_lines = 0
    start = time.perf_counter()
    level = log.level
    log.setLevel(max(level, logging.ERROR))  # truncation is counted in the returned summary, not logged per batch
    try:
        with tqdm(
            total=total,
            unit="line",
            desc="translate",
            file=stderr,
            disable=not progress,
            mininterval=0.5,
            dynamic_ncols=True,
        ) as bar:
            for batch in _batches(lines, batch_size):
                hyps, n_blank, n_cut = translate_lines(module, batch, beam, batch_size)
                out.write("".join(_one_line(hyp) + "\n" for hyp in hyps))
                n_lines += len(batch)
                done += len(batch) - n_blank
                blank += n_blank
                truncated += n_cut
                bar.update(len(batch))
    finally:
        log.setLevel(level)
    seconds = time.perf_counter() - start
    return {
        "lines": n_lines,
        "translated": done,
        "empty": blank,
        "truncated": truncated,
        "seconds": round(seconds, 3),
        "sentences_per_s": round(done / seconds, 2) if seconds > 0 else None,
    }


def _check_counts(beam: int, batch_size: int, max_beam: int | None) -> None:
    if beam < 1 or (max_beam is not None and beam > max_beam):
        allowed = f"in 1..{max_beam}" if max_beam is not None else ">= 1"
        raise RnnlabError(f"--beam: expected an integer {allowed}, got {beam}")
    if batch_size < 1:
        raise RnnlabError(f"--batch-size: expected an integer >= 1, got {batch_size}")


def translate_command(
    sentence: str | None,
    beam: int = 5,
    run: str | Path | None = None,
    stdin=None,
    stdout=None,
    stderr=None,
    *,
    input_path: str | Path | None = None,
    output_path: str | Path | None = None,
    batch_size: int = STDIN_BATCH,
    max_beam: int | None = None,
    progress: bool = True,
    allow_unk: bool = False,
) -> int:
    """``rnnlab translate``: English -> German; returns the number of sentences translated.

    ``run``: a model folder, its ``model.ckpt`` or an MLflow run id (None or :data:`DEFAULT_RUN`: the
    default model, :func:`rnnlab.inference.resolve_model`). Without ``sentence``, stdin is
    translated line by line: a blank line gives an empty output line (output line i belongs to
    input line i) and the count of blank lines goes to stderr, as does the number of sentences
    truncated to the model's ``max_len``. Unknown words become ``<unk>``.

    With ``input_path`` and/or ``output_path`` (``--input FILE --output FILE``; the other side is
    stdin/stdout when left out): the input is checked (exists, UTF-8) and the output folder too
    before the model loads; then :func:`translate_stream` translates ``batch_size`` lines at a
    time with a progress bar and the output file is written atomically (nothing is left at
    ``output_path`` when it fails); a summary line with sentences/s goes to stderr.
    ``max_beam``: the largest beam accepted (the CLI passes :data:`rnnlab.serving.MAX_BEAM`).
    ``allow_unk`` (``--allow-unk``): let ``<unk>`` be emitted (never, by default)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    _check_counts(beam, batch_size, max_beam)
    files = input_path is not None or output_path is not None
    if sentence is not None and files:
        raise RnnlabError("give either a sentence or --input/--output, not both")
    if sentence is not None and not sentence.strip():
        raise RnnlabError("the sentence to translate is empty or whitespace-only")
    total = count_input_lines(input_path) if input_path is not None else None
    if output_path is not None:
        check_output_file(output_path, input_path)
    module = load(resolve_model(None if run is None or str(run) == DEFAULT_RUN else run, TASK))
    module.rules = dataclasses.replace(module.rules, allow_unk=allow_unk)  # --allow-unk
    if files:
        lines = read_input_lines(input_path) if input_path is not None else stdin
        if output_path is not None:
            with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
                summary = translate_stream(module, lines, out, beam, batch_size, total, stderr, progress)
        else:
            summary = translate_stream(module, lines, stdout, beam, batch_size, total, stderr, progress)
        rate = summary["sentences_per_s"]
        print(
            f"rnnlab translate: {summary['lines']} line(s) -> {output_path or 'stdout'}: "
            f"{summary['translated']} sentence(s) translated, {summary['empty']} empty or whitespace-only "
            f"line(s) left empty, {summary['truncated']} truncated to {module.hparams.decode_max_len} tokens; "
            f"{summary['seconds']:.1f} s, {rate if rate is not None else '-'} sentences/s "
            f"(beam {beam}, batch {batch_size})",
            file=stderr,
        )
        return summary["translated"]
    if sentence is not None:
        (hyp,), blank, truncated = translate_lines(module, [sentence], beam)
        print(hyp, file=stdout)
        done = 1
    else:
        interactive = hasattr(stdin, "isatty") and stdin.isatty()
        done = blank = truncated = 0
        for lines in _batches(stdin, 1 if interactive else batch_size):
            hyps, n_blank, n_cut = translate_lines(module, lines, beam, batch_size)
            for hyp in hyps:
                print(hyp, file=stdout, flush=interactive)
            done += len(lines) - n_blank
            blank += n_blank
            truncated += n_cut
    if blank:
        print(f"rnnlab translate: {blank} empty or whitespace-only line(s) gave empty output lines", file=stderr)
    if truncated:
        print(
            f"rnnlab translate: warning: {truncated} sentence(s) longer than {module.hparams.decode_max_len} tokens "
            "were truncated",
            file=stderr,
        )
    return done
