"""Stage evaluate on a tiny real PTB LSTM: the table reproduces the training run's test perplexity
from the saved checkpoint, missing tasks are recorded (not dropped), the report and plot data are
written, and MLflow has an evaluation run linked to the training run plus a registered model."""

from __future__ import annotations

import json

import pytest
from tiny_lm_store import lm_store  # noqa: F401 - fixture

from rnnlab.errors import ConfigError


def test_table_reproduces_training(lm_store):  # noqa: F811
    trained = json.loads((lm_store.root / "data/metrics/train_lm/ptb-lstm.json").read_text())
    table = json.loads((lm_store.root / "data/metrics/evaluate.json").read_text())
    row = table["lm"]["ptb"]["lstm"]
    assert row["split"] == "test" and row["metric"] == "ppl"
    # Same model, same test stream, same batch/bptt: the independent loop gives the training-time number.
    assert row["test_ppl"] == pytest.approx(trained["test_ppl"], rel=1e-4)
    assert 50 < row["test_ppl"] < 10002  # better than uniform over PTB's 10k words
    assert row["params"] == trained["params"] > 0
    assert row["mlflow_run_id"] == trained["mlflow_run_id"]
    assert row["registered_model"] == "rnnlab-lm-ptb-lstm/1"
    assert row["tokens"] == 82420  # PTB test: 82,430 tokens incl. <eos>, minus the batchify remainder + shift
    ngram, trained_ngram = (
        table["lm"]["ptb"]["ngram"],
        json.loads((lm_store.root / "data/metrics/train_lm/ptb-ngram.json").read_text()),
    )
    assert ngram["test_ppl"] == pytest.approx(trained_ngram["test_ppl"], rel=1e-4)
    assert ngram["tokens"] == 82429 and "bptt" not in ngram  # every position of the stream but the first
    assert ngram["registered_model"] == "rnnlab-lm-ptb-ngram/1"
    assert set(table["skipped"]) == {"translation", "captioning"}
    assert table["skipped"]["translation"] == "params train_seq2seq absent"


def test_report_and_plots(lm_store):  # noqa: F811
    report = (lm_store.root / "data/reports/index.md").read_text()
    row = lm_store.table["lm"]["ptb"]["lstm"]
    assert f"| ptb | lstm | test | {row['test_ppl']} |" in report
    assert f"`{row['mlflow_run_id']}`" in report
    assert "**translation**: skipped" in report and "### Samples" in report
    plot = json.loads((lm_store.root / "data/plots/evaluate/lm_ppl.json").read_text())
    assert plot[0] == {"model": "ptb-lstm", "ppl": row["test_ppl"]} and plot[1]["model"] == "ptb-ngram"


def test_mlflow_evaluation_run_links_training_run(lm_store):  # noqa: F811
    from mlflow.tracking import MlflowClient

    client = MlflowClient(lm_store.uri)
    exp = client.get_experiment_by_name("rnnlab-evaluate")
    (run,) = client.search_runs([exp.experiment_id])
    train_id = lm_store.table["lm"]["ptb"]["lstm"]["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["scored.ptb-lstm"] == train_id
    assert run.data.metrics["lm.ptb.lstm.test_ppl"] == pytest.approx(lm_store.table["lm"]["ptb"]["lstm"]["test_ppl"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluate.json", "report"} <= artifacts
    version = client.get_model_version("rnnlab-lm-ptb-lstm", "1")
    assert version.tags["training_run_id"] == train_id
    assert version.tags["evaluation_run_id"] == run.info.run_id


def test_bad_evaluate_params_name_the_key():
    from rnnlab.stages.evaluate import parse_evaluate_config

    with pytest.raises(ConfigError, match="evaluate.seq2seq_beam_sizes"):
        parse_evaluate_config({"evaluate": {"seq2seq_beam_sizes": [0]}})
    with pytest.raises(ConfigError, match="lm_bpt"):
        parse_evaluate_config({"evaluate": {"lm_bpt": 3}})


def test_training_runs_carry_mlflow_lineage(lm_store):  # noqa: F811
    """MLflow's own lineage fields (the UI's Dataset, Source and Models columns): each training run's
    data dependencies as dataset inputs with the DVC md5 as digest, the source tags, and the
    registered model version pointing back at the training run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(lm_store.uri)
    trained = json.loads((lm_store.root / "data/metrics/train_lm/ptb-lstm.json").read_text())
    run = client.get_run(trained["mlflow_run_id"])
    md5_tags = {k.removeprefix("data_md5."): v for k, v in run.data.tags.items() if k.startswith("data_md5.")}
    inputs = run.inputs.dataset_inputs
    assert md5_tags and len(inputs) == len(md5_tags)
    by_source = {json.loads(i.dataset.source)["path"]: i for i in inputs}
    assert set(by_source) == set(md5_tags)  # one dataset per DVC dependency, named by its repo path
    for path, item in by_source.items():
        assert item.dataset.digest == md5_tags[path]
        assert item.dataset.name == "/".join(path.split("/")[-2:])
        assert {t.key: t.value for t in item.tags}.get("mlflow.data.context") == "training"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"] == "pipeline/train_lm.py"
    version = client.get_model_version("rnnlab-lm-ptb-lstm", "1")
    assert version.run_id == trained["mlflow_run_id"]  # the model is linked to the run that trained it
