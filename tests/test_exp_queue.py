"""A sweep queued with `dvc exp run --queue` and run by two DVC queue workers at once, both logging to
one shared MLflow tracking server: every experiment lands in `dvc exp show` with its own metrics,
and its training run in MLflow, tagged with its experiment name, with its own params (nothing lost,
nothing mixed). Tiny profile, real PTB, one LM run retrained per experiment."""

from __future__ import annotations

import itertools
import json
import re
import sys
import time

import pytest
from local_server import local_service
from pipeline_repo import VENV_BIN, prepared_copy, run

pytestmark = pytest.mark.slow

LRS, CLIPS = (5.0, 10.0), (0.25, 0.5)  # keys the tiny profile leaves to params.yaml (a profile's own win)


def _queue_idle(repo, env) -> bool:
    status = run(["dvc", "queue", "status"], repo, **env).stdout
    return not re.search(r"\b(Queued|Running)\b", status)


def test_two_workers_run_a_queued_sweep_into_one_tracking_server(tmp_path):
    from mlflow.tracking import MlflowClient

    repo = prepared_copy(tmp_path / "repo")
    server_cmd = [
        f"{VENV_BIN}/mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'store.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    with local_service(server_cmd, tmp_path / "server.log", "/health") as (uri, _):
        env = {"MLFLOW_TRACKING_URI": uri}
        run(
            [
                "dvc",
                "exp",
                "run",
                "--queue",
                "train_lm@ptb-lstm",
                "-S",
                "++train_lm.runs.ptb-lstm.lr=" + ",".join(map(str, LRS)),  # ++: a key the run does not state
                "-S",
                "++train_lm.runs.ptb-lstm.clip=" + ",".join(map(str, CLIPS)),
            ],
            repo,
            **env,
        )
        run(["dvc", "queue", "start", "-j", "2"], repo, **env)
        deadline = time.monotonic() + 900
        while not _queue_idle(repo, env):  # synchronised on the queue's own status
            assert time.monotonic() < deadline, run(["dvc", "queue", "status"], repo).stdout
            time.sleep(2)
        status = run(["dvc", "queue", "status"], repo).stdout
        assert status.count("Success") == 4 and "Failed" not in status, status
        shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
        client = MlflowClient(tracking_uri=uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "rnnlab-lm"]
        runs = client.search_runs([exp.experiment_id])
        run(["dvc", "queue", "stop"], repo, check=False)

    experiments = {}
    for baseline in shown:
        for exp_entry in baseline.get("experiments") or []:
            for revision in exp_entry.get("revs", []):
                data = revision["data"]
                name = revision.get("name") or exp_entry.get("name")
                lm = data["params"]["params.yaml"]["data"]["train_lm"]["runs"]["ptb-lstm"]
                metrics = data["metrics"]["data/metrics/train_lm/ptb-lstm.json"]["data"]
                experiments[name] = (lm["lr"], lm["clip"], metrics)
    assert sorted((lr, clip) for lr, clip, _ in experiments.values()) == sorted(itertools.product(LRS, CLIPS))
    assert len({m["val_ppl"] for _, _, m in experiments.values()}) == 4  # four different trainings

    # One MLflow run per experiment, tagged with its name, carrying that experiment's own params and
    # the metrics DVC recorded for it (the two workers' runs are not mixed).
    tracked = {r.data.tags.get("dvc_exp_name"): r for r in runs if r.info.run_name == "train_lm/ptb-lstm"}
    assert set(tracked) == set(experiments), (sorted(tracked), sorted(experiments))
    for name, (lr, clip, metrics) in experiments.items():
        r = tracked[name]
        assert r.info.status == "FINISHED"
        assert float(r.data.params["lr"]) == lr and float(r.data.params["clip"]) == clip
        assert r.data.metrics["final/val_ppl"] == pytest.approx(metrics["val_ppl"])
        assert r.info.run_id == metrics["mlflow_run_id"]
    print(
        json.dumps({n: {"lr": lr, "clip": c, "val_ppl": m["val_ppl"]} for n, (lr, c, m) in experiments.items()}),
        file=sys.stderr,
    )
