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
    num_nodes: int = 1
    precision: str = "32-true"
    deterministic: bool | Literal["warn"] = True
    progress_bar: bool = False
    num_threads: int = 0  # 0 = torch's default (all cores)
    checkpoint_every_n_steps: int = 200  # resume checkpoints (0 = only at epoch ends and on a signal)
    resume: bool = True  # a rerun continues from the run's last checkpoint (false: start over)

    def validate(self, where: str) -> None:
        require(self.precision in {"32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true"},
                f"{where}.precision", "one of 32-true, 16-mixed, bf16-mixed, bf16-true, 64-true", self.precision)
        require(self.num_threads >= 0, f"{where}.num_threads", "an integer >= 0", self.num_threads)
        require(self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1),
                f"{where}.devices", '"auto" or an integer >= 1', self.devices)
        require(self.num_nodes >= 1, f"{where}.num_nodes", "an integer >= 1", self.num_nodes)
        require(self.checkpoint_every_n_steps >= 0, f"{where}.checkpoint_every_n_steps", "an integer >= 0",
                self.checkpoint_every_n_steps)

    def resume_identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        return {"accelerator": self.accelerator, "devices": self.devices, "strategy": self.strategy,
                "num_nodes": self.num_nodes, "precision": self.precision, "deterministic": self.deterministic}


def global_rank() -> int:
    """This process's rank in a distributed run, from the launcher's environment (0 when alone).

    Known before the Trainer exists, so a stage can open the MLflow run and write outputs on
    rank 0 only: torchrun sets RANK, SLURM sets SLURM_PROCID, Lightning's own launcher starts
    ranks > 0 with LOCAL_RANK (and NODE_RANK on other machines).
    """
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if os.environ.get("SLURM_PROCID", "").isdigit() and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(os.environ["SLURM_PROCID"])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    return local + node * 1_000_000  # exact value irrelevant off node 0: only "is it 0" matters there


def safe_exp(loss: float) -> float:
    """Perplexity from a mean loss; inf rather than OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else float("inf")


def seed_everything(seed: int) -> None:
    # cuBLAS needs this for deterministic GEMMs on GPU (pytorch #35661); harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    pl.seed_everything(seed, workers=True, verbose=False)


def make_trainer(cfg: TrainerConfig, callbacks: list, max_epochs: int, default_root_dir: str,
                 **overrides) -> pl.Trainer:
    """A Trainer from params. Every checkpoint it writes is atomic and every load ``weights_only``."""
    from rnnlab.resume import AtomicCheckpointIO

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    kwargs = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        plugins=[AtomicCheckpointIO()],
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
        return {"history": self.history, "train_tokens": self.train_tokens, "train_seconds": self.train_seconds,
                "loss_sum": loss_sum, "loss_weight": loss_weight}

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
            sums = torch.tensor([self._loss_sum, self._loss_weight], dtype=torch.float64,
                                device=pl_module.device if distributed else "cpu")
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
