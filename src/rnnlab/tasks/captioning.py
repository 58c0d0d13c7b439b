"""Captioning (Flickr8k): a CNN+LSTM caption decoder on cached image features, the ``train_captioner`` task.

The task interface is :mod:`rnnlab.tasks.base`; :func:`rnnlab.stages.train.train_stage` calls
:func:`train` once per run of ``train_captioner.runs``.

Training (:func:`train`): teacher forcing (Adam, dropout, gradient clipping) through the one
training loop :func:`rnnlab.training.fit`, keeping the weights with the best ``val/loss`` on the
dev split; the train loader resumes mid-epoch after a kill. Then the test images are decoded
freely (greedy = beam 1, and beam search) and scored (:func:`evaluate`): corpus BLEU-1..4 and
sacreBLEU (:mod:`rnnlab.metrics`), captions/s; the PNG grids are drawn (:mod:`rnnlab.plots`).

Fine-tuning (``finetune_blocks``, README "Fine-tuning the encoder"): the encoder's last N blocks
(:class:`rnnlab.models.image_encoder.EncoderTail`) are part of the LightningModule, train from the
ImageNet weights at ``encoder_lr`` and are saved in its checkpoint; the batches then carry the frozen
prefix's maps (one pass over the images at the start of the run, :func:`prefix_cache`) instead of
the feature cache's, and :meth:`CaptioningTask.encode` runs the tail before the decoder.

Loss (:class:`CaptioningTask`): token-level cross-entropy over the non-pad target tokens, plus
``alpha_c`` times the doubly stochastic attention penalty for the soft-attention decoder. Logged:
``train/loss`` (the optimised total), ``train/ce``, ``val/loss`` (token-weighted cross-entropy over
the whole dev split) and ``val/ppl``. BLEU is never computed under teacher forcing.

BLEU tokenisation: :class:`rnnlab.data.tokenize.WordTokenizer` with lower-casing, the tokenizer the
model is trained with. References are all captions of an image (5 for Flickr8k) tokenised that
way, never truncated and never mapped to ``<unk>``; hypotheses are the decoded tokens (``<unk>``
stays a token that matches nothing). sacreBLEU gets the raw reference captions.

The model folder ``data/models/captioner/<run>/`` holds everything a fresh process needs to caption
a new image: ``model.ckpt`` (weights, hparams incl. the encoder name, vocabulary, tokenizer; read
with ``weights_only=True``), ``vocab.json``, ``run.json`` (the run config and the evaluation
settings :func:`score` reuses to reproduce the numbers), ``metrics.json``, ``samples.png`` (test
images, generated vs reference captions), for soft attention ``attention.png``, and the test captions
``test_hyps_<setting>.txt`` line by line with ``test_images.txt`` (what sacreBLEU scored).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab.config import flatten, parse_section, require, require_corpus_task
from rnnlab.data.captions import CaptionDataModule, read_prepared_captions, scored_splits
from rnnlab.data.feature_cache import FEATURES_FILE, INDEX_FILE, load_features, read_index
from rnnlab.data.tokenize import Tokenizer, WordTokenizer, build_tokenizer
from rnnlab.data.vocab import UNK, Vocab
from rnnlab.decoding import LengthNorm, OutputRules, beam_search, greedy_decode
from rnnlab.errors import ConfigError, DataError, RnnlabError, TrainingError
from rnnlab.io import atomic_path, read_json, write_json
from rnnlab.metrics import corpus_bleu, decode_name, perplexity, sacrebleu_standard
from rnnlab.models.captioner import build_captioner, incremental_decoder
from rnnlab.models.image_encoder import ENCODER_NAMES, EncoderTail, build_image_encoder, split_encoder
from rnnlab.resume import load_checkpoint_file
from rnnlab.tasks.base import RunContext, StagePaths, TrainOutput
from rnnlab.training import FitSpec, fit, load_best_weights, save_model_checkpoint

log = logging.getLogger(__name__)

SECTION = "train_captioner"
TASK = "captioning"
EXPERIMENT = "rnnlab-captioner"
CORPUS = "flickr8k"  # the default corpus of a run
MODEL_FILE = "model.ckpt"
VOCAB_FILE = "vocab.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
TEST_IMAGES_FILE = "test_images.txt"  # the order of the lines of test_hyps_<setting>.txt
BLEU_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4")


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Keys of one ``train_captioner`` run (``defaults`` merged with ``runs.<name>``).

    decoder: ``show_tell`` (Vinyals et al.) or ``soft_attention`` (Xu et al., soft).
    encoder: name of the CNN that produced the feature cache (efficientnet_lite0 | resnet18 |
        resnet50 | small_cnn); checked against the cache's index so features and model agree.
    embedding_size, hidden_size: word embedding and LSTM sizes.
    attention_size: size of the additive attention MLP (soft_attention only). Its per-step cost
        is captions x 49 x attention_size elementwise work, the CPU bottleneck of that decoder.
    dropout: on word embeddings, the image embedding (show_tell) and the LSTM output.
    lr: Adam learning rate.  gradient_clip_val: max global gradient norm (null: no clipping).
    batch_size: *images* per training batch; each brings all its captions (~5), so a batch has
        about 5 x batch_size captions.  eval_batch_size: images per validation/decoding batch.
    max_epochs: passes over the train images.  max_time_minutes: optional wall-clock cap on
        training (null: none; results then depend on the machine).  limit_train_batches:
        fraction (float) or number (int) of train batches per epoch (smoke runs).
    alpha_c: weight of the doubly stochastic attention penalty (soft_attention only).
    finetune_blocks: 0 (default): the encoder stays frozen and the decoder reads the feature
        cache. N >= 1: the encoder's last N blocks (:func:`rnnlab.models.image_encoder.encoder_blocks`,
        18 for efficientnet_lite0, the last being its 1x1 head conv) train jointly with the decoder;
        -1: all of them. The frozen prefix runs once over the run's images at its start (kept in
        memory, float16, the cache's layout), so each step runs only the last N blocks + decoder.
    encoder_lr: Adam learning rate of the fine-tuned blocks (their own param group), below ``lr`` so
        the ImageNet features are adjusted rather than overwritten (Xu et al.'s code: 1e-4 vs 4e-4).
    min_freq: a train-split word needs this many occurrences to enter the vocabulary.
    max_len: captions are cut to this many words for training; decoding stops after max_len
        words (+ <eos>).
    beam_sizes: test decoding settings; 1 = greedy (e.g. [1, 3, 5]).
    length_penalty: GNMT length penalty alpha for beam search (0 = rank by raw log-prob).
    length_norm: how beam search ranks finished captions: gnmt (the alpha above) | average | none.
    block_ngram_repeat: no n-gram of this size twice in one caption (0: off); README "Decoding rules".
    allow_unk: true lets decoding emit ``<unk>`` (``<pad>``/``<bos>`` never are).
    grid_images: how many test images the PNG grids show.
    enabled: false in a profile that leaves this run out (the stage writes a row saying so).
    CPU threads are the shared ``trainer.num_threads``.
    corpus: a ``captions`` corpus of params ``corpora`` (default flickr8k); its images must be the
        ones the ``features`` stage encoded (params ``features.corpus``).
    """

    corpus: str = CORPUS
    decoder: Literal["show_tell", "soft_attention"] = "soft_attention"
    encoder: str = "efficientnet_lite0"
    embedding_size: int = 256
    hidden_size: int = 512
    attention_size: int = 256
    dropout: float = 0.5
    lr: float = 4e-4
    gradient_clip_val: float | None = 5.0
    batch_size: int = 32
    eval_batch_size: int = 100
    max_epochs: int = 3
    max_time_minutes: float | None = None
    limit_train_batches: int | float = 1.0
    alpha_c: float = 1.0
    finetune_blocks: int = 0
    encoder_lr: float = 1e-4
    min_freq: int = 5
    max_len: int = 30
    beam_sizes: list[int] = field(default_factory=lambda: [1, 3, 5])
    length_penalty: float = 0.0
    length_norm: LengthNorm = "gnmt"
    block_ngram_repeat: int = 2  # measured, README "Decoding rules"
    allow_unk: bool = False
    grid_images: int = 8
    coco_metrics: bool = True  # METEOR, ROUGE-L, CIDEr-D (+ the toolkit's BLEU) per setting; needs Java
    enabled: bool = True

    def validate(self, where: str) -> None:
        if not self.corpus or "/" in self.corpus:
            raise ConfigError(f"{where}.corpus: expected a corpus name of params corpora, got {self.corpus!r}")
        require(self.encoder in ENCODER_NAMES, f"{where}.encoder", f"one of {list(ENCODER_NAMES)}", self.encoder)
        for key in (
            "embedding_size",
            "hidden_size",
            "attention_size",
            "batch_size",
            "eval_batch_size",
            "max_epochs",
            "min_freq",
            "max_len",
        ):
            require(getattr(self, key) >= 1, f"{where}.{key}", "an integer >= 1", getattr(self, key))
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a number in [0, 1)", self.dropout)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.alpha_c >= 0, f"{where}.alpha_c", "a number >= 0", self.alpha_c)
        require(
            self.finetune_blocks >= -1,
            f"{where}.finetune_blocks",
            "an integer >= 1, 0 (frozen) or -1 (all)",
            self.finetune_blocks,
        )
        require(self.encoder_lr > 0, f"{where}.encoder_lr", "a number > 0", self.encoder_lr)
        require(
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            f"{where}.gradient_clip_val",
            "null or a number > 0",
            self.gradient_clip_val,
        )
        require(
            self.max_time_minutes is None or self.max_time_minutes > 0,
            f"{where}.max_time_minutes",
            "null or a number > 0",
            self.max_time_minutes,
        )
        require(
            bool(self.beam_sizes) and all(b >= 1 for b in self.beam_sizes),
            f"{where}.beam_sizes",
            "a non-empty list of integers >= 1",
            self.beam_sizes,
        )
        require(self.length_penalty >= 0, f"{where}.length_penalty", "a number >= 0", self.length_penalty)
        require(self.block_ngram_repeat >= 0, f"{where}.block_ngram_repeat", "an integer >= 0", self.block_ngram_repeat)
        require(self.grid_images >= 0, f"{where}.grid_images", "an integer >= 0", self.grid_images)
        require(
            isinstance(self.limit_train_batches, int)
            and self.limit_train_batches >= 1
            or isinstance(self.limit_train_batches, float)
            and 0 < self.limit_train_batches <= 1,
            f"{where}.limit_train_batches",
            "an integer >= 1 or a fraction in (0, 1]",
            self.limit_train_batches,
        )


def parse_run(merged: dict, where: str = SECTION) -> RunConfig:
    """One run's keys, checked; errors name the key (``train_captioner.runs.flickr8k-show_tell.foo``)."""
    return parse_section(RunConfig, merged, where)


def check_corpus(run: RunConfig, corpora: dict, where: str) -> None:
    """Before anything trains: the run's corpus is declared in params ``corpora`` with task captions."""
    require_corpus_task(run.corpus, corpora, ("captions",), "captions", where)


def data_files(run: RunConfig, paths: StagePaths) -> list[Path]:
    """What a run reads: the prepared captions and the feature cache's index."""
    return [Path(paths.prepared) / run.corpus / "captions.parquet", Path(paths.features) / INDEX_FILE]


def tags(run: RunConfig) -> dict:
    return {"corpus": run.corpus, "decoder": run.decoder, "encoder": run.encoder}


def eval_sets(run: RunConfig, paths: StagePaths) -> list[str]:
    """The extra evaluation sets of the run's prepared corpus (``eval_<name>`` splits), sorted."""
    splits = scored_splits(read_prepared_captions(paths.prepared, run.corpus)["split"])
    return [s for s in splits if s.startswith("eval_")]


def corpus_captions(corpus: str, paths: StagePaths, index: dict, where: str):
    """The corpus's prepared captions that have cached features, and how many were left out; a
    cache made from another corpus's images (none of this corpus's images in it) is an error."""
    captions = read_prepared_captions(paths.prepared, corpus)
    kept, left_out = captions_with_features(captions, index)
    if kept.empty and not captions.empty:
        raise ConfigError(
            f"{where}.corpus: the feature cache {paths.features} holds none of the images of corpus {corpus!r} "
            f"(the features stage encodes the images of params features.corpus; set it to {corpus!r})"
        )
    return kept, left_out


# --------------------------------------------------------------------------------------------
# the LightningModule
# --------------------------------------------------------------------------------------------
@dataclass
class Captions:
    tokens: list[list[str]]  # without <bos>/<eos>
    scores: list[float]
    attention: list[torch.Tensor] | None  # per caption [steps (incl. <eos>), positions]

    def texts(self, tokenizer: Tokenizer) -> list[str]:
        return [tokenizer.detokenize(t) for t in self.tokens]


_D = RunConfig  # the defaults below are RunConfig's (one place)


class CaptioningTask(pl.LightningModule):
    """Caption decoder on cached features. The checkpoint carries the vocabulary and tokenizer
    (``on_save_checkpoint``), so captioning a new image needs nothing but the checkpoint and the
    encoder it names (``hparams.encoder``)."""

    def __init__(
        self,
        decoder: str,
        vocab_size: int,
        feature_size: int,
        embedding_size: int = _D.embedding_size,
        hidden_size: int = _D.hidden_size,
        attention_size: int = _D.attention_size,
        dropout: float = _D.dropout,
        lr: float = _D.lr,
        alpha_c: float = _D.alpha_c,
        max_len: int = _D.max_len,
        encoder: str = _D.encoder,
        length_penalty: float = _D.length_penalty,
        length_norm: str = _D.length_norm,
        block_ngram_repeat: int = _D.block_ngram_repeat,
        allow_unk: bool = _D.allow_unk,
        finetune_blocks: int = _D.finetune_blocks,
        encoder_lr: float = _D.encoder_lr,
        tokenizer: dict | None = None,
        vocab_fingerprint: str = "",
        vocab: Vocab | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["vocab"])
        # What decoding may emit and how beams are ranked (a checkpoint carries its run's rules;
        # older ones get RunConfig's); the CLI may change it (--allow-unk).
        self.rules = OutputRules(
            allow_unk=allow_unk,
            block_ngram_repeat=block_ngram_repeat,
            length_norm=length_norm,
            length_penalty=length_penalty,
        )
        if vocab is not None and len(vocab) != vocab_size:
            raise RnnlabError(f"vocab_size {vocab_size} != vocabulary of {len(vocab)} tokens")
        self.model = build_captioner(
            decoder,
            vocab_size=vocab_size,
            feature_size=feature_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            attention_size=attention_size,
            dropout=dropout,
            pad_id=Vocab.pad_id,
        )
        # Fine-tuning: the encoder's trainable last blocks (None: frozen, the batches carry the final
        # features). Built from the architecture; train() loads the ImageNet weights, load() the checkpoint's.
        self.encoder_tail = encoder_tail(encoder, finetune_blocks) if finetune_blocks else None
        self.vocab = vocab
        self.tokenizer = build_tokenizer(tokenizer) if tokenizer else WordTokenizer(lowercase=True)
        self._val_sums = [0.0, 0]

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Decoder input [images, 49, C] from the run's cached maps: the cached features themselves
        (frozen encoder), or the fine-tuned tail's output on the cached prefix maps."""
        return features if self.encoder_tail is None else self.encoder_tail(features)

    # -- loss ------------------------------------------------------------------------------
    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        out = self.model(self.encode(batch.features), batch.inputs, batch.image_index)
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
        self.log("val/loss", loss)
        self.log("val/ppl", perplexity(loss))

    def configure_optimizers(self):
        if self.encoder_tail is None:
            return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)
        groups = [
            {"params": list(self.model.parameters()), "lr": self.hparams.lr},
            {"params": list(self.encoder_tail.parameters()), "lr": self.hparams.encoder_lr},  # lower: ImageNet init
        ]
        return torch.optim.Adam(groups, lr=self.hparams.lr)

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
    def caption(
        self,
        features: torch.Tensor,
        beam_size: int = 1,
        max_len: int | None = None,
        length_penalty: float | None = None,
        return_attention: bool = False,
        batch_size: int = 100,
    ) -> Captions:
        """Caption images from features [images, positions, channels]; greedy when ``beam_size == 1``.

        Decoding follows ``self.rules``; ``length_penalty`` (GNMT alpha), when given, overrides its alpha."""
        if self.vocab is None:
            raise RnnlabError("CaptioningTask has no vocabulary (load it from a checkpoint)")
        was_training = self.training
        self.eval()
        max_steps = (max_len or self.hparams.max_len) + 1  # + the <eos> step
        tokens, scores, attention = [], [], [] if return_attention else None
        try:
            for start in range(0, features.size(0), batch_size):
                chunk = self.encode(features[start : start + batch_size].to(self.device, torch.float32))
                stepper, state = incremental_decoder(self.model, chunk)
                common = dict(
                    batch_size=chunk.size(0),
                    bos_id=Vocab.bos_id,
                    eos_id=Vocab.eos_id,
                    max_len=max_steps,
                    return_attention=return_attention,
                    rules=self.rules,
                )
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


def encoder_tail(encoder: str, finetune_blocks: int, pretrained: bool = False) -> EncoderTail:
    """The last ``finetune_blocks`` blocks of encoder ``encoder`` (random weights unless ``pretrained``).

    Built under a forked RNG: a fine-tuned run's decoder starts from the same weights, and sees its
    batches in the same order, as the frozen run with the same seed."""
    with torch.random.fork_rng(devices=[]):
        return split_encoder(build_image_encoder(encoder, pretrained=pretrained), finetune_blocks)[1]


def prefix_cache(
    encoder: str, finetune_blocks: int, image_dir: str | Path, names: Sequence[str]
) -> tuple[np.ndarray, dict]:
    """The frozen prefix's maps of ``names`` (in memory, the feature cache's layout, float16) and an
    index like the cache's (encoder, names kept, problems), for a run with ``finetune_blocks``."""
    from rnnlab.features import encode_images

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder missing; fine-tuning the encoder reads the images")
    with torch.random.fork_rng(devices=[]):
        prefix, _ = split_encoder(build_image_encoder(encoder), finetune_blocks)
    start = time.perf_counter()
    array, kept, problems = encode_images(prefix, image_dir, names)
    log.info(
        "encoder prefix %s: %d images -> %s float16 in %.1f s",
        prefix.name,
        len(kept),
        tuple(array.shape),
        time.perf_counter() - start,
    )
    index = {
        "encoder": encoder,
        "prefix": prefix.name,
        "names": kept,
        "problems": [{"image": n, "reason": r} for n, r in problems],
    }
    return array, index


def load(path: str | Path, map_location: str = "cpu") -> CaptioningTask:
    """A trained :class:`CaptioningTask` (eval mode, vocabulary inside) from a model folder or its
    ``model.ckpt``, read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    ckpt = load_checkpoint_file(path)
    if "vocab" not in ckpt or "hyper_parameters" not in ckpt:
        raise RnnlabError(f"{path}: not a captioning checkpoint (no vocab/hyper_parameters)")
    vocab = Vocab.from_dict(ckpt["vocab"])
    hp = dict(ckpt["hyper_parameters"])
    if hp.get("vocab_fingerprint") and hp["vocab_fingerprint"] != vocab.fingerprint():
        raise RnnlabError(
            f"{path}: vocabulary fingerprint {vocab.fingerprint()} != {hp['vocab_fingerprint']} in hparams"
        )
    task = CaptioningTask(**hp, vocab=vocab)
    task.load_state_dict(ckpt["state_dict"])
    task.on_load_checkpoint(ckpt)
    return task.to(map_location).eval()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def captions_with_features(captions, index: dict):
    """Captions whose image has a row in the feature cache, and how many were left out."""
    names = set(index["names"])
    in_splits = captions["split"].isin(scored_splits(captions["split"]))
    keep = captions["image"].isin(names) & in_splits
    return captions[keep].reset_index(drop=True), int((~keep & in_splits).sum())


def _feature_index(paths: StagePaths) -> dict:
    index_path = Path(paths.features) / INDEX_FILE
    if not index_path.is_file():
        raise DataError(f"{index_path}: feature cache missing (run the features stage)")
    return read_index(index_path)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def evaluate(
    module: CaptioningTask,
    data: CaptionDataModule,
    split: str = "test",
    beam_sizes: Sequence[int] = (1, 3, 5),
    length_penalty: float | None = None,
    batch_size: int = 100,
    captions=None,
    coco: bool = True,
) -> tuple[dict, dict]:
    """Decode every image of ``split`` with each beam size (1 = greedy) and score it.

    Returns (metrics, decoded): ``metrics[setting]`` = {bleu1..4, sacrebleu, sacrebleu_signature,
    mean_length, captions_per_s, unk_in_output (``<unk>`` tokens in the captions)}
    with ``setting`` = :func:`rnnlab.metrics.decode_name` (``greedy``,
    ``beam3``); ``decoded[setting]`` = token lists in ``decoded["names"]`` order and, for soft
    attention, ``decoded["attention"]`` from greedy decoding. ``captions`` (the raw caption table)
    gives sacreBLEU its untokenised references (else the detokenised tokenised ones). With ``coco``,
    ``metrics[setting]["coco"]`` = the COCO caption toolkit's {bleu1..4, meteor, rouge_l, cider_d}
    on the same hypotheses and raw references (:mod:`rnnlab.coco_metrics`)."""
    split_data = data.splits[split]
    names = list(split_data.names)
    features = torch.cat([f for _, f in data.image_batches(split, batch_size)])
    references = split_data.references
    raw_refs = None
    if captions is not None:
        table = captions[captions["split"] == split].sort_values(["image", "caption_index"])
        by_image = table.groupby("image")["caption"].apply(list).to_dict()
        raw_refs = [by_image[n] for n in names]
    tokenizer = module.tokenizer
    if raw_refs is None:
        raw_refs = [[tokenizer.detokenize(r) for r in rs] for rs in references]
    metrics, decoded = {}, {"names": names}
    for beam in beam_sizes:
        setting = decode_name(beam)
        start = time.perf_counter()
        want_attention = beam == 1 and module.hparams.decoder == "soft_attention"
        result = module.caption(
            features,
            beam_size=beam,
            length_penalty=length_penalty,
            return_attention=want_attention,
            batch_size=batch_size,
        )
        seconds = time.perf_counter() - start
        scores = corpus_bleu(result.tokens, references)
        std = sacrebleu_standard(result.texts(tokenizer), raw_refs)
        metrics[setting] = {
            **scores,
            "sacrebleu": std["score"],
            "sacrebleu_signature": std["signature"],
            "mean_length": round(float(np.mean([len(t) for t in result.tokens])), 3),
            "captions_per_s": round(len(names) / seconds, 2),
            "unk_in_output": sum(t.count(UNK) for t in result.tokens),
        }
        if coco:
            from rnnlab.coco_metrics import coco_caption_scores

            metrics[setting]["coco"] = {
                k: round(v, 4) for k, v in coco_caption_scores(result.texts(tokenizer), raw_refs).items()
            }
        decoded[setting] = result.tokens
        if want_attention:
            decoded["attention"] = result.attention
        log.info("%s %s: %s", split, setting, scores)
    return metrics, decoded


def score(
    folder: str | Path,
    paths: StagePaths,
    beam_sizes: Sequence[int] = (1, 3),
    split: str = "test",
    limit: int | None = None,
    rules: OutputRules | None = None,
) -> dict:
    """Score a ``train_captioner`` model folder on ``split`` from the saved folder only.

    The decoder, vocabulary and tokenizer come from ``folder/model.ckpt``; the decoding settings
    (length penalty, batch size) from ``folder/run.json``; the images' features from the cache
    ``paths.features`` (a fine-tuned model: its frozen prefix over the images in ``paths.raw``, then
    its own fine-tuned blocks) and their references from ``paths.prepared/<corpus>/captions.parquet``.
    With the same beam sizes the numbers equal those :func:`train` reported (decoding is
    deterministic on CPU). ``limit``: the first N images of ``split`` only (smoke tests).
    Returns ``{setting: {bleu1..4, sacrebleu, ...}, "params": the run's config}``."""
    folder = Path(folder)
    for path in (folder / MODEL_FILE, folder / RUN_FILE):
        if not path.is_file():
            raise DataError(f"{path}: missing from the captioner model folder (run train_captioner)")
    run = read_json(folder / RUN_FILE)
    module = load(folder / MODEL_FILE)
    if rules is not None:  # instead of the checkpoint's (benchmarks/decoding_rules.py)
        module.rules = rules
    features_dir = Path(paths.features)
    features = load_features(features_dir / FEATURES_FILE, features_dir / INDEX_FILE)
    if features[1].get("encoder") != module.hparams.encoder:
        raise DataError(
            f"{features_dir / INDEX_FILE}: features of {features[1].get('encoder')!r}, but "
            f"{folder} was trained on {module.hparams.encoder!r}"
        )
    corpus = run["config"].get("corpus", CORPUS)
    captions, _ = corpus_captions(corpus, paths, features[1], f"{folder}/{RUN_FILE} config")
    if limit is not None:
        keep = sorted(set(captions.loc[captions["split"] == split, "image"]))[:limit]
        captions = captions[(captions["split"] != split) | captions["image"].isin(keep)].reset_index(drop=True)
    finetune = module.hparams.get("finetune_blocks", 0)
    if finetune:  # its own last blocks (in the checkpoint) read the frozen prefix's maps of the images
        names = sorted(set(captions.loc[captions["split"] == split, "image"]))
        features = prefix_cache(module.hparams.encoder, finetune, Path(paths.raw) / corpus / "images", names)
    settings = run["eval"]
    data = CaptionDataModule(
        captions,
        features_dir / FEATURES_FILE,
        features_dir / INDEX_FILE,
        eval_batch_size=settings["batch_size"],
        max_len=module.hparams.max_len,
        vocab=module.vocab,
        tokenizer=module.tokenizer,
        features=features,
    )
    data.setup()
    metrics, _ = evaluate(
        module,
        data,
        split,
        list(beam_sizes),
        None if rules is not None else settings["length_penalty"],
        settings["batch_size"],
        captions=captions,
        coco=settings.get("coco_metrics", False),
    )
    unks = sum(m["unk_in_output"] for m in metrics.values())
    return {**metrics, "unk_in_output": unks, "params": run["config"]}


# --------------------------------------------------------------------------------------------
# captioning new image files (the CLI and serving)
# --------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")  # what torchvision.io decodes; `rnnlab caption DIR`
FOLDER_BATCH = 32  # images loaded, encoded and decoded together by `rnnlab caption DIR`


class ImageCaptioner:
    """A trained model folder (or its ``model.ckpt``) with its image encoder, built once and used for
    any number of batches of decoded images (:func:`caption_images`, :func:`caption_folder`).

    The checkpoint names its encoder (``hparams.encoder``); images are squashed to 224x224,
    encoded by the same fast path as the feature cache and rounded through float16 like the cache,
    so a new image is seen exactly as the training images were. A fine-tuned checkpoint carries its
    last blocks: here only the frozen prefix runs (and is rounded like the prefix cache it trained on)."""

    def __init__(self, folder: str | Path, encoder_weights: str | Path | None = None):
        from rnnlab.data.images import image_transform
        from rnnlab.features import optimize_for_inference

        self.module = load(folder)
        encoder = build_image_encoder(self.module.hparams.encoder, encoder_weights)
        finetune = self.module.hparams.get("finetune_blocks", 0)
        # Fine-tuned: the frozen prefix runs here, the checkpoint's own last blocks in module.encode.
        self.fast = optimize_for_inference(split_encoder(encoder, finetune)[0] if finetune else encoder)
        self.transform = image_transform(encoder.mean.flatten().tolist(), encoder.std.flatten().tolist())

    def features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 RGB images [3, H, W] -> cached-feature-like maps [images, positions, channels]."""
        batch = torch.stack([self.transform(image) for image in images]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            maps = self.fast(batch)  # [images, C, 7, 7]
        return maps.permute(0, 2, 3, 1).reshape(maps.size(0), -1, maps.size(1)).half().float()

    def caption(
        self, images: Sequence[torch.Tensor], beam_size: int = 3, length_penalty: float | None = None
    ) -> list[str]:
        features = self.features(images)
        result = self.module.caption(features.clone(), beam_size=beam_size, length_penalty=length_penalty)
        return result.texts(self.module.tokenizer)


def caption_images(
    folder: str | Path,
    image_paths: Sequence[str | Path],
    beam_size: int = 3,
    encoder_weights: str | Path | None = None,
    length_penalty: float | None = None,
    allow_unk: bool = False,
) -> list[str]:
    """Caption image files with a trained model folder (or its ``model.ckpt``); raises ImageError
    (a DataError) naming a file that is missing or not a decodable image, before any model loads.
    All images are decoded and encoded as one batch (:class:`ImageCaptioner`); for a folder of
    any size see :func:`caption_folder`."""
    from rnnlab.data.images import load_image

    images = [load_image(p) for p in image_paths]
    captioner = ImageCaptioner(folder, encoder_weights)
    captioner.module.rules = dataclasses.replace(captioner.module.rules, allow_unk=allow_unk)
    return captioner.caption(images, beam_size=beam_size, length_penalty=length_penalty)


def list_image_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """(image files by suffix :data:`IMAGE_SUFFIXES`, case-insensitive; every other entry) of a
    folder, each sorted by name; not recursive (sub-folders are among the others)."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise RnnlabError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
    return images, [p for p in entries if p not in set(images)]


def caption_folder(
    captioner: ImageCaptioner,
    paths: Sequence[str | Path],
    beam_size: int = 3,
    batch_size: int = FOLDER_BATCH,
    length_penalty: float | None = None,
):
    """Caption image files ``batch_size`` at a time: only one batch of decoded images is in memory.

    Yields ``(path, caption, None)`` per captioned image (input order) and ``(path, None, reason)`` per
    file that is missing, unreadable or not a decodable image: never raises for a bad file."""
    from rnnlab.data.images import ImageError, load_image

    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
    for start in range(0, len(paths), batch_size):
        good, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path))
                good.append(Path(path))
            except ImageError as exc:
                yield Path(path), None, exc.reason
        if images:
            captions = captioner.caption(images, beam_size=beam_size, length_penalty=length_penalty)
            yield from ((path, text, None) for path, text in zip(good, captions))


def _write_folder_captions(
    captioner: ImageCaptioner, images: list[Path], out, beam: int, batch_size: int, stderr, progress: bool
) -> dict:
    from tqdm.auto import tqdm

    done, bad = 0, []
    start = time.perf_counter()
    with tqdm(
        total=len(images),
        unit="image",
        desc="caption",
        file=stderr,
        disable=not progress,
        mininterval=0.5,
        dynamic_ncols=True,
    ) as bar:
        for path, text, reason in caption_folder(captioner, images, beam, batch_size):
            if reason is None:
                out.write(json.dumps({"image": path.name, "caption": text}, ensure_ascii=False) + "\n")
                done += 1
            else:
                bar.write(f"rnnlab caption: skipped {path.name}: {reason}", file=stderr)
                bad.append({"image": path.name, "reason": reason})
            bar.update(1)
    seconds = time.perf_counter() - start
    return {
        "images": len(images),
        "captioned": done,
        "bad_images": len(bad),
        "bad": bad,
        "seconds": round(seconds, 3),
        "images_per_s": round(done / seconds, 2) if seconds > 0 else None,
    }


def caption_folder_command(
    folder: str | Path,
    out_path: str | Path | None = None,
    beam: int = 3,
    run: str | Path | None = None,
    batch_size: int = FOLDER_BATCH,
    encoder_weights: str | Path | None = None,
    stdout=None,
    stderr=None,
    progress: bool = True,
    allow_unk: bool = False,
) -> dict:
    """``rnnlab caption DIR --out captions.jsonl``: one JSON line ``{"image": name, "caption": text}``
    per decodable image file of ``DIR`` (sorted by name, :data:`IMAGE_SUFFIXES`), ``batch_size``
    images loaded, encoded and decoded at a time (:func:`caption_folder`). ``folder`` may also be
    one image file (one line).

    A bad image (unreadable, truncated, not an image) is named on stderr, skipped and counted; other
    files are named and skipped. The output file is written atomically (``out_path`` None: stdout);
    a summary (images captioned, bad images, images/s) goes to stderr. No image file at all, or
    none decodable, is an error naming the folder (nothing is written). Returns the summary."""
    from rnnlab.inference import resolve_model

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    folder = Path(folder)
    if not folder.exists():
        raise RnnlabError(f"{folder}: no such folder")
    if batch_size < 1:
        raise RnnlabError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if out_path is not None:
        out_path = Path(out_path)
        if out_path.is_dir():
            raise RnnlabError(f"{out_path}: is a folder; --out must name a file")
        if not out_path.parent.is_dir():
            raise RnnlabError(f"{out_path}: the output folder {out_path.parent} does not exist")
    images, others = list_image_files(folder) if folder.is_dir() else ([folder], [])  # a file: a folder of one
    if out_path is not None:
        images = [p for p in images if p.resolve() != out_path.resolve()]
        others = [p for p in others if p.resolve() != out_path.resolve()]
    if not images:
        raise RnnlabError(
            f"{folder}: no image files ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in this folder"
            + (f" ({len(others)} other entries)" if others else "")
        )
    for other in others:
        print(
            f"rnnlab caption: skipped {other.name}: not an image file "
            f"({'a folder' if other.is_dir() else 'suffix ' + (other.suffix or 'none')})",
            file=stderr,
        )
    captioner = ImageCaptioner(resolve_model(run, TASK), encoder_weights)
    captioner.module.rules = dataclasses.replace(captioner.module.rules, allow_unk=allow_unk)  # --allow-unk

    def write(out) -> dict:
        summary = _write_folder_captions(captioner, images, out, beam, batch_size, stderr, progress)
        if not summary["captioned"]:
            raise RnnlabError(
                f"{folder}: no decodable image ({summary['bad_images']} bad image file(s): "
                + ", ".join(b["image"] for b in summary["bad"][:5])
                + (", ..." if summary["bad_images"] > 5 else "")
                + ")"
            )
        return summary

    if out_path is not None:
        with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
            summary = write(out)
    else:
        summary = write(stdout)
    summary["other_files"] = len(others)
    rate = summary["images_per_s"]
    print(
        f"rnnlab caption: {folder} -> {out_path or 'stdout'}: {summary['captioned']} image(s) captioned, "
        f"{summary['bad_images']} bad image(s) skipped, {len(others)} other file(s) skipped; "
        f"{summary['seconds']:.1f} s, {rate if rate is not None else '-'} images/s (beam {beam}, batch {batch_size})",
        file=stderr,
    )
    return summary


# --------------------------------------------------------------------------------------------
# training one run
# --------------------------------------------------------------------------------------------
def _tokens_per_batch(batch) -> int:
    return int((batch.inputs != Vocab.pad_id).sum())


def _best_score(result, monitor: str) -> float | None:
    """The monitored score of the weights ``fit`` kept: the best validation round's, or that of
    the final weights when ``fit`` validated them after training (stopped mid-epoch) and they won."""
    best = result.trainer.checkpoint_callback
    scores = [float(best.best_model_score)] if best is not None and best.best_model_score is not None else []
    final = result.trainer.callback_metrics.get(monitor)
    if final is not None:
        scores.append(float(final))
    return min(scores) if scores else None


def _draw_grids(
    module: CaptioningTask, data: CaptionDataModule, decoded: dict, image_dir: Path, out_dir: Path, run: RunConfig
) -> dict:
    from rnnlab.plots import save_attention_grid, save_caption_grid

    n = min(run.grid_images, len(decoded["names"]))
    names = decoded["names"][:n]
    setting = "greedy" if "greedy" in decoded else next(k for k in decoded if k.startswith("beam"))
    tokens = decoded[setting][:n]
    refs = [[module.tokenizer.detokenize(r) for r in rs] for rs in data.splits["test"].references[:n]]
    generated = [module.tokenizer.detokenize(t) for t in tokens]
    out = {
        "samples_png": str(
            save_caption_grid(
                out_dir / "samples.png",
                image_dir,
                names,
                generated,
                refs,
                title=f"{run.decoder} ({setting}) on test images",
            )
        )
    }
    if decoded.get("attention"):
        k = min(n, 4)
        out["attention_png"] = str(
            save_attention_grid(out_dir / "attention.png", image_dir, names[:k], tokens[:k], decoded["attention"][:k])
        )
    return out


def _write_hypotheses(out_dir: Path, decoded: dict, tokenizer: Tokenizer, settings: list[str]) -> None:
    """``test_images.txt`` (one image name a line) and ``test_hyps_<setting>.txt`` (its caption on the
    same line, detokenised as sacreBLEU scored it): the reported sacreBLEU can be recomputed by the
    ``sacrebleu`` command line against the raw caption files, as for translation."""
    (out_dir / TEST_IMAGES_FILE).write_text("".join(f"{n}\n" for n in decoded["names"]), encoding="utf-8")
    for setting in settings:
        lines = [tokenizer.detokenize(t) for t in decoded[setting]]
        (out_dir / f"test_hyps_{setting}.txt").write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


def train(run: RunConfig, ctx: RunContext) -> TrainOutput:
    """Train one decoder on the cached features (``finetune_blocks``: with the encoder's last blocks,
    on the frozen prefix's maps), keep the best ``val/loss`` weights, score them on
    the test images and write the model folder ``ctx.out_dir`` (writer only)."""
    started = time.perf_counter()
    paths = ctx.paths
    features_dir = Path(paths.features)
    index = _feature_index(paths)
    captions, left_out = corpus_captions(run.corpus, paths, index, ctx.where)
    image_dir = Path(paths.raw) / run.corpus / "images"  # the grids (drawn when the folder is there)

    cache_encoder = index.get("encoder")
    if cache_encoder != run.encoder:
        raise ConfigError(
            f"{ctx.where}.encoder is {run.encoder!r} but the feature cache {features_dir} was made with "
            f"{cache_encoder!r}; re-extract features or fix the param"
        )
    prefix_seconds, tail_weights, feature_size = None, None, None
    if run.finetune_blocks:  # the same images as the frozen cache, through the frozen prefix only
        prefix_start = time.perf_counter()
        try:
            prefix = prefix_cache(run.encoder, run.finetune_blocks, image_dir, sorted(set(captions["image"])))
        except ConfigError as exc:  # e.g. more blocks than the encoder has: name the key
            raise ConfigError(f"{ctx.where}.finetune_blocks: {exc}") from exc
        prefix_seconds = round(time.perf_counter() - prefix_start, 1)
        pretrained = encoder_tail(run.encoder, run.finetune_blocks, pretrained=True)
        tail_weights, feature_size = pretrained.state_dict(), pretrained.out_channels
    data = CaptionDataModule(
        captions,
        features_dir / FEATURES_FILE,
        features_dir / INDEX_FILE,
        batch_size=run.batch_size,
        eval_batch_size=run.eval_batch_size,
        min_freq=run.min_freq,
        max_len=run.max_len,
        features=prefix if run.finetune_blocks else None,
    )
    data.setup()
    vocab = data.vocab
    module = CaptioningTask(
        decoder=run.decoder,
        vocab_size=len(vocab),
        feature_size=feature_size or int(data.features.shape[2]),
        embedding_size=run.embedding_size,
        hidden_size=run.hidden_size,
        attention_size=run.attention_size,
        dropout=run.dropout,
        lr=run.lr,
        alpha_c=run.alpha_c,
        max_len=run.max_len,
        encoder=run.encoder,
        length_penalty=run.length_penalty,
        length_norm=run.length_norm,
        block_ngram_repeat=run.block_ngram_repeat,
        allow_unk=run.allow_unk,
        finetune_blocks=run.finetune_blocks,
        encoder_lr=run.encoder_lr,
        tokenizer=data.tokenizer.to_dict(),
        vocab_fingerprint=vocab.fingerprint(),
        vocab=vocab,
    )
    if tail_weights is not None:
        module.encoder_tail.load_state_dict(tail_weights)  # fine-tuning starts from ImageNet
    spec = FitSpec(
        max_epochs=run.max_epochs,
        monitor="val/loss",
        limit_train_batches=run.limit_train_batches,
        max_time_minutes=run.max_time_minutes,
        gradient_clip_val=run.gradient_clip_val,
        tokens_per_batch=_tokens_per_batch,
        distributed=False,
    )
    result = fit(module, data, ctx.trainer, spec, ctx.resume, ctx.tracker)
    best_val = _best_score(result, "val/loss")
    load_best_weights(module, result)
    module.eval()

    out_dir = Path(ctx.out_dir)
    model_path = out_dir / MODEL_FILE
    if ctx.writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model_checkpoint(result.best_path, model_path)  # weights, hparams, vocab, tokenizer
        vocab.save(out_dir / VOCAB_FILE)
        write_json(
            out_dir / RUN_FILE,
            {
                "name": ctx.name,
                "config": dataclasses.asdict(run),
                "seed": ctx.seed,
                "eval": {
                    "beam_sizes": run.beam_sizes,
                    "length_penalty": run.length_penalty,  # decoding's other rules: the checkpoint's hparams
                    "batch_size": run.eval_batch_size,
                    "coco_metrics": run.coco_metrics,
                },
                "features": {"encoder": index.get("encoder"), "images": len(index["names"])},
            },
        )

    eval_start = time.perf_counter()
    with result.evaluation_guard():  # Ctrl-C during the test decoding also stops cleanly
        test, decoded = evaluate(
            module,
            data,
            "test",
            run.beam_sizes,
            run.length_penalty,
            run.eval_batch_size,
            captions=captions,
            coco=run.coco_metrics,
        )
    eval_seconds = time.perf_counter() - eval_start

    artifacts = {"model": str(model_path)}
    if ctx.writer:
        _write_hypotheses(out_dir, decoded, module.tokenizer, list(test))
    if ctx.writer and image_dir.is_dir() and run.grid_images:
        artifacts.update(_draw_grids(module, data, decoded, image_dir, out_dir, run))
    trainer = result.trainer
    summary = data.summary()
    details = {
        "decoder": run.decoder,
        "encoder": run.encoder,
        "seed": ctx.seed,
        "data": summary,
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "best_val_loss": round(best_val, 5) if best_val is not None else None,
        "best_val_ppl": round(perplexity(best_val), 3) if best_val is not None else None,
        "train_seconds": round(result.wall_s, 1),
        # fine-tuning: the frozen prefix's one pass over the images (not in train_seconds)
        **({"prefix_cache_seconds": prefix_seconds} if run.finetune_blocks else {}),
        "eval_seconds": round(eval_seconds, 1),
        "train_tokens_per_s": round(result.history.tokens_per_second, 1),
        "test": test,
        "history": result.history.history,
        "artifacts": artifacts,
    }
    if ctx.writer:
        write_json(out_dir / METRICS_FILE, details)
        # Curves went through the history callback; here the nested test scores (test.beam3.bleu4, ...).
        ctx.tracker.log_metrics(
            {
                k: v
                for k, v in flatten({"test": test}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )

    row = {
        "decoder": run.decoder,
        "encoder": run.encoder,
        "bleu": {setting: {k: s[k] for k in BLEU_KEYS} for setting, s in test.items()},
        "sacrebleu": {setting: s["sacrebleu"] for setting, s in test.items()},
        **({"coco": {setting: s["coco"] for setting, s in test.items()}} if run.coco_metrics else {}),
        "captions_per_s": {setting: s["captions_per_s"] for setting, s in test.items()},
        "unk_in_output": sum(s["unk_in_output"] for s in test.values()),  # every setting's captions together
        "params": dataclasses.asdict(run),
        "best_val_loss": details["best_val_loss"],
        "epochs": details["epochs"],
        "steps": details["steps"],
        "train_seconds": details["train_seconds"],
        **({"prefix_cache_seconds": prefix_seconds} if run.finetune_blocks else {}),
        "eval_seconds": details["eval_seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "data": {**summary, "captions_without_features": left_out},
        "model_path": str(out_dir),
    }
    plot_rows = [
        {
            "run": ctx.name,
            "beam": beam,
            **{k: test[decode_name(beam)][k] for k in BLEU_KEYS},
            "sacrebleu": test[decode_name(beam)]["sacrebleu"],
        }
        for beam in dict.fromkeys(run.beam_sizes)
    ]
    greedy_or_first = test.get("greedy") or next(iter(test.values()))
    log.info("%s %s: greedy BLEU-4 %.2f in %.0f s", SECTION, ctx.name, greedy_or_first["bleu4"], row["wall_seconds"])
    artifacts_out: list[tuple[Path, str | None]] = []
    if ctx.writer:
        artifacts_out += [(Path(artifacts[k]), "figures") for k in ("samples_png", "attention_png") if k in artifacts]
        artifacts_out += [(out_dir / f, "model") for f in (MODEL_FILE, VOCAB_FILE, RUN_FILE)]
        artifacts_out.append((out_dir / METRICS_FILE, None))
        artifacts_out += [
            (path, "hyps") for path in [out_dir / TEST_IMAGES_FILE, *sorted(out_dir.glob("test_hyps_*.txt"))]
        ]
    return TrainOutput(row=row, plot_rows=plot_rows, artifacts=artifacts_out)
