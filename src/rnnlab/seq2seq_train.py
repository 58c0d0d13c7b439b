"""Train and evaluate the En->De translator: ``train_translation(config, pairs, out_dir, seed)``.

``config`` is the ``train_seq2seq`` section of ``params.yaml`` (unknown keys are a ConfigError
naming the key; every key has the default shown, which is the CPU profile)::

    tokenizer: bpe           # word | bpe (BPE learned on the train split with HF tokenizers)
    bpe_vocab_size: 5000     # per side, used when tokenizer is bpe
    lowercase_target: false  # source is always lower-cased; German keeps its case by default
    min_freq: 1              # vocab: train tokens seen fewer times become <unk>
    max_len: 50              # tokens per sentence; longer ones are truncated (counted); also the decode limit
    embedding_size: 128
    hidden_size: 128         # encoder: per direction; decoder LSTM and attention
    num_layers: 1
    dropout: 0.2
    attention: bahdanau      # bahdanau | luong | none (Sutskever fixed context)
    input_feeding: false     # Luong input feeding (step-by-step decoder in training: slower)
    summary_each_step: true  # attention none: final encoder states concatenated to every input
    teacher_forcing: 1.0     # < 1: feed own argmax predictions with probability 1 - ratio
    label_smoothing: 0.1
    lr: 0.003                # Adam
    lr_plateau_factor: null  # e.g. 0.5: multiply lr by it when `monitor` stops improving (null: constant lr)
    batch_size: 64
    eval_batch_size: 256
    max_epochs: 12
    max_time_minutes: null   # optional wall-clock cap on training (interactive use; results then depend on speed)
    limit_train_batches: 1.0 # float fraction or int batches per epoch
    clip: 1.0                # gradient-norm clipping (null: none)
    monitor: val/bleu        # val/bleu (greedy, sacreBLEU) | val/loss: best checkpoint + early stopping
    patience: 3              # early stopping, in validation rounds
    val_bleu: true           # decode val greedily at each validation (needed for monitor val/bleu)
    beam_sizes: [1, 3, 5, 10]
    length_penalty: 1.0      # GNMT alpha for beam search; 0 = rank by raw log-prob (1.0 chosen on val)
    heatmaps: 4              # attention PNGs for the first N validation sentences
    enable_progress_bar: false
    num_threads: 0           # torch CPU threads; 0 = torch's default. On a shared, busy machine use 1:
                             # OpenMP threads spin-wait on each other when cores are oversubscribed

The defaults are the CPU profile (about 5.5 minutes per row on 2 cores, evaluation included).
A GPU profile aiming at >= 38 tokenized BLEU (the nmtpy attentive GRU's 37.3) is ``FULL_CONFIG``:
BPE, 2 layers of 512, input feeding, 30 epochs.

Outputs in ``out_dir``: ``model.ckpt`` (best by ``monitor``; vocabs and tokenizers inside),
``history.json`` (per-epoch metrics), ``bleu_vs_beam.json`` (rows ``{beam, sacrebleu, chrf,
tok_bleu, sentences_per_s}``; beam 0 means greedy), ``test_hyps_{greedy,beamK}.txt``,
``attention/val_XX.png``. The returned dict is flat: numbers, plus three ``*_signature`` strings.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from rnnlab.config import parse_section, require
from rnnlab.data.parallel import ParallelDataModule
from rnnlab.io import write_json
from rnnlab.seq2seq_eval import attention_heatmaps, score_translations, teacher_forced_perplexity
from rnnlab.tasks.seq2seq_task import TranslationTask
from rnnlab.training import HistoryCallback, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Seq2SeqConfig:
    tokenizer: Literal["word", "bpe"] = "bpe"
    bpe_vocab_size: int = 5000
    lowercase_target: bool = False
    min_freq: int = 1
    max_len: int = 50
    embedding_size: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.2
    attention: Literal["bahdanau", "luong", "none"] = "bahdanau"
    input_feeding: bool = False
    summary_each_step: bool = True
    teacher_forcing: float = 1.0
    label_smoothing: float = 0.1
    lr: float = 0.003
    lr_plateau_factor: float | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    max_epochs: int = 12
    max_time_minutes: float | None = None
    limit_train_batches: int | float = 1.0
    clip: float | None = 1.0
    monitor: Literal["val/bleu", "val/loss"] = "val/bleu"
    patience: int = 3
    val_bleu: bool = True
    beam_sizes: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
    length_penalty: float = 1.0
    heatmaps: int = 4
    enable_progress_bar: bool = False
    num_threads: int = 0

    def validate(self, where: str) -> None:
        for key in ("bpe_vocab_size", "min_freq", "max_len", "embedding_size", "hidden_size", "num_layers",
                    "batch_size", "eval_batch_size", "max_epochs", "patience"):
            require(getattr(self, key) >= 1, f"{where}.{key}", "an integer >= 1", getattr(self, key))
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a number in [0, 1)", self.dropout)
        require(0.0 < self.teacher_forcing <= 1.0, f"{where}.teacher_forcing", "a number in (0, 1]",
                self.teacher_forcing)
        require(0.0 <= self.label_smoothing < 1.0, f"{where}.label_smoothing", "a number in [0, 1)",
                self.label_smoothing)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.lr_plateau_factor is None or 0 < self.lr_plateau_factor < 1, f"{where}.lr_plateau_factor",
                "null or a number in (0, 1)", self.lr_plateau_factor)
        require(self.clip is None or self.clip > 0, f"{where}.clip", "null or a number > 0", self.clip)
        require(self.max_time_minutes is None or self.max_time_minutes > 0, f"{where}.max_time_minutes",
                "null or a number > 0", self.max_time_minutes)
        require(self.limit_train_batches > 0, f"{where}.limit_train_batches", "a number > 0",
                self.limit_train_batches)
        require(bool(self.beam_sizes) and all(k >= 1 for k in self.beam_sizes), f"{where}.beam_sizes",
                "a non-empty list of integers >= 1", self.beam_sizes)
        require(self.length_penalty >= 0, f"{where}.length_penalty", "a number >= 0", self.length_penalty)
        require(self.num_threads >= 0, f"{where}.num_threads", "an integer >= 0", self.num_threads)
        require(self.heatmaps >= 0, f"{where}.heatmaps", "an integer >= 0", self.heatmaps)
        require(self.val_bleu or self.monitor != "val/bleu", f"{where}.monitor",
                "val/loss when val_bleu is false", self.monitor)


# GPU profile for the ">= 38 BLEU" row (documented; the stage picks it through params).
FULL_CONFIG = {
    "tokenizer": "bpe", "bpe_vocab_size": 10000, "min_freq": 1, "max_len": 60,
    "embedding_size": 512, "hidden_size": 512, "num_layers": 2, "dropout": 0.4,
    "attention": "bahdanau", "input_feeding": True, "label_smoothing": 0.1, "lr": 0.001, "lr_plateau_factor": 0.5,
    "batch_size": 128, "max_epochs": 30, "max_time_minutes": None, "patience": 5, "beam_sizes": [1, 3, 5, 10],
    "length_penalty": 1.0,
}


def parse_seq2seq_config(data: dict, where: str = "train_seq2seq") -> Seq2SeqConfig:
    return parse_section(Seq2SeqConfig, data, where)


def _task_hparams(cfg: Seq2SeqConfig) -> dict:
    keys = ("embedding_size", "hidden_size", "num_layers", "dropout", "attention", "input_feeding",
            "summary_each_step", "lr", "label_smoothing", "teacher_forcing", "val_bleu", "length_penalty",
            "lr_plateau_factor", "monitor")
    return {k: getattr(cfg, k) for k in keys} | {"decode_max_len": cfg.max_len}


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def evaluate_translation(task: TranslationTask, sources: list[str], references: list[str], beam_sizes: list[int],
                         out_dir: Path | None = None, prefix: str = "test") -> tuple[dict, list[dict]]:
    """Greedy and beam decoding of ``sources``; returns (flat metrics, bleu-vs-beam rows; beam 0 = greedy).

    Beam size 1 runs through beam search (not the greedy shortcut), so the metrics also record
    whether it reproduced greedy decoding exactly on real data (``{prefix}/beam1_equals_greedy``)."""
    metrics: dict = {}
    rows, greedy_tokens = [], None
    for beam in [0, *beam_sizes]:
        name = "greedy" if beam == 0 else f"beam{beam}"
        started = time.perf_counter()
        _, result = task.decode_sentences(sources, beam_size=max(beam, 1), greedy=beam == 0)
        per_s = len(sources) / max(time.perf_counter() - started, 1e-9)
        if beam == 0:
            greedy_tokens = result.tokens
        elif beam == 1:
            metrics[f"{prefix}/beam1_equals_greedy"] = float(result.tokens == greedy_tokens)
        hyps = [task.ids_to_text(ids) for ids in result.tokens]
        scores = score_translations(hyps, references)
        row = {"beam": beam, **{k: round(scores[k], 2) for k in ("sacrebleu", "chrf", "tok_bleu")},
               "sentences_per_s": round(per_s, 1)}
        rows.append(row)
        for key in ("sacrebleu", "chrf", "tok_bleu", "sentences_per_s"):
            metrics[f"{prefix}/{key}_{name}"] = row[key]
        for key in ("sacrebleu_signature", "chrf_signature", "tok_bleu_signature"):
            metrics[key] = scores[key]
        if out_dir is not None:
            _write_lines(out_dir / f"{prefix}_hyps_{name}.txt", hyps)
    return metrics, rows


def train_translation(config: dict, pairs: pd.DataFrame, out_dir: Path, seed: int, tracker=None) -> dict:
    """Train on ``pairs`` (columns split/line/src/tgt), keep the best checkpoint, evaluate on test.

    ``tracker`` (optional, rnnlab.tracking) receives per-epoch curves and the attention PNGs; the
    caller logs the returned metrics and the model once."""
    cfg = parse_seq2seq_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(seed)
    started = time.perf_counter()

    dm = ParallelDataModule(
        pairs, tokenizer=cfg.tokenizer, bpe_vocab_size=cfg.bpe_vocab_size, min_freq=cfg.min_freq,
        max_len=cfg.max_len, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, seed=seed,
        lowercase_target=cfg.lowercase_target,
    )
    dm.setup("fit")
    task = TranslationTask(
        src_vocab_size=len(dm.src_vocab), tgt_vocab_size=len(dm.tgt_vocab),
        src_vocab_fingerprint=dm.src_vocab.fingerprint(), tgt_vocab_fingerprint=dm.tgt_vocab.fingerprint(),
        src_vocab=dm.src_vocab, tgt_vocab=dm.tgt_vocab, src_tokenizer=dm.src_tokenizer,
        tgt_tokenizer=dm.tgt_tokenizer, **_task_hparams(cfg),
    )
    mode = "max" if cfg.monitor == "val/bleu" else "min"
    ckpt_dir = out_dir / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.monitor, mode=mode, save_top_k=1)
    stopping = EarlyStopping(monitor=cfg.monitor, mode=mode, patience=cfg.patience)
    history = HistoryCallback(tracker, tokens_per_batch=lambda batch: int((batch.tgt_out != 0).sum()))
    on_gpu = torch.cuda.is_available()
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,  # one process: val BLEU needs the whole split, and the bucket sampler is not sharded
        deterministic=True if not on_gpu else "warn",  # cuDNN LSTM backward has no deterministic mode
        max_epochs=cfg.max_epochs,
        max_time={"minutes": cfg.max_time_minutes} if cfg.max_time_minutes else None,
        limit_train_batches=cfg.limit_train_batches,
        gradient_clip_val=cfg.clip,
        enable_progress_bar=cfg.enable_progress_bar,
        enable_model_summary=False,
        logger=False,
        callbacks=[checkpoint, stopping, history],
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    trainer.fit(task, datamodule=dm)
    train_seconds = time.perf_counter() - started

    final = out_dir / "model.ckpt"
    if checkpoint.best_model_path:
        shutil.copyfile(checkpoint.best_model_path, final)
    else:  # no validation round finished (tiny limits): keep the last weights
        trainer.save_checkpoint(final)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    best = TranslationTask.load_from_checkpoint(final, map_location=task.device, weights_only=True)
    best.eval()

    eval_started = time.perf_counter()
    val_loss, val_ppl = teacher_forced_perplexity(best, dm.loader("val"))
    test_loss, test_ppl = teacher_forced_perplexity(best, dm.loader("test"))
    test_metrics, beam_rows = evaluate_translation(best, dm.sources("test"), dm.references("test"), cfg.beam_sizes,
                                                   out_dir)
    pngs = attention_heatmaps(best, dm.sources("val")[: cfg.heatmaps], out_dir / "attention")
    if tracker is not None:
        for png in pngs:
            tracker.log_artifact(png, "attention")
    eval_seconds = time.perf_counter() - eval_started

    val_bleus = [h["val/bleu"] for h in history.history if "val/bleu" in h]
    metrics = {
        "val/loss": round(val_loss, 4), "val/ppl": round(val_ppl, 3),
        "test/loss": round(test_loss, 4), "test/ppl": round(test_ppl, 3),
        "val/bleu_best": round(max(val_bleus), 2) if val_bleus else float("nan"),
        **test_metrics,
        "params": best.num_parameters(),
        "epochs": len(history.history),
        "steps": trainer.global_step,
        "tokens_per_s": round(history.tokens_per_second, 1),
        "train_wall_s": round(train_seconds, 1),
        "eval_wall_s": round(eval_seconds, 1),
        "src_vocab_size": len(dm.src_vocab), "tgt_vocab_size": len(dm.tgt_vocab),
        **{f"truncated/{split}_{side}": n for split, cut in dm.truncated.items() for side, n in cut.items()},
    }
    write_json(out_dir / "history.json", history.history)
    write_json(out_dir / "bleu_vs_beam.json", beam_rows)
    write_json(out_dir / "config.json", dataclasses.asdict(cfg))
    log.info("train_seq2seq: %s", {k: v for k, v in metrics.items() if not k.endswith("_signature")})
    return metrics
