"""The one stage loop of the three training stages (``train_lm``, ``train_seq2seq``,
``train_captioner``): DVC runs it once per run (``train_lm@ptb-lstm``, a ``foreach`` stage), so
changing one run's params retrains that run only.

For run ``R`` of section ``S`` (params ``S.runs.R`` over ``S.defaults``; ``trainer`` over ``S.trainer``):

1. parse and check the run (:func:`task.parse_run`) before anything is trained;
2. open the resume folder ``data/checkpoints/S/R`` (fingerprint: the run's config, the trainer
   layout, the seed and the md5 of its data files) and the MLflow run, continuing the one a killed
   process left (one MLflow run per row, never an orphan);
3. ``task.train(run, ctx)``: the task's LightningModule through :func:`rnnlab.training.fit`;
4. write ``data/models/<task>/R/`` (the model folder), ``data/metrics/S/R.json`` (the row, also
   logged to MLflow as ``final/*``), ``data/plots/S/R.json``; delete the resume folder.

Only global rank 0 tracks and writes (a DDP run starts one process per device).
A run with ``enabled: false`` (a profile leaving it out) writes a row saying so and no model.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import shutil
import time
from pathlib import Path

from rnnlab.distributed import global_rank, seed_everything
from rnnlab.io import write_json
from rnnlab.resume import ResumeDir
from rnnlab.stages.common import get_seed, tracking_enabled, training_section
from rnnlab.tasks.base import RunContext, StagePaths

log = logging.getLogger(__name__)

TASK_MODULES = {
    "train_lm": "rnnlab.tasks.lm",
    "train_seq2seq": "rnnlab.tasks.translation",
    "train_captioner": "rnnlab.tasks.captioning",
}


def task_module(section: str):
    return importlib.import_module(TASK_MODULES[section])


def parse_runs(params: dict, section: str) -> dict:
    """Every run of a training section, parsed and checked: ``{name: RunConfig}``."""
    task = task_module(section)
    sec = training_section(params, section, task.EXPERIMENT)
    return {name: _parse_run(task, params, merged, where) for name, (where, merged) in sec.runs.items()}


def _parse_run(task, params: dict, merged: dict, where: str):
    """``task.parse_run``, then the task's check of the corpus the run names (params ``corpora``)."""
    run = task.parse_run(merged, where)
    check = getattr(task, "check_corpus", None)
    if check is not None and isinstance(params.get("corpora"), dict):
        check(run, params["corpora"], where)
    return run


def _finite(row: dict) -> dict:
    """NaN/inf are not JSON: null instead."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def train_stage(
    params: dict,
    section: str,
    run_name: str,
    paths: StagePaths,
    models_dir: Path,
    metrics_path: Path,
    plots_path: Path,
    checkpoints_root: Path = Path("data/checkpoints"),
) -> dict:
    """Train run ``run_name`` of ``section``; returns its metrics row."""
    from rnnlab.tracking import md5_path, tracked_run

    task = task_module(section)
    sec = training_section(params, section, task.EXPERIMENT)
    if run_name not in sec.runs:
        from rnnlab.errors import ConfigError

        raise ConfigError(f"{section}.runs.{run_name}: no such run; runs: {sorted(sec.runs)}")
    where, merged = sec.runs[run_name]
    run = _parse_run(task, params, merged, where)
    seed, writer = get_seed(params), global_rank() == 0
    out_dir = Path(models_dir) / run_name
    if writer:
        shutil.rmtree(out_dir, ignore_errors=True)  # no stale files from an earlier profile
        out_dir.mkdir(parents=True, exist_ok=True)
    if not getattr(run, "enabled", True):
        row = {"enabled": False, "reason": f"{where}.enabled is false (profile {params.get('profile', 'cpu')!r})"}
        log.warning("%s: %s", run_name, row["reason"])
        if writer:
            write_json(out_dir / "disabled.json", row)
            write_json(metrics_path, row)
            write_json(plots_path, [])
        return row

    data_files = task.data_files(run, paths)
    identity = {
        "stage": section,
        "run": dataclasses.asdict(run),
        "trainer": sec.trainer.resume_identity(),
        "seed": seed,
        "data": {p.as_posix(): md5_path(p) for p in data_files},
    }
    resume = ResumeDir(Path(checkpoints_root) / section / run_name, identity, enabled=sec.trainer.resume)
    started = time.perf_counter()
    with tracked_run(
        run_name=f"{section}/{run_name}",
        stage=f"{section}@{run_name}",
        experiment=sec.experiment,
        enabled=tracking_enabled(params),
        params={"seed": seed, "name": run_name, **dataclasses.asdict(run), "trainer": dataclasses.asdict(sec.trainer)},
        data_deps=data_files,
        tags={"task": task.TASK, **task.tags(run)},
        run_id=resume.mlflow_run_id,
    ) as tracker:
        resume.record_run_id(tracker.run_id)
        seed_everything(seed)
        ctx = RunContext(
            name=run_name,
            where=where,
            seed=seed,
            trainer=sec.trainer,
            paths=paths,
            out_dir=out_dir,
            resume=resume,
            tracker=tracker,
            writer=writer,
        )
        output = task.train(run, ctx)
        row = _finite(output.row)
        row["stage_wall_s"] = round(time.perf_counter() - started, 1)
        row["mlflow_run_id"] = tracker.run_id or resume.mlflow_run_id
        if writer:
            tracker.log_metrics(
                {f"final/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )
            tracker.set_tags({k: v for k, v in row.items() if k.endswith("_signature")})
            for path, folder in output.artifacts:
                tracker.log_artifact(path, folder)
            tracker.set_tags({"rnnlab.resumes": resume.state.get("resumes", 0)})
    if writer:
        write_json(metrics_path, row)
        write_json(plots_path, output.plot_rows)
        resume.clear()
        log.info("%s@%s: %s", section, run_name, {k: v for k, v in row.items() if not k.endswith("_signature")})
    return row


def main(section: str, description: str | None = None, argv: list[str] | None = None) -> dict:
    """The command line of ``pipeline/<section>.py`` (paths from dvc.yaml, the run from ``--run``)."""
    import argparse

    from rnnlab.config import load_params

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--run", required=True, help=f"a run name of params {section}.runs")
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--features", type=Path, default=Path("data/features/flickr8k"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--models", type=Path, required=True, help="the task's model root (data/models/lm)")
    ap.add_argument("--metrics", type=Path, required=True, help="this run's metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="this run's plot data JSON")
    ap.add_argument(
        "--checkpoints",
        type=Path,
        default=Path("data/checkpoints"),
        help="root of the resume folders (outside every DVC output)",
    )
    args = ap.parse_args(argv)
    paths = StagePaths(prepared=args.prepared, features=args.features, raw=args.raw)
    return train_stage(
        load_params(args.params), section, args.run, paths, args.models, args.metrics, args.plots, args.checkpoints
    )
