"""Train one caption decoder on cached image features, then evaluate it on the test images.

:func:`train_captioner` is the library function behind the ``train_captioner`` DVC stage (one call
per decoder type). It trains with teacher forcing (Adam, dropout, gradient clipping), keeps the
weights with the best ``val/loss`` on the dev split, decodes the test images freely (greedy and
beam search) for corpus BLEU-1..4 and sacreBLEU (:mod:`rnnlab.caption_eval`), and draws the PNG
grids. Outputs in ``out_dir``: ``model.ckpt`` (vocabulary and tokenizer inside),
``samples.png`` (test images, generated vs reference captions) and, for soft attention,
``attention.png`` (per-word attention maps).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from rnnlab.caption_eval import evaluate_captioner, save_attention_grid, save_caption_grid
from rnnlab.config import flatten, parse_section, require
from rnnlab.data.captions import CaptionDataModule
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError
from rnnlab.models.image_encoder import ENCODER_NAMES
from rnnlab.tasks.caption_task import CaptioningTask
from rnnlab.training import HistoryCallback, seed_everything

log = logging.getLogger(__name__)


@dataclass
class CaptionTrainConfig:
    """Keys of the ``train_captioner`` params section (one entry per decoder run).

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
        training (Lightning ``max_time``; null: none).  limit_train_batches: fraction (float) or
        number (int) of train batches per epoch (smoke runs).
    alpha_c: weight of the doubly stochastic attention penalty (soft_attention only).
    min_freq: a train-split word needs this many occurrences to enter the vocabulary.
    max_len: captions are cut to this many words for training; decoding stops after max_len
        words (+ <eos>).
    beam_sizes: test decoding settings; 1 = greedy (e.g. [1, 3, 5]).
    length_penalty: GNMT length penalty alpha for beam search (0 = rank by raw log-prob).
    grid_images: how many test images the PNG grids show.
    num_threads: torch CPU threads (0 = torch's default).
    """

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
    min_freq: int = 5
    max_len: int = 30
    beam_sizes: list[int] = field(default_factory=lambda: [1, 3, 5])
    length_penalty: float = 0.0
    grid_images: int = 8
    num_threads: int = 0

    def validate(self, where: str) -> None:
        require(self.encoder in ENCODER_NAMES, f"{where}.encoder", f"one of {list(ENCODER_NAMES)}", self.encoder)
        for key in ("embedding_size", "hidden_size", "attention_size", "batch_size", "eval_batch_size",
                    "max_epochs", "min_freq", "max_len"):
            require(getattr(self, key) >= 1, f"{where}.{key}", "an integer >= 1", getattr(self, key))
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a number in [0, 1)", self.dropout)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.alpha_c >= 0, f"{where}.alpha_c", "a number >= 0", self.alpha_c)
        require(self.gradient_clip_val is None or self.gradient_clip_val > 0, f"{where}.gradient_clip_val",
                "null or a number > 0", self.gradient_clip_val)
        require(self.max_time_minutes is None or self.max_time_minutes > 0, f"{where}.max_time_minutes",
                "null or a number > 0", self.max_time_minutes)
        require(bool(self.beam_sizes) and all(b >= 1 for b in self.beam_sizes), f"{where}.beam_sizes",
                "a non-empty list of integers >= 1", self.beam_sizes)
        require(self.length_penalty >= 0, f"{where}.length_penalty", "a number >= 0", self.length_penalty)
        require(self.grid_images >= 0, f"{where}.grid_images", "an integer >= 0", self.grid_images)
        require(self.num_threads >= 0, f"{where}.num_threads", "an integer >= 0", self.num_threads)
        require(isinstance(self.limit_train_batches, int) and self.limit_train_batches >= 1
                or isinstance(self.limit_train_batches, float) and 0 < self.limit_train_batches <= 1,
                f"{where}.limit_train_batches", "an integer >= 1 or a fraction in (0, 1]", self.limit_train_batches)


def parse_caption_config(config: dict, where: str = "train_captioner") -> CaptionTrainConfig:
    return parse_section(CaptionTrainConfig, config, where)


def _max_time(minutes: float | None) -> dict | None:
    if minutes is None:
        return None
    seconds = int(math.ceil(minutes * 60))
    return {"seconds": seconds}


def train_captioner(
    config: dict,
    captions: pd.DataFrame,
    features_path: str | Path,
    out_dir: str | Path,
    seed: int,
    index_path: str | Path | None = None,
    image_dir: str | Path | None = None,
    tracker: Any = None,
) -> dict:
    """Train + evaluate one decoder (see :class:`CaptionTrainConfig` for ``config``'s keys).

    ``captions``: the prepared captions table (split, image, caption_index, caption, ...);
    ``features_path``: the ``.npy`` feature cache (index ``features_path`` with suffix ``.json``
    unless ``index_path`` is given); ``image_dir``: raw images, only for the PNG grids (skipped
    when None); ``tracker``: optional :class:`rnnlab.tracking.Tracker` for the per-epoch curves
    and the flattened test scores (the caller logs params, the model file and the PNGs).
    Returns a JSON-ready metrics dict (test BLEU per decoding setting, losses, timings, data counts).
    """
    cfg = parse_caption_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    data = CaptionDataModule(captions, features_path, index_path, batch_size=cfg.batch_size,
                             eval_batch_size=cfg.eval_batch_size, min_freq=cfg.min_freq, max_len=cfg.max_len)
    data.setup()
    cache_encoder = data.feature_index.get("encoder")
    if cache_encoder != cfg.encoder:
        raise ConfigError(
            f"train_captioner.encoder is {cfg.encoder!r} but the feature cache {features_path} was made with "
            f"{cache_encoder!r}; re-extract features or fix the param"
        )
    vocab = data.vocab
    task = CaptioningTask(
        decoder=cfg.decoder, vocab_size=len(vocab), feature_size=int(data.features.shape[2]),
        embedding_size=cfg.embedding_size, hidden_size=cfg.hidden_size, attention_size=cfg.attention_size,
        dropout=cfg.dropout, lr=cfg.lr, alpha_c=cfg.alpha_c, max_len=cfg.max_len, encoder=cfg.encoder,
        tokenizer=data.tokenizer.to_dict(), vocab_fingerprint=vocab.fingerprint(), vocab=vocab,
    )
    history = HistoryCallback(tracker, tokens_per_batch=lambda b: int((b.inputs != Vocab.pad_id).sum()))
    ckpt_dir = out_dir / "checkpoints"
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # stale checkpoints from an earlier run must not be picked as "best"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1)
    on_gpu = torch.cuda.is_available()
    trainer = pl.Trainer(
        accelerator="auto",
        devices="auto",
        logger=False,
        # CPU: bitwise reproducible. GPU: cuDNN's LSTM has no deterministic mode for every op.
        deterministic="warn" if on_gpu else True,
        max_epochs=cfg.max_epochs,
        max_time=_max_time(cfg.max_time_minutes),
        limit_train_batches=cfg.limit_train_batches,
        gradient_clip_val=cfg.gradient_clip_val,
        callbacks=[history, best],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    start = time.perf_counter()
    trainer.fit(task, datamodule=data)
    train_seconds = time.perf_counter() - start
    final_val = None
    if task.last_validated_step != trainer.global_step:
        # Training stopped mid-epoch (max_time / limit): score the final weights too.
        final_val = trainer.validate(task, datamodule=data, verbose=False)[0]["val/loss"]
    best_score = float(best.best_model_score) if best.best_model_score is not None else None
    if best_score is not None and (final_val is None or best_score <= final_val):
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        task.load_state_dict(state["state_dict"])
        best_val = best_score
    else:
        best_val = final_val
    model_path = out_dir / "model.ckpt"
    # Best weights + vocab/tokenizer (on_save_checkpoint); optimizer state is not needed to caption.
    trainer.save_checkpoint(model_path, weights_only=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)

    start = time.perf_counter()
    test_metrics, decoded = evaluate_captioner(task, data, "test", cfg.beam_sizes, cfg.length_penalty,
                                               cfg.eval_batch_size, captions=captions)
    eval_seconds = time.perf_counter() - start

    artifacts = {"model": str(model_path)}
    if image_dir is not None and cfg.grid_images:
        artifacts.update(_draw_grids(task, data, decoded, Path(image_dir), out_dir, cfg))

    metrics = {
        "decoder": cfg.decoder,
        "encoder": cfg.encoder,
        "seed": seed,
        "data": data.summary(),
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "best_val_loss": round(best_val, 5) if best_val is not None else None,
        "best_val_ppl": round(math.exp(min(best_val, 50.0)), 3) if best_val is not None else None,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "train_tokens_per_s": round(history.tokens_per_second, 1),
        "test": test_metrics,
        "history": history.history,
        "artifacts": artifacts,
    }
    if tracker is not None:
        # Curves went through HistoryCallback; here the nested test scores (test.beam3.bleu4, ...).
        # Params, the model file and the PNGs are logged once, by the calling stage.
        numeric = {k: v for k, v in flatten({"test": test_metrics}).items() if isinstance(v, (int, float))}
        tracker.log_metrics(numeric)
    return metrics


def _draw_grids(task: CaptioningTask, data: CaptionDataModule, decoded: dict, image_dir: Path, out_dir: Path,
                cfg: CaptionTrainConfig) -> dict:
    n = min(cfg.grid_images, len(decoded["names"]))
    names = decoded["names"][:n]
    setting = "greedy" if "greedy" in decoded else next(k for k in decoded if k.startswith("beam"))
    tokens = decoded[setting][:n]
    refs = [[task.tokenizer.detokenize(r) for r in rs] for rs in data.splits["test"].references[:n]]
    generated = [task.tokenizer.detokenize(t) for t in tokens]
    out = {"samples_png": str(save_caption_grid(out_dir / "samples.png", image_dir, names, generated, refs,
                                                title=f"{cfg.decoder} ({setting}) on test images"))}
    if decoded.get("attention"):
        out["attention_png"] = str(save_attention_grid(out_dir / "attention.png", image_dir, names[: min(n, 4)],
                                                       tokens[: min(n, 4)], decoded["attention"][: min(n, 4)]))
    return out
