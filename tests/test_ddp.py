"""Data-parallel training on CPU: ``trainer.strategy: ddp`` with ``devices: 2`` (gloo) runs the real
train_lm stage script as two processes (Lightning's launcher), killed halfway and resumed. Each rank
trains on its own block of batch columns, only rank 0 tracks and writes, and the result matches
single-process training with the same global batch.

Tolerance: the ranks' gradients are averaged by a gloo all-reduce, which sums float32 values in
another order than one process reducing the whole batch, so the runs differ by rounding
(~1e-7 relative per step) that SGD at lr 20 amplifies step after step. Over the 20 steps here we
measured weights at most 7.5e-7 apart, the train loss 3e-8 relative apart and equal validation
and test losses (5 decimals); the test allows 1e-4 (weights), 1e-5 (train loss) and 2e-5
relative (val/test loss). On the full PTB vocabulary over 40 steps the gap grew to 2e-4 relative
in the validation loss. Dropout is off: with dropout each rank draws its own masks, so the runs
would be equal in distribution only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal

import numpy as np
import pytest
import torch
from pause import pause_env, wait_for_marker
from pipeline_repo import edit_profile, prepared_copy, run, start, step_checkpoints, train_cmd

from rnnlab.data.lm_data import batchify

pytestmark = pytest.mark.slow
KILL_AT = 9  # both ranks pause here, the step after the step-8 checkpoint (every 4 steps)


def _profile(strategy: dict) -> dict:
    return {
        "trainer": {"accelerator": "cpu", **strategy},
        "train_lm": {"defaults": {"batch_size": 16}, "runs": {"ptb-lstm": {"dropout": 0.0}}},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The DDP run is killed (both processes, SIGKILL) while both ranks are paused right after its
    step-8 checkpoint, and resumed (from step 8: asserted in the log)."""
    base = tmp_path_factory.mktemp("ddp")
    repo = prepared_copy(base / "repo")
    edit_profile(repo, _profile({"strategy": "ddp", "devices": 2}))
    print(f"kill step {KILL_AT}")
    killed = start(train_cmd(base / "ddp"), repo, **pause_env(KILL_AT, base / "pause"))
    pids = {wait_for_marker(base / "pause", rank, process=killed)["pid"] for rank in (0, 1)}
    assert len(pids) == 2  # two processes, both at the same step
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert step_checkpoints(repo) == [4, 8]
    ddp = run(train_cmd(base / "ddp"), repo)
    assert (
        "Restoring states from the checkpoint path at data/checkpoints/train_lm/ptb-lstm/step-000000008" in ddp.stderr
    )
    edit_profile(repo, _profile({"strategy": "auto", "devices": 1}))
    single = run(train_cmd(base / "single"), repo)
    return repo, base, ddp, single


def _row(base, name) -> dict:
    return json.loads((base / name / "ptb-lstm.json").read_text())


def test_each_rank_trains_on_its_own_block_of_columns(runs):
    repo, _, ddp, _ = runs
    logged = dict(re.findall(r"rank (\d)/2 trains on columns \d+\.\.\d+ of 16 \(shard md5 (\w+)\)", ddp.stderr))
    ids = np.load(repo / "data/prepared/ptb/train.npy")
    ids = ids[: max(int(len(ids) * 0.05), 16 * (35 + 1))]  # train_fraction 0.05, as the data module cuts it
    batched = batchify(ids, 16)  # [n_steps, 16], exactly as one process lays it out
    expected = {
        str(r): hashlib.md5(batched[:, 8 * r : 8 * r + 8].contiguous().numpy().tobytes()).hexdigest() for r in (0, 1)
    }
    assert logged == expected and logged["0"] != logged["1"]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.stderr
    assert "distributed_backend=gloo" in ddp.stdout + ddp.stderr


def test_only_rank_zero_tracks_and_writes(runs):
    from mlflow.tracking import MlflowClient

    repo, base, ddp, _ = runs
    assert "rank 1: trained and evaluated its shard; rank 0 writes the outputs" in ddp.stderr
    assert len(re.findall(r"INFO rnnlab.stages.train: train_lm@ptb-lstm: \{", ddp.stderr)) == 1  # the writer's line
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs_ = client.search_runs(
        [client.get_experiment_by_name("rnnlab-lm").experiment_id], order_by=["attributes.start_time ASC"]
    )
    assert len(runs_) == 2  # one for the DDP stage (not one per rank), one for the single-process run
    tracked = runs_[0]
    assert tracked.info.run_id == _row(base, "ddp")["mlflow_run_id"] and tracked.info.status == "FINISHED"
    assert tracked.data.params["trainer.strategy"] == "ddp" and tracked.data.params["trainer.devices"] == "2"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "val/ppl")] == [1]
    written = sorted(p.name for p in (base / "ddp" / "models" / "ptb-lstm").iterdir())
    assert written == ["history.json", "model.ckpt", "neighbours.json", "samples.txt", "vocab.json"]


def test_ddp_matches_single_process_with_the_same_global_batch(runs):
    _, base, _, _ = runs
    ddp, single = _row(base, "ddp"), _row(base, "single")
    for key in ("val_loss", "test_loss"):
        assert ddp[key] == pytest.approx(single[key], rel=2e-5), key
    assert ddp["epochs"] == single["epochs"] == 1 and ddp["params"] == single["params"]
    hist = [json.loads((base / n / "models/ptb-lstm/history.json").read_text())[0] for n in ("ddp", "single")]
    assert hist[0]["train/loss_epoch"] == pytest.approx(hist[1]["train/loss_epoch"], rel=1e-5)
    assert hist[0]["val/tokens"] == hist[1]["val/tokens"] == 73750  # the shards cover the whole split once
    weights = [
        torch.load(base / n / "models/ptb-lstm/model.ckpt", weights_only=True)["state_dict"] for n in ("ddp", "single")
    ]
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], rtol=0, atol=1e-4), key
