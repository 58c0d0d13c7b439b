"""What every task (language model, translation, captioning) provides to the one stage loop.

A task is a module of :mod:`rnnlab.tasks` with:

- ``SECTION`` (``train_lm``), ``EXPERIMENT`` (the default MLflow experiment), ``TASK`` (``lm``);
- ``RunConfig``: a dataclass holding every key a run may set and **the** default of each (the
  single place a default is written; ``params.yaml`` states the profile's values);
- ``parse_run(merged, where) -> RunConfig``: the run's keys (``defaults`` merged with the run),
  checked, errors naming ``where`` (``train_lm.runs.ptb-lstm.dropout``);
- ``data_files(run, paths) -> [Path]``: what the run reads (resume fingerprint, MLflow ``data_md5``);
- ``tags(run) -> dict``: MLflow tags;
- ``train(run, ctx: RunContext) -> TrainOutput``: build the LightningModule and DataModule, call
  :func:`rnnlab.training.fit`, score the best weights with the task's ``evaluate``, write the
  model folder ``ctx.out_dir``;
- ``score(folder, paths, beam_sizes) -> dict``: rescore a saved model folder (the evaluate stage);
- ``load(folder)``: the trained model, ready for inference (:mod:`rnnlab.inference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnlab.resume import ResumeDir
from rnnlab.training import TrainerConfig


@dataclass
class StagePaths:
    """The input folders ``dvc.yaml`` gives a training stage."""

    prepared: Path = Path("data/prepared")
    features: Path = Path("data/features/flickr8k")  # the feature cache folder
    raw: Path = Path("data/raw")


@dataclass
class RunContext:
    name: str  # the run's name (its key in <section>.runs, its folder, its DVC stage train_x@name)
    where: str  # the run's params key, for messages
    seed: int
    trainer: TrainerConfig
    paths: StagePaths
    out_dir: Path  # the model folder (a DVC output): written by global rank 0 only
    resume: ResumeDir
    tracker: Any  # rnnlab.tracking tracker (NullTracker when tracking is off)
    writer: bool  # global rank 0


@dataclass
class TrainOutput:
    row: dict  # the run's metrics (data/metrics/<section>/<run>.json)
    plot_rows: list[dict] = field(default_factory=list)  # data/plots/<section>/<run>.json
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)  # (file, MLflow folder)
