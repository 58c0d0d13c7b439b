"""Params every stage reads besides its own section: ``seed``, ``tracking``, ``trainer``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rnnlab.config import merged_runs, parse_section, section
from rnnlab.errors import ConfigError
from rnnlab.training import TrainerConfig


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


@dataclass
class TrainingSection:
    """A training section of params: ``experiment``, ``trainer`` (over the top-level ``trainer``),
    ``defaults`` (keys every run shares) and ``runs`` (run name -> its keys over ``defaults``)."""

    name: str
    experiment: str
    trainer: TrainerConfig
    runs: dict[str, tuple[str, dict]]  # run name -> (params key, merged keys)


def training_section(params: dict, name: str, experiment: str) -> TrainingSection:
    data = section(params, name)
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - {"experiment", "trainer", "defaults", "runs"})
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]}: unknown key; valid keys: ['defaults', 'experiment', 'runs', 'trainer']"
        )
    shared = params.get("trainer", {}) or {}
    own = data.get("trainer", {}) or {}
    for where, block in (("trainer", shared), (f"{name}.trainer", own)):
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: expected a mapping, got {block!r}")
    trainer = parse_section(TrainerConfig, {**shared, **own}, f"{name}.trainer" if own else "trainer")
    experiment_name = data.get("experiment", experiment)
    if not isinstance(experiment_name, str) or not experiment_name:
        raise ConfigError(f"{name}.experiment: expected a non-empty string, got {experiment_name!r}")
    runs = {
        run: (where, merged)
        for where, run, merged in merged_runs(name, data.get("defaults", {}) or {}, data.get("runs"))
    }
    return TrainingSection(name=name, experiment=experiment_name, trainer=trainer, runs=runs)


def asdict_shallow(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
