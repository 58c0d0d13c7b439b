"""Stage ``evaluate``: score every trained model from its saved files, write one table, the plots
data, the report, and (with tracking) log + register every model as an MLflow pyfunc model.

What is scored comes from the training stages' own outputs, never from a list kept here:

- language models: every run of ``train_lm.runs`` (params) that ``train_lm.json`` lists, loaded
  from ``<models>/lm/<run>/`` by :func:`rnnlab.evaluate.evaluate_language_model` (perplexity on
  the test split, + bits per char for character corpora);
- translation: every run in ``train_seq2seq.json`` (``run -> {..., mlflow_run_id, model_path}``),
  scored by ``rnnlab.seq2seq_eval.evaluate_translation_checkpoint`` (sacreBLEU, chrF, BLEU-1..4
  for each beam size);
- captioning: every run in ``train_captioner.json``, scored by
  ``rnnlab.caption_eval.evaluate_caption_checkpoint``.

A task whose training metrics file (or params section) is absent is *skipped and recorded*
(``skipped.<task>`` in the table, a line in the report, a warning in the log) -- never dropped
silently. The table, ``evaluate.json``, is nested ``<task>.<corpus or run>[.<model>].<metric>``
so ``dvc metrics show`` / ``dvc metrics diff`` flatten it into one row per number.

MLflow (when ``tracking.enabled``): one evaluation run (experiment ``evaluate.experiment``) logs
every number as ``<task>.<...>.<metric>``, the table as ``evaluate.json``, the report, and a tag
``scored.<run name>`` -> the training run id for each model it scored. With
``evaluate.register_models`` every scored model is logged into that evaluation run as a pyfunc
model (``rnnlab.serving``) and registered (``rnnlab-lm-<corpus>-<model>``, ``rnnlab-translator``,
``rnnlab-captioner``); each model version carries tags ``training_run_id`` / ``evaluation_run_id``.
Registering from here keeps the training stages free of MLflow.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rnnlab.config import parse_section, section
from rnnlab.errors import ConfigError, RnnlabError
from rnnlab.io import read_json, write_json
from rnnlab.stages import get_seed, tracking_enabled

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    lm_batch_size: int = 10
    lm_bptt: int = 35
    experiment: str = "rnnlab-evaluate"
    seq2seq_beam_sizes: list[int] = field(default_factory=lambda: [1, 5])
    caption_beam_sizes: list[int] = field(default_factory=lambda: [1, 3])
    register_models: bool = True
    sample_prompt: str = "the"
    sample_tokens: int = 30

    def validate(self, where: str) -> None:
        for key in ("lm_batch_size", "lm_bptt", "sample_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {getattr(self, key)!r}")
        for key in ("seq2seq_beam_sizes", "caption_beam_sizes"):
            if not getattr(self, key) or any(b < 1 for b in getattr(self, key)):
                raise ConfigError(f"{where}.{key}: expected a non-empty list of integers >= 1, got {getattr(self, key)!r}")


def parse_evaluate_config(params: dict) -> EvaluateConfig:
    cfg = parse_section(EvaluateConfig, section(params, "evaluate"), "evaluate")
    cfg.validate("evaluate")
    return cfg


# A translator / captioner run's validation score (training metrics row): the registered models
# get their versions in increasing order of it, so ``models:/rnnlab-translator/latest`` is the best.
SELECT_KEYS = ("val_sacrebleu_best", "val_sacrebleu", "val_bleu4", "val_bleu")


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else str(value)
    return value


def _flatten_result(result: dict, prefix: str = "") -> dict:
    """Scalars of a scorer's result dict, nested dicts joined with '.'; lists are left out (plots)."""
    out: dict = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_result(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = _round(value)
    return out


def _beam_rows(result: dict, run: str) -> list[dict]:
    """Per-beam rows of a scorer's result: any list of dicts with a ``beam`` key (translation), or
    ``{"greedy"|"beam<k>": {sacrebleu, bleu1.., ...}}`` settings (captioning; greedy drawn at beam 1)."""
    rows = []
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) and "beam" in r for r in value):
            rows += [{"run": run, **{k: _round(v) for k, v in r.items()}} for r in value]
        elif isinstance(value, dict) and (key == "greedy" or (key.startswith("beam") and key[4:].isdigit())):
            beam = 1 if key == "greedy" else int(key[4:])
            rows.append({"run": run, "beam": beam, "decoding": key,
                         **{k: _round(v) for k, v in value.items() if isinstance(v, (int, float))}})
    return rows


# ----------------------------------------------------------------------------------------------
# The three tasks
# ----------------------------------------------------------------------------------------------
def _score_language_models(params: dict, cfg: EvaluateConfig, prepared_dir: Path, models_dir: Path,
                           metrics_dir: Path, skipped: dict) -> list[dict]:
    from rnnlab.data.registry import get_corpus
    from rnnlab.evaluate import evaluate_language_model
    from rnnlab.lm_train import parse_train_lm_config

    train_metrics = metrics_dir / "train_lm.json"
    if "train_lm" not in params or not train_metrics.exists():
        skipped["lm"] = f"{train_metrics} or params train_lm absent"
        return []
    trained = read_json(train_metrics)
    entries = []
    for run in parse_train_lm_config(section(params, "train_lm")).run_configs():
        row_in = trained.get(run.corpus, {}).get(run.model)
        if row_in is None:
            raise RnnlabError(f"{train_metrics}: no row for train_lm run {run.name!r} ({run.corpus}/{run.model}); "
                              "rerun train_lm")
        model_dir = models_dir / "lm" / run.name
        target = model_dir / "model.ckpt" if (model_dir / "model.ckpt").exists() else model_dir
        result = evaluate_language_model(target, prepared_dir / run.corpus, cfg.lm_batch_size, cfg.lm_bptt)
        split = result["split"]
        char = get_corpus(run.corpus).task == "lm-char"
        row = {"task": "lm", "metric": "bpc" if char else "ppl", "split": split,
               f"{split}_ppl": round(result["ppl"], 3), f"{split}_loss": round(result["loss"], 5),
               "tokens": result["tokens"]}
        if target.is_file():  # neural: batchified stream; an n-gram scores every position
            row.update(batch_size=cfg.lm_batch_size, bptt=cfg.lm_bptt)
        if char and result.get("bpc") is not None:
            row[f"{split}_bpc"] = round(result["bpc"], 4)
        if row_in.get("params") is not None:
            row["params"] = row_in["params"]
        if row_in.get("mlflow_run_id"):
            row["mlflow_run_id"] = row_in["mlflow_run_id"]
        entries.append({"task": "lm", "key": (run.corpus, run.model), "name": run.name, "row": row,
                        "checkpoint": target, "corpus": run.corpus, "model": run.model, "char": char})
    return entries


def _score_other(task: str, train_name: str, scorer: str, params: dict, cfg: EvaluateConfig, prepared_dir: Path,
                 models_dir: Path, metrics_dir: Path, features_dir: Path, skipped: dict,
                 beam_rows: list[dict]) -> list[dict]:
    import importlib

    train_metrics = metrics_dir / f"{train_name}.json"
    if train_name not in params or not train_metrics.exists():
        skipped[task] = f"{train_metrics} or params {train_name} absent"
        return []
    module, fn = scorer.rsplit(".", 1)
    try:
        score = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as exc:  # recorded in the table and the report, not silent
        skipped[task] = f"{train_metrics} exists but its scorer {scorer} is not available ({exc})"
        return []
    entries = []
    for run, row_in in sorted(read_json(train_metrics).items()):
        if not isinstance(row_in, dict):
            continue
        model_dir = Path(row_in["model_path"]) if row_in.get("model_path") else models_dir / train_name.removeprefix(
            "train_") / run
        corpus = row_in.get("corpus") or ("multi30k" if task == "translation" else "flickr8k")
        if task == "translation":
            result = score(model_dir, prepared_dir / corpus, cfg.seq2seq_beam_sizes)
            beams = cfg.seq2seq_beam_sizes
        else:  # the caption scorer takes the prepared root (it reads <root>/flickr8k/captions.parquet)
            result = score(model_dir, prepared_dir, features_dir, cfg.caption_beam_sizes)
            beams = cfg.caption_beam_sizes
        if isinstance(result.get("params"), dict):  # a run's config, not a number: kept out of the table
            result = {k: v for k, v in result.items() if k != "params"}
        row = {"task": task, "corpus": corpus, "beam_sizes": ",".join(map(str, beams)), **_flatten_result(result)}
        if isinstance(row_in.get("params"), int):
            row.setdefault("params", row_in["params"])
        if row_in.get("mlflow_run_id"):
            row["mlflow_run_id"] = row_in["mlflow_run_id"]
        beam_rows += [{"task": task, **r} for r in _beam_rows(result, run)]
        ckpt = model_dir / "model.ckpt" if (model_dir / "model.ckpt").exists() else model_dir
        select = next((row_in[k] for k in SELECT_KEYS if isinstance(row_in.get(k), (int, float))), 0.0)
        entries.append({"task": task, "key": (run,), "name": run, "row": row, "checkpoint": ckpt, "corpus": corpus,
                        "model": run, "result": result, "select": select})
    return entries


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _md_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else f"`{row[c]}`" if c == "mlflow_run_id"
                                      else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _copy_pngs(sources: list[Path], reports_dir: Path, label: str) -> list[str]:
    out = []
    for src in sources:  # next to index.md: .gitignore keeps /data/reports/*.png out of git
        dst = reports_dir / f"{label}-{src.name}"
        shutil.copyfile(src, dst)
        out.append(dst.relative_to(reports_dir).as_posix())
    return out


def write_report(reports_dir: Path, entries: list[dict], skipped: dict, samples: dict, eval_run_id: str | None,
                 registered: dict, models_dir: Path, extra_png_dirs: list[Path]) -> Path:
    if reports_dir.exists():
        shutil.rmtree(reports_dir)
    reports_dir.mkdir(parents=True)
    md = ["# rnnlab results", "",
          "Generated by the DVC stage `evaluate` from the saved models (fresh process, test splits). "
          "Every number comes with the MLflow run id of the training run that produced the model"
          + (f"; the evaluation run is `{eval_run_id}`." if eval_run_id else " (tracking was disabled: no evaluation run)."),
          ""]
    by_task: dict[str, list[dict]] = {}
    for e in entries:
        by_task.setdefault(e["task"], []).append(e)
    if "lm" in by_task:
        rows = []
        for e in by_task["lm"]:
            r = e["row"]
            split = r["split"]
            rows.append({"corpus": e["corpus"], "model": e["model"], "split": split, "ppl": r.get(f"{split}_ppl"),
                         "bpc": r.get(f"{split}_bpc"), "params": r.get("params"), "bptt": r.get("bptt"),
                         "registered": registered.get(e["name"]), "mlflow_run_id": r.get("mlflow_run_id")})
        md += ["## Language models", "", _md_table(rows, ["corpus", "model", "split", "ppl", "bpc", "params", "bptt",
                                                          "registered", "mlflow_run_id"]), ""]
        if samples:
            md += ["### Samples", ""]
            for name, text in samples.items():
                md += [f"**{name}**", "", "```", text, "```", ""]
    for task, title in (("translation", "Translation (Multi30k en-de)"), ("captioning", "Captioning (Flickr8k)")):
        if task not in by_task:
            continue
        # one column per run, one line per number (these tables have dozens of metrics)
        runs = by_task[task]
        keys = sorted({k for e in runs for k in e["row"]} - {"task", "corpus", "mlflow_run_id", "registered_model"})
        lines = ["| | " + " | ".join(e["name"] for e in runs) + " |", "|---|" + "---|" * len(runs)]
        for key in [*keys, "registered_model", "mlflow_run_id"]:
            cells = []
            for e in runs:
                value = e["row"].get(key)
                text = "" if value is None else str(value).replace("|", "\\|")
                cells.append(f"`{text}`" if key == "mlflow_run_id" and text else text)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        md += [f"## {title}", "", *lines, ""]
    pictures = []
    for e in entries:
        model_dir = e["checkpoint"] if e["checkpoint"].is_dir() else e["checkpoint"].parent
        pictures += [(e["name"], p) for p in _copy_pngs(sorted(model_dir.rglob("*.png")), reports_dir, e["name"])]
    for d in extra_png_dirs:
        if d.is_dir():
            pictures += [(d.name, p) for p in _copy_pngs(sorted(d.glob("*.png")), reports_dir, d.name)]
    if pictures:
        md += ["## Pictures", ""]
        for label, rel in pictures:
            md += [f"### {label}: {Path(rel).name}", "", f"![{label}]({rel})", ""]
    if skipped:
        md += ["## Not evaluated", ""] + [f"- **{task}**: skipped ({why})" for task, why in sorted(skipped.items())] + [""]
    path = reports_dir / "index.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def _lm_sample(entry: dict, cfg: EvaluateConfig, seed: int) -> str:
    from rnnlab.generate import sample_from_path

    prompt = cfg.sample_prompt.capitalize() if entry["char"] else cfg.sample_prompt
    text = sample_from_path(entry["checkpoint"], prompt, cfg.sample_tokens, 1.0, seed)
    return prompt + ("" if entry["char"] else " ") + text


def evaluate_stage(params: dict, prepared_dir: Path, models_dir: Path, metrics_dir: Path, metrics_path: Path,
                   reports_dir: Path = Path("data/reports"), plots_dir: Path = Path("data/plots/evaluate"),
                   features_dir: Path = Path("data/features/flickr8k"),
                   extra_png_dirs: tuple[Path, ...] = (Path("data/study"),)) -> dict:
    """Score, write ``metrics_path`` (the table), ``plots_dir`` (plot data), ``reports_dir``; returns the table."""
    from rnnlab.tracking import default_tracking_uri, tracked_run

    cfg = parse_evaluate_config(params)
    seed = get_seed(params)
    skipped: dict[str, str] = {}
    beam_rows: list[dict] = []
    entries = _score_language_models(params, cfg, prepared_dir, models_dir, metrics_dir, skipped)
    entries += _score_other("translation", "train_seq2seq", "rnnlab.seq2seq_eval.evaluate_translation_checkpoint",
                            params, cfg, prepared_dir, models_dir, metrics_dir, features_dir, skipped, beam_rows)
    entries += _score_other("captioning", "train_captioner", "rnnlab.caption_eval.evaluate_caption_checkpoint",
                            params, cfg, prepared_dir, models_dir, metrics_dir, features_dir, skipped, beam_rows)
    for task, why in skipped.items():
        log.warning("evaluate: %s skipped: %s", task, why)

    table: dict = {}
    for e in entries:
        node = table.setdefault(e["task"], {})
        for k in e["key"][:-1]:
            node = node.setdefault(k, {})
        node[e["key"][-1]] = e["row"]
    if skipped:
        table["skipped"] = dict(skipped)

    lm_rows = [{"model": e["name"], "ppl": e["row"][f"{e['row']['split']}_ppl"]} for e in entries if e["task"] == "lm"]
    write_json(plots_dir / "lm_ppl.json", lm_rows)
    # One key set for every row: DVC cannot render a plot file whose rows have different keys
    # (translation has chrF, captioning BLEU-1..4; those stay in evaluate.json).
    write_json(plots_dir / "bleu_vs_beam.json",
               [{k: r.get(k) for k in ("task", "run", "beam", "sacrebleu")} for r in beam_rows])
    samples = {e["name"]: s for e in entries if e["task"] == "lm" for s in [_lm_sample(e, cfg, seed)] if s}

    tracking = tracking_enabled(params)
    eval_run_id = None
    registered: dict[str, str] = {}
    scored = {f"scored.{e['name']}": e["row"]["mlflow_run_id"] for e in entries if e["row"].get("mlflow_run_id")}
    with tracked_run(run_name="evaluate", stage="evaluate", experiment=cfg.experiment, enabled=tracking,
                     params=asdict(cfg), data_deps=[metrics_dir / f"{n}.json" for n in
                                                     ("train_lm", "train_seq2seq", "train_captioner")
                                                     if (metrics_dir / f"{n}.json").exists()],
                     tags={"task": "evaluate", **{f"skipped.{k}": v for k, v in skipped.items()}}) as tracker:
        eval_run_id = tracker.run_id
        for e in entries:
            prefix = ".".join([e["task"], *e["key"]])
            tracker.log_metrics({f"{prefix}.{k}": v for k, v in e["row"].items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.set_tags(scored)
        if eval_run_id and cfg.register_models:
            # pyfunc models need the fluent API on a finished flush: log them after the queue is sent
            tracker.flush(force=True)
            from rnnlab.serving import log_and_register, registered_name

            # translators/captioners share one registered name: the best validation score goes last
            for e in sorted(entries, key=lambda e: (e["task"] != "lm", e.get("select", 0.0))):
                name = registered_name(e["task"], e["corpus"], e["model"])
                config = {"char_level": e.get("char", False)} if e["task"] == "lm" else {}
                info = log_and_register(e["task"], e["checkpoint"], name, eval_run_id, default_tracking_uri(),
                                        model_config=config, training_run_id=e["row"].get("mlflow_run_id"),
                                        run_name=e["name"])
                registered[e["name"]] = f"{name}/{info['version']}"
                e["row"]["registered_model"] = registered[e["name"]]
    report = write_report(reports_dir, entries, skipped, samples, eval_run_id, registered, models_dir,
                          list(extra_png_dirs))
    if eval_run_id:
        import mlflow

        mlflow.set_tracking_uri(default_tracking_uri())
        mlflow.MlflowClient().log_artifacts(eval_run_id, str(report.parent), "report")
        mlflow.MlflowClient().log_dict(eval_run_id, table, "evaluate.json")
    write_json(metrics_path, table)
    log.info("evaluate: %d models scored, report %s", len(entries), report)
    return table
