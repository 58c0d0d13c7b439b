"""LightningModule for streaming language models trained by truncated BPTT.

The hidden state is carried across consecutive windows (detached, so gradients flow back at
most ``bptt`` steps) and reset at the start of each epoch and of each evaluation pass.
Validation/test perplexity is token-weighted over the whole split with the state carried, as
in pytorch/examples ``evaluate()``. The vocabulary travels inside the checkpoint.

Resume: the carried training state is part of the data position, so ``resume_state()`` hands it
to ``rnnlab.resume.ResumeCallback`` (one per DDP rank: each rank carries its own batch columns)
and a run resumed mid-epoch continues the stream exactly where the checkpoint left it.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab.data.vocab import Vocab
from rnnlab.errors import TrainingError
from rnnlab.training import safe_exp
from rnnlab.models.lm import build_language_model, count_parameters, detach_state


class LanguageModelTask(pl.LightningModule):
    def __init__(
        self,
        model_name: str,
        vocab_size: int,
        model_hparams: dict,
        optimizer: str = "sgd",
        lr: float = 20.0,
        weight_decay: float = 0.0,
        clip: float | None = 0.25,
        lr_anneal_factor: float = 0.25,
        vocab_fingerprint: str = "",
        tokenizer: dict | None = None,
        vocab: Vocab | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["vocab"])
        self.model = build_language_model(model_name, vocab_size, **model_hparams)
        self.vocab = vocab
        self._state = {"train": None, "val": None, "test": None}
        self._sums: dict[str, list[float]] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _carried(self, key: str, batch_size: int):
        carried = self._state[key]  # (batch_size, state) so any state layout works
        if carried is None or carried[0] != batch_size:
            return self.model.init_state(batch_size, self.device)
        return _to_device(detach_state(carried[1]), self.device)

    def _step(self, batch, key: str):
        tokens, targets = batch  # [seq, batch] each
        logits, state = self.model(tokens, self._carried(key, tokens.size(1)))
        self._state[key] = (tokens.size(1), state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return loss, targets.numel()

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            # A new epoch starts the stream afresh. Keyed on batch_idx (not on_train_epoch_start)
            # so a run resumed mid-epoch keeps the state restored from its checkpoint.
            self._state["train"] = None
        loss, _ = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise TrainingError(
                f"train loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "lower train_lm lr or set clip"
            )
        distributed = self.trainer.world_size > 1  # each rank's loss covers its own columns only
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch[0].numel(),
                 sync_dist=distributed)
        return loss

    def resume_state(self) -> dict:
        """The carried training state (this rank's columns), for the resume checkpoint."""
        carried = self._state["train"]
        if carried is None:
            return {"train": None}
        return {"train": {"batch_size": carried[0], "state": _to_device(detach_state(carried[1]), "cpu")}}

    def load_resume_state(self, state: dict) -> None:
        carried = state.get("train")
        self._state["train"] = None if carried is None else (carried["batch_size"], carried["state"])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Clip here rather than via Trainer so the pre-clip norm (exploding gradients) is logged.
        max_norm = self.hparams.clip if self.hparams.clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # -- evaluation ------------------------------------------------------------------------
    def _eval_start(self, key: str) -> None:
        self._state[key] = None
        self._sums[key] = [0.0, 0]

    def _eval_step(self, batch, key: str) -> None:
        loss, n = self._step(batch, key)
        self._sums[key][0] += loss.item() * n
        self._sums[key][1] += n

    def _eval_end(self, key: str) -> None:
        total, n = self._sums[key]
        mean = total / max(n, 1)
        self.log(f"{key}/loss", mean, sync_dist=True)
        self.log(f"{key}/ppl", safe_exp(mean), sync_dist=True)
        self.log(f"{key}/tokens", float(n), sync_dist=True, reduce_fx="sum")

    def on_validation_epoch_start(self):
        self._eval_start("val")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_start(self):
        self._eval_start("test")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_end("test")

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {hp.optimizer!r}")
        # Anneal the learning rate when validation loss stops improving (pytorch/examples: /4).
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=hp.lr_anneal_factor, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"}}

    # -- checkpoint ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.vocab is not None:
            checkpoint["vocab"] = self.vocab.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "vocab" in checkpoint:
            self.vocab = Vocab.from_dict(checkpoint["vocab"])

    def num_parameters(self) -> int:
        return count_parameters(self.model)


def _to_device(state, device):
    """Move a carried state (tensor / tuple / list / dict of tensors) to ``device``."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, (tuple, list)):
        return type(state)(_to_device(s, device) for s in state)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    raise TypeError(f"cannot move state of type {type(state).__name__}")
