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

import numpy as np
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from rnnlab.config import merged_runs, parse_section, require
from rnnlab.data.lm_data import BPTTWindows, LMDataModule, batchify
from rnnlab.data.registry import get_corpus
from rnnlab.errors import ConfigError, TrainingError
from rnnlab.generate import NGRAM_FILE
from rnnlab.io import copy_file, read_json, write_json
from rnnlab.models.lm import LANGUAGE_MODELS
from rnnlab.resume import ResumableLoader, ResumeCallback, ResumeDir, fit_resumable, load_checkpoint_file
from rnnlab.tasks.lm_task import LanguageModelTask
from rnnlab.training import HistoryCallback, TrainerConfig, global_rank, make_trainer, safe_exp, seed_everything

log = logging.getLogger(__name__)


NGRAM = "ngram"  # the count model (rnnlab.models.ngram), trained by counting instead of Lightning
NGRAM_WORD_ORDER = 5
NGRAM_CHAR_ORDER = 6  # best validation ppl of orders 5..10 on Tiny Shakespeare


def model_names() -> list[str]:
    return sorted([*LANGUAGE_MODELS, NGRAM])


def lm_corpus_names() -> list[str]:
    from rnnlab.data.registry import CORPORA

    return sorted(name for name, c in CORPORA.items() if c.task in ("lm-word", "lm-char"))


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
    order: int | None = None  # n-gram only: null = 5 for word corpora, NGRAM_CHAR_ORDER for char corpora
    discount: float | None = None  # n-gram only: null = estimated per order (n1 / (n1 + 2 n2))
    samples: int = 3  # generated samples logged per run (MLflow text artifact samples.txt)

    def validate(self, where: str) -> None:
        try:
            corpus = get_corpus(self.corpus)
        except ConfigError as exc:
            raise ConfigError(f"{where}.corpus: {exc}") from exc
        if corpus.task not in ("lm-word", "lm-char"):
            raise ConfigError(f"{where}.corpus: {self.corpus!r} is not a language-modelling corpus; valid names: "
                              f"{lm_corpus_names()}")
        if self.model not in model_names():
            raise ConfigError(f"{where}.model: unknown model {self.model!r}; valid names: {model_names()}")
        if self.order is not None:
            require(self.order >= 1, f"{where}.order", "an integer >= 1 (1 = unigram) or null", self.order)
        if self.discount is not None:
            require(0 < self.discount <= 1, f"{where}.discount", "a number in (0, 1] or null", self.discount)
        require(self.samples >= 0, f"{where}.samples", "an integer >= 0", self.samples)
        require(self.bptt >= 1, f"{where}.bptt", "an integer >= 1", self.bptt)
        require(self.batch_size >= 1, f"{where}.batch_size", "an integer >= 1", self.batch_size)
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a number in [0, 1)", self.dropout)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.clip is None or self.clip > 0, f"{where}.clip", "null or a number > 0", self.clip)
        require(self.max_epochs >= 1, f"{where}.max_epochs", "an integer >= 1", self.max_epochs)
        require(0 < self.train_fraction <= 1, f"{where}.train_fraction", "a number in (0, 1]", self.train_fraction)

    @property
    def char_level(self) -> bool:
        return get_corpus(self.corpus).task == "lm-char"

    def ngram_order(self) -> int:
        if self.order is not None:
            return self.order
        return NGRAM_CHAR_ORDER if self.char_level else NGRAM_WORD_ORDER

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
        return [parse_section(LMRunConfig, merged, where)
                for where, merged in merged_runs("train_lm", self.defaults, self.runs)]


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


def train_ngram_model(run: LMRunConfig, prepared_dir: Path, out_dir: Path, tracker=None) -> dict:
    """Fit the interpolated Kneser-Ney n-gram on the train stream; score valid and test streams.

    Saves ``out_dir/ngram.npz`` (+ ``vocab.json``, ``tokenizer.json``, ``run.json``) so
    :func:`rnnlab.evaluate.evaluate_language_model` and ``rnnlab generate`` can use the folder.
    Perplexity is over every position 1..len-1 of a split's id stream (``<eos>`` included), the
    same number ``evaluate_language_model`` gives for the folder.
    """
    from rnnlab.data.vocab import Vocab
    from rnnlab.models.ngram import KneserNeyLanguageModel

    vocab = Vocab.load(prepared_dir / "vocab.json")
    order = run.ngram_order()
    started = time.perf_counter()
    train_ids = np.load(prepared_dir / "train.npy")
    model = KneserNeyLanguageModel(order, run.discount, vocab_size=len(vocab)).fit(train_ids)
    fit_s = time.perf_counter() - started
    val_loss = -float(np.mean(model.log_prob(np.load(prepared_dir / "valid.npy"))))
    test_split = "test" if (prepared_dir / "test.npy").exists() else "valid"
    test_loss = -float(np.mean(model.log_prob(np.load(prepared_dir / f"{test_split}.npy"))))
    wall = time.perf_counter() - started
    if not (math.isfinite(val_loss) and math.isfinite(test_loss)):
        raise TrainingError(f"{run.name}: n-gram log-probability is not finite (val {val_loss}, test {test_loss})")
    row = {
        "val_loss": round(val_loss, 5),
        "val_ppl": round(safe_exp(val_loss), 3),
        "test_split": test_split,
        "test_loss": round(test_loss, 5),
        "test_ppl": round(safe_exp(test_loss), 3),
        "params": model.num_stored(),  # stored counts + keys (the n-gram's "parameters")
        "tokens_per_s": round(train_ids.size / max(fit_s, 1e-9), 1),  # counting speed
        "wall_s": round(wall, 1),
        "epochs": 1,
        "order": order,
        "discounts": [round(d, 4) for d in model.discounts],
    }
    if run.char_level:
        row["val_bpc"] = round(val_loss / math.log(2), 4)
        row["test_bpc"] = round(test_loss / math.log(2), 4)
    if global_rank() != 0:
        return row
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / NGRAM_FILE)
    for name in ("vocab.json", "tokenizer.json"):
        if (prepared_dir / name).exists():
            copy_file(prepared_dir / name, out_dir / name)
    write_json(out_dir / "run.json", {"model": NGRAM, "corpus": run.corpus, "order": order,
                                      "char_level": run.char_level})
    write_json(out_dir / "history.json", [{"epoch": 0, "val/loss": val_loss, "val/ppl": safe_exp(val_loss)}])
    if tracker is not None:
        tracker.log_metrics({f"final/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        tracker.log_artifact(out_dir / NGRAM_FILE, "model")
        tracker.log_artifact(out_dir / "vocab.json", "model")
        tracker.log_artifact(out_dir / "run.json", "model")
    log.info("%s: %s", run.name, row)
    return row


def log_samples(run: LMRunConfig, out_dir: Path, seed: int, tracker=None) -> list[str]:
    """``run.samples`` generated texts (prompts from :data:`SAMPLE_PROMPTS`) -> ``samples.txt`` + MLflow."""
    from rnnlab.generate import load_sampler

    if run.samples == 0:
        return []
    sample = load_sampler(out_dir)  # once, not once per sample
    prompts = SAMPLE_PROMPTS["char" if run.char_level else "word"]
    texts = []
    for i in range(run.samples):
        prompt = prompts[i % len(prompts)]
        text = sample(prompt, 200 if run.char_level else 40, 1.0, seed + i)
        sep = "" if run.char_level else " "
        texts.append(f"[{i}] prompt={prompt!r} temperature=1.0 seed={seed + i}\n{prompt}{sep}{text}\n")
    body = "\n".join(texts)
    (out_dir / "samples.txt").write_text(body)
    if tracker is not None:
        tracker.log_text(body, "samples.txt")
    return texts


SAMPLE_PROMPTS = {"word": ["the", "in the", "stock prices"], "char": ["ROMEO:\n", "First Citizen:\n", "KING"]}
PROBE_WORDS = ["money", "stock", "year", "company", "president", "market", "bank", "japan"]


def log_neighbours(out_dir: Path, tracker=None, probes: list[str] = PROBE_WORDS, k: int = 8) -> dict:
    """Nearest neighbours by cosine similarity of the input embedding -> ``neighbours.json`` + MLflow."""
    from rnnlab.checkpoints import load_language_model

    model, vocab, _ = load_language_model(out_dir / "model.ckpt")
    if not hasattr(model, "embedding"):
        return {}
    emb = torch.nn.functional.normalize(model.embedding.weight.detach().float(), dim=1)  # [V, E]
    result = {}
    for word in probes:
        if word not in vocab.stoi:
            continue
        sims = emb @ emb[vocab.stoi[word]]  # [V]
        sims[vocab.stoi[word]] = -2.0
        top = torch.topk(sims, k)
        result[word] = [[vocab.itos[i], round(float(v), 4)] for v, i in zip(top.values.tolist(), top.indices.tolist())]
    write_json(out_dir / "neighbours.json", result)
    if tracker is not None:
        tracker.log_dict(result, "neighbours.json")
    return result


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
    stage_started = time.perf_counter()
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
            if run.model == NGRAM:
                row = train_ngram_model(run, prepared_dir / run.corpus, models_dir / run.name, tracker)
            else:
                row = train_language_model(run, cfg.trainer, prepared_dir / run.corpus, models_dir / run.name, seed,
                                           tracker, resume=resume)
            if writer:
                log_samples(run, models_dir / run.name, seed, tracker)
                if run.model != NGRAM and not run.char_level:
                    log_neighbours(models_dir / run.name, tracker)
            row["mlflow_run_id"] = tracker.run_id or resume.mlflow_run_id
        table.setdefault(run.corpus, {})[run.model] = row
        if writer:
            history = read_json(models_dir / run.name / "history.json")
            curve = [{"epoch": h["epoch"], "val_ppl": h.get("val/ppl"), "train_loss": h.get("train/loss_epoch"),
                      "lr": h.get("lr")} for h in history]
            write_json(plots_dir / f"{run.name}.json", curve)
    if writer:
        budget = {"wall_s": round(time.perf_counter() - stage_started, 1),
                  "runs": {r.name: table[r.corpus][r.model]["wall_s"] for r in runs}}
        log.info("train_lm budget used: %.1f s over %d runs", budget["wall_s"], len(runs))
        write_json(metrics_path, table)
        write_json(models_dir / "budget.json", budget)  # the stage's time budget used (README "Language models")
        for resume in resume_dirs:
            resume.clear()
    return table


def run_config_dict(run: LMRunConfig) -> dict:
    return asdict(run)
