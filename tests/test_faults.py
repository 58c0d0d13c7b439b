"""Faults tried on purpose (README "Reliability" table): NaN loss, a full disk, two ``dvc repro`` at
once, an MLflow server unreachable at start or going away mid-run, and the security rules
(``weights_only`` loads, services on 127.0.0.1, no absolute paths in logged params).
Download, bad-input and params faults are tested in test_download.py, test_data_validation.py
and test_config.py; a test here checks the README table points at tests that exist."""

from __future__ import annotations

import ast
import errno
import io
import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pause import pause_env, wait_for_marker
from pipeline_repo import REPO, RUN_DIR, prepared_copy, run, start

from rnnlab.errors import RnnlabError, TrainingError
from rnnlab.io import OutputWriteError, copy_file, write_json, write_npy
from rnnlab.resume import AtomicCheckpointIO, ResumeDir
from rnnlab.tracking import MlflowTracker, scrub, tracked_run

TINY = dict(
    model="lstm",
    embedding_size=32,
    hidden_size=32,
    num_layers=1,
    dropout=0.0,
    batch_size=16,
    bptt=20,
    lr=20.0,
    train_fraction=0.05,
    limit_train_batches=30,
)


# -- NaN loss --------------------------------------------------------------------------------------
def test_nan_loss_stops_training_and_marks_the_run_failed(prepared_ptb, tmp_path, monkeypatch):
    from lm_helpers import lm_params
    from mlflow.tracking import MlflowClient

    from rnnlab.models.lm import RecurrentLanguageModel
    from rnnlab.stages.train import train_stage
    from rnnlab.tasks.base import StagePaths

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store: ./mlflow.db
    calls = {"n": 0}
    forward = RecurrentLanguageModel.forward

    def diverging(self, tokens, state=None):
        logits, state = forward(self, tokens, state)
        calls["n"] += 1
        return (logits * float("nan") if calls["n"] >= 7 else logits), state

    monkeypatch.setattr(RecurrentLanguageModel, "forward", diverging)
    params = lm_params({"tiny": {"corpus": "ptb", **TINY}}, seed=7, trainer={"checkpoint_every_n_steps": 2})
    params["tracking"] = {"enabled": True}
    params["train_lm"]["experiment"] = "faults"
    with pytest.raises(TrainingError, match=r"train loss is nan at step 6 \(epoch 0\)"):
        train_stage(
            params,
            "train_lm",
            "tiny",
            StagePaths(prepared=prepared_ptb.parent),
            tmp_path / "out",
            tmp_path / "tiny.json",
            tmp_path / "tiny-plot.json",
            tmp_path / "checkpoints",
        )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (failed,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert failed.info.status == "FAILED"
    assert "TrainingError: train loss is nan at step 6" in failed.data.tags["rnnlab.error"]
    # The last good checkpoint (step 6: the loss check runs before any NaN reaches the weights) stays.
    resume = ResumeDir(
        tmp_path / "checkpoints" / "train_lm" / "tiny",
        json.loads((tmp_path / "checkpoints/train_lm/tiny/state.json").read_text())["identity"],
    )
    assert resume.latest_checkpoint() == resume.step_path(6)
    weights = torch.load(resume.step_path(6), weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "out" / "tiny" / "model.ckpt").exists() and not (tmp_path / "tiny.json").exists()
    # No absolute path of the machine in what was logged.
    assert sorted(k for k in failed.data.tags if k.startswith("data_md5.")) == [
        "data_md5.ext/ptb/train.npy",
        "data_md5.ext/ptb/valid.npy",
        "data_md5.ext/ptb/vocab.json",
    ]
    assert not [v for v in failed.data.params.values() if v.startswith("/")]
    assert failed.data.tags["dvc_stage"] == "train_lm@tiny"


# -- disk full -------------------------------------------------------------------------------------
class FullDisk(io.BytesIO):
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            super().write(bytes(data)[: max(self.room - self.tell(), 0)])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


@pytest.fixture
def full_disk(monkeypatch):
    import rnnlab.io

    real_open = rnnlab.io.open_output
    state = {"room": 64, "files": []}

    def open_output(path):
        real_open(path).close()  # the temp file exists on disk, as with a real full disk
        state["files"].append(path)
        return FullDisk(state["room"])

    monkeypatch.setattr(rnnlab.io, "open_output", open_output)
    return state


def test_disk_full_leaves_no_half_written_output(tmp_path, full_disk):
    target = tmp_path / "metrics" / "train_lm.json"
    with pytest.raises(
        OutputWriteError,
        match=r"train_lm.json: could not write \(no space left on device\); "
        r"nothing was written at this path",
    ):
        write_json(target, {"ptb": {"lstm": {"val_ppl": 1.0, "pad": "x" * 500}}})
    assert not target.exists()
    old = tmp_path / "prepared" / "train.npy"
    old.parent.mkdir()
    np.save(old, np.arange(5, dtype=np.int32))
    with pytest.raises(OutputWriteError, match="no space left on device"):
        write_npy(old, np.arange(1000, dtype=np.int32))
    assert np.load(old).tolist() == [0, 1, 2, 3, 4]  # the previous version is untouched
    src = tmp_path / "best.ckpt"
    src.write_bytes(b"c" * 1000)
    with pytest.raises(OutputWriteError):
        copy_file(src, tmp_path / "models" / "model.ckpt")
    assert not (tmp_path / "models" / "model.ckpt").exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [] and len(full_disk["files"]) == 3


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import rnnlab.io

    resume = ResumeDir(tmp_path / "run", {"config": 1})
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, resume.step_path(4))
    monkeypatch.setattr(rnnlab.io, "open_output", lambda path: FullDisk(100))
    with pytest.raises(OutputWriteError, match=r"step-000000008.ckpt: could not write \(no space left on device\)"):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}}, resume.step_path(8))
    assert [p.name for p in resume.checkpoints()] == ["step-000000004.ckpt"]
    assert resume.latest_checkpoint() == resume.step_path(4)
    assert torch.equal(io_plugin.load_checkpoint(resume.step_path(4))["state_dict"]["w"], torch.ones(3))
    assert not list(resume.path.glob(".*.tmp"))


# -- two dvc repro at once -------------------------------------------------------------------------
@pytest.mark.slow
def test_second_dvc_repro_fails_clearly_on_the_lock_and_corrupts_nothing(tmp_path):
    repo = prepared_copy(tmp_path / "repo")
    run(["dvc", "repro", "prepare"], repo)  # the profile is a dep of every stage: bring them up to date first
    lock_before = (repo / "dvc.lock").read_text()
    # The first repro pauses in training (step 2) until the end of the test: no race with a fast machine.
    first = start(["dvc", "repro", "train_lm@ptb-lstm"], repo, **pause_env(2, tmp_path / "pause"))
    assert wait_for_marker(tmp_path / "pause", process=first)["step"] == 2
    second = run(["dvc", "repro"], repo, check=False)
    assert second.returncode != 0
    assert re.search(r"is busy, it is being blocked by:\s+\(PID \d+\): .*dvc repro train_lm@ptb-lstm", second.stderr), (
        second.stderr
    )
    assert first.poll() is None  # the first one was left alone ...
    os.killpg(first.pid, signal.SIGINT)  # ... until stopped the way a user would (the pause ends on it)
    out, err = first.communicate(timeout=300)
    assert "training stopped by SIGINT" in err, err[-3000:]
    # Nothing corrupted: dvc.lock as before, DVC's locks released, the stage's checkpoint readable.
    assert (repo / "dvc.lock").read_text() == lock_before
    rwlock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
    assert not rwlock.get("read") and not rwlock.get("write")
    resume = ResumeDir(repo / RUN_DIR, json.loads((repo / RUN_DIR / "state.json").read_text())["identity"])
    assert resume.latest_checkpoint() is not None
    status = run(["dvc", "status", "train_lm@ptb-lstm"], repo).stdout
    assert re.findall(r"^([\w@-]+):", status, re.M) == ["train_lm@ptb-lstm"]  # only the interrupted stage


# -- MLflow tracking server unreachable / going away -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_at_start_is_a_clear_error(tmp_path, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(RnnlabError) as info:
        with tracked_run("train_lm/x", "train_lm", root=tmp_path):
            pytest.fail("the run must not start")
    message = str(info.value)
    assert time.monotonic() - started < 15
    assert f"MLflow tracking server http://***@127.0.0.1:{port} is unreachable" in message
    assert "s3cret" not in message and "MLFLOW_TRACKING_URI" in message and "tracking.enabled: false" in message


class FlakyClient:
    """Stands in for MlflowClient: fails like a dead server while ``down``."""

    def __init__(self):
        self.down = False
        self.metrics: list[tuple[str, int]] = []
        self.tags: dict[str, str] = {}
        self.status = None

    def _check(self):
        if self.down:
            raise ConnectionError("HTTPConnectionPool(host='127.0.0.1'): Max retries exceeded (Connection refused)")

    def log_batch(self, run_id, metrics=(), params=()):
        self._check()
        if any(p.key == "bad" for p in params):
            raise ValueError("INVALID_PARAMETER_VALUE: Changing param values is not allowed")
        self.metrics += [(m.key, m.step) for m in metrics]

    def set_tag(self, run_id, key, value):
        self._check()
        self.tags[key] = value

    def set_terminated(self, run_id, status):
        self._check()
        self.status = status


def test_run_ending_during_an_outage_arrives_when_the_server_is_back(caplog, monkeypatch):
    """close() keeps retrying for RNNLAB_MLFLOW_CLOSE_WAIT_S: a server restarting while the run
    ends gets the tail and the FINISHED status. Synchronised on the tracker's own waiting message."""
    import threading

    monkeypatch.setenv("RNNLAB_MLFLOW_CLOSE_WAIT_S", "30")
    client = FlakyClient()
    tracker = MlflowTracker(client, "run1", "http://127.0.0.1:5000", retry_interval_s=0.0)
    client.down = True
    tracker.log_metrics({"val/ppl": 700.0}, step=3)
    waiting = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "retrying for up to" in record.getMessage():
                waiting.set()

    handler = Watch()
    logging.getLogger("rnnlab.tracking").addHandler(handler)
    try:

        def back_up():
            assert waiting.wait(20)
            client.down = False

        thread = threading.Thread(target=back_up)
        thread.start()
        tracker.close("FINISHED")
        thread.join()
    finally:
        logging.getLogger("rnnlab.tracking").removeHandler(handler)
    assert client.status == "FINISHED" and client.metrics == [("val/ppl", 3)] and tracker.queued_calls == 0


def test_tracker_queues_while_the_server_is_away_and_resends_in_order(caplog, monkeypatch):
    monkeypatch.setenv("RNNLAB_MLFLOW_CLOSE_WAIT_S", "0")  # a server that never comes back: report at once
    client = FlakyClient()
    tracker = MlflowTracker(client, "run1", "http://127.0.0.1:5000", retry_interval_s=0.0)
    tracker.log_metrics({"val/ppl": 900.0}, step=1)
    client.down = True
    with caplog.at_level(logging.WARNING, logger="rnnlab.tracking"):
        tracker.log_metrics({"val/ppl": 800.0}, step=2)
        tracker.set_tags({"epoch": "2"})
        tracker.log_metrics({"val/ppl": 700.0, "lr": 5.0}, step=3)
    assert client.metrics == [("val/ppl", 1)]
    assert (tracker.queued_calls, tracker.queued_metrics) == (3, 3)
    assert caplog.text.count("is unreachable") == 1 and "training continues" in caplog.text
    client.down = False
    tracker.log_params({"bad": 1})  # rejected by MLflow: dropped and counted, the rest still goes out
    tracker.log_metrics({"val/ppl": 600.0}, step=4)
    assert client.metrics == [("val/ppl", 1), ("val/ppl", 2), ("val/ppl", 3), ("lr", 3), ("val/ppl", 4)]
    assert client.tags == {"epoch": "2"} and tracker.rejected_calls == 1 and tracker.queued_calls == 0
    client.down = True
    tracker.log_metrics({"val/ppl": 500.0}, step=5)
    with caplog.at_level(logging.WARNING, logger="rnnlab.tracking"):
        tracker.close("FINISHED")
    assert client.status is None and tracker.outages == 2
    assert "1 calls (1 metric points) not recorded" in caplog.text and "DVC outputs are complete" in caplog.text


def test_scrub_keeps_paths_inside_the_repo_relative_and_reduces_others(tmp_path):
    params = {
        "out": str(tmp_path / "data" / "models"),
        "ext": "/home/someone/corpora/ptb",
        "n": 3,
        "list": [str(tmp_path / "a.txt"), "relative/b.txt"],
    }
    assert scrub(params, tmp_path) == {
        "out": "data/models",
        "ext": "<abs>/ptb",
        "n": 3,
        "list": ["a.txt", "relative/b.txt"],
    }


# -- security --------------------------------------------------------------------------------------
def _python_files() -> list[Path]:
    return [p for folder in ("src", "pipeline", "benchmarks") for p in (REPO / folder).rglob("*.py")]


def test_every_checkpoint_load_is_weights_only():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            func = node.func
            is_torch_load = func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch"
            if not (is_torch_load or func.attr == "load_from_checkpoint"):
                continue
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], f"checkpoint loads without weights_only=True: {offenders}"


def test_services_bind_localhost_only():
    texts = {
        p: p.read_text(encoding="utf-8")
        for p in [
            REPO / "Makefile",
            REPO / "README.md",
            *_python_files(),
            *(REPO / "tests").glob("*.py"),
            *(REPO / "scripts").glob("*"),
        ]
    }
    commands = [
        (p, line)
        for p, text in texts.items()
        for line in text.splitlines()
        if re.search(r"mlflow[\"',\s]+(ui|server)\b", line) and "--host" in line
    ]
    assert commands, "expected the mlflow ui/server command lines"
    for path, line in commands:
        assert re.search(r"--host[\"',\s=]+127\.0\.0\.1", line), f"{path.name}: {line.strip()}"
    wildcard = "0.0." + "0.0"
    assert not [p.name for p, text in texts.items() if wildcard in text]


def test_readme_reliability_table_points_at_existing_tests():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", section)
    assert len(refs) >= 15
    missing = [
        f"{f}::{t}"
        for f, t in refs
        if not re.search(rf"^def {t}\(", (REPO / "tests" / f).read_text(encoding="utf-8"), re.M)
    ]
    assert missing == []


def test_experiment_created_by_a_parallel_worker_is_reused(tmp_path):
    """Two DVC queue workers starting at once both try to create the MLflow experiment: the loser
    takes the winner's id instead of failing the stage (seen in tests/test_exp_queue.py)."""
    from rnnlab.tracking import _get_experiment_id

    class Racing:
        def __init__(self):
            self.calls = 0

        def get_experiment_by_name(self, name):
            self.calls += 1
            return None if self.calls == 1 else type("E", (), {"experiment_id": "42"})()

        def create_experiment(self, name, artifact_location=None):
            raise RuntimeError("RESOURCE_ALREADY_EXISTS: Experiment(name=rnnlab-lm) already exists.")

    assert _get_experiment_id(Racing(), "rnnlab-lm", tmp_path) == "42"
