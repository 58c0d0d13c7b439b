"""The real pipeline, end to end: ``dvc repro`` of every stage in a temporary copy of this repository
on the real corpora (PTB, Multi30k, Flickr8k through the mirror) with a tiny profile
(``pipeline_repo.pipeline_tiny_params``). Then: ``dvc metrics show``, the MLflow runs, a second
``dvc repro`` that runs nothing, and a DVC remote: push, clone, pull, ``dvc repro`` runs nothing."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from pipeline_repo import copy_repo, edit_params, git_repo, pipeline_tiny_params, run

STAGES = ("download", "prepare", "train_lm", "study", "train_seq2seq", "features", "train_captioner", "evaluate")


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    edit_params(repo, pipeline_tiny_params)
    git_repo(repo)
    first = run(["dvc", "repro"], repo, timeout=1500)
    return repo, first


def _json(repo, rel):
    return json.loads((repo / rel).read_text())


def test_repro_runs_every_stage_and_writes_its_metrics(repro):
    repo, first = repro
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    prepare = _json(repo, "data/metrics/prepare.json")
    assert prepare["ptb"]["splits"]["test"]["tokens"] == 82430
    assert prepare["multi30k"]["splits"]["test"]["lines"] == 1000
    assert sum(prepare["flickr8k"]["dropped"].values()) == 5  # the `.jpg.1` quirk, counted

    lm = _json(repo, "data/metrics/train_lm.json")["ptb"]
    assert 50 < lm["lstm"]["val_ppl"] < 3000 and lm["lstm"]["tokens_per_s"] > 0
    assert 1 < lm["ngram"]["val_ppl"] < lm["lstm"]["val_ppl"]  # counts over all of train vs 10 tiny batches

    s2s = _json(repo, "data/metrics/train_seq2seq.json")
    assert sorted(s2s) == ["multi30k-attention", "multi30k-none"]
    assert all(0 <= row["sacrebleu_beam2"] <= 100 and row["val_ppl"] > 1 for row in s2s.values())

    features = _json(repo, "data/metrics/features.json")
    assert features["encoded"] == features["images"] >= 24 and features["bad_images"] == 0  # 8 per split

    cap = _json(repo, "data/metrics/train_captioner.json")
    assert sorted(cap) == ["flickr8k-show_tell", "flickr8k-soft_attention"]

    study = _json(repo, "data/metrics/study.json")
    assert study["gradient_flow"]["lstm_over_rnn_at_lag_10_trained"] > 0

    table = _json(repo, "data/metrics/evaluate.json")
    assert table["lm"]["ptb"]["lstm"]["test_ppl"] == pytest.approx(lm["lstm"]["test_ppl"], rel=1e-4)
    assert table["lm"]["ptb"]["lstm"]["mlflow_run_id"] == lm["lstm"]["mlflow_run_id"]
    assert table["lm"]["ptb"]["ngram"]["test_ppl"] > 1
    assert set(table["translation"]) == set(s2s) and set(table["captioning"]) == set(cap)
    assert "skipped" not in table
    report = (repo / "data/reports/index.md").read_text()
    assert lm["lstm"]["mlflow_run_id"] in report and "multi30k-attention" in report
    curve = _json(repo, "data/plots/train_lm/ptb-lstm.json")
    assert curve[0]["epoch"] == 1 and curve[0]["val_ppl"] == pytest.approx(lm["lstm"]["val_ppl"], rel=1e-3)


def test_dvc_metrics_show_lists_the_table(repro):
    repo, _ = repro
    data = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    metrics = next(iter(data.values()))["data"]
    assert metrics["data/metrics/evaluate.json"]["data"]["lm"]["ptb"]["lstm"]["test_ppl"] > 0
    assert "train_lm.json" in run(["dvc", "metrics", "show"], repo).stdout


def test_dvc_plots_show_writes_the_html(repro, tmp_path):
    repo, _ = repro
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    html = (tmp_path / "plots" / "index.html").read_text()
    for title in ("Test perplexity by model", "BLEU vs beam size", "Gradient flow", "Long-lag recall accuracy"):
        assert title in html, title
    assert "ptb-lstm" in html  # train_lm's learning curve


def test_mlflow_runs_have_metrics_tags_and_artifacts(repro):
    from mlflow.tracking import MlflowClient

    repo, _ = repro
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rnnlab-lm")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["train_lm/ptb-lstm", "train_lm/ptb-ngram"]
    r = runs["train_lm/ptb-lstm"]
    trained = _json(repo, "data/metrics/train_lm.json")["ptb"]["lstm"]
    assert r.info.run_id == trained["mlflow_run_id"] and r.info.status == "FINISHED"
    assert r.data.metrics["final/val_ppl"] == pytest.approx(trained["val_ppl"])
    assert "val/ppl" in r.data.metrics and r.data.params["hidden_size"] == "16"
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert r.data.tags["git_commit"] == commit and r.data.tags["dvc_stage"] == "train_lm"
    md5_tags = {k: v for k, v in r.data.tags.items() if k.startswith("data_md5.")}
    assert len(md5_tags) == 3 and all(len(v) == 32 for v in md5_tags.values())
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train_lm"]["deps"]
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert {"model/model.ckpt", "model/vocab.json"} <= artifacts
    for experiment, n in (("rnnlab-seq2seq", 2), ("rnnlab-captioner", 2), ("rnnlab-study", 1)):
        found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert len(found) >= n and all(x.info.status == "FINISHED" for x in found), experiment
    evals = client.search_runs([client.get_experiment_by_name("rnnlab-evaluate").experiment_id])
    assert evals[0].data.tags["scored.ptb-lstm"] == r.info.run_id


def test_second_repro_runs_nothing(repro):
    repo, _ = repro
    second = run(["dvc", "repro"], repo)
    assert "Running stage" not in second.stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_push_then_pull_in_a_second_clone_reproduces_without_rerunning(repro, tmp_path):
    """A DVC remote on a local directory (README "Scaling")."""
    repo, _ = repro
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results + remote"], repo)
    assert "pushed" in run(["dvc", "push"], repo).stdout and any(remote.rglob("*"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    model = "data/models/lm/ptb-lstm/model.ckpt"
    assert not (clone / model).exists()  # git has no data, only dvc.lock
    run(["dvc", "pull"], clone)
    assert (clone / model).read_bytes() == (repo / model).read_bytes()
    again = run(["dvc", "repro"], clone)
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date" in again.stdout
    assert _json(clone, "data/metrics/evaluate.json") == _json(repo, "data/metrics/evaluate.json")


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
