"""The one training loop of every task (language model, translation, captioning): :func:`fit`.

``fit(module, datamodule, trainer_cfg, spec, resume, tracker)`` builds the one Trainer from params
(accelerator, devices, strategy, precision, num_threads, determinism), the best-checkpoint and
early-stopping callbacks (Lightning's ``ModelCheckpoint`` / ``EarlyStopping``), the per-epoch
history that goes to MLflow and to the DVC plots, and resume after a kill (``ckpt_path`` into
Lightning's own restore). A task only says what differs (:class:`FitSpec`: the monitored metric,
patience, budget, clipping, whether its data can be sharded over several processes).

What is hand-written here, and why (Lightning has pieces of the same name that do not do the job):

- Resume is Lightning's ``trainer.fit(ckpt_path=...)`` on a folder of ours (:mod:`rnnlab.resume`):
  fingerprinted by the run's config + data (a changed param must not resume an old run), holding
  the RNG states and the LM's carried hidden state per rank, which Lightning's checkpoint lacks.
- Signals: ``OnExceptionCheckpoint`` saves wherever the exception lands (mid-step: weights updated,
  data position not), so SIGINT/SIGTERM are turned into a save at the *end* of the current batch.
- Tracking goes through :mod:`rnnlab.tracking` rather than ``MLFlowLogger``: that logger cannot
  queue calls while the tracking server is down, and a resumed row must continue its MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from rnnlab.config import require
from rnnlab.resume import (
    RANK_STATES_KEY,
    AtomicCheckpointIO,
    PauseAtStep,
    ResumeCallback,
    ResumeDir,
    fit_resumable,
    load_checkpoint_file,
)

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """params ``trainer`` (shared by every training stage) merged with a section's own ``trainer``."""

    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    deterministic: bool | Literal["warn"] = True
    progress_bar: bool = False
    num_threads: int = 0  # 0 = torch's default (all cores)
    checkpoint_every_n_steps: int = 200  # resume checkpoints (0 = only at epoch ends and on a signal)
    resume: bool = True  # a rerun continues from the run's last checkpoint (false: start over)

    def validate(self, where: str) -> None:
        require(
            self.precision in {"32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true"},
            f"{where}.precision",
            "one of 32-true, 16-mixed, bf16-mixed, bf16-true, 64-true",
            self.precision,
        )
        require(self.num_threads >= 0, f"{where}.num_threads", "an integer >= 0", self.num_threads)
        require(
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1),
            f"{where}.devices",
            '"auto" or an integer >= 1',
            self.devices,
        )
        require(self.num_nodes >= 1, f"{where}.num_nodes", "an integer >= 1", self.num_nodes)
        require(
            self.checkpoint_every_n_steps >= 0,
            f"{where}.checkpoint_every_n_steps",
            "an integer >= 0",
            self.checkpoint_every_n_steps,
        )

    def resume_identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
            "precision": self.precision,
            "deterministic": self.deterministic,
        }


@dataclass
class FitSpec:
    """What one task asks of :func:`fit` (everything else comes from :class:`TrainerConfig`)."""

    max_epochs: int
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int | None = None  # early stopping on ``monitor`` (None: off)
    limit_train_batches: int | float = 1.0
    max_time_minutes: float | None = None  # interactive use only: results then depend on the machine
    gradient_clip_val: float | None = None  # None: no Trainer clipping (the LM clips itself, logging the norm)
    tokens_per_batch: Callable | None = None  # for tokens/s and the token-weighted epoch loss
    distributed: bool = False  # True when the task's data shards itself over processes (the LM)


@dataclass
class FitResult:
    best_path: Path  # the best checkpoint (full training state; see :func:`save_model_checkpoint`)
    history: HistoryCallback
    trainer: pl.Trainer
    wall_s: float  # training time, summed over interrupted processes
    resume_callback: ResumeCallback | None = None

    @contextlib.contextmanager
    def evaluation_guard(self) -> Iterator[None]:
        """Around the evaluation after training: SIGINT/SIGTERM there still stop the stage cleanly
        (``TrainingInterrupted`` once the block ends; a rerun evaluates again from the checkpoint)."""
        if self.resume_callback is None:
            yield
            return
        with self.resume_callback.catch_signals():
            yield
        self.resume_callback.raise_if_stopped()


def make_trainer(
    cfg: TrainerConfig, callbacks: list, max_epochs: int, default_root_dir: str, distributed: bool = True, **overrides
) -> pl.Trainer:
    """The one Trainer. Every checkpoint it writes is atomic and every load ``weights_only``."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    devices, strategy, num_nodes = cfg.devices, cfg.strategy, cfg.num_nodes
    if not distributed and (devices not in ("auto", 1) or num_nodes != 1 or strategy not in ("auto", "single_device")):
        log.warning(
            "this task trains in one process (its validation needs the whole split): trainer.devices=%s, "
            "strategy=%s, num_nodes=%s ignored",
            devices,
            strategy,
            num_nodes,
        )
    if not distributed:
        devices, strategy, num_nodes = 1, "auto", 1
    deterministic = cfg.deterministic
    if deterministic is True and torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"):
        deterministic = "warn"  # cuDNN's LSTM backward has no deterministic mode
    kwargs = dict(
        accelerator=cfg.accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        plugins=[AtomicCheckpointIO()],
        precision=cfg.precision,
        deterministic=deterministic,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        logger=False,  # metrics go to MLflow through HistoryCallback, once
        callbacks=callbacks,
        max_epochs=max_epochs,
        num_sanity_val_steps=0,
        default_root_dir=default_root_dir,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class _LastValidated(pl.Callback):
    """Remembers the global step whose weights the last validation round measured."""

    def __init__(self):
        self.step = -1

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def fit(
    module: pl.LightningModule, datamodule, cfg: TrainerConfig, spec: FitSpec, resume: ResumeDir, tracker=None
) -> FitResult:
    """Train ``module`` on ``datamodule``; keep the best checkpoint by ``spec.monitor``.

    With ``resume.enabled`` training continues from the newest readable checkpoint in ``resume``,
    saves there every ``cfg.checkpoint_every_n_steps`` steps, at epoch ends and on SIGINT/SIGTERM
    (then raises ``TrainingInterrupted``). The best checkpoint lives in ``resume.best_dir``, never in
    a DVC output (DVC deletes those before rerunning a stage)."""
    # save_on_train_epoch_end=False: the best checkpoint is taken when validation ends, before the
    # epoch-end hooks, so the epoch-end resume checkpoint already holds this epoch's best score.
    best = ModelCheckpoint(
        dirpath=resume.best_dir,
        filename="best",
        monitor=spec.monitor,
        mode=spec.mode,
        save_top_k=1,
        save_on_train_epoch_end=False,
    )
    history = HistoryCallback(tracker, tokens_per_batch=spec.tokens_per_batch)
    validated = _LastValidated()
    callbacks: list = [best, history, validated]
    if spec.patience is not None:
        callbacks.append(EarlyStopping(monitor=spec.monitor, mode=spec.mode, patience=spec.patience))
    resume_callback = ResumeCallback(resume, cfg.checkpoint_every_n_steps) if resume.enabled else None
    # Test hook (RNNLAB_PAUSE_AT_STEP): before the resume callback, so a signal during the pause is
    # handled by it at the end of that same step.
    pause = PauseAtStep.from_env(
        stopped=lambda: resume_callback is not None and resume_callback.stop_signal is not None
    )
    if pause is not None:
        callbacks.append(pause)
    if resume_callback is not None:
        callbacks.append(resume_callback)
    overrides: dict = {"limit_train_batches": spec.limit_train_batches}
    if spec.distributed:
        # The datamodule shards itself; a DistributedSampler would deal whole windows round-robin.
        overrides["use_distributed_sampler"] = False
    if spec.max_time_minutes:
        overrides["max_time"] = {"seconds": int(spec.max_time_minutes * 60 + 0.999)}
    if spec.gradient_clip_val is not None:
        overrides["gradient_clip_val"] = spec.gradient_clip_val
    trainer = make_trainer(cfg, callbacks, spec.max_epochs, str(resume.path), distributed=spec.distributed, **overrides)
    started = time.perf_counter()
    if resume_callback is not None:
        fit_resumable(trainer, module, datamodule, resume, resume_callback)
        wall = resume_callback.elapsed_s
    else:
        trainer.fit(module, datamodule=datamodule)
        wall = time.perf_counter() - started
    best_path = Path(best.best_model_path) if best.best_model_path else None
    if best_path is None or validated.step != trainer.global_step:
        # Stopped before validating its last weights (max_time, or no validation round at all):
        # score them too and keep whichever is better.
        score = trainer.validate(module, datamodule=datamodule, verbose=False)[0].get(spec.monitor)
        better = best.best_model_score is None or (
            score is not None
            and (score < float(best.best_model_score) if spec.mode == "min" else score > float(best.best_model_score))
        )
        if better:
            best_path = resume.best_dir / "best.ckpt"
            trainer.save_checkpoint(best_path)
    return FitResult(
        best_path=best_path, history=history, trainer=trainer, wall_s=wall, resume_callback=resume_callback
    )


def load_best_weights(module: pl.LightningModule, result: FitResult) -> None:
    """Put the best checkpoint's weights into ``module``. By hand, not ``trainer.test(ckpt_path=...)``:
    that would also restore the callbacks from the best epoch and cut the history back to it."""
    module.load_state_dict(load_checkpoint_file(result.best_path)["state_dict"])


TRAINING_ONLY_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks", RANK_STATES_KEY)


def save_model_checkpoint(best_path: Path, final: Path) -> None:
    """``model.ckpt``: the best checkpoint without the training-only state (optimizer, loops, RNG)."""
    checkpoint = load_checkpoint_file(best_path)
    for key in TRAINING_ONLY_KEYS:
        checkpoint.pop(key, None)
    AtomicCheckpointIO().save_checkpoint(checkpoint, final)


def _distributed_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class HistoryCallback(pl.Callback):
    """Collects per-epoch metrics (for the DVC plot) and streams them to the tracker.

    Also measures training throughput (tokens/s over training steps only, evaluation excluded)
    and the epoch's training loss (``train/loss_epoch``: the mean of the steps' losses weighted by
    ``tokens_per_batch``, summed over DDP ranks). Both are kept here rather than in Lightning's
    logged-metric aggregation because this state goes into every checkpoint: an epoch resumed
    halfway reports the same mean as one never interrupted.
    """

    def __init__(self, tracker=None, tokens_per_batch=None):
        self.tracker = tracker
        self.tokens_per_batch = tokens_per_batch  # callable(batch) -> int
        self.history: list[dict] = []
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._t0 = 0.0
        self._loss_sum = 0.0  # this epoch, this rank: sum of loss x weight (float64, exact on resume)
        self._loss_weight = 0.0

    # Saved in every checkpoint, so a resumed run's history.json and throughput cover all epochs.
    # The partial loss sums differ per DDP rank: the checkpoint holds their total, restored on
    # rank 0 only (the epoch-end reduction adds the ranks' sums again).
    def state_dict(self) -> dict:
        loss_sum, loss_weight = self._loss_sum, self._loss_weight
        if _distributed_world() > 1:  # collective: Lightning asks every rank for its state
            parts: list = [None] * _distributed_world()
            torch.distributed.all_gather_object(parts, (loss_sum, loss_weight))
            loss_sum, loss_weight = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return {
            "history": self.history,
            "train_tokens": self.train_tokens,
            "train_seconds": self.train_seconds,
            "loss_sum": loss_sum,
            "loss_weight": loss_weight,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self.train_tokens = int(state_dict.get("train_tokens", 0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        first = _distributed_world() == 1 or torch.distributed.get_rank() == 0
        self._loss_sum = float(state_dict.get("loss_sum", 0.0)) if first else 0.0
        self._loss_weight = float(state_dict.get("loss_weight", 0.0)) if first else 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self._t0
        if batch_idx == 0:  # a new epoch (keyed on batch_idx so a mid-epoch resume keeps its sums)
            self._loss_sum, self._loss_weight = 0.0, 0.0
        weight = int(self.tokens_per_batch(batch)) if self.tokens_per_batch is not None else 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss_sum += float(loss.detach()) * weight
            self._loss_weight += weight
        if self.tokens_per_batch is not None:
            self.train_tokens += weight * trainer.world_size  # equal shards per rank
        if self.tracker is not None and trainer.global_step % 50 == 0:
            m = trainer.callback_metrics
            step_metrics = {k: float(m[k]) for k in ("train/loss_step", "train/grad_norm") if k in m}
            self.tracker.log_metrics(step_metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        # Runs after the epoch's validation, so val/* metrics of this epoch are in callback_metrics.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
        if self._loss_weight:
            distributed = trainer.world_size > 1
            sums = torch.tensor(
                [self._loss_sum, self._loss_weight],
                dtype=torch.float64,
                device=pl_module.device if distributed else "cpu",
            )
            if distributed:  # collective: every rank runs this hook
                sums = trainer.strategy.reduce(sums, reduce_op="sum")
            metrics["train/loss"] = metrics["train/loss_epoch"] = float(sums[0] / sums[1])
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
