"""Resume after a kill, for translation: the stage loop (``train_stage`` of ``train_seq2seq``) runs in a
subprocess on a tiny profile of the real Multi30k and is SIGKILLed as soon as a resume checkpoint
``step-*.ckpt`` at or after a random step (second epoch or early third) is on disk (a checkpoint every 3 steps,
8 steps an epoch: after an epoch end, a validation round and a best checkpoint; the step is printed,
``RNNLAB_KILL_AFTER`` pins it). The trainer pauses right after that save (``RNNLAB_PAUSE_AT_STEP``),
so the kill never races a fast machine. The rerun resumes from that checkpoint. Its
metrics row, training history and best weights must equal, exactly, those of a run that was never
interrupted."""

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

pytestmark = pytest.mark.slow

RUN = "multi30k-attention"
STEPS = 24  # 3 epochs x limit_train_batches 8
EVERY = 3  # trainer.checkpoint_every_n_steps
TIMING = ("train_wall_s", "eval_wall_s", "train_tokens_per_s", "stage_wall_s", "mlflow_run_id")

SCRIPT = r"""
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from rnnlab.stages.train import train_stage
from rnnlab.tasks.base import StagePaths
params, name, out, prepared = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
train_stage(params, "train_seq2seq", name, StagePaths(prepared=prepared), out / "models",
            out / "metrics" / f"{name}.json", out / "plots" / f"{name}.json", out / "checkpoints")
"""


def params() -> dict:
    return {
        "seed": 5,
        "tracking": {"enabled": True},  # the sqlite store in the run's folder (its cwd)
        "trainer": {"num_threads": 1, "checkpoint_every_n_steps": EVERY},
        "train_seq2seq": {
            "defaults": {
                "tokenizer": "bpe",
                "bpe_vocab_size": 400,
                "embedding_size": 32,
                "hidden_size": 32,
                "max_len": 20,
                "batch_size": 32,
                "max_epochs": STEPS // 8,
                "limit_train_batches": 8,
                "lr": 0.01,
                "dropout": 0.3,
                "teacher_forcing": 0.8,
                "beam_sizes": [1, 2],
                "heatmaps": 1,
                "max_train_pairs": 300,
                "max_val_pairs": 60,
                "patience": 5,
            },
            "runs": {RUN: {"attention": "bahdanau"}},
        },
    }


def start(out: Path, prepared: Path, **extra_env: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **extra_env}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(params()), RUN, str(out), str(prepared)],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"stage failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    return out + err


def assert_one_mlflow_run_continued(store: Path, experiment: str, row: dict) -> None:
    """The killed process and the rerun are one MLflow run (continued, not an orphan), FINISHED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (only,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert only.info.run_id == row["mlflow_run_id"] and only.info.status == "FINISHED"
    assert only.data.tags["rnnlab.resumes"] == "1"


def step_files(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mirror) -> Path:
    from rnnlab.data.readers import read_parallel_corpus
    from rnnlab.io import write_parquet

    root = tmp_path_factory.mktemp("prepared")
    (root / "multi30k").mkdir()
    write_parquet(root / "multi30k" / "pairs.parquet", read_parallel_corpus(mirror / "multi30k"))
    return root


def test_killed_run_resumes_to_the_same_numbers(prepared, tmp_path):
    # 1. The reference: the same run, never interrupted.
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    run_dir.mkdir()
    finish(start(ref_dir, prepared))
    reference = json.loads((ref_dir / "metrics" / f"{RUN}.json").read_text())
    assert reference["steps"] == STEPS and reference["epochs"] == STEPS // 8
    assert not (ref_dir / "checkpoints" / "train_seq2seq" / RUN).exists()  # deleted once the outputs were written

    # 2. The same run, SIGKILLed while paused right after its first checkpoint at or after a random
    # step of the second epoch (9..16) or the start of the third.
    kill_after = random_step(list(range(10, 19)))
    saved = next(s for s in save_steps(EVERY, 8, STEPS // 8) if s >= kill_after)
    resume_dir = run_dir / "checkpoints" / "train_seq2seq" / RUN
    proc = start(run_dir, prepared, **pause_env(saved + 1, tmp_path / "pause"))
    wait_for_marker(tmp_path / "pause", process=proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    steps = step_files(resume_dir)
    print(f"killed (SIGKILL) with resume checkpoints at steps {steps}; resuming from step {saved} of {STEPS}")
    assert steps[-1] == saved and not (run_dir / "metrics" / f"{RUN}.json").exists()

    # 3. The rerun resumes from that checkpoint and finishes.
    log = finish(start(run_dir, prepared))
    assert f"resuming from {resume_dir / f'step-{saved:09d}.ckpt'}" in log, log[-3000:]
    resumed = json.loads((run_dir / "metrics" / f"{RUN}.json").read_text())
    exact = sorted(
        k for k in reference if k not in TIMING and k != "model_path" and not k.startswith("sentences_per_s_")
    )
    assert {
        "val_ppl",
        "test_ppl",
        "sacrebleu_greedy",
        "sacrebleu_beam2",
        "chrf_beam2",
        "tok_lc_bleu_greedy",
        "val_sacrebleu_best",
        "steps",
    } <= set(exact)
    assert {k: resumed[k] for k in exact} == {k: reference[k] for k in exact}
    assert sorted(resumed) == sorted(reference)

    folder, ref_folder = run_dir / "models" / RUN, ref_dir / "models" / RUN
    history = json.loads((folder / "history.json").read_text())
    ref_history = json.loads((ref_folder / "history.json").read_text())
    for key in ("val/loss", "val/bleu", "train/loss_epoch", "epoch"):
        assert [h[key] for h in history] == [h[key] for h in ref_history], key
    weights = torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]
    ref_weights = torch.load(ref_folder / "model.ckpt", weights_only=True)["state_dict"]
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    for name in ("test_hyps_greedy.txt", "test_hyps_beam2.txt"):
        assert (folder / name).read_text() == (ref_folder / name).read_text()
    assert not resume_dir.exists()
    assert_one_mlflow_run_continued(run_dir / "mlflow.db", "rnnlab-seq2seq", resumed)
    print(
        f"resumed row == uninterrupted row on {len(exact)} keys: val_ppl {resumed['val_ppl']}, test_ppl "
        f"{resumed['test_ppl']}, sacrebleu greedy/beam2 {resumed['sacrebleu_greedy']}/{resumed['sacrebleu_beam2']}"
    )
