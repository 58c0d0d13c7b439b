"""The real pipeline, end to end: ``dvc repro`` in a temporary copy of this repository on the
real PTB corpus (through the mirror) with a tiny profile, then a second ``dvc repro`` that must
run nothing. Checks the DVC metrics and the MLflow run (params, metrics, tags, artifacts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def tiny_profile(params: dict, mirror: Path) -> dict:
    params["download"].update(corpora=["ptb"], mirror=str(mirror))
    params["prepare"]["corpora"] = ["ptb"]
    params["train_lm"]["defaults"].update(
        embedding_size=32, hidden_size=32, num_layers=1, train_fraction=0.05, limit_train_batches=40
    )
    params["train_lm"]["runs"] = [{"name": "ptb-lstm", "corpus": "ptb", "model": "lstm"}]
    return params


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RNNLAB_MIRROR")}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_repo(dst: Path) -> Path:
    """Copy the tracked + untracked-not-ignored files (what a fresh clone would have)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.fixture(scope="module")
def repro(tmp_path_factory, mirror):
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    params = tiny_profile(yaml.safe_load((repo / "params.yaml").read_text()), mirror)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "test copy"], repo)
    first = run(["dvc", "repro"], repo)
    return repo, first


def test_repro_writes_metrics_for_every_stage(repro):
    repo, first = repro
    for stage in ("download", "prepare", "train_lm", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    prepare = json.loads((repo / "data/metrics/prepare.json").read_text())
    assert prepare["ptb"]["splits"]["test"]["tokens"] == 82430
    assert prepare["ptb"]["dropped"] == {}
    trained = json.loads((repo / "data/metrics/train_lm.json").read_text())["ptb"]["lstm"]
    assert 50 < trained["val_ppl"] < 3000 and trained["tokens_per_s"] > 0
    evaluated = json.loads((repo / "data/metrics/evaluate.json").read_text())["lm"]["ptb"]["lstm"]
    assert evaluated["test_ppl"] == pytest.approx(trained["test_ppl"], rel=1e-4)
    assert evaluated["mlflow_run_id"] == trained["mlflow_run_id"]
    curve = json.loads((repo / "data/plots/train_lm/ptb-lstm.json").read_text())
    assert curve[0]["epoch"] == 1 and curve[0]["val_ppl"] == pytest.approx(trained["val_ppl"], rel=1e-3)


def test_dvc_metrics_show_lists_the_table(repro):
    repo, _ = repro
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    data = json.loads(shown)
    metrics = next(iter(data.values()))["data"]
    assert metrics["data/metrics/evaluate.json"]["data"]["lm"]["ptb"]["lstm"]["test_ppl"] > 0
    assert "train_lm.json" in run(["dvc", "metrics", "show"], repo).stdout


def test_mlflow_run_has_metrics_tags_and_artifacts(repro):
    from mlflow.tracking import MlflowClient

    repo, _ = repro
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rnnlab-lm")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["train_lm/ptb-lstm"]
    r = runs[0]
    trained = json.loads((repo / "data/metrics/train_lm.json").read_text())["ptb"]["lstm"]
    assert r.info.run_id == trained["mlflow_run_id"] and r.info.status == "FINISHED"
    assert r.data.metrics["final/val_ppl"] == pytest.approx(trained["val_ppl"])
    assert "val/ppl" in r.data.metrics and r.data.params["hidden_size"] == "32"
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert r.data.tags["git_commit"] == commit and r.data.tags["dvc_stage"] == "train_lm"
    md5_tags = {k: v for k, v in r.data.tags.items() if k.startswith("data_md5.")}
    assert len(md5_tags) == 3 and all(len(v) == 32 for v in md5_tags.values())
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train_lm"]["deps"]  # DVC recorded the same lineage
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert artifacts == {"model/model.ckpt", "model/vocab.json"}
    evals = client.search_runs([client.get_experiment_by_name("rnnlab-evaluate").experiment_id])
    assert evals[0].data.tags["scored.ptb-lstm"] == r.info.run_id


def test_second_repro_runs_nothing(repro):
    repo, _ = repro
    second = run(["dvc", "repro"], repo)
    assert "Running stage" not in second.stdout
    status = run(["dvc", "status"], repo).stdout
    assert "up to date" in status


def test_bad_param_fails_the_stage_with_a_clear_message(repro, tmp_path):
    repo, _ = repro
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_lm"]["runs"] = [{"name": "x", "corpus": "ptb", "model": "lstm", "bptt": 0}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "pipeline/train_lm.py", "--params", str(tmp_path / "params.yaml"), "--prepared",
           "data/prepared", "--models", str(tmp_path / "m"), "--metrics", str(tmp_path / "m.json"),
           "--plots", str(tmp_path / "plots")]
    proc = run(cmd, repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: train_lm.runs[0].bptt: expected an integer >= 1, got 0"
    assert not (tmp_path / "m").exists()
