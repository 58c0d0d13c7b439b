"""Stage ``study``: the long-term-dependency study (gradient flow, long-lag recall, clipping); see
:mod:`rnnlab.study.stage` for the experiments and README "Long-term dependencies"."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rnnlab.config import section
from rnnlab.stages.common import get_seed, tracking_enabled
from rnnlab.study.stage import parse_study_config, run_study


def study_stage(params: dict, prepared_dir: Path, plots_dir: Path, pictures_dir: Path, metrics_path: Path) -> dict:
    """The ``study`` DVC stage body: parse params ``study``, run, track in one MLflow run."""
    from rnnlab.tracking import tracked_run

    cfg = parse_study_config(section(params, "study"))
    seed = get_seed(params)
    with tracked_run(
        run_name="study",
        stage="study",
        experiment=cfg.experiment,
        enabled=tracking_enabled(params),
        params={"seed": seed, **asdict(cfg)},
        data_deps=[prepared_dir / cfg.corpus / f for f in ("train.npy", "valid.npy")],
        tags={"task": "study"},
    ) as tracker:
        return run_study(cfg, seed, prepared_dir, plots_dir, pictures_dir, metrics_path, tracker)
