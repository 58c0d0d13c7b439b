"""The language-model task: n-gram, MLP, RNN, GRU and LSTM LMs on word and character corpora.

``params.yaml`` section ``train_lm`` (one DVC stage per run, ``train_lm@<run>``)::

    defaults: {...}            # RunConfig keys shared by every run
    runs:                      # run name -> its keys over ``defaults``
      ptb-lstm: {corpus: ptb, model: lstm}

Neural LMs are trained by truncated BPTT through :func:`rnnlab.training.fit`
(:class:`LanguageModelTask`: the hidden state carried across windows, detached, reset per epoch);
the n-gram is counted (:class:`rnnlab.models.ngram.KneserNeyLanguageModel`). The model folder
``data/models/lm/<run>/`` holds ``model.ckpt`` (neural; vocab inside) or ``ngram.npz`` +
``vocab.json`` + ``run.json`` (n-gram), ``history.json``, ``samples.txt`` and ``neighbours.json``.

Perplexity everywhere (training's test row, :func:`score`, the evaluate stage) is token-weighted
cross-entropy over the whole split with the state carried (pytorch/examples ``evaluate()``);
the n-gram scores every position 1..len-1 of the same id stream. Character corpora add bits per char.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab.config import parse_section, require, require_corpus_task
from rnnlab.data.lm_data import BPTTWindows, ShardedLMDataModule, batchify
from rnnlab.data.vocab import Vocab, check_vocab
from rnnlab.errors import ConfigError, RnnlabError, TrainingError
from rnnlab.io import copy_file, read_json, write_json
from rnnlab.metrics import bits_per_char, perplexity
from rnnlab.models.lm import LANGUAGE_MODELS, RECURRENT_CORES, build_language_model
from rnnlab.models.lm_parts import count_parameters, detach_state
from rnnlab.resume import load_checkpoint_file
from rnnlab.tasks.base import RunContext, StagePaths, TrainOutput
from rnnlab.training import FitSpec, fit, load_best_weights, save_model_checkpoint

log = logging.getLogger(__name__)

SECTION, TASK, EXPERIMENT = "train_lm", "lm", "rnnlab-lm"
NGRAM = "ngram"  # the count model, trained by counting instead of Lightning
NGRAM_FILE = "ngram.npz"
NGRAM_WORD_ORDER = 5
NGRAM_CHAR_ORDER = 6  # best validation ppl of orders 5..10 on Tiny Shakespeare
SAMPLE_PROMPTS = {"word": ["the", "in the", "stock prices"], "char": ["ROMEO:\n", "First Citizen:\n", "KING"]}
PROBE_WORDS = ["money", "stock", "year", "company", "president", "market", "bank", "japan"]


def model_names() -> list[str]:
    return sorted([*LANGUAGE_MODELS, NGRAM])


def check_corpus(run: RunConfig, corpora: dict, where: str) -> None:
    """Before anything trains: the run's corpus is declared in params ``corpora`` with an LM task.
    (The raw mapping: the stage reads no corpus entry, only the data ``prepare`` wrote from it.)"""
    require_corpus_task(run.corpus, corpora, ("lm-word", "lm-char"), "language-modelling", where)


def bind_corpus(run: RunConfig, prepared_root: Path) -> Path:
    """The run's prepared corpus folder, checked to be a language-modelling corpus; sets
    ``run.char_level`` from the tokenizer ``prepare`` used (the corpus's ``options.tokenizer``)."""
    folder = Path(prepared_root) / run.corpus
    tokenizer = folder / "tokenizer.json"
    if not (folder / "train.npy").is_file() or not tokenizer.is_file():
        raise ConfigError(
            f"train_lm run corpus {run.corpus!r}: no prepared language-modelling corpus at {folder} "
            "(declare it in params.yaml corpora: with task lm-word or lm-char, list it in "
            "download.corpora and prepare.corpora, and run `dvc repro prepare`)"
        )
    run.char_level = read_json(tokenizer).get("name") == "char"
    return folder


@dataclass
class RunConfig:
    """One language-model run; every default of the task is written here and nowhere else."""

    corpus: str
    model: str
    enabled: bool = True
    embedding_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float = 0.2
    tie_weights: bool = False
    # Output layer of the recurrent LMs (rnnlab.models.lm): full softmax, or the adaptive softmax
    # (Grave et al. 2017) with head/tail boundaries at these frequency ranks; adaptive needs no tying.
    output: Literal["full", "adaptive"] = "full"
    cutoffs: list[int] = field(default_factory=lambda: [2000, 6000])
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
    eval_fraction: float = 1.0  # prefix of valid/test used in training's evaluation (smoke tests only)
    limit_train_batches: int | float = 1.0
    max_time_minutes: float | None = None
    order: int | None = None  # n-gram only: null = 5 for word corpora, NGRAM_CHAR_ORDER for char corpora
    discount: float | None = None  # n-gram only: null = estimated per order (n1 / (n1 + 2 n2))
    samples: int = 3  # generated samples logged per run (MLflow text artifact samples.txt)

    # Set by bind_corpus from the prepared data (not a param): the corpus's task decides it.
    char_level = False

    def validate(self, where: str) -> None:
        if not self.corpus or "/" in self.corpus:
            raise ConfigError(f"{where}.corpus: expected a corpus name of params corpora, got {self.corpus!r}")
        if self.model not in model_names():
            raise ConfigError(f"{where}.model: unknown model {self.model!r}; valid names: {model_names()}")
        if self.order is not None:
            require(self.order >= 1, f"{where}.order", "an integer >= 1 (1 = unigram) or null", self.order)
        if self.discount is not None:
            require(0 < self.discount <= 1, f"{where}.discount", "a number in (0, 1] or null", self.discount)
        if self.output == "adaptive" and self.model not in RECURRENT_CORES:
            raise ConfigError(
                f"{where}.output: adaptive is for the recurrent models {list(RECURRENT_CORES)}, not {self.model!r}"
            )
        require(self.samples >= 0, f"{where}.samples", "an integer >= 0", self.samples)
        require(self.bptt >= 1, f"{where}.bptt", "an integer >= 1", self.bptt)
        require(self.batch_size >= 1, f"{where}.batch_size", "an integer >= 1", self.batch_size)
        require(self.eval_batch_size >= 1, f"{where}.eval_batch_size", "an integer >= 1", self.eval_batch_size)
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a number in [0, 1)", self.dropout)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.clip is None or self.clip > 0, f"{where}.clip", "null or a number > 0", self.clip)
        require(self.max_epochs >= 1, f"{where}.max_epochs", "an integer >= 1", self.max_epochs)
        require(0 < self.train_fraction <= 1, f"{where}.train_fraction", "a number in (0, 1]", self.train_fraction)
        require(0 < self.eval_fraction <= 1, f"{where}.eval_fraction", "a number in (0, 1]", self.eval_fraction)
        require(self.limit_train_batches > 0, f"{where}.limit_train_batches", "a number > 0", self.limit_train_batches)

    def ngram_order(self) -> int:
        if self.order is not None:
            return self.order
        return NGRAM_CHAR_ORDER if self.char_level else NGRAM_WORD_ORDER

    def model_hparams(self) -> dict:
        hp = dict(
            embedding_size=self.embedding_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            dropout=self.dropout,
            tie_weights=self.tie_weights,
        )
        if self.output != "full":  # the full softmax's hparams stay as they were (old checkpoints load)
            hp.update(output=self.output, cutoffs=list(self.cutoffs))
        hp.update(self.model_options)
        return hp


def parse_run(merged: dict, where: str) -> RunConfig:
    return parse_section(RunConfig, merged, where)


def data_files(run: RunConfig, paths: StagePaths) -> list[Path]:
    folder = bind_corpus(run, paths.prepared)
    return [folder / f for f in ("train.npy", "valid.npy", "vocab.json")]


def tags(run: RunConfig) -> dict:
    return {"corpus": run.corpus, "model": run.model}


# ----------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------
class LanguageModelTask(pl.LightningModule):
    """Truncated BPTT: the hidden state is carried across consecutive windows (detached, so
    gradients flow back at most ``bptt`` steps) and reset at the start of each epoch and of each
    evaluation pass. Validation/test perplexity is token-weighted over the whole split with the
    state carried. The vocabulary travels inside the checkpoint.

    Resume: the carried training state is part of the data position, so ``resume_state()`` hands
    it to :class:`rnnlab.resume.ResumeCallback` (one per DDP rank: each rank carries its own batch
    columns) and a run resumed mid-epoch continues the stream exactly where it left off."""

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

    def _carried(self, key: str, batch_size: int):
        carried = self._state[key]  # (batch_size, state) so any state layout works
        if carried is None or carried[0] != batch_size:
            return self.model.init_state(batch_size, self.device)
        return _to_device(detach_state(carried[1]), self.device)

    def _step(self, batch, key: str):
        tokens, targets = batch  # [seq, batch] each
        state = self._carried(key, tokens.size(1))
        if key == "train" and getattr(self.model, "adaptive", False):
            # the adaptive softmax's cheap target-only loss; evaluation below scores the full vocabulary
            loss, state = self.model.adaptive_loss(tokens, targets, state)
            self._state[key] = (tokens.size(1), state)
            return loss, targets.numel()
        logits, state = self.model(tokens, state)
        self._state[key] = (tokens.size(1), state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return loss, targets.numel()

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            # A new epoch starts the stream afresh. Keyed on batch_idx (not on_train_epoch_start)
            # so a run resumed mid-epoch keeps the state restored from its checkpoint.
            self._state["train"] = None
        loss, _ = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise TrainingError(
                f"train loss is {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}); lower train_lm lr or set clip"
            )
        distributed = self.trainer.world_size > 1  # each rank's loss covers its own columns only
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch[0].numel(),
            sync_dist=distributed,
        )
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
        self.log(f"{key}/ppl", perplexity(mean), sync_dist=True)
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

    def configure_optimizers(self):
        hp = self.hparams
        optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if hp.optimizer not in optimizers:
            raise ValueError(f"unknown optimizer {hp.optimizer!r}")
        opt = optimizers[hp.optimizer](self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # Anneal the learning rate when validation loss stops improving (pytorch/examples: /4).
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=hp.lr_anneal_factor, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"}}

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


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _char_rows(row: dict, val_loss: float, test_loss: float) -> None:
    row["val_bpc"] = round(bits_per_char(val_loss), 4)
    row["test_bpc"] = round(bits_per_char(test_loss), 4)


def train(run: RunConfig, ctx: RunContext) -> TrainOutput:
    """Train one LM (neural through ``fit``, or the n-gram by counting), write its model folder."""
    prepared = bind_corpus(run, ctx.paths.prepared)
    if run.model == NGRAM:
        row, history = _train_ngram(run, prepared, ctx)
    else:
        row, history = _train_neural(run, prepared, ctx)
    row = {"corpus": run.corpus, "model": run.model, **row}
    output = TrainOutput(row=row)
    if not ctx.writer:
        return output
    write_json(ctx.out_dir / "history.json", history)
    _log_samples(run, ctx)
    if run.model != NGRAM and not run.char_level:
        _log_neighbours(ctx)
    output.plot_rows = [
        {"epoch": h["epoch"], "val_ppl": h.get("val/ppl"), "train_loss": h.get("train/loss_epoch"), "lr": h.get("lr")}
        for h in history
    ]
    model_files = [NGRAM_FILE, "vocab.json", "run.json"] if run.model == NGRAM else ["model.ckpt", "vocab.json"]
    output.artifacts = [(ctx.out_dir / name, "model") for name in model_files] + [(ctx.out_dir / "history.json", None)]
    return output


def _train_neural(run: RunConfig, prepared: Path, ctx: RunContext) -> tuple[dict, list[dict]]:
    dm = ShardedLMDataModule(
        prepared, run.batch_size, run.bptt, run.eval_batch_size, run.train_fraction, run.eval_fraction
    )
    tokenizer_path = prepared / "tokenizer.json"
    module = LanguageModelTask(
        model_name=run.model,
        vocab_size=len(dm.vocab),
        model_hparams=run.model_hparams(),
        optimizer=run.optimizer,
        lr=run.lr,
        weight_decay=run.weight_decay,
        clip=run.clip,
        lr_anneal_factor=run.lr_anneal_factor,
        vocab_fingerprint=dm.vocab.fingerprint(),
        tokenizer=read_json(tokenizer_path) if tokenizer_path.exists() else None,
        vocab=dm.vocab,
    )
    spec = FitSpec(
        max_epochs=run.max_epochs,
        monitor="val/loss",
        mode="min",
        limit_train_batches=run.limit_train_batches,
        max_time_minutes=run.max_time_minutes,
        tokens_per_batch=lambda batch: batch[0].numel(),
        distributed=True,
    )
    result = fit(module, dm, ctx.trainer, spec, ctx.resume, ctx.tracker)
    load_best_weights(module, result)
    with result.evaluation_guard():  # Ctrl-C during the final test also stops cleanly
        test = result.trainer.test(module, datamodule=dm, verbose=False)[0]
    history = result.history.history
    best_val = min(h["val/loss"] for h in history)
    row = {
        "val_loss": round(best_val, 5),
        "val_ppl": round(perplexity(best_val), 3),
        "test_split": "test" if dm.has_split("test") else "valid",
        "test_loss": round(test["test/loss"], 5),
        "test_ppl": round(test["test/ppl"], 3),
        "params": module.num_parameters(),
        "tokens_per_s": round(result.history.tokens_per_second, 1),
        "wall_s": round(result.wall_s, 1),
        "epochs": len(history),
    }
    if run.char_level:
        _char_rows(row, best_val, test["test/loss"])
    if ctx.writer:
        save_model_checkpoint(result.best_path, ctx.out_dir / "model.ckpt")
        copy_file(prepared / "vocab.json", ctx.out_dir / "vocab.json")
    else:
        log.info("rank %d: trained and evaluated its shard; rank 0 writes the outputs", result.trainer.global_rank)
    return row, history


def _train_ngram(run: RunConfig, prepared: Path, ctx: RunContext) -> tuple[dict, list[dict]]:
    """Fit interpolated Kneser-Ney on the train stream; score the valid and test streams."""
    from rnnlab.models.ngram import KneserNeyLanguageModel

    vocab = Vocab.load(prepared / "vocab.json")
    order = run.ngram_order()
    started = time.perf_counter()
    train_ids = np.load(prepared / "train.npy")
    model = KneserNeyLanguageModel(order, run.discount, vocab_size=len(vocab)).fit(train_ids)
    fit_s = time.perf_counter() - started
    val_loss = -float(np.mean(model.log_prob(_eval_prefix(np.load(prepared / "valid.npy"), run.eval_fraction))))
    test_split = "test" if (prepared / "test.npy").exists() else "valid"
    test_ids = _eval_prefix(np.load(prepared / f"{test_split}.npy"), run.eval_fraction)
    test_loss = -float(np.mean(model.log_prob(test_ids)))
    if not (math.isfinite(val_loss) and math.isfinite(test_loss)):
        raise TrainingError(f"{ctx.where}: n-gram log-probability is not finite (val {val_loss}, test {test_loss})")
    row = {
        "val_loss": round(val_loss, 5),
        "val_ppl": round(perplexity(val_loss), 3),
        "test_split": test_split,
        "test_loss": round(test_loss, 5),
        "test_ppl": round(perplexity(test_loss), 3),
        "params": model.num_stored(),  # stored counts + keys (the n-gram's "parameters")
        "tokens_per_s": round(train_ids.size / max(fit_s, 1e-9), 1),  # counting speed
        "wall_s": round(time.perf_counter() - started, 1),
        "epochs": 1,
        "order": order,
        "discounts": [round(d, 4) for d in model.discounts],
    }
    if run.char_level:
        _char_rows(row, val_loss, test_loss)
    if ctx.writer:
        model.save(ctx.out_dir / NGRAM_FILE)
        for name in ("vocab.json", "tokenizer.json"):
            if (prepared / name).exists():
                copy_file(prepared / name, ctx.out_dir / name)
        write_json(
            ctx.out_dir / "run.json",
            {"model": NGRAM, "corpus": run.corpus, "order": order, "char_level": run.char_level},
        )
    return row, [{"epoch": 0, "val/loss": val_loss, "val/ppl": perplexity(val_loss)}]


def _eval_prefix(ids: np.ndarray, fraction: float) -> np.ndarray:
    return ids if fraction >= 1.0 else ids[: max(int(len(ids) * fraction), 2)]


def _log_samples(run: RunConfig, ctx: RunContext) -> list[str]:
    """``run.samples`` generated texts (prompts from :data:`SAMPLE_PROMPTS`) -> ``samples.txt`` + MLflow."""
    from rnnlab.generate import sample

    if run.samples == 0:
        return []
    model = load(ctx.out_dir)  # once, not once per sample
    prompts = SAMPLE_PROMPTS["char" if run.char_level else "word"]
    texts = []
    for i in range(run.samples):
        prompt = prompts[i % len(prompts)]
        text = sample(model, prompt, 200 if run.char_level else 40, 1.0, ctx.seed + i)
        sep = "" if run.char_level else " "
        texts.append(f"[{i}] prompt={prompt!r} temperature=1.0 seed={ctx.seed + i}\n{prompt}{sep}{text}\n")
    body = "\n".join(texts)
    (ctx.out_dir / "samples.txt").write_text(body)
    ctx.tracker.log_text(body, "samples.txt")
    return texts


def _log_neighbours(ctx: RunContext, probes: list[str] = PROBE_WORDS, k: int = 8) -> dict:
    """Nearest neighbours by cosine similarity of the input embedding -> ``neighbours.json`` + MLflow."""
    lm = load(ctx.out_dir)
    if not hasattr(lm.model, "embedding"):
        return {}
    emb = torch.nn.functional.normalize(lm.model.embedding.weight.detach().float(), dim=1)  # [V, E]
    result = {}
    for word in probes:
        if word not in lm.vocab.stoi:
            continue
        sims = emb @ emb[lm.vocab.stoi[word]]  # [V]
        sims[lm.vocab.stoi[word]] = -2.0
        top = torch.topk(sims, k)
        result[word] = [
            [lm.vocab.itos[i], round(float(v), 4)] for v, i in zip(top.values.tolist(), top.indices.tolist())
        ]
    write_json(ctx.out_dir / "neighbours.json", result)
    ctx.tracker.log_dict(result, "neighbours.json")
    return result


# ----------------------------------------------------------------------------------------------
# Loading and scoring a saved model
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedLM:
    kind: Literal["neural", "ngram"]
    model: Any  # nn.Module (eval mode) or KneserNeyLanguageModel
    vocab: Vocab
    char_level: bool
    path: Path  # model.ckpt or the n-gram folder
    hparams: dict = field(default_factory=dict)


def load(path: str | Path, expected_vocab: Vocab | None = None) -> LoadedLM:
    """A ``train_lm`` model folder, its ``model.ckpt`` or its ``ngram.npz`` -> :class:`LoadedLM`."""
    path = Path(path)
    if path.is_dir() and (path / NGRAM_FILE).is_file() or path.name == NGRAM_FILE:
        return _load_ngram(path if path.is_dir() else path.parent, expected_vocab)
    ckpt_path = path / "model.ckpt" if path.is_dir() else path
    if path.is_dir() and not ckpt_path.is_file():
        raise RnnlabError(f"{path}: folder holds neither model.ckpt nor {NGRAM_FILE}")
    ckpt = load_checkpoint_file(ckpt_path)
    if "hyper_parameters" not in ckpt or "vocab" not in ckpt:
        raise RnnlabError(f"{ckpt_path}: not a language-model checkpoint (no hyper_parameters/vocab)")
    hp = ckpt["hyper_parameters"]
    vocab = Vocab.from_dict(ckpt["vocab"])
    check_vocab(vocab, expected_vocab, str(ckpt_path))
    if hp["vocab_size"] != len(vocab):
        raise RnnlabError(
            f"{ckpt_path}: model has {hp['vocab_size']} outputs but its vocabulary has {len(vocab)} tokens"
        )
    model = build_language_model(hp["model_name"], hp["vocab_size"], **hp["model_hparams"])
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    )
    model.eval()
    char_level = (hp.get("tokenizer") or {}).get("name") == "char"
    return LoadedLM("neural", model, vocab, char_level, ckpt_path, dict(hp))


def _load_ngram(folder: Path, expected_vocab: Vocab | None) -> LoadedLM:
    from rnnlab.models.ngram import KneserNeyLanguageModel

    for name in (NGRAM_FILE, "vocab.json"):
        if not (folder / name).is_file():
            raise RnnlabError(f"{folder}: n-gram model folder lacks {name}")
    model = KneserNeyLanguageModel.load(folder / NGRAM_FILE)
    vocab = Vocab.load(folder / "vocab.json")
    check_vocab(vocab, expected_vocab, str(folder))
    if model.vocab_size != len(vocab):
        raise RnnlabError(f"{folder}: n-gram has {model.vocab_size} words but vocab.json has {len(vocab)}")
    char_level = False
    if (folder / "run.json").is_file():
        char_level = bool(read_json(folder / "run.json").get("char_level", False))
    elif (folder / "tokenizer.json").is_file():
        char_level = read_json(folder / "tokenizer.json").get("name") == "char"
    return LoadedLM("ngram", model, vocab, char_level, folder)


@torch.inference_mode()
def evaluate(model, ids: np.ndarray, batch_size: int = 10, bptt: int = 35) -> dict:
    """Token-weighted cross-entropy of a neural LM over a whole id stream, state carried."""
    windows = BPTTWindows(batchify(ids, batch_size), bptt)
    state = model.init_state(batch_size, "cpu")
    total, count = 0.0, 0
    for tokens, targets in windows:
        logits, state = model(tokens, state)
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    loss = total / count
    return {"loss": loss, "ppl": perplexity(loss), "bpc": bits_per_char(loss), "tokens": count}


def score(
    path: str | Path, prepared_dir: Path, batch_size: int, bptt: int, limit: int | None = None, split: str | None = None
) -> dict:
    """Score a trained LM on the test split (valid where a corpus has no test split).

    Neural: token-weighted over the batchified stream (``batch_size`` columns, ``bptt`` windows,
    state carried). n-gram: every position 1..len-1 of the stream (``batch_size``/``bptt`` do not
    apply); the same number train_lm reports. ``limit``: the first N tokens only (smoke tests).
    ``split``: another prepared split (an extra evaluation set ``eval_<name>``).
    ``{split, loss, ppl, bpc, tokens}``."""
    expected = Vocab.load(Path(prepared_dir) / "vocab.json")
    if split is None:
        split = "test" if (Path(prepared_dir) / "test.npy").exists() else "valid"
    ids = np.load(Path(prepared_dir) / f"{split}.npy")
    if limit is not None:
        ids = ids[: max(limit, batch_size * 2)]
    lm = load(path, expected)
    if lm.kind == "ngram":
        log_probs = lm.model.log_prob(ids)
        loss = -float(np.mean(log_probs))
        return {
            "split": split,
            "loss": loss,
            "ppl": perplexity(loss),
            "bpc": bits_per_char(loss),
            "tokens": int(log_probs.size),
        }
    return {"split": split, **evaluate(lm.model, ids, batch_size, bptt)}
