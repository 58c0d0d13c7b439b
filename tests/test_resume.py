"""Resume after a kill, on the real pipeline: ``dvc repro`` of train_lm (tiny profile, real PTB) is
killed with SIGKILL at a random step, its newest checkpoint is truncated, the rerun (after DVC
deleted the stage outputs) is stopped with SIGINT, and the third run finishes. Both signals hit a
trainer paused at a known step (``RNNLAB_PAUSE_AT_STEP``, tests/pause.py), never a timed guess. Its metrics and
weights must equal, exactly, those of a run that was never interrupted, and all three segments
must be one MLflow run. Plus unit tests of the pieces (checkpoint files, loader position)."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from pause import pause_env, random_step, save_steps, wait_for_marker
from pipeline_repo import RUN_DIR, edit_profile, prepared_copy, run, start, step_checkpoints, train_cmd

from rnnlab.resume import AtomicCheckpointIO, ResumableLoader, ResumeDir

EXACT_KEYS = ["val_loss", "val_ppl", "test_loss", "test_ppl", "epochs", "params"]
STEPS = 40  # tiny profile: 2 epochs x 20 windows, a checkpoint every 4 steps
STAGE = "train_lm@ptb-lstm"  # run alone (--single-item): the profile edit below must not rerun prepare


def _mlflow(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    return client, client.get_experiment_by_name("rnnlab-lm").experiment_id


def _state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = prepared_copy(tmp_path_factory.mktemp("resume") / "repo")
    edit_profile(repo, {"train_lm": {"runs": {"ptb-lstm": {"max_epochs": 2}}}})  # resume across an epoch end
    return repo


@pytest.mark.slow
def test_kill_truncate_interrupt_resume_equals_uninterrupted(repo, tmp_path):
    # 1. The reference: the same stage, never interrupted (its resume folder is deleted at the end).
    run(train_cmd(tmp_path / "ref"), repo)
    assert not (repo / RUN_DIR).exists()
    reference = json.loads((tmp_path / "ref" / "ptb-lstm.json").read_text())
    assert reference["epochs"] == 2  # the history covers every epoch, not just up to the best one

    # 2. dvc repro, SIGKILL of the training process once its first checkpoint at or after a random
    # step is on disk: the trainer pauses right after that save (no race with a fast machine).
    # RNNLAB_KILL_AFTER pins the step (22 once exposed a resume-from-epoch-end bug).
    kill_after = random_step(list(range(8, STEPS - 16)))
    saved = next(s for s in save_steps(4, STEPS // 2, 2) if s >= kill_after)
    repro = start(["dvc", "repro", "--single-item", STAGE], repo, **pause_env(saved + 1, tmp_path / "pause-kill"))
    marker = wait_for_marker(tmp_path / "pause-kill", process=repro)
    os.kill(marker["pid"], signal.SIGKILL)  # the marker's pid is the train_lm process, not dvc
    out, err = repro.communicate(timeout=120)
    assert repro.returncode != 0, out + err
    steps = step_checkpoints(repo)
    assert steps == [saved - 4, saved]  # the newest two are kept
    state = json.loads((repo / RUN_DIR / "state.json").read_text())
    client, exp = _mlflow(repo)
    killed_run = client.get_run(state["mlflow_run_id"])
    assert killed_run.info.status == "RUNNING"  # SIGKILL: nobody could close it

    # 3. The newest checkpoint is truncated (disk trouble): the rerun must fall back to the previous one.
    newest = repo / RUN_DIR / f"step-{steps[-1]:09d}.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (repo / "data/models/lm/ptb-lstm").mkdir(parents=True, exist_ok=True)
    (repo / "data/models/lm/ptb-lstm/marker").write_text("DVC deletes the outputs before a rerun")

    # 4. The rerun resumes and is stopped with Ctrl-C (SIGINT to the stage, as a terminal would) while
    # paused two steps after the newest checkpoint: it saves that step and stops.
    interrupt_at = saved + 2
    repro = start(["dvc", "repro", "--single-item", STAGE], repo, **pause_env(interrupt_at, tmp_path / "pause-int"))
    assert wait_for_marker(tmp_path / "pause-int", process=repro)["step"] == interrupt_at
    assert not (repo / "data/models/lm/ptb-lstm/marker").exists()
    os.killpg(repro.pid, signal.SIGINT)
    out, err = repro.communicate(timeout=120)
    assert repro.returncode != 0
    assert "training stopped by SIGINT" in err and "run the stage again" in err, err[-3000:]
    assert f"Restoring states from the checkpoint path at {RUN_DIR}/step-{steps[0]:09d}.ckpt" in out + err
    assert "skipping a damaged checkpoint" in err
    assert step_checkpoints(repo)[-1] == interrupt_at  # the interrupt checkpoint, at the step it stopped
    interrupted = client.get_run(state["mlflow_run_id"])
    assert interrupted.info.status == "KILLED"
    assert "TrainingInterrupted" in interrupted.data.tags["rnnlab.error"]

    # 5. The third run finishes: same metrics and weights as the uninterrupted run, one MLflow run.
    final = run(["dvc", "repro", "--single-item", STAGE], repo)
    assert "Restoring states from the checkpoint path" in final.stdout + final.stderr
    resumed = json.loads((repo / "data/metrics/train_lm/ptb-lstm.json").read_text())
    assert {k: resumed[k] for k in EXACT_KEYS} == {k: reference[k] for k in EXACT_KEYS}
    ref_weights = _state_dict(tmp_path / "ref/models/ptb-lstm/model.ckpt")
    weights = _state_dict(repo / "data/models/lm/ptb-lstm/model.ckpt")
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    history = json.loads((repo / "data/models/lm/ptb-lstm/history.json").read_text())
    ref_history = json.loads((tmp_path / "ref/models/ptb-lstm/history.json").read_text())
    assert [h["val/loss"] for h in history] == [h["val/loss"] for h in ref_history]
    assert [h["train/loss_epoch"] for h in history] == [h["train/loss_epoch"] for h in ref_history]
    assert resumed["mlflow_run_id"] == state["mlflow_run_id"]
    finished = client.get_run(state["mlflow_run_id"])
    assert finished.info.status == "FINISHED" and finished.data.tags["rnnlab.resumes"] == "2"
    assert finished.data.metrics["final/val_ppl"] == pytest.approx(resumed["val_ppl"])
    assert len(client.search_runs([exp])) == 2  # the reference and this one: no orphan runs
    assert not (repo / RUN_DIR).exists()  # deleted once the outputs were written


# -- the pieces -----------------------------------------------------------------------------------
def _save(io: AtomicCheckpointIO, path: Path, value: int) -> None:
    io.save_checkpoint({"state_dict": {"w": torch.full((64,), float(value))}, "step": value}, path)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    resume = ResumeDir(tmp_path / "run", {"config": 1})
    io = AtomicCheckpointIO()
    for step in (4, 8, 12):
        _save(io, resume.step_path(step), step)
    resume.prune()
    assert [p.name for p in resume.checkpoints()] == ["step-000000008.ckpt", "step-000000012.ckpt"]
    newest = resume.step_path(12)
    newest.write_bytes(newest.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="rnnlab.resume"):
        assert resume.latest_checkpoint() == resume.step_path(8)
    assert "step-000000012.ckpt: not a readable checkpoint" in caplog.text


def test_checkpoint_of_another_config_is_discarded_not_resumed(tmp_path, caplog):
    first = ResumeDir(tmp_path / "run", {"hidden_size": 32})
    first.record_run_id("abc123")
    _save(AtomicCheckpointIO(), first.step_path(4), 4)
    same = ResumeDir(tmp_path / "run", {"hidden_size": 32})
    assert same.latest_checkpoint() == first.step_path(4) and same.mlflow_run_id == "abc123"
    with caplog.at_level(logging.WARNING, logger="rnnlab.resume"):
        changed = ResumeDir(tmp_path / "run", {"hidden_size": 64})
    assert "discarding the previous checkpoints because its config or data changed" in caplog.text
    assert changed.latest_checkpoint() is None and changed.mlflow_run_id is None
    assert not first.step_path(4).exists()


def test_loader_resumes_mid_pass_then_starts_the_next_pass_from_the_top():
    loader = ResumableLoader(list(range(10)))
    it = iter(loader)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    saved = loader.state_dict()
    restored = ResumableLoader(list(range(10)))
    restored.load_state_dict(saved)
    assert list(restored) == [4, 5, 6, 7, 8, 9]
    assert list(restored) == list(range(10))


def test_shuffled_loader_resumes_the_same_order_mid_pass():
    """A shuffling DataLoader (captioning) draws its order from the torch RNG at the start of a pass:
    a loader restored mid-pass in a fresh process serves the rest of that same order."""
    from torch.utils.data import DataLoader

    def make():
        return ResumableLoader(DataLoader(list(range(20)), batch_size=2, shuffle=True))

    torch.manual_seed(3)
    uninterrupted = make()
    first_pass = [b.tolist() for b in uninterrupted]
    second_pass = [b.tolist() for b in uninterrupted]
    assert sorted(x for b in first_pass for x in b) == list(range(20)) and first_pass != second_pass

    torch.manual_seed(3)
    killed = make()
    it = iter(killed)
    [next(it) for _ in range(3)]
    saved = killed.state_dict()
    torch.manual_seed(999)  # the new process starts from another RNG state
    resumed = make()
    resumed.load_state_dict(saved)
    assert [b.tolist() for b in resumed] == first_pass[3:]


def test_bucket_sampler_order_follows_the_pass_index():
    """Translation: the bucket sampler's order is a function of the pass (seed + epoch), restored on resume."""
    import numpy as np

    from rnnlab.data.parallel import BucketBatchSampler

    lengths = np.arange(40) % 7 + 1
    sampler = BucketBatchSampler(lengths, batch_size=4, shuffle=True, seed=5)
    passes = [list(sampler) for _ in range(2)]
    resumed = BucketBatchSampler(lengths, batch_size=4, shuffle=True, seed=5)
    resumed.set_epoch(1)
    assert list(resumed) == passes[1] and passes[0] != passes[1]
