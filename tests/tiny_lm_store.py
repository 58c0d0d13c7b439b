"""One tiny trained PTB LSTM and a trigram + the evaluate stage, in a temp folder with its own sqlite MLflow store,
built once per test session and shared by tests/test_evaluate_stage.py, test_serving.py and
test_ui_browser.py (real train_lm and evaluate stage functions, real PTB prepared by the real code)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_PARAMS = {
    "seed": 7,
    "tracking": {"enabled": True},
    "trainer": {"progress_bar": False, "checkpoint_every_n_steps": 0, "resume": False},
    "train_lm": {
        "experiment": "rnnlab-lm",
        "defaults": {
            "embedding_size": 16,
            "hidden_size": 16,
            "num_layers": 1,
            "dropout": 0.0,
            "batch_size": 16,
            "eval_batch_size": 10,
            "bptt": 20,
            "train_fraction": 0.02,
            "limit_train_batches": 10,
        },
        "runs": {
            "ptb-lstm": {"corpus": "ptb", "model": "lstm"},
            "ptb-ngram": {"corpus": "ptb", "model": "ngram", "order": 3},
        },
    },
    # lm_batch_size / lm_bptt = the training run's eval_batch_size / bptt: evaluate must reproduce its test ppl
    "evaluate": {"experiment": "rnnlab-evaluate", "lm_batch_size": 10, "lm_bptt": 20, "sample_tokens": 12},
}


@dataclass
class Store:
    root: Path  # the working folder (data/..., mlflow.db, mlartifacts)
    uri: str  # its MLflow tracking URI
    params: dict
    table: dict  # evaluate.json


@contextlib.contextmanager
def chdir_env(path: Path, uri: str):
    old_cwd, old_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(path)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


@functools.cache
def tiny_store(prepared_root: Path) -> Store:
    from rnnlab.stages.evaluate import evaluate_stage
    from rnnlab.stages.train import train_stage
    from rnnlab.tasks.base import StagePaths

    root = Path(tempfile.mkdtemp(prefix="rnnlab-store-"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    paths = StagePaths(prepared=prepared_root)
    with chdir_env(root, uri):
        for name in TINY_PARAMS["train_lm"]["runs"]:
            train_stage(
                TINY_PARAMS,
                "train_lm",
                name,
                paths,
                Path("data/models/lm"),
                Path(f"data/metrics/train_lm/{name}.json"),
                Path(f"data/plots/train_lm/{name}.json"),
            )
        table = evaluate_stage(
            TINY_PARAMS,
            paths,
            Path("data/models"),
            Path("data/metrics"),
            Path("data/metrics/evaluate.json"),
            Path("data/reports"),
            Path("data/plots/evaluate"),
        )
    return Store(root, uri, TINY_PARAMS, table)


@pytest.fixture(scope="session")
def lm_store(prepared_ptb) -> Store:
    store = tiny_store(prepared_ptb.parent)
    yield store
    shutil.rmtree(store.root, ignore_errors=True)
