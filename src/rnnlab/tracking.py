"""Experiment tracking (MLflow), optional at import time.

DVC owns params, lineage, model files and final metrics JSON; MLflow owns curves, samples, images
and run comparison (STYLE.md). Training code talks to a ``Tracker``; when MLflow is not installed
(e.g. a bare GPU box) or tracking is disabled, a ``NullTracker`` keeps everything runnable.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (MLflow
>= 3.14 refuses the plain file store). ``MLFLOW_TRACKING_URI`` overrides it (a real server).
Every run is tagged with the git commit (+ dirty flag), the DVC stage and the md5 of each data
dependency, so a run can be traced to the exact code and data.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rnnlab.config import flatten

log = logging.getLogger(__name__)
MAX_PARAM_LEN = 500  # MLflow limits param values; long lists are summarised, never rejected


def default_tracking_uri(root: Path | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def md5_path(path: str | Path) -> str:
    """md5 of a file's bytes (as DVC 3 computes it), or of the sorted (relpath, md5) list of a folder."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if path.is_dir():
        lines = [f"{p.relative_to(path).as_posix()} {md5_path(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
        return hashlib.md5("\n".join(lines).encode()).hexdigest()
    return "missing"


def git_info(root: Path | None = None) -> dict[str, str]:
    root = root or Path.cwd()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        return {"git_commit": commit, "git_dirty": str(bool(status.strip())).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


class NullTracker:
    """Tracker that records nothing (tracking disabled or MLflow absent)."""

    run_id: str | None = None
    enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class MlflowTracker(NullTracker):
    enabled = True

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = []
        for key, value in flatten(dict(params)).items():
            text = str(value)
            if len(text) > MAX_PARAM_LEN:
                text = text[: MAX_PARAM_LEN - 3] + "..."
            items.append(Param(key, text))
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


def _get_experiment_id(client, name: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifact_location = (root / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


@contextlib.contextmanager
def tracked_run(
    run_name: str,
    stage: str,
    experiment: str = "rnnlab",
    enabled: bool = True,
    params: Mapping[str, Any] | None = None,
    data_deps: list[str | Path] | None = None,
    tags: Mapping[str, str] | None = None,
    root: Path | None = None,
    run_id: str | None = None,
) -> Iterator[NullTracker]:
    """Open an MLflow run (or a NullTracker) and close it FINISHED / FAILED / KILLED.

    ``run_id`` continues an existing run (resume) instead of creating a new one.
    """
    root = (root or Path.cwd()).resolve()
    if not enabled:
        yield NullTracker()
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning("mlflow is not installed: tracking disabled for %s", run_name)
        yield NullTracker()
        return
    uri = default_tracking_uri(root)
    client = MlflowClient(tracking_uri=uri)
    try:
        exp_id = _get_experiment_id(client, experiment, root)
    except Exception as exc:  # noqa: BLE001 - any backend failure is reported the same way
        from rnnlab.errors import RnnlabError

        raise RnnlabError(f"MLflow tracking store {uri} is unreachable: {exc}") from exc
    if run_id is None:
        run = client.create_run(exp_id, run_name=run_name)
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    tracker = MlflowTracker(client, run_id)
    all_tags = {"dvc_stage": stage, "rnnlab.run_name": run_name, **git_info(root), **(tags or {})}
    for dep in data_deps or []:
        rel = Path(dep)
        all_tags[f"data_md5.{rel.as_posix()}"] = md5_path(root / rel if not rel.is_absolute() else rel)
    tracker.set_tags(all_tags)
    if params:
        tracker.log_params(params)
    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        client.set_terminated(run_id, status=status)
