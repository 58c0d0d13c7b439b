"""The MLflow UI in a real browser: `mlflow ui` on 127.0.0.1 over the tiny pipeline's store
(train_lm + evaluate stage functions), opened by Debian's headless chromium; the rendered DOM
must show the experiment, the run names, a metric value and the lineage in MLflow's own fields (Dataset
with the DVC md5, Source, the logged + registered model); a screenshot is saved.

Marked ``browser``. Without chromium the test is skipped, unless ``RNNLAB_REQUIRE_BROWSER=1``
(set by ``.ci/run``, which installs chromium), where a missing browser is a failure. The
screenshot goes to ``$RNNLAB_UI_SCREENSHOT`` when set (``.ci/run``: data/reports/ui.png), else to
the test's temp folder; its path is printed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from local_server import local_service
from tiny_lm_store import lm_store  # noqa: F401 - fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]
VENV_BIN = Path(sys.executable).parent
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("RNNLAB_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed (apt-get install -y chromium); RNNLAB_REQUIRE_BROWSER=1 forbids a skip")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def chromium(browser: str, profile: Path, url: str, *action: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget: the page's JS runs (and its API fetches finish) before the dump/screenshot
    cmd = [browser, *CHROME_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *action, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def visible_text(html: str) -> str:
    """The rendered page's text: tags dropped, whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", html))


@pytest.fixture(scope="module")
def ui(lm_store):  # noqa: F811
    browser = find_chromium()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        str(VENV_BIN / "mlflow"),
        "ui",
        "--backend-store-uri",
        lm_store.uri,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
    ]
    with local_service(cmd, lm_store.root / "ui.log", "/health", env=env, cwd=lm_store.root) as (base, _):
        yield browser, base


def test_ui_shows_experiment_runs_and_metric(ui, lm_store, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    browser, base = ui
    client = MlflowClient(lm_store.uri)
    exp = client.get_experiment_by_name("rnnlab-lm")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"train_lm/ptb-lstm", "train_lm/ptb-ngram"}
    run = runs["train_lm/ptb-lstm"]
    ppl = lm_store.table["lm"]["ptb"]["lstm"]["test_ppl"]
    assert run.data.metrics["final/test_ppl"] == pytest.approx(ppl)
    # its data dependencies as MLflow dataset inputs (name, digest = the DVC md5)
    inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["ptb/train.npy", "ptb/valid.npy", "ptb/vocab.json"]

    # the experiment page lists the run by name
    page = chromium(browser, tmp_path / "profile1", f"{base}/#/experiments/{exp.experiment_id}/runs", "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    assert "rnnlab-lm" in page.stdout, page.stdout[-3000:]
    assert "train_lm/ptb-lstm" in page.stdout and "train_lm/ptb-ngram" in page.stdout, page.stdout[-3000:]
    (tmp_path / "runs_table.html").write_text(page.stdout)
    # the runs table's own Dataset column names the training data with its DVC md5
    text = visible_text(page.stdout)
    assert "Dataset" in text and f"ptb/train.npy ({inputs['ptb/train.npy']})" in text, text[:3000]

    # the run page shows its metric values
    run_url = f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    page = chromium(browser, tmp_path / "profile2", run_url, "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    assert "train_lm/ptb-lstm" in page.stdout and "final/test_ppl" in page.stdout
    assert str(ppl) in page.stdout, f"metric value {ppl} not in the rendered run page"
    (tmp_path / "run_page.html").write_text(page.stdout)  # kept with the test's temp folder, to read a failure
    # ... and its lineage in MLflow's own fields: Source (the stage script), Datasets (the first input,
    # with the DVC md5 as digest, "+2" more) and the logged model registered from this run.
    assert run.data.tags["mlflow.source.name"] == "pipeline/train_lm.py"
    text = visible_text(page.stdout)
    assert "Source train_lm.py" in text, text[:3000]
    assert f"Datasets ptb/train.npy ({inputs['ptb/train.npy']}) training +2" in text, text[:3000]
    assert "Logged models (1)" in text and "rnnlab-lm-ptb-lstm v1" in text, text[-3000:]

    shot = Path(os.environ.get("RNNLAB_UI_SCREENSHOT") or tmp_path / "ui.png").resolve()
    shot.parent.mkdir(parents=True, exist_ok=True)
    done = chromium(browser, tmp_path / "profile3", run_url, f"--screenshot={shot}")
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
    print(f"MLflow UI screenshot: {shot}")
