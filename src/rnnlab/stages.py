"""The body of each DVC stage, as plain functions (``pipeline/<stage>.py`` only parses paths).

Each takes the loaded ``params.yaml`` dict and the paths ``dvc.yaml`` gives it, reads only its
own params section (+ ``seed`` and ``tracking``), and writes its outputs atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rnnlab.config import parse_section, section
from rnnlab.errors import ConfigError
from rnnlab.io import write_json

log = logging.getLogger(__name__)


@dataclass
class DownloadConfig:
    corpora: list[str]
    mirror: str | None = None
    retries: int = 3
    timeout_s: float = 60.0
    progress: bool = True

    def validate(self, where: str) -> None:
        from rnnlab.data.registry import get_corpus

        for i, name in enumerate(self.corpora):
            try:
                get_corpus(name)
            except ConfigError as exc:
                raise ConfigError(f"{where}.corpora[{i}]: {exc}") from None


@dataclass
class TrackingConfig:
    enabled: bool = True


def tracking_enabled(params: dict) -> bool:
    return parse_section(TrackingConfig, params.get("tracking", {}), "tracking").enabled


def get_seed(params: dict) -> int:
    seed = section(params, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    return seed


def download_stage(params: dict, raw_dir: Path, metrics_path: Path) -> dict:
    from rnnlab.data.download import fetch_corpus, resolve_mirror

    cfg = parse_section(DownloadConfig, section(params, "download"), "download")
    mirror = resolve_mirror(cfg.mirror)
    report = {}
    for name in cfg.corpora:
        r = fetch_corpus(name, raw_dir, mirror, cfg.retries, cfg.timeout_s, cfg.progress)
        log.info("%s: %d files from %s (%d fetched, %d already verified)", name, r.files, r.origin, r.fetched,
                 r.already_present)
        report[name] = {"files": r.files, "origin": r.origin}
    write_json(metrics_path, report)
    return report


def prepare_stage(params: dict, raw_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    # Imported here: pandera/pandas are data-stage needs; training stages must import without them.
    from rnnlab.data.prepare import parse_prepare_config, prepare_corpora

    cfg = parse_prepare_config(section(params, "prepare"))
    metrics = prepare_corpora(cfg, raw_dir, out_dir)
    write_json(metrics_path, metrics)
    return metrics


def train_lm_stage(params: dict, prepared_dir: Path, models_dir: Path, metrics_path: Path, plots_dir: Path,
                   checkpoints_dir: Path = Path("data/checkpoints/train_lm")) -> dict:
    """``checkpoints_dir``: resume checkpoints, outside the DVC outputs (README "Reliability")."""
    from rnnlab.lm_train import parse_train_lm_config, train_lm_runs

    cfg = parse_train_lm_config(section(params, "train_lm"))
    return train_lm_runs(cfg, get_seed(params), tracking_enabled(params), prepared_dir, models_dir, metrics_path,
                         plots_dir, checkpoints_dir)
