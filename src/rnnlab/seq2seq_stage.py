"""Stage ``train_seq2seq``: train each configured En->De translator on Multi30k, one MLflow run each.

``params.yaml`` section ``train_seq2seq``::

    experiment: rnnlab-seq2seq
    defaults: {...}          # Seq2SeqConfig keys (rnnlab.seq2seq_train) shared by every run
    runs:                    # one entry per model; its keys override ``defaults``
      - {name: multi30k-attention, attention: bahdanau}
      - {name: multi30k-none, attention: none}

Besides the Seq2SeqConfig keys a run (or ``defaults``) may set ``max_train_pairs`` /
``max_val_pairs`` (null = all): keep only the first N pairs of that split (corpus line order),
for tiny test profiles. The test split (test_2016_flickr) is always scored whole, so the
evaluate stage, which rescores it from the saved model, reproduces these numbers exactly.
An unknown key is a ConfigError naming it (``train_seq2seq.runs[1].foo``).

Outputs:

- ``<models_dir>/<run>/``: ``model.ckpt`` (best by ``monitor``; vocabularies and tokenizers
  inside), ``vocab.src.json`` / ``vocab.tgt.json`` and ``tokenizer.src.json`` /
  ``tokenizer.tgt.json`` (the same vocabularies/tokenizers, checked against the checkpoint on
  load), ``config.json``, ``history.json``, ``bleu_vs_beam.json`` (+ ``.png``),
  ``test_hyps_*.txt``, ``attention/val_XX.png``. The folder alone is enough to translate
  (``rnnlab translate --run <folder>``) and to rescore
  (:func:`rnnlab.seq2seq_eval.evaluate_translation_checkpoint`).
- ``metrics_path`` (``data/metrics/train_seq2seq.json``): ``{run: row}``; see :func:`score_row`
  for the score keys. ``sacrebleu_*`` = sacreBLEU on detokenized cased text (13a, signature in
  ``sacrebleu_signature``), ``chrf_*`` = chrF on the same text, ``tok_lc_bleu_*`` = BLEU on
  word-tokenized **lower-cased** text (what Multi30k papers report). ``greedy`` = greedy decoding,
  ``beamK`` = batched beam search of width K (``beam1`` runs through beam search and must equal
  greedy: ``beam1_equals_greedy``).
- ``plots_dir/bleu_vs_beam.json``: rows ``{run, beam, bleu}`` (sacreBLEU) for each beam size.
- ``<models_dir>/budget.json``: the stage's wall time, per run and in total.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnlab.config import merged_runs, parse_section, section
from rnnlab.errors import ConfigError, DataError
from rnnlab.io import write_json

log = logging.getLogger(__name__)

CORPUS = "multi30k"
TEST_SET = "test_2016_flickr"
RUN_KEYS = ("name", "max_train_pairs", "max_val_pairs")  # run-level keys beside the Seq2SeqConfig ones
SCORES = ("sacrebleu", "chrf", "tok_bleu")
SCORE_NAMES = {"sacrebleu": "sacrebleu", "chrf": "chrf", "tok_bleu": "tok_lc_bleu"}  # library name -> table name
MODEL_FILES = ("model.ckpt", "vocab.src.json", "vocab.tgt.json", "tokenizer.src.json", "tokenizer.tgt.json",
               "config.json")


@dataclass
class Seq2SeqRun:
    name: str
    config: dict[str, Any]  # validated Seq2SeqConfig keys, as given (defaults merged)
    max_train_pairs: int | None = None
    max_val_pairs: int | None = None


@dataclass
class TrainSeq2SeqConfig:
    defaults: dict[str, Any]
    runs: list[dict[str, Any]]
    experiment: str = "rnnlab-seq2seq"

    def run_configs(self) -> list[Seq2SeqRun]:
        from rnnlab.seq2seq_train import Seq2SeqConfig, parse_seq2seq_config

        valid = sorted({f.name for f in dataclasses.fields(Seq2SeqConfig)} | set(RUN_KEYS))
        for where, data in [("train_seq2seq.defaults", self.defaults),
                            *((f"train_seq2seq.runs[{i}]", run) for i, run in enumerate(self.runs))]:
            unknown = sorted(set(data) - set(valid))
            if unknown:
                raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys: {valid}")
        runs = []
        for where, merged in merged_runs("train_seq2seq", self.defaults, self.runs):
            limits = {}
            for key in ("max_train_pairs", "max_val_pairs"):
                value = merged.pop(key, None)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ConfigError(f"{where}.{key}: expected null or an integer >= 1, got {value!r}")
                limits[key] = value
            name = merged.pop("name")
            parse_seq2seq_config(merged, where)  # every key and range checked, naming the run
            runs.append(Seq2SeqRun(name=name, config=merged, **limits))
        return runs


def parse_train_seq2seq_config(data: dict) -> TrainSeq2SeqConfig:
    cfg = parse_section(TrainSeq2SeqConfig, data, "train_seq2seq")
    cfg.run_configs()  # validate every run before any training starts
    return cfg


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def pairs_path(prepared_dir: Path) -> Path:
    """``pairs.parquet`` in ``prepared_dir`` (``data/prepared/multi30k``) or ``prepared_dir/multi30k``."""
    prepared_dir = Path(prepared_dir)
    for path in (prepared_dir / "pairs.parquet", prepared_dir / CORPUS / "pairs.parquet"):
        if path.is_file():
            return path
    raise DataError(f"{prepared_dir / CORPUS / 'pairs.parquet'}: not found (run `dvc repro prepare` with multi30k "
                    "in prepare.corpora)")


def read_pairs(prepared_dir: Path):
    import pandas as pd

    path = pairs_path(prepared_dir)
    pairs = pd.read_parquet(path)
    missing = {"split", "line", "src", "tgt"} - set(pairs.columns)
    if missing:
        raise DataError(f"{path}: lacks columns {sorted(missing)} (has {list(pairs.columns)}); rerun prepare")
    for split in ("train", "val", "test"):
        if not (pairs["split"] == split).any():
            raise DataError(f"{path}: split {split!r} is empty")
    return pairs


def subsample(pairs, max_train: int | None, max_val: int | None):
    """The first N pairs (corpus line order) of train / val; test is never cut."""
    import pandas as pd

    parts = []
    for split, limit in (("train", max_train), ("val", max_val), ("test", None)):
        frame = pairs[pairs["split"] == split].sort_values("line")
        parts.append(frame if limit is None else frame.head(limit))
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def score_row(metrics: dict, beam_sizes, prefix: str = "test") -> dict:
    """Score keys shared by ``train_seq2seq.json`` and ``evaluate_translation_checkpoint``, from the
    flat metrics of :func:`rnnlab.seq2seq_train.evaluate_translation`."""
    row: dict = {}
    for decode in ["greedy", *(f"beam{k}" for k in beam_sizes)]:
        for score in SCORES:
            row[f"{SCORE_NAMES[score]}_{decode}"] = metrics[f"{prefix}/{score}_{decode}"]
    if f"{prefix}/beam1_equals_greedy" in metrics:
        row["beam1_equals_greedy"] = bool(metrics[f"{prefix}/beam1_equals_greedy"])
    row["sacrebleu_signature"] = metrics["sacrebleu_signature"]
    row["chrf_signature"] = metrics["chrf_signature"]
    row["tok_lc_bleu_signature"] = metrics["tok_bleu_signature"]
    return row


def _train_row(run: Seq2SeqRun, metrics: dict, beam_sizes: list[int], pair_counts: dict, model_dir: Path) -> dict:
    row = {"corpus": CORPUS, "test_set": TEST_SET, "attention": run.config.get("attention", "bahdanau"),
           **score_row(metrics, beam_sizes)}
    row.update({
        "val_ppl": metrics["val/ppl"], "test_ppl": metrics["test/ppl"], "val_loss": metrics["val/loss"],
        "test_loss": metrics["test/loss"], "val_sacrebleu_best": metrics["val/bleu_best"],
        "params": metrics["params"], "epochs": metrics["epochs"], "steps": metrics["steps"],
        "train_wall_s": metrics["train_wall_s"], "eval_wall_s": metrics["eval_wall_s"],
        "train_tokens_per_s": metrics["tokens_per_s"],
        **{f"sentences_per_s_{d}": metrics[f"test/sentences_per_s_{d}"]
           for d in ["greedy", *(f"beam{k}" for k in beam_sizes)]},
        "src_vocab_size": metrics["src_vocab_size"], "tgt_vocab_size": metrics["tgt_vocab_size"],
        "pairs": pair_counts,
        "truncated": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("truncated/")},
        "model_path": model_dir.as_posix(),
    })
    # NaN/inf (e.g. no validation BLEU with val_bleu: false) are not JSON: null instead
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _plot_bleu_vs_beam(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beams = [r for r in rows if r["beam"] > 0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("sacrebleu", "sacreBLEU (detok, cased)"), ("tok_bleu", "BLEU (tok, lower-cased)"),
                       ("chrf", "chrF")):
        ax.plot([r["beam"] for r in beams], [r[key] for r in beams], marker="o", label=label)
    ax.set_xlabel("beam size")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def train_seq2seq_run(run: Seq2SeqRun, pairs, seed: int, tracking: bool, experiment: str, data_file: Path,
                      models_dir: Path) -> tuple[dict, list[dict]]:
    """Train, evaluate and save one run; returns (its ``train_seq2seq.json`` row, its beam rows)."""
    from rnnlab.io import read_json
    from rnnlab.seq2seq_train import parse_seq2seq_config, train_translation
    from rnnlab.tasks.seq2seq_task import load_translation_task
    from rnnlab.tracking import tracked_run

    cfg = parse_seq2seq_config(run.config, f"train_seq2seq.runs[{run.name}]")
    data = subsample(pairs, run.max_train_pairs, run.max_val_pairs)
    counts = {split: int((data["split"] == split).sum()) for split in ("train", "val", "test")}
    out_dir = models_dir / run.name
    shutil.rmtree(out_dir, ignore_errors=True)  # no stale files from an earlier profile
    with tracked_run(
        run_name=f"train_seq2seq/{run.name}",
        stage="train_seq2seq",
        experiment=experiment,
        enabled=tracking,
        params={"seed": seed, "name": run.name, **dataclasses.asdict(cfg), "max_train_pairs": run.max_train_pairs,
                "max_val_pairs": run.max_val_pairs},
        data_deps=[data_file],
        tags={"task": "translation", "corpus": CORPUS, "model": run.name, "attention": cfg.attention,
              "tokenizer": cfg.tokenizer},
    ) as tracker:
        metrics = train_translation(run.config, data, out_dir, seed, tracker=tracker)
        # The vocabularies/tokenizers beside the checkpoint (the checkpoint carries them too; a
        # loader checks that both agree, so a swapped file is an error naming both sizes).
        task = load_translation_task(out_dir / "model.ckpt")
        task.src_vocab.save(out_dir / "vocab.src.json")
        task.tgt_vocab.save(out_dir / "vocab.tgt.json")
        write_json(out_dir / "tokenizer.src.json", task.src_tokenizer.to_dict())
        write_json(out_dir / "tokenizer.tgt.json", task.tgt_tokenizer.to_dict())
        beam_rows = read_json(out_dir / "bleu_vs_beam.json")
        png = _plot_bleu_vs_beam(beam_rows, out_dir / "bleu_vs_beam.png", f"{run.name}: {TEST_SET}")
        row = _train_row(run, metrics, cfg.beam_sizes, counts, out_dir)
        row["mlflow_run_id"] = tracker.run_id
        tracker.log_metrics({f"final/{k}": v for k, v in row.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.set_tags({k: v for k, v in row.items() if k.endswith("_signature")})
        for name in MODEL_FILES:
            tracker.log_artifact(out_dir / name, "model")
        for path in (out_dir / "history.json", out_dir / "bleu_vs_beam.json", png):
            tracker.log_artifact(path)
        for path in sorted(out_dir.glob("test_hyps_*.txt")):
            tracker.log_artifact(path, "hyps")
    log.info("train_seq2seq %s: %s", run.name, {k: v for k, v in row.items() if not k.endswith("_signature")})
    return row, [{"run": run.name, "beam": r["beam"], "bleu": r["sacrebleu"]} for r in beam_rows if r["beam"] > 0]


def train_seq2seq_stage(params: dict, prepared_dir: Path, models_dir: Path, metrics_path: Path,
                        plots_dir: Path) -> dict:
    """The ``train_seq2seq`` stage body: every run in ``train_seq2seq.runs``; returns the metrics table."""
    from rnnlab.stages import get_seed, tracking_enabled

    cfg = parse_train_seq2seq_config(section(params, "train_seq2seq"))
    seed, tracking = get_seed(params), tracking_enabled(params)
    runs = cfg.run_configs()
    data_file = pairs_path(Path(prepared_dir))
    pairs = read_pairs(Path(prepared_dir))
    models_dir, plots_dir = Path(models_dir), Path(plots_dir)
    started = time.perf_counter()
    table: dict = {}
    plot_rows: list[dict] = []
    walls: dict = {}
    for run in runs:
        run_started = time.perf_counter()
        row, beam_rows = train_seq2seq_run(run, pairs, seed, tracking, cfg.experiment, data_file, models_dir)
        walls[run.name] = round(time.perf_counter() - run_started, 1)
        row["stage_wall_s"] = walls[run.name]
        table[run.name] = row
        plot_rows += beam_rows
    budget = {"wall_s": round(time.perf_counter() - started, 1), "runs": walls}
    log.info("train_seq2seq budget used: %.1f s over %d runs", budget["wall_s"], len(runs))
    write_json(models_dir / "budget.json", budget)
    write_json(plots_dir / "bleu_vs_beam.json", plot_rows)
    write_json(metrics_path, table)
    return table
