"""The one model resolver of every command line tool and of serving.

A model reference is a model folder (``data/models/lm/ptb-lstm``), a checkpoint file inside one
(``.../model.ckpt``, ``.../ngram.npz``) or an MLflow run id (32 hex digits): the ``model``
artifact folder of that training run, downloaded from the tracking store. :func:`load_model`
hands the resolved path to the task's own ``load`` (:mod:`rnnlab.tasks`).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from rnnlab.errors import RnnlabError

TASK_MODULES = {
    "lm": "rnnlab.tasks.lm",
    "translation": "rnnlab.tasks.translation",
    "captioning": "rnnlab.tasks.captioning",
}
DEFAULT_MODELS = {
    "lm": "data/models/lm/ptb-lstm",
    "translation": "data/models/seq2seq/multi30k-attention",
    "captioning": "data/models/captioner/flickr8k-soft_attention",
}
TRAIN_HINT = {
    "lm": "dvc repro train_lm@ptb-lstm",
    "translation": "dvc repro train_seq2seq@multi30k-attention",
    "captioning": "dvc repro train_captioner@flickr8k-soft_attention",
}


def resolve_model_path(ref: str | Path, artifact: str = "model") -> Path:
    """A local path as is; otherwise ``ref`` as an MLflow run id, its ``artifact`` folder downloaded."""
    path = Path(ref)
    if path.exists():
        return path
    text = str(ref)
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise RnnlabError(f"{text}: no such checkpoint file or model folder (nor an MLflow run id: 32 hex digits)")
    try:
        import mlflow
    except ImportError as exc:
        raise RnnlabError(f"{text}: no such file, and mlflow is not installed to look it up as a run id") from exc
    from rnnlab.tracking import default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=text, artifact_path=artifact))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown runs
        raise RnnlabError(f"{text}: not a file and not an MLflow run with artifact {artifact} ({exc})") from exc


def resolve_model(ref: str | Path | None, task: str) -> Path:
    """``ref`` (or the task's default model folder) resolved to a local path that exists."""
    if task not in TASK_MODULES:
        raise RnnlabError(f"unknown task {task!r}; expected one of {sorted(TASK_MODULES)}")
    if ref is None:
        default = Path(DEFAULT_MODELS[task])
        if not default.exists():
            raise RnnlabError(f"{default}: no trained model (train one with `{TRAIN_HINT[task]}`, or pass --run)")
        return default
    return resolve_model_path(ref)


def load_model(ref: str | Path | None, task: str):
    """The task's trained model for inference (what its ``load`` returns)."""
    path = resolve_model(ref, task)
    return importlib.import_module(TASK_MODULES[task]).load(path)
