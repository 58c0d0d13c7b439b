"""The real pipeline, end to end: ``dvc repro`` of every stage in a temporary copy of this repository
on the real corpora (PTB, Multi30k, Flickr8k through the mirror) with the ``tiny`` profile. Then:
``dvc metrics show``, the MLflow runs, one DVC stage per training run, complete stage deps (every
project module a stage imported is a dep of it), ``dvc status`` after changing one run or one
module, a second ``dvc repro`` that runs nothing, and a DVC remote: push, clone, pull, no rerun."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import yaml
from pipeline_repo import copy_repo, edit_params, git_repo, run, tiny_params

pytestmark = pytest.mark.slow

STAGES = (
    "download",
    "prepare",
    "train_lm@ptb-lstm",
    "train_lm@ptb-ngram",
    "study",
    "train_seq2seq@multi30k-attention",
    "train_seq2seq@multi30k-none",
    "features",
    "train_captioner@flickr8k-show_tell",
    "train_captioner@flickr8k-soft_attention",
    "evaluate",
)
TRAIN_STAGES = {"train_lm": 10, "train_seq2seq": 2, "train_captioner": 2}  # one DVC stage per run
RUNS = {  # the runs the tiny profile trains (and evaluate scores)
    "train_lm": ("ptb-lstm", "ptb-ngram"),
    "train_seq2seq": ("multi30k-attention", "multi30k-none"),
    "train_captioner": ("flickr8k-show_tell", "flickr8k-soft_attention"),
}


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    repo = copy_repo(base / "repo")
    edit_params(repo, tiny_params)
    git_repo(repo)
    first = run(["dvc", "repro"], repo, timeout=1500, RNNLAB_RECORD_IMPORTS=str(base / "imports"))
    return repo, first, base / "imports"


def _stages(status_stdout: str) -> set[str]:
    """Stage names ``dvc status`` lists as changed."""
    import re

    return set(re.findall(r"^([\w@.-]+):$", status_stdout, re.M))


def _json(repo, rel):
    return json.loads((repo / rel).read_text())


def test_repro_runs_every_stage_and_writes_its_metrics(repro):
    repo, first, _ = repro
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    prepare = _json(repo, "data/metrics/prepare.json")
    assert prepare["ptb"]["splits"]["test"]["tokens"] == 82430
    assert prepare["multi30k"]["splits"]["test"]["lines"] == 1000
    assert sum(prepare["flickr8k"]["dropped"].values()) == 5  # the `.jpg.1` quirk, counted

    lm = {
        "lstm": _json(repo, "data/metrics/train_lm/ptb-lstm.json"),
        "ngram": _json(repo, "data/metrics/train_lm/ptb-ngram.json"),
    }
    # Measured values of the tiny profile (deterministic on CPU; rel 1% for another CPU's rounding).
    assert {k: lm["lstm"][k] for k in ("val_ppl", "test_ppl")} == pytest.approx(
        {"val_ppl": 400.248, "test_ppl": 397.616}, rel=0.01
    )
    assert {k: lm["ngram"][k] for k in ("val_ppl", "test_ppl")} == pytest.approx(
        {"val_ppl": 57.014, "test_ppl": 57.949}, rel=0.01
    )
    assert lm["ngram"]["val_ppl"] < lm["lstm"]["val_ppl"]  # counts over all of train vs 10 tiny batches
    assert lm["lstm"]["tokens_per_s"] > 0
    assert _json(repo, "data/metrics/train_lm/ptb-gru.json")["enabled"] is False  # left out by the profile

    s2s = {
        name: _json(repo, f"data/metrics/train_seq2seq/{name}.json") for name in ("multi30k-attention", "multi30k-none")
    }
    # 16 steps of a 32-unit model: the perplexities are what a break shows in (BPE vs a word vocabulary,
    # so not comparable across the two runs); BLEU is near zero, pinned all the same.
    assert {n: (r["val_ppl"], r["test_ppl"]) for n, r in s2s.items()} == {
        "multi30k-attention": pytest.approx((183.737, 183.764), rel=0.01),
        "multi30k-none": pytest.approx((55.472, 58.324), rel=0.01),
    }
    assert {n: (r["sacrebleu_greedy"], r["sacrebleu_beam2"]) for n, r in s2s.items()} == {
        "multi30k-attention": pytest.approx((0.11, 0.07), abs=0.05),
        "multi30k-none": pytest.approx((0.08, 0.08), abs=0.05),
    }

    features = _json(repo, "data/metrics/features.json")
    assert features["encoded"] == features["images"] >= 24 and features["bad_images"] == 0  # 8 per split

    cap = {
        name: _json(repo, f"data/metrics/train_captioner/{name}.json")
        for name in ("flickr8k-show_tell", "flickr8k-soft_attention")
    }

    # 2 epochs on 8 images: BLEU-1 and the validation loss are the numbers; no 3-gram matches yet.
    assert {n: r["best_val_loss"] for n, r in cap.items()} == pytest.approx(
        {"flickr8k-show_tell": 4.98745, "flickr8k-soft_attention": 4.91125}, abs=0.005
    )
    assert {n: r["bleu"]["greedy"]["bleu1"] for n, r in cap.items()} == pytest.approx(
        {"flickr8k-show_tell": 36.5385, "flickr8k-soft_attention": 34.4324}, abs=0.5
    )
    assert {n: r["sacrebleu"]["greedy"] for n, r in cap.items()} == pytest.approx(
        {"flickr8k-show_tell": 0.9587, "flickr8k-soft_attention": 2.5528}, abs=0.05
    )

    study = _json(repo, "data/metrics/study.json")
    # The LSTM keeps ~38x more of the gradient than the plain RNN 10 steps back (measured).
    assert study["gradient_flow"]["lstm_over_rnn_at_lag_10_trained"] == pytest.approx(38.01, rel=0.02)

    table = _json(repo, "data/metrics/evaluate.json")
    assert table["lm"]["ptb"]["lstm"]["test_ppl"] == pytest.approx(lm["lstm"]["test_ppl"], rel=1e-4)
    assert table["lm"]["ptb"]["lstm"]["mlflow_run_id"] == lm["lstm"]["mlflow_run_id"]
    assert table["lm"]["ptb"]["ngram"]["test_ppl"] == pytest.approx(lm["ngram"]["test_ppl"], rel=1e-4)
    assert set(table["translation"]) == set(s2s) and set(table["captioning"]) == set(cap)
    assert set(table["skipped"]) == {
        f"lm.{n}"
        for n in (
            "wikitext2-ngram",
            "tinyshakespeare-ngram",
            "ptb-rnn",
            "ptb-gru",
            "ptb-lstm_peephole",
            "ptb-mlp",
            "wikitext2-lstm",
            "tinyshakespeare-lstm",
        )
    }
    assert "enabled is false (profile 'tiny')" in table["skipped"]["lm.ptb-gru"]
    report = (repo / "data/reports/index.md").read_text()
    assert lm["lstm"]["mlflow_run_id"] in report and "multi30k-attention" in report
    curve = _json(repo, "data/plots/train_lm/ptb-lstm.json")
    assert curve[0]["epoch"] == 1 and curve[0]["val_ppl"] == pytest.approx(lm["lstm"]["val_ppl"], rel=1e-3)


def test_dvc_metrics_show_lists_the_table(repro):
    repo, _, _ = repro
    data = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    metrics = next(iter(data.values()))["data"]
    shown = metrics["data/metrics/evaluate.json"]["data"]["lm"]["ptb"]["lstm"]["test_ppl"]
    assert shown == _json(repo, "data/metrics/evaluate.json")["lm"]["ptb"]["lstm"]["test_ppl"]
    assert "data/metrics/train_lm/ptb-lstm.json" in metrics


def test_dvc_plots_show_writes_the_html(repro, tmp_path):
    repo, _, _ = repro
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    html = (tmp_path / "plots" / "index.html").read_text()
    for title in ("Test perplexity by model", "BLEU vs beam size", "Gradient flow", "Long-lag recall accuracy"):
        assert title in html, title
    assert "ptb-lstm" in html  # train_lm's learning curve


def test_mlflow_runs_have_metrics_tags_and_artifacts(repro):
    from mlflow.tracking import MlflowClient

    repo, _, _ = repro
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rnnlab-lm")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["train_lm/ptb-lstm", "train_lm/ptb-ngram"]
    r = runs["train_lm/ptb-lstm"]
    trained = _json(repo, "data/metrics/train_lm/ptb-lstm.json")
    assert r.info.run_id == trained["mlflow_run_id"] and r.info.status == "FINISHED"
    assert r.data.metrics["final/val_ppl"] == pytest.approx(trained["val_ppl"])
    assert "val/ppl" in r.data.metrics and r.data.params["hidden_size"] == "16"
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert r.data.tags["git_commit"] == commit and r.data.tags["dvc_stage"] == "train_lm@ptb-lstm"
    md5_tags = {k: v for k, v in r.data.tags.items() if k.startswith("data_md5.")}
    assert len(md5_tags) == 3 and all(len(v) == 32 for v in md5_tags.values())
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train_lm@ptb-lstm"]["deps"]
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert {"model/model.ckpt", "model/vocab.json"} <= artifacts
    found = client.search_runs([client.get_experiment_by_name("rnnlab-study").experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    # Translation and captioning runs carry the same lineage tags: the commit, their DVC stage, and
    # the md5 of each data file they read (recomputed here from the file, as DVC hashes it).
    lineage = {
        "train_seq2seq": ("rnnlab-seq2seq", ["data/prepared/multi30k/pairs.parquet"]),
        "train_captioner": (
            "rnnlab-captioner",
            ["data/features/flickr8k/features.json", "data/prepared/flickr8k/captions.parquet"],
        ),
    }
    for section, (experiment, data_files) in lineage.items():
        found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert sorted(x.info.run_name for x in found) == sorted(f"{section}/{n}" for n in RUNS[section]), experiment
        for x in found:
            name = x.info.run_name.split("/", 1)[1]
            assert (
                x.info.status == "FINISHED"
                and x.info.run_id == _json(repo, f"data/metrics/{section}/{name}.json")["mlflow_run_id"]
            )
            assert x.data.tags["git_commit"] == commit and x.data.tags["dvc_stage"] == f"{section}@{name}"
            md5_tags = {k.removeprefix("data_md5."): v for k, v in x.data.tags.items() if k.startswith("data_md5.")}
            assert md5_tags == {f: hashlib.md5((repo / f).read_bytes()).hexdigest() for f in data_files}, (
                x.info.run_name
            )
    # The evaluation run names every training run it scored (scored.<run> -> its run id), all three tasks.
    evaluation = client.search_runs(
        [client.get_experiment_by_name("rnnlab-evaluate").experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    scored = {k: v for k, v in evaluation.data.tags.items() if k.startswith("scored.")}
    expected = {
        f"scored.{name}": _json(repo, f"data/metrics/{section}/{name}.json")["mlflow_run_id"]
        for section, names in RUNS.items()
        for name in names
    }
    assert scored == expected and scored["scored.ptb-lstm"] == r.info.run_id


def test_one_dvc_stage_per_training_run(repro):
    repo, _, _ = repro
    listed = run(["dvc", "stage", "list", "--name-only"], repo).stdout.split()
    for section, count in TRAIN_STAGES.items():
        assert len([s for s in listed if s.startswith(f"{section}@")]) == count, listed
    assert "train_lm@ptb-lstm" in listed and "train_lm" not in listed


def _dep_covers(dep: str, file: str) -> bool:
    dep = dep.rstrip("/")
    return file == dep or file.startswith(dep + "/")


def test_every_stage_depends_on_every_module_it_imported(repro):
    """Each stage recorded the project files it imported (RNNLAB_RECORD_IMPORTS); every one must be
    covered by a ``deps:`` entry of that stage, or editing it would not rerun the stage."""
    repo, _, imports = repro
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    recorded = {p.stem: json.loads(p.read_text()) for p in imports.glob("*.json")}
    pipeline_stage = {
        "download": "download",
        "prepare": "prepare",
        "study": "study",
        "features": "features",
        "evaluate": "evaluate",
    }
    assert len(recorded) >= len(STAGES)
    missing = {}
    for name, files in recorded.items():
        script, _, run_name = name.partition("@")
        stage = f"{script}@{run_name}" if run_name else pipeline_stage[script]
        deps = [d["path"] for d in lock[stage]["deps"]]
        uncovered = [f for f in files if not any(_dep_covers(d, f) for d in deps)]
        if uncovered:
            missing[stage] = uncovered
    assert not missing, f"stages that import files no deps entry covers: {missing}"
    assert any(f.endswith("src/rnnlab/training.py") for f in recorded["train_lm@ptb-lstm"])


def test_changing_one_run_reruns_that_run_and_evaluate_only(repro):
    repo, _, _ = repro
    original = (repo / "params.yaml").read_text()
    try:
        edit_params(repo, lambda p: p["train_lm"]["runs"]["ptb-lstm"].update(lr=5.0))
        assert _stages(run(["dvc", "status"], repo).stdout) == {"train_lm@ptb-lstm", "evaluate"}
    finally:
        (repo / "params.yaml").write_text(original)


def test_editing_a_shared_module_marks_the_stages_that_use_it(repro):
    repo, _, _ = repro
    module = repo / "src/rnnlab/training.py"
    original = module.read_text()
    try:
        module.write_text(original + "\n# edited\n")
        changed = _stages(run(["dvc", "status"], repo).stdout)
        assert {
            f"{s}@{r}"
            for s, r in (
                ("train_lm", "ptb-lstm"),
                ("train_seq2seq", "multi30k-none"),
                ("train_captioner", "flickr8k-show_tell"),
            )
        } <= changed
        assert not {"download", "prepare"} & changed
    finally:
        module.write_text(original)
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_second_repro_runs_nothing(repro):
    repo, _, _ = repro
    second = run(["dvc", "repro"], repo)
    assert "Running stage" not in second.stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_push_then_pull_in_a_second_clone_reproduces_without_rerunning(repro, tmp_path):
    """A DVC remote on a local directory (README "Scaling")."""
    repo, _, _ = repro
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
    repo, _, _ = repro
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_lm"]["runs"]["ptb-lstm"]["bptt"] = 0
    params["profile"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu.yaml").write_text("{}\n")
    cmd = [
        sys.executable,
        "pipeline/train_lm.py",
        "--params",
        str(tmp_path / "params.yaml"),
        "--run",
        "ptb-lstm",
        "--prepared",
        "data/prepared",
        "--models",
        str(tmp_path / "m"),
        "--metrics",
        str(tmp_path / "m.json"),
        "--plots",
        str(tmp_path / "plot.json"),
    ]
    proc = run(cmd, repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: train_lm.runs.ptb-lstm.bptt: expected an integer >= 1, got 0"
    assert not (tmp_path / "m").exists()
