"""The `full` profile (the GPU targets) cannot rot: every stage of it runs on CPU through `dvc repro`,
with the profile's own configs (model sizes, optimizers, schedules, decoders) and tiny data limits
merged over them (a couple of batches, a prefix of each evaluation split, 4 images per split)."""

from __future__ import annotations

import json

import pytest
import yaml
from pipeline_repo import copy_repo, edit_params, edit_profile, git_repo, run, tiny_params

from rnnlab.config import load_params

# Tiny limits only: every size, optimizer and schedule stays the full profile's own.
LIMITS_LM = {"train_fraction": 0.002, "eval_fraction": 0.005, "limit_train_batches": 2, "max_epochs": 1, "samples": 1}
SMOKE = {
    "trainer": {"num_threads": 1, "checkpoint_every_n_steps": 0},
    "train_lm": {"defaults": LIMITS_LM},
    "study": {
        "gradient_flow": {
            "window": 12,
            "report_lag": 10,
            "batch_size": 4,
            "num_windows": 1,
            "train_steps": 5,
            "train_batch_size": 8,
            "bptt": 10,
        },
        "long_lag": {"lags": [2, 5], "steps": 10, "hidden_size": 8},
        "clipping": {"steps": 5, "hidden_size": 16, "batch_size": 8, "bptt": 10},
    },
    "train_seq2seq": {
        "defaults": {
            "max_train_pairs": 256,
            "max_val_pairs": 16,
            "max_test_pairs": 16,
            "limit_train_batches": 2,
            "max_epochs": 1,
            "heatmaps": 1,
        }
    },
    "features": {"limit_images": 4, "num_workers": 0},
    "train_captioner": {"defaults": {"limit_train_batches": 2, "max_epochs": 1, "grid_images": 1}},
    "evaluate": {"limit_test": 2000, "sample_tokens": 5},
}


@pytest.fixture(scope="module")
def full_repro(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("full") / "repo")
    edit_params(repo, tiny_params)
    # tracking off: MLflow start-up and model registration per stage would triple the test's time, and
    # tracking is tested by the tiny pipeline (tests/test_pipeline.py); this test is about the configs
    edit_params(repo, lambda p: p.update(profile="full", tracking={"enabled": False}))
    full = yaml.safe_load((repo / "profiles" / "full.yaml").read_text())
    # the runs of the full profile set their own epochs/batches: the limits go over each of them
    smoke = {
        **SMOKE,
        "train_lm": {"defaults": LIMITS_LM, "runs": {name: dict(LIMITS_LM) for name in full["train_lm"]["runs"]}},
        "train_seq2seq": {
            **SMOKE["train_seq2seq"],
            "runs": {name: {"max_epochs": 1} for name in full["train_seq2seq"]["runs"]},
        },
        "train_captioner": {
            **SMOKE["train_captioner"],
            "runs": {name: {"max_epochs": 1} for name in full["train_captioner"]["runs"]},
        },
    }
    edit_profile(repo, smoke, profile="full")
    git_repo(repo)
    proc = run(["dvc", "repro"], repo, timeout=2400)
    return repo, proc


@pytest.mark.slow
def test_every_stage_of_the_full_profile_runs(full_repro):
    repo, proc = full_repro
    params = load_params(repo / "params.yaml")
    assert params["profile"] == "full"
    stages = [s for s in run(["dvc", "stage", "list", "--name-only"], repo).stdout.split()]
    for stage in stages:
        assert f"Running stage '{stage}'" in proc.stdout, stage
    # The full profile's configs, not the cpu ones: a 650-unit LSTM, a 2x512 translator, a 1024-unit captioner.
    lstm = json.loads((repo / "data/metrics/train_lm/ptb-lstm.json").read_text())
    assert lstm["params"] > 10_000_000 and lstm["epochs"] == 1
    s2s = json.loads((repo / "data/metrics/train_seq2seq/multi30k-attention.json").read_text())
    assert s2s["pairs"] == {"train": 256, "val": 16, "test": 16} and s2s["params"] > 5_000_000
    assert set(k for k in s2s if k.startswith("sacrebleu_")) >= {"sacrebleu_greedy", "sacrebleu_beam10"}
    cap = json.loads((repo / "data/metrics/train_captioner/flickr8k-soft_attention.json").read_text())
    assert cap["steps"] >= 1 and cap["params"]["hidden_size"] == 1024  # 4 train images: one batch of 64
    table = json.loads((repo / "data/metrics/evaluate.json").read_text())
    assert "skipped" not in table
    assert len(table["lm"]["ptb"]) == 6 and set(table["translation"]) == {"multi30k-attention", "multi30k-none"}
    assert table["lm"]["tinyshakespeare"]["lstm"]["metric"] == "bpc"
