"""Stage ``train_lm``: train each configured (model, corpus) language model.

``params.yaml`` section ``train_lm``::

    trainer: {...}            # TrainerConfig (accelerator, devices, precision, ...)
    defaults: {...}           # LMRunConfig keys shared by every run
    runs:                     # one entry per (model, corpus); keys override ``defaults``
      - {name: ptb-lstm, corpus: ptb, model: lstm}

Outputs per run under ``<models_dir>/<name>/``: ``model.ckpt`` (best by validation loss, vocab
inside), ``history.json``; metrics table ``{corpus: {model: {...}}}`` for ``train_lm.json``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.callbacks import ModelCheckpoint

from rnnlab.config import parse_section, require
from rnnlab.data.lm_data import LMDataModule
from rnnlab.data.registry import get_corpus
from rnnlab.errors import ConfigError
from rnnlab.io import write_json
from rnnlab.models.lm import LANGUAGE_MODELS
from rnnlab.tasks.lm_task import LanguageModelTask
from rnnlab.training import HistoryCallback, TrainerConfig, make_trainer, safe_exp, seed_everything

log = logging.getLogger(__name__)


@dataclass
class LMRunConfig:
    name: str
    corpus: str
    model: str
    embedding_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float = 0.2
    tie_weights: bool = False
    model_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 20
    eval_batch_size: int = 10
    bptt: int = 35
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 20.0
    weight_decay: float = 0.0
    clip: float | None = 0.25
    lr_anneal_factor: float = 0.25
    max_epochs: int = 1
    train_fraction: float = 1.0
    limit_train_batches: int | float = 1.0
    max_time_minutes: float | None = None

    def validate(self, where: str) -> None:
        get_corpus(self.corpus)
        if get_corpus(self.corpus).task not in ("lm-word", "lm-char"):
            raise ConfigError(f"{where}.corpus: {self.corpus!r} is not a language-modelling corpus")
        if self.model not in LANGUAGE_MODELS:
            raise ConfigError(f"{where}.model: unknown model {self.model!r}; valid names: {sorted(LANGUAGE_MODELS)}")
        require(self.bptt >= 1, f"{where}.bptt", "an integer >= 1", self.bptt)
        require(self.batch_size >= 1, f"{where}.batch_size", "an integer >= 1", self.batch_size)
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a number in [0, 1)", self.dropout)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.clip is None or self.clip > 0, f"{where}.clip", "null or a number > 0", self.clip)
        require(self.max_epochs >= 1, f"{where}.max_epochs", "an integer >= 1", self.max_epochs)
        require(0 < self.train_fraction <= 1, f"{where}.train_fraction", "a number in (0, 1]", self.train_fraction)

    def model_hparams(self) -> dict:
        hp = dict(embedding_size=self.embedding_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                  dropout=self.dropout, tie_weights=self.tie_weights)
        hp.update(self.model_options)
        return hp


@dataclass
class TrainLMConfig:
    trainer: TrainerConfig
    defaults: dict[str, Any]
    runs: list[dict[str, Any]]
    experiment: str = "rnnlab-lm"

    def run_configs(self) -> list[LMRunConfig]:
        configs = []
        for i, run in enumerate(self.runs):
            merged = {**self.defaults, **run}
            configs.append(parse_section(LMRunConfig, merged, f"train_lm.runs[{i}]"))
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"train_lm.runs: run names must be unique, got {names}")
        return configs


def parse_train_lm_config(data: dict) -> TrainLMConfig:
    cfg = parse_section(TrainLMConfig, data, "train_lm")
    cfg.run_configs()  # validate every run up front, before any training starts
    return cfg


def train_language_model(run: LMRunConfig, trainer_cfg: TrainerConfig, prepared_dir: Path, out_dir: Path,
                         seed: int, tracker=None) -> dict:
    """Train one LM; return its metrics row. ``out_dir/model.ckpt`` is the best checkpoint."""
    seed_everything(seed)
    dm = LMDataModule(prepared_dir, run.batch_size, run.bptt, run.eval_batch_size, run.train_fraction)
    task = LanguageModelTask(
        model_name=run.model,
        vocab_size=len(dm.vocab),
        model_hparams=run.model_hparams(),
        optimizer=run.optimizer,
        lr=run.lr,
        weight_decay=run.weight_decay,
        clip=run.clip,
        lr_anneal_factor=run.lr_anneal_factor,
        vocab_fingerprint=dm.vocab.fingerprint(),
        vocab=dm.vocab,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1)
    history = HistoryCallback(tracker, tokens_per_batch=lambda batch: batch[0].numel())
    overrides = {"limit_train_batches": run.limit_train_batches}
    if run.max_time_minutes:
        overrides["max_time"] = {"minutes": run.max_time_minutes}
    trainer = make_trainer(trainer_cfg, [checkpoint, history], run.max_epochs, str(out_dir), **overrides)
    started = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    wall = time.perf_counter() - started
    best = Path(checkpoint.best_model_path)
    test_split = "test" if dm.has_split("test") else "valid"
    test_result = trainer.test(task, datamodule=dm, ckpt_path=str(best), verbose=False)[0]
    final = out_dir / "model.ckpt"
    shutil.copyfile(best, final)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    best_val = min(h["val/loss"] for h in history.history)
    row = {
        "val_loss": round(best_val, 5),
        "val_ppl": round(safe_exp(best_val), 3),
        f"{test_split}_ppl_final": round(test_result["test/ppl"], 3),
        "test_split": test_split,
        "test_loss": round(test_result["test/loss"], 5),
        "test_ppl": round(test_result["test/ppl"], 3),
        "params": task.num_parameters(),
        "tokens_per_s": round(history.tokens_per_second, 1),
        "wall_s": round(wall, 1),
        "epochs": len(history.history),
    }
    row.pop(f"{test_split}_ppl_final")
    if get_corpus(run.corpus).task == "lm-char":
        row["val_bpc"] = round(best_val / math.log(2), 4)
        row["test_bpc"] = round(test_result["test/loss"] / math.log(2), 4)
    write_json(out_dir / "history.json", history.history)
    if tracker is not None:
        tracker.log_metrics({f"final/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        tracker.log_artifact(final, "model")
        tracker.log_artifact(prepared_dir / "vocab.json", "model")
        tracker.log_artifact(out_dir / "history.json")
    log.info("%s: %s", run.name, row)
    return row


def run_config_dict(run: LMRunConfig) -> dict:
    return asdict(run)
