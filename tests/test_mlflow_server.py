"""The pipeline against a real ``mlflow server`` on 127.0.0.1 (its own SQLite backend store and
artifact root, started and stopped here): runs, params, metrics and artifacts arrive through
the server; then the server is killed mid-run and training finishes anyway with complete outputs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from local_server import local_service
from pause import pause_env, release, wait_for_marker
from pipeline_repo import VENV_BIN, prepared_copy, run, start, step_checkpoints, train_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-server")
    cmd = [
        str(Path(VENV_BIN) / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{base / 'store.db'}",
        "--artifacts-destination",
        str(base / "artifacts"),
    ]
    with local_service(cmd, base / "server.log", "/health", cwd=base) as (uri, proc):
        yield {"uri": uri, "base": base, "proc": proc}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return prepared_copy(tmp_path_factory.mktemp("mlflow-repo") / "repo")


def test_pipeline_logs_runs_metrics_and_artifacts_through_the_server(server, repo):
    from mlflow.tracking import MlflowClient

    run(["dvc", "repro", "train_lm@ptb-lstm"], repo, MLFLOW_TRACKING_URI=server["uri"])
    row = json.loads((repo / "data/metrics/train_lm/ptb-lstm.json").read_text())
    client = MlflowClient(tracking_uri=server["uri"])
    (tracked,) = client.search_runs([client.get_experiment_by_name("rnnlab-lm").experiment_id])
    assert tracked.info.run_id == row["mlflow_run_id"] and tracked.info.status == "FINISHED"
    assert tracked.data.params["hidden_size"] == "32" and tracked.data.tags["dvc_stage"] == "train_lm@ptb-lstm"
    assert tracked.data.metrics["final/val_ppl"] == pytest.approx(row["val_ppl"])
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "val/ppl")] == [1]
    # Artifacts went through the server's artifact proxy into its own artifact root.
    assert tracked.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "model")} == {
        "model/model.ckpt",
        "model/vocab.json",
    }
    stored = list((server["base"] / "artifacts").rglob("model.ckpt"))
    assert len(stored) == 1 and stored[0].read_bytes() == (repo / "data/models/lm/ptb-lstm/model.ckpt").read_bytes()
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()  # nothing local


def test_server_going_down_mid_run_does_not_stop_training(server, repo, tmp_path):
    from mlflow.tracking import MlflowClient

    # The trainer pauses at step 5 (after its step-4 checkpoint) while the server is killed, so the
    # server dies mid-run however fast the machine is; then it is released.
    pause = tmp_path / "pause"
    training = start(
        train_cmd(tmp_path),
        repo,
        MLFLOW_TRACKING_URI=server["uri"],
        RNNLAB_MLFLOW_CLOSE_WAIT_S="2",
        **pause_env(5, pause),
    )
    wait_for_marker(pause, process=training)
    assert step_checkpoints(repo) == [4]
    os.killpg(server["proc"].pid, signal.SIGKILL)  # the server dies while the run is going on
    server["proc"].wait(timeout=30)
    release(pause)
    out, err = training.communicate(timeout=600)
    assert training.returncode == 0, err[-3000:]
    assert "is unreachable" in err and "training continues; tracking calls are queued" in err
    assert "unreachable at the end of run" in err and "The checkpoint and the DVC outputs are complete" in err
    # Outputs complete: the metrics table and a loadable model.
    row = json.loads((tmp_path / "ptb-lstm.json").read_text())
    model = torch.load(tmp_path / "models/ptb-lstm/model.ckpt", weights_only=True)
    assert model["hyper_parameters"]["model_name"] == "lstm"
    # The outage changed nothing in training: the same numbers as the stage run with the server up
    # (the first test: same params and seed, deterministic on CPU).
    with_server = json.loads((repo / "data/metrics/train_lm/ptb-lstm.json").read_text())
    assert {k: row[k] for k in ("val_ppl", "test_ppl", "params")} == {
        k: with_server[k] for k in ("val_ppl", "test_ppl", "params")
    }
    # What reached the server before it died is in its store; the run was never closed.
    store = MlflowClient(tracking_uri=f"sqlite:///{server['base'] / 'store.db'}")
    tracked = store.get_run(row["mlflow_run_id"])
    assert tracked.info.status == "RUNNING" and tracked.data.params["hidden_size"] == "32"
    assert "val/ppl" not in tracked.data.metrics  # logged after the server died: reported, not stored
