"""Shared training plumbing: Trainer settings from params, seeding, per-epoch history and
tracking callbacks. Used by every training stage (LM, seq2seq, captioning)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import pytorch_lightning as pl
import torch

from rnnlab.config import require


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool | Literal["warn"] = True
    progress_bar: bool = False
    num_threads: int = 0  # 0 = torch's default (all cores)

    def validate(self, where: str) -> None:
        require(self.precision in {"32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true"},
                f"{where}.precision", "one of 32-true, 16-mixed, bf16-mixed, bf16-true, 64-true", self.precision)
        require(self.num_threads >= 0, f"{where}.num_threads", "an integer >= 0", self.num_threads)


def safe_exp(loss: float) -> float:
    """Perplexity from a mean loss; inf rather than OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else float("inf")


def seed_everything(seed: int) -> None:
    # cuBLAS needs this for deterministic GEMMs on GPU (pytorch #35661); harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    pl.seed_everything(seed, workers=True, verbose=False)


def make_trainer(cfg: TrainerConfig, callbacks: list, max_epochs: int, default_root_dir: str,
                 **overrides) -> pl.Trainer:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    kwargs = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        deterministic=cfg.deterministic,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        logger=False,  # metrics go to MLflow through TrackingCallback, once
        callbacks=callbacks,
        max_epochs=max_epochs,
        num_sanity_val_steps=0,
        default_root_dir=default_root_dir,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class HistoryCallback(pl.Callback):
    """Collects per-epoch metrics (for the DVC plot) and streams them to the tracker.

    Also measures training throughput (tokens/s over training steps only, evaluation excluded).
    """

    def __init__(self, tracker=None, tokens_per_batch=None):
        self.tracker = tracker
        self.tokens_per_batch = tokens_per_batch  # callable(batch) -> int
        self.history: list[dict] = []
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self._t0
        if self.tokens_per_batch is not None:
            self.train_tokens += int(self.tokens_per_batch(batch))
        if self.tracker is not None and trainer.global_step % 50 == 0:
            m = trainer.callback_metrics
            step_metrics = {k: float(m[k]) for k in ("train/loss_step", "train/grad_norm") if k in m}
            self.tracker.log_metrics(step_metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        # Runs after the epoch's validation, so val/* metrics of this epoch are in callback_metrics.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
        metrics["epoch"] = trainer.current_epoch + 1
        metrics["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 0.0
        if self.train_seconds > 0 and self.train_tokens:
            metrics["tokens_per_s"] = self.train_tokens / self.train_seconds
        self.history.append(metrics)
        if self.tracker is not None:
            self.tracker.log_metrics({k.replace("_epoch", ""): v for k, v in metrics.items()}, step=metrics["epoch"])

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0
