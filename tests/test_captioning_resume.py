"""A captioner run killed mid-epoch (SIGKILL) and run again ends exactly where an uninterrupted run does.

The stage loop (:func:`rnnlab.stages.train.train_stage`, what DVC's ``train_captioner@<run>`` runs)
trains in a subprocess on real Flickr8k captions and features of real images. It is SIGKILLed
while paused (``RNNLAB_PAUSE_AT_STEP``) right after a random mid-epoch resume checkpoint
``step-*.ckpt`` (printed; ``RNNLAB_KILL_AFTER`` pins it), so the kill never races the clock; then
run again: it must resume from that checkpoint, mid-epoch (the train loader is a
``ResumableLoader``), and write the same metrics row and the same weights, bit for bit on CPU, as
a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pause import pause_env, random_step, save_steps, wait_for_marker

from rnnlab.data.captions import read_flickr8k
from rnnlab.features import extract_features
from rnnlab.io import read_json

RUN = "flickr8k-soft_attention"
SPLIT_SIZES = {"train": 16, "dev": 2, "test": 2}
BATCH = 2  # images per batch: 8 steps per epoch
EPOCHS = 2
EVERY = 3  # trainer.checkpoint_every_n_steps: the first checkpoint is mid-epoch 1
TIMING_KEYS = {
    "train_seconds",
    "eval_seconds",
    "wall_seconds",
    "stage_wall_s",
    "captions_per_s",
    "model_path",
    "mlflow_run_id",
}

CHILD = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from rnnlab.stages.train import train_stage
from rnnlab.tasks.base import StagePaths
a = json.loads(sys.argv[1])
train_stage(a["params"], "train_captioner", a["run"], StagePaths(**{k: Path(v) for k, v in a["paths"].items()}),
            Path(a["models"]), Path(a["metrics"]), Path(a["plots"]), Path(a["checkpoints"]))
"""

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, mirror) -> dict:
    """prepared/flickr8k/captions.parquet (a few real images per split) and their feature cache."""
    table, _ = read_flickr8k(mirror / "flickr8k")
    keep = []
    for split, n in SPLIT_SIZES.items():
        keep += list(table[table.split == split].image.drop_duplicates().head(n))
    subset = table[table.image.isin(keep)].reset_index(drop=True)
    root = tmp_path_factory.mktemp("caption_resume")
    (root / "prepared" / "flickr8k").mkdir(parents=True)
    subset.to_parquet(root / "prepared" / "flickr8k" / "captions.parquet")
    extract_features(
        mirror / "flickr8k" / "images",
        sorted(subset.image.unique()),
        root / "features" / "features.npy",
        root / "features" / "features.json",
        batch_size=8,
        num_workers=0,
    )
    return {"prepared": str(root / "prepared"), "features": str(root / "features"), "raw": str(mirror)}


def _args(inputs: dict, out: Path) -> dict:
    params = {
        "seed": 3,
        "tracking": {"enabled": True},  # the sqlite store in the run's folder (its cwd)
        "trainer": {"num_threads": 1, "checkpoint_every_n_steps": EVERY},
        "train_captioner": {
            "defaults": {
                "embedding_size": 16,
                "hidden_size": 32,
                "attention_size": 16,
                "batch_size": BATCH,
                "eval_batch_size": 8,
                "max_epochs": EPOCHS,
                "min_freq": 1,
                "max_len": 12,
                "lr": 3e-3,
                "beam_sizes": [1, 3],
                "grid_images": 0,
            },
            "runs": {RUN: {"decoder": "soft_attention"}},
        },
    }
    return {
        "params": params,
        "run": RUN,
        "paths": inputs,
        "models": str(out / "models"),
        "metrics": str(out / "metrics.json"),
        "plots": str(out / "plots.json"),
        "checkpoints": str(out / "checkpoints"),
    }


def _start(args: dict, log: Path, **extra_env: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "OMP_NUM_THREADS": "1", **extra_env}
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
        )


from test_translation_resume import assert_one_mlflow_run_continued  # noqa: E402


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt")) if folder.is_dir() else []


def _run(args: dict, log: Path) -> str:
    proc = _start(args, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    return log.read_text()


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _weights(out: Path) -> dict:
    return torch.load(out / "models" / RUN / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_killed_mid_epoch_and_rerun_equals_an_uninterrupted_run(inputs, tmp_path):
    steps_per_epoch = SPLIT_SIZES["train"] // BATCH
    # 1. The stage, SIGKILLed mid-epoch.
    killed = tmp_path / "killed"
    killed.mkdir()
    args = _args(inputs, killed)
    resume_dir = killed / "checkpoints" / "train_captioner" / RUN
    # Paused right after a random mid-epoch checkpoint (printed; RNNLAB_KILL_AFTER pins it), then killed.
    mid_epoch = [s for s in save_steps(EVERY, steps_per_epoch, EPOCHS) if s % steps_per_epoch]
    kill_step = random_step(mid_epoch)
    proc = _start(args, killed / "first.log", **pause_env(kill_step + 1, tmp_path / "pause"))
    wait_for_marker(tmp_path / "pause", process=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _steps(resume_dir)[-1] == kill_step  # the newest checkpoint: where the rerun continues
    print(
        f"killed by SIGKILL; newest resume checkpoint: step {kill_step} "
        f"(epoch {kill_step // steps_per_epoch + 1}, batch {kill_step % steps_per_epoch} of {steps_per_epoch}); "
        f"checkpoints on disk: {_steps(resume_dir)}"
    )
    assert not Path(args["metrics"]).exists(), "killed before it wrote its outputs"

    # 2. Run again: it resumes from that checkpoint and completes.
    log = _run(args, killed / "second.log")
    assert f"resuming from {resume_dir / f'step-{kill_step:09d}.ckpt'}" in log, log[-4000:]
    assert not resume_dir.exists(), "the resume folder is deleted once the outputs are written"
    resumed = read_json(args["metrics"])
    assert_one_mlflow_run_continued(killed / "mlflow.db", "rnnlab-captioner", resumed)

    # 3. The same run, never interrupted.
    clean = tmp_path / "clean"
    clean.mkdir()
    clean_args = _args(inputs, clean)
    log = _run(clean_args, clean / "run.log")
    assert "resuming from" not in log
    expected = read_json(clean_args["metrics"])

    assert expected["steps"] == EPOCHS * steps_per_epoch and expected["epochs"] == EPOCHS
    assert expected["bleu"]["greedy"]["bleu1"] > 0  # a real score, not an empty decode
    assert _comparable(resumed) == _comparable(expected)
    a, b = _weights(killed), _weights(clean)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bitwise identical weights"
    history = [read_json(out / "models" / RUN / "metrics.json")["history"] for out in (killed, clean)]
    for key in ("val/loss", "train/loss_epoch"):
        assert [h[key] for h in history[0]] == [h[key] for h in history[1]], key
    print(
        f"resumed run == uninterrupted run: best_val_loss {expected['best_val_loss']}, "
        f"BLEU {expected['bleu']}, sacreBLEU {expected['sacrebleu']}"
    )
