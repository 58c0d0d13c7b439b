"""Stage ``evaluate``: score every trained model from its saved files, write one table, the plots
data, the report, and (with tracking) log + register every model as an MLflow pyfunc model.

What is scored comes from params and the training stages' own outputs, never from a list kept
here: every run of ``train_lm.runs``, ``train_seq2seq.runs`` and ``train_captioner.runs``, loaded
from its model folder by its task's ``score`` (:mod:`rnnlab.tasks`): perplexity on the test split
(+ bits per char for character corpora); sacreBLEU, chrF and tokenized BLEU per beam size;
BLEU-1..4 and sacreBLEU per beam size (beam 1 = greedy).

A task whose params section is absent, a run disabled by the profile, or a run without its
training metrics file is *skipped and recorded* (``skipped.<task>[.<run>]`` in the table, a line in
the report, a warning in the log) -- never dropped silently. The table, ``evaluate.json``, is
nested ``<task>.<corpus or run>[.<model>].<metric>`` so ``dvc metrics show`` / ``dvc metrics diff``
flatten it into one row per number.

MLflow (when ``tracking.enabled``): one evaluation run (experiment ``evaluate.experiment``) logs
every number as ``<task>.<...>.<metric>``, the table as ``evaluate.json``, the report, and a tag
``scored.<run name>`` -> the training run id for each model it scored. With
``evaluate.register_models`` every scored model is logged into that evaluation run as a pyfunc
model (``rnnlab.serving``) and registered (``rnnlab-lm-<corpus>-<model>``, ``rnnlab-translator``,
``rnnlab-captioner``; ``-<corpus>`` appended for a user's corpus); each model version carries tags
``training_run_id`` / ``evaluation_run_id``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rnnlab.config import parse_section, section
from rnnlab.errors import ConfigError
from rnnlab.io import read_json, write_json
from rnnlab.report import write_report
from rnnlab.stages.common import get_seed, tracking_enabled
from rnnlab.stages.train import TASK_MODULES, parse_runs, task_module
from rnnlab.tasks.base import StagePaths

log = logging.getLogger(__name__)

MODEL_SUBDIRS = {"train_lm": "lm", "train_seq2seq": "seq2seq", "train_captioner": "captioner"}


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
    limit_test: int | None = None  # smoke tests only: score the first N test tokens / pairs / images

    def validate(self, where: str) -> None:
        for key in ("lm_batch_size", "lm_bptt", "sample_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {getattr(self, key)!r}")
        if self.limit_test is not None and self.limit_test < 1:
            raise ConfigError(f"{where}.limit_test: expected null or an integer >= 1, got {self.limit_test!r}")
        for key in ("seq2seq_beam_sizes", "caption_beam_sizes"):
            if not getattr(self, key) or any(b < 1 for b in getattr(self, key)):
                raise ConfigError(
                    f"{where}.{key}: expected a non-empty list of integers >= 1, got {getattr(self, key)!r}"
                )


def parse_evaluate_config(params: dict) -> EvaluateConfig:
    return parse_section(EvaluateConfig, section(params, "evaluate"), "evaluate")


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
    ``{"greedy"|"beam<k>": {sacrebleu, bleu1.., ...}}`` settings (captioning; greedy is beam 1)."""
    rows = []
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) and "beam" in r for r in value):
            rows += [{"run": run, **{k: _round(v) for k, v in r.items()}} for r in value]
        elif isinstance(value, dict) and (key == "greedy" or (key.startswith("beam") and key[4:].isdigit())):
            beam = 1 if key == "greedy" else int(key[4:])
            rows.append(
                {
                    "run": run,
                    "beam": beam,
                    "decoding": key,
                    **{k: _round(v) for k, v in value.items() if isinstance(v, (int, float))},
                }
            )
    return rows


def _trained_runs(params: dict, train_section: str, metrics_dir: Path, skipped: dict) -> list[tuple[str, Any, dict]]:
    """``[(run name, RunConfig, training row)]`` of a section; what cannot be scored goes to ``skipped``."""
    task = task_module(train_section).TASK
    if train_section not in params:
        skipped[task] = f"params {train_section} absent"
        return []
    out = []
    for name, run in parse_runs(params, train_section).items():
        path = metrics_dir / train_section / f"{name}.json"
        if not path.is_file():
            skipped[f"{task}.{name}"] = f"{path} absent (run `dvc repro {train_section}@{name}`)"
            continue
        row = read_json(path)
        if row.get("enabled") is False or not getattr(run, "enabled", True):
            skipped[f"{task}.{name}"] = row.get("reason", f"{train_section}.runs.{name}.enabled is false")
            continue
        out.append((name, run, row))
    return out


def _score_language_models(
    params: dict, cfg: EvaluateConfig, paths: StagePaths, models_dir: Path, metrics_dir: Path, skipped: dict
) -> list[dict]:
    lm = task_module("train_lm")
    entries = []
    for name, run, row_in in _trained_runs(params, "train_lm", metrics_dir, skipped):
        lm.bind_corpus(run, paths.prepared)
        model_dir = models_dir / "lm" / name
        target = model_dir / "model.ckpt" if (model_dir / "model.ckpt").exists() else model_dir
        result = lm.score(target, paths.prepared / run.corpus, cfg.lm_batch_size, cfg.lm_bptt, cfg.limit_test)
        split = result["split"]
        row = {
            "task": "lm",
            "metric": "bpc" if run.char_level else "ppl",
            "split": split,
            f"{split}_ppl": round(result["ppl"], 3),
            f"{split}_loss": round(result["loss"], 5),
            "tokens": result["tokens"],
        }
        if target.is_file():  # neural: batchified stream; an n-gram scores every position
            row.update(batch_size=cfg.lm_batch_size, bptt=cfg.lm_bptt)
        if run.char_level and result.get("bpc") is not None:
            row[f"{split}_bpc"] = round(result["bpc"], 4)
        if row_in.get("params") is not None:
            row["params"] = row_in["params"]
        if row_in.get("mlflow_run_id"):
            row["mlflow_run_id"] = row_in["mlflow_run_id"]
        entries.append(
            {
                "task": "lm",
                "key": (run.corpus, run.model),
                "name": name,
                "row": row,
                "checkpoint": target,
                "corpus": run.corpus,
                "model": run.model,
                "char": run.char_level,
                "training_row": row_in,
            }
        )
        entries += _score_eval_sets(lm, name, run, target, paths, cfg)
    return entries


def _score_eval_sets(lm, name: str, run, target: Path, paths: StagePaths, cfg: EvaluateConfig) -> list[dict]:
    """The corpus's extra evaluation sets (params ``corpora.<corpus>.eval_sets``, prepared as
    ``eval_<set>.npy``): one row each, ``lm.<corpus>.eval_<set>.<model>``."""
    out = []
    for path in sorted((paths.prepared / run.corpus).glob("eval_*.npy")):
        split = path.stem
        result = lm.score(target, paths.prepared / run.corpus, cfg.lm_batch_size, cfg.lm_bptt, cfg.limit_test, split)
        row = {
            "task": "lm",
            "metric": "bpc" if run.char_level else "ppl",
            "split": split,
            "eval_set": split[len("eval_") :],
            f"{split}_ppl": round(result["ppl"], 3),
            f"{split}_loss": round(result["loss"], 5),
            "tokens": result["tokens"],
        }
        if run.char_level:
            row[f"{split}_bpc"] = round(result["bpc"], 4)
        out.append(
            {
                "task": "lm",
                "key": (run.corpus, split, run.model),
                "name": f"{name}@{split}",
                "row": row,
                "corpus": run.corpus,
                "model": run.model,
                "char": run.char_level,
                "checkpoint": target,
                "eval_set": True,  # a score row only: no model of its own, no sample
            }
        )
    return out


def _score_decoders(
    train_section: str,
    params: dict,
    beams: list[int],
    paths: StagePaths,
    models_dir: Path,
    metrics_dir: Path,
    skipped: dict,
    beam_rows: list[dict],
    limit: int | None,
) -> list[dict]:
    """Translators and captioners: each run's model folder rescored by its task's ``score`` on the
    test split of the run's corpus, then on each extra evaluation set of that corpus (the task's
    ``eval_sets``: params ``corpora.<corpus>.eval_sets``), a row of its own ``<run>@eval_<set>``."""
    task = task_module(train_section)
    entries = []
    for name, run, row_in in sorted(_trained_runs(params, train_section, metrics_dir, skipped), key=lambda t: t[0]):
        model_dir = models_dir / MODEL_SUBDIRS[train_section] / name
        corpus = getattr(run, "corpus", task.CORPUS)
        result = task.score(model_dir, paths, beams, limit=limit)
        entry = _decoder_entry(task, name, corpus, result, beams, row_in, model_dir, beam_rows)
        entries.append(entry)
        for split in getattr(task, "eval_sets", lambda run, paths: [])(run, paths):
            result = task.score(model_dir, paths, beams, limit=limit, split=split)
            extra = _decoder_entry(task, f"{name}@{split}", corpus, result, beams, row_in, model_dir, beam_rows)
            extra["row"]["eval_set"] = split[len("eval_") :]
            extra["eval_set"] = True  # a score row only: no model of its own
            entries.append(extra)
    return entries


def _decoder_entry(
    task, name: str, corpus: str, result: dict, beams: list[int], row_in: dict, model_dir: Path, beam_rows: list
) -> dict:
    result = {k: v for k, v in result.items() if not isinstance(v, dict) or k != "params"}
    row = {
        "task": task.TASK,
        "corpus": corpus,
        "beam_sizes": ",".join(map(str, beams)),
        **_flatten_result(result),
    }
    if isinstance(row_in.get("params"), int):
        row.setdefault("params", row_in["params"])
    if row_in.get("mlflow_run_id"):
        row["mlflow_run_id"] = row_in["mlflow_run_id"]
    beam_rows += [{"task": task.TASK, **r} for r in _beam_rows(result, name)]
    ckpt = model_dir / "model.ckpt" if (model_dir / "model.ckpt").exists() else model_dir
    return {
        "task": task.TASK,
        "key": (name,),
        "name": name,
        "row": row,
        "checkpoint": ckpt,
        "corpus": corpus,
        "default_corpus": task.CORPUS,  # the built-in one keeps the short registered name
        "model": name,
        "result": result,
        "training_row": row_in,
    }


def _lm_sample(entry: dict, cfg: EvaluateConfig, seed: int) -> str:
    from rnnlab.generate import sample
    from rnnlab.tasks.lm import load

    prompt = cfg.sample_prompt.capitalize() if entry["char"] else cfg.sample_prompt
    text = sample(load(entry["checkpoint"]), prompt, cfg.sample_tokens, 1.0, seed)
    return prompt + ("" if entry["char"] else " ") + text


def register_models(entries: list[dict], eval_run_id: str, tracking_uri: str) -> dict[str, str]:
    """Log and register every scored model (``rnnlab.serving.log_and_register``), then point each
    registered name's alias ``champion`` at its best version of this evaluation by the training
    rows' validation numbers (``rnnlab.serving.CHAMPION_CRITERIA``). Returns ``{run: "name/version"}``
    and records it in each entry's row as ``registered_model``."""
    from mlflow.tracking import MlflowClient

    from rnnlab.serving import log_and_register, registered_name, set_champion

    registered: dict[str, str] = {}
    candidates: dict[str, tuple[str, dict[str, dict]]] = {}  # name -> (task, {version: training row})
    for e in entries:
        name = registered_name(e["task"], e["corpus"], e["model"], e.get("default_corpus"))
        config = {"char_level": e.get("char", False)} if e["task"] == "lm" else {}
        info = log_and_register(
            e["task"],
            e["checkpoint"],
            name,
            eval_run_id,
            tracking_uri,
            model_config=config,
            training_run_id=e["row"].get("mlflow_run_id"),
            run_name=e["name"],
        )
        registered[e["name"]] = f"{name}/{info['version']}"
        e["row"]["registered_model"] = registered[e["name"]]
        candidates.setdefault(name, (e["task"], {}))[1][str(info["version"])] = e.get("training_row", {})
    client = MlflowClient(tracking_uri)
    for name, (task, versions) in candidates.items():
        set_champion(client, name, task, versions)
    return registered


def evaluate_stage(
    params: dict,
    paths: StagePaths,
    models_dir: Path,
    metrics_dir: Path,
    metrics_path: Path,
    reports_dir: Path = Path("data/reports"),
    plots_dir: Path = Path("data/plots/evaluate"),
    extra_png_dirs: tuple[Path, ...] = (Path("data/study"),),
) -> dict:
    """Score, write ``metrics_path`` (the table), ``plots_dir`` (plot data), ``reports_dir``; returns the table."""
    from rnnlab.tracking import default_tracking_uri, tracked_run

    cfg = parse_evaluate_config(params)
    seed = get_seed(params)
    skipped: dict[str, str] = {}
    beam_rows: list[dict] = []
    entries = _score_language_models(params, cfg, paths, models_dir, metrics_dir, skipped)
    entries += _score_decoders(
        "train_seq2seq",
        params,
        cfg.seq2seq_beam_sizes,
        paths,
        models_dir,
        metrics_dir,
        skipped,
        beam_rows,
        cfg.limit_test,
    )
    entries += _score_decoders(
        "train_captioner",
        params,
        cfg.caption_beam_sizes,
        paths,
        models_dir,
        metrics_dir,
        skipped,
        beam_rows,
        cfg.limit_test,
    )
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

    models = [e for e in entries if not e.get("eval_set")]  # extra evaluation sets are score rows only
    lm_rows = [{"model": e["name"], "ppl": e["row"][f"{e['row']['split']}_ppl"]} for e in models if e["task"] == "lm"]
    write_json(plots_dir / "lm_ppl.json", lm_rows)
    # One key set for every row: DVC cannot render a plot file whose rows have different keys
    # (translation has chrF, captioning BLEU-1..4; those stay in evaluate.json).
    write_json(
        plots_dir / "bleu_vs_beam.json",
        [{k: r.get(k) for k in ("task", "run", "beam", "sacrebleu")} for r in beam_rows],
    )
    samples = {e["name"]: s for e in models if e["task"] == "lm" for s in [_lm_sample(e, cfg, seed)] if s}

    eval_run_id = None
    registered: dict[str, str] = {}
    scored = {f"scored.{e['name']}": e["row"]["mlflow_run_id"] for e in entries if e["row"].get("mlflow_run_id")}
    data_deps = (
        sorted(p for s in TASK_MODULES for p in (metrics_dir / s).glob("*.json")) if metrics_dir.is_dir() else []
    )
    with tracked_run(
        run_name="evaluate",
        stage="evaluate",
        experiment=cfg.experiment,
        enabled=tracking_enabled(params),
        params=asdict(cfg),
        data_deps=data_deps,
        dataset_context=None,  # its deps are the training metrics rows, not data
        tags={"task": "evaluate", **{f"skipped.{k}": v for k, v in skipped.items()}},
    ) as tracker:
        eval_run_id = tracker.run_id
        for e in entries:
            prefix = ".".join([e["task"], *e["key"]])
            tracker.log_metrics(
                {
                    f"{prefix}.{k}": v
                    for k, v in e["row"].items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )
        tracker.set_tags(scored)
        if eval_run_id and cfg.register_models:
            # pyfunc models need the fluent API on a finished flush: log them after the queue is sent
            tracker.flush(force=True)
            registered = register_models(models, eval_run_id, default_tracking_uri())
    report = write_report(
        reports_dir, entries, skipped, samples, eval_run_id, registered, models_dir, list(extra_png_dirs)
    )
    if eval_run_id:
        import mlflow

        mlflow.set_tracking_uri(default_tracking_uri())
        mlflow.MlflowClient().log_artifacts(eval_run_id, str(report.parent), "report")
        mlflow.MlflowClient().log_dict(eval_run_id, table, "evaluate.json")
    write_json(metrics_path, table)
    log.info("evaluate: %d models scored, report %s", len(entries), report)
    return table
