"""Stage ``train_lm``: train each configured (model, corpus) language model.

``params.yaml`` section ``train_lm``::

    trainer: {...}            # TrainerConfig (accelerator, devices, precision, ...)
    defaults: {...}           # LMRunConfig keys shared by every run
    runs:                     # one entry per (model, corpus); keys override ``defaults``
      - {name: ptb-lstm, corpus: ptb, model: lstm}

Outputs per run under ``<models_dir>/<name>/``: ``model.ckpt`` (best by validation loss, vocab
inside), ``history.json``; metrics table ``{corpus: {model: {...}}}`` for ``train_lm.json``.

Reliability and scale (README "Reliability", "Scaling"): each run resumes from its folder under
``<checkpoints_dir>/<name>/`` (``rnnlab.resume``; outside the DVC outputs, deleted once the
stage's outputs are written) and continues its MLflow run. Under ``trainer.strategy: ddp`` each
rank trains on its own block of the batch columns (``ShardedLMDataModule``), so every rank
carries its own hidden state, and only global rank 0 tracks and writes outputs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from rnnlab.config import parse_section, require
from rnnlab.data.lm_data import BPTTWindows, LMDataModule, batchify
from rnnlab.data.registry import get_corpus
from rnnlab.errors import ConfigError
from rnnlab.io import copy_file, read_json, write_json
from rnnlab.models.lm import LANGUAGE_MODELS
from rnnlab.resume import ResumableLoader, ResumeCallback, ResumeDir, fit_resumable, load_checkpoint_file
from rnnlab.tasks.lm_task import LanguageModelTask
from rnnlab.training import HistoryCallback, TrainerConfig, global_rank, make_trainer, safe_exp, seed_everything

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


class ShardedLMDataModule(LMDataModule):
    """``LMDataModule`` with resumable training windows, split between DDP ranks by batch column.

    The stream is batchified with the global ``batch_size`` exactly as on one process; rank r of
    W then keeps columns ``r*B/W .. (r+1)*B/W - 1``. Each column is an independent contiguous
    piece of the stream, so each rank carries the hidden state of its own columns from window to
    window, and the ranks together train on exactly the single-process batch (DDP averages the
    gradients of equal-sized shards = the gradient of the global mean loss). Evaluation splits
    are sharded the same way with ``eval_batch_size``.
    """

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def windows(self, split: str) -> BPTTWindows:
        bsz = self.batch_size if split == "train" else self.eval_batch_size
        batched = batchify(self.stream(split), bsz)  # [n_steps, bsz]
        rank, world = self._rank_world()
        if world > 1:
            key = "batch_size" if split == "train" else "eval_batch_size"
            if bsz % world:
                raise ConfigError(f"train_lm.runs[*].{key}: expected a multiple of the {world} processes "
                                  f"(trainer.devices x num_nodes), got {bsz}")
            per_rank = bsz // world
            batched = batched[:, rank * per_rank : (rank + 1) * per_rank].contiguous()  # [n_steps, bsz/W]
            if split == "train":
                digest = hashlib.md5(batched.numpy().tobytes()).hexdigest()
                log.info("rank %d/%d trains on columns %d..%d of %d (shard md5 %s)", rank, world,
                         rank * per_rank, (rank + 1) * per_rank - 1, bsz, digest)
        return BPTTWindows(batched, self.bptt)

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.windows("train"))  # its position is saved in every checkpoint

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.windows(split), batch_size=None, shuffle=False)


def resume_identity(run: LMRunConfig, trainer_cfg: TrainerConfig, seed: int, data_files: list[Path]) -> dict:
    """What a checkpoint must match to be resumed: run config, trainer layout, seed, data md5."""
    from rnnlab.tracking import md5_path

    return {"stage": "train_lm", "run": asdict(run), "trainer": trainer_cfg.resume_identity(), "seed": seed,
            "data": {p.name: md5_path(p) for p in data_files}}


def train_language_model(run: LMRunConfig, trainer_cfg: TrainerConfig, prepared_dir: Path, out_dir: Path,
                         seed: int, tracker=None, resume: ResumeDir | None = None) -> dict:
    """Train one LM; return its metrics row. ``out_dir/model.ckpt`` is the best checkpoint.

    With ``resume``, training continues from the newest readable checkpoint in that folder,
    saves there every ``trainer_cfg.checkpoint_every_n_steps`` steps, at epoch ends and on
    SIGINT/SIGTERM, and keeps the best-so-far checkpoint there (not in ``out_dir``, which DVC
    deletes before rerunning the stage). Only global rank 0 writes ``out_dir``.
    """
    seed_everything(seed)
    dm = ShardedLMDataModule(prepared_dir, run.batch_size, run.bptt, run.eval_batch_size, run.train_fraction)
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
        tokenizer=read_json(prepared_dir / "tokenizer.json") if (prepared_dir / "tokenizer.json").exists() else None,
        vocab=dm.vocab,
    )
    ckpt_dir = resume.best_dir if resume is not None else out_dir / "checkpoints"
    # save_on_train_epoch_end=False: the best checkpoint is taken when validation ends, before the
    # epoch-end hooks, so the epoch-end resume checkpoint already holds this epoch's best score
    # (Lightning runs checkpoint callbacks last; a run resumed from an epoch end would otherwise
    # forget the previous best and keep a worse later epoch).
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                                 save_on_train_epoch_end=False)
    history = HistoryCallback(tracker, tokens_per_batch=lambda batch: batch[0].numel())
    callbacks = [checkpoint, history]
    resume_callback = None
    if resume is not None:
        resume_callback = ResumeCallback(resume, trainer_cfg.checkpoint_every_n_steps)
        callbacks.append(resume_callback)
    # Our loaders shard the batch columns themselves; a DistributedSampler would deal whole
    # windows round-robin to the ranks and break the carried hidden state.
    overrides = {"limit_train_batches": run.limit_train_batches, "use_distributed_sampler": False}
    if run.max_time_minutes:
        overrides["max_time"] = {"minutes": run.max_time_minutes}
    trainer = make_trainer(trainer_cfg, callbacks, run.max_epochs, str(out_dir), **overrides)
    started = time.perf_counter()
    test_split = "test" if dm.has_split("test") else "valid"
    if resume is not None:
        with resume_callback.catch_signals():  # Ctrl-C during the final test also stops cleanly
            fit_resumable(trainer, task, dm, resume, resume_callback)
            wall = resume_callback.elapsed_s
            best = Path(checkpoint.best_model_path)
            test_result = _test_best(trainer, task, dm, best)
            resume_callback.raise_if_stopped()
        if tracker is not None:
            tracker.set_tags({"rnnlab.resumes": resume.state.get("resumes", 0)})
    else:
        trainer.fit(task, datamodule=dm)
        wall = time.perf_counter() - started
        best = Path(checkpoint.best_model_path)
        test_result = _test_best(trainer, task, dm, best)
    best_val = min(h["val/loss"] for h in history.history)
    row = {
        "val_loss": round(best_val, 5),
        "val_ppl": round(safe_exp(best_val), 3),
        "test_split": test_split,
        "test_loss": round(test_result["test/loss"], 5),
        "test_ppl": round(test_result["test/ppl"], 3),
        "params": task.num_parameters(),
        "tokens_per_s": round(history.tokens_per_second, 1),
        "wall_s": round(wall, 1),
        "epochs": len(history.history),
    }
    if get_corpus(run.corpus).task == "lm-char":
        row["val_bpc"] = round(best_val / math.log(2), 4)
        row["test_bpc"] = round(test_result["test/loss"] / math.log(2), 4)
    if not trainer.is_global_zero:
        log.info("rank %d: trained and evaluated its shard; rank 0 writes the outputs", trainer.global_rank)
        return row
    final = out_dir / "model.ckpt"
    copy_file(best, final)
    if resume is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    write_json(out_dir / "history.json", history.history)
    if tracker is not None:
        tracker.log_metrics({f"final/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        tracker.log_artifact(final, "model")
        tracker.log_artifact(prepared_dir / "vocab.json", "model")
        tracker.log_artifact(out_dir / "history.json")
    log.info("%s: %s", run.name, row)
    return row


def _test_best(trainer, task: LanguageModelTask, dm, best: Path) -> dict:
    """Test the best weights. Loaded by hand, not ``trainer.test(ckpt_path=...)``: that would also
    restore the callbacks' states from the best epoch and cut the history (and throughput) back
    to that epoch."""
    task.load_state_dict(load_checkpoint_file(best)["state_dict"])
    return trainer.test(task, datamodule=dm, verbose=False)[0]


def train_lm_runs(cfg: TrainLMConfig, seed: int, tracking: bool, prepared_dir: Path, models_dir: Path,
                  metrics_path: Path, plots_dir: Path, checkpoints_dir: Path) -> dict:
    """The ``train_lm`` stage body: every run in ``cfg.runs``, resumable, tracked; returns the table.

    Each run's resume folder ``checkpoints_dir/<name>`` is kept until the metrics table is
    written, so a stage killed during its second run reruns its first one from the finished
    checkpoint (evaluation only) instead of retraining it.
    """
    from rnnlab.tracking import tracked_run

    runs = cfg.run_configs()
    pairs = [(r.corpus, r.model) for r in runs]
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"train_lm.runs: each (corpus, model) pair may appear once, got {pairs}")
    writer = global_rank() == 0
    table: dict = {}
    resume_dirs = []
    for run in runs:
        data_files = [prepared_dir / run.corpus / f for f in ("train.npy", "valid.npy", "vocab.json")]
        resume = ResumeDir(checkpoints_dir / run.name, resume_identity(run, cfg.trainer, seed, data_files),
                           enabled=cfg.trainer.resume)
        resume_dirs.append(resume)
        with tracked_run(
            run_name=f"train_lm/{run.name}",
            stage="train_lm",
            experiment=cfg.experiment,
            enabled=tracking,
            params={"seed": seed, **asdict(run), "trainer": asdict(cfg.trainer)},
            data_deps=data_files,
            tags={"task": "lm", "corpus": run.corpus, "model": run.model},
            run_id=resume.mlflow_run_id,
        ) as tracker:
            resume.record_run_id(tracker.run_id)
            row = train_language_model(run, cfg.trainer, prepared_dir / run.corpus, models_dir / run.name, seed,
                                       tracker, resume=resume)
            row["mlflow_run_id"] = tracker.run_id or resume.mlflow_run_id
        table.setdefault(run.corpus, {})[run.model] = row
        if writer:
            history = read_json(models_dir / run.name / "history.json")
            curve = [{"epoch": h["epoch"], "val_ppl": h.get("val/ppl"), "train_loss": h.get("train/loss_epoch"),
                      "lr": h.get("lr")} for h in history]
            write_json(plots_dir / f"{run.name}.json", curve)
    if writer:
        write_json(metrics_path, table)
        for resume in resume_dirs:
            resume.clear()
    return table


def run_config_dict(run: LMRunConfig) -> dict:
    return asdict(run)
