"""Experiment tracking (MLflow), optional at import time.

DVC owns params, lineage, model files and final metrics JSON; MLflow owns curves, samples, images
and run comparison (STYLE.md). Training code talks to a ``Tracker``; when MLflow is not installed
(e.g. a bare GPU box) or tracking is disabled, a ``NullTracker`` keeps everything runnable.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (MLflow
>= 3.14 refuses the plain file store). ``MLFLOW_TRACKING_URI`` overrides it (a real server).
Every run is tagged with the git commit (+ dirty flag), the DVC stage and the md5 of each data
dependency, so a run can be traced to the exact code and data.

Reliability (README "Reliability"): a tracking *server* that cannot be reached when a run starts
is a clear error at once (``/health`` probe). One that goes away mid-run does not stop
training: calls are queued in memory (bounded) and re-sent, in order, when it answers again
(tried again at most every ``RNNLAB_MLFLOW_RETRY_S`` seconds, default 30); whatever is still
unsent when the run ends is reported as a warning with counts. Checkpoints and DVC outputs never
depend on the tracker. Only global rank 0 of a distributed run tracks. Logged params never
contain an absolute path of the machine (made relative to the repository, or reduced to a name).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rnnlab.config import flatten

log = logging.getLogger(__name__)
MAX_PARAM_LEN = 500  # MLflow limits param values; long lists are summarised, never rejected
MAX_QUEUED_METRICS = 100_000  # metric points kept while the server is away; older ones are dropped
# The MLflow client retries a dead server for minutes by default; a stage should learn it fast.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


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
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {"git_commit": commit, "git_dirty": str(bool(status.strip())).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def redact_uri(uri: str) -> str:
    """The URI without user:password (for messages)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def probe_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, when an http(s) tracking server does not answer."""
    from rnnlab.errors import RnnlabError

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answered (auth proxies may refuse /health): reachable
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RnnlabError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason}); start it, point "
            "MLFLOW_TRACKING_URI at a running server, unset MLFLOW_TRACKING_URI to use the local sqlite store, "
            "or set tracking.enabled: false"
        ) from exc


def scrub(value: Any, root: Path) -> Any:
    """Replace absolute paths in logged values: relative to ``root`` if inside it, else the name."""
    if isinstance(value, dict):
        return {k: scrub(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, root) for v in value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value)
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return f"<abs>/{path.name}"
    return value


def _scrub_text(text: str, root: Path) -> str:
    return text.replace(str(root), ".").replace(str(Path.home()), "~")


def _is_unreachable(exc: BaseException) -> bool:
    """Connection-level failures (server down / network), as opposed to MLflow rejecting a call."""
    import socket

    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return False  # a local file problem (an artifact deleted before a retry...), not the server
    try:
        import requests

        if isinstance(exc, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    text = str(exc)
    return any(
        s in text
        for s in (
            "Max retries exceeded",
            "Connection refused",
            "Failed to establish",
            "timed out",
            "Connection aborted",
            "RemoteDisconnected",
        )
    )


class NullTracker:
    """Tracker that records nothing (tracking disabled, MLflow absent, or a rank other than 0)."""

    run_id: str | None = None
    enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_datasets(self, datasets: list, context: str) -> None: ...


class MlflowTracker(NullTracker):
    """Logs to one MLflow run through ``MlflowClient``; survives the server going away.

    Every call goes into an ordered queue that is sent at once when the server answers. When it
    does not (connection refused, timeout), training goes on: the queue keeps growing (metric
    points beyond ``MAX_QUEUED_METRICS`` are dropped, oldest first, and counted) and is re-sent
    at the next call at least ``retry_interval_s`` later. A call MLflow *rejects* (not a
    connection problem) is dropped with a warning. ``close`` makes a last attempt and reports
    what could not be sent.
    """

    enabled = True

    def __init__(self, client, run_id: str, uri: str = "", retry_interval_s: float | None = None):
        self.client, self.run_id, self.uri = client, run_id, redact_uri(uri)
        if retry_interval_s is None:
            retry_interval_s = float(os.environ.get("RNNLAB_MLFLOW_RETRY_S", "30"))
        self.retry_interval_s = retry_interval_s
        self._queue: list[tuple[str, Callable[[], None], int]] = []  # (what, call, metric points)
        self.down_since: float | None = None
        self._next_try = 0.0
        self.dropped_metrics = 0  # metric points dropped (queue full)
        self.rejected_calls = 0  # calls MLflow refused
        self.outages = 0

    # -- queue -----------------------------------------------------------------------------
    @property
    def queued_metrics(self) -> int:
        return sum(n for _, _, n in self._queue)

    @property
    def queued_calls(self) -> int:
        return len(self._queue)

    def _enqueue(self, what: str, call: Callable[[], None], points: int = 0) -> None:
        self._queue.append((what, call, points))
        while self.queued_metrics > MAX_QUEUED_METRICS:
            i = next(i for i, (_, _, n) in enumerate(self._queue) if n)
            self.dropped_metrics += self._queue.pop(i)[2]
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send the queue in order; True when it is empty afterwards."""
        if self.down_since is not None and not force and time.monotonic() < self._next_try:
            return False
        sent = 0
        while self._queue:
            what, call, _ = self._queue[0]
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - the tracker must never stop training
                if _is_unreachable(exc):
                    self._went_down(exc)
                    return False
                self.rejected_calls += 1
                log.warning("MLflow rejected %s for run %s (dropped): %s", what, self.run_id, exc)
            self._queue.pop(0)
            sent += 1
        if self.down_since is not None:
            log.warning(
                "MLflow tracking at %s is reachable again after %.0f s; sent %d queued calls",
                self.uri,
                time.monotonic() - self.down_since,
                sent,
            )
            self.down_since = None
        return True

    def _went_down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            log.warning(
                "MLflow tracking at %s is unreachable (%s): training continues; tracking calls are "
                "queued and re-sent when it answers",
                self.uri,
                str(exc).splitlines()[0][:200],
            )
        self._next_try = time.monotonic() + self.retry_interval_s

    def close(self, status: str) -> None:
        """Send the queue, then mark the run ``status``. A server that is away keeps being retried
        for ``RNNLAB_MLFLOW_CLOSE_WAIT_S`` seconds (default 60: a server restart takes ~10 s), so a
        run that ends during an outage still arrives whole; after that, report what was lost."""
        wait_s = float(os.environ.get("RNNLAB_MLFLOW_CLOSE_WAIT_S", "60"))
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            self.flush(force=True)
            if not self._queue:
                try:
                    self.client.set_terminated(self.run_id, status=status)
                    return
                except Exception as exc:  # noqa: BLE001
                    if not _is_unreachable(exc):
                        log.warning("MLflow rejected closing run %s as %s: %s", self.run_id, status, exc)
                        return
                    self._went_down(exc)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not announced:
                log.warning(
                    "MLflow tracking at %s is unreachable at the end of run %s: retrying for up to %.0f s "
                    "(%d calls queued)",
                    self.uri,
                    self.run_id,
                    wait_s,
                    self.queued_calls,
                )
                announced = True
            time.sleep(min(2.0, left))
        log.warning(
            "MLflow tracking at %s unreachable at the end of run %s: %d calls (%d metric points) not recorded, "
            "%d metric points dropped while it was away, run left RUNNING (should be %s). The checkpoint and the "
            "DVC outputs are complete.",
            self.uri,
            self.run_id,
            self.queued_calls,
            self.queued_metrics,
            self.dropped_metrics,
            status,
        )

    # -- the Tracker interface -------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = []
        for key, value in flatten(dict(params)).items():
            text = str(value)
            if len(text) > MAX_PARAM_LEN:
                text = text[: MAX_PARAM_LEN - 3] + "..."
            items.append(Param(key, text))
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._enqueue("params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the time of the measurement, kept if it is sent later
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._enqueue("metrics", lambda: self.client.log_batch(self.run_id, metrics=items), len(items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            call = lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path)  # noqa: E731
        else:
            call = lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)  # noqa: E731
        self._enqueue(f"artifact {path.name}", call)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._enqueue(f"text {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._enqueue(f"dict {artifact_file}", lambda: self.client.log_dict(self.run_id, data, artifact_file))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._enqueue(f"tag {k}", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))

    def log_datasets(self, datasets: list, context: str) -> None:
        """Record ``datasets`` (``mlflow.data`` datasets) as the run's inputs, tagged with ``context``."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [DatasetInput(d._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)]) for d in datasets]
        if inputs:
            self._enqueue("dataset inputs", lambda: self.client.log_inputs(self.run_id, datasets=inputs))


def _get_experiment_id(client, name: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifact_location = (root / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception as exc:  # noqa: BLE001
        # Two processes (parallel DVC queue workers) creating it at once: the other one won.
        if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _dep_key(dep: str | Path, root: Path) -> tuple[str, Path]:
    """(tag key part, path to hash): relative to ``root`` when possible, never an absolute path."""
    path = Path(dep)
    full = path if path.is_absolute() else root / path
    try:
        return full.resolve().relative_to(root).as_posix(), full
    except ValueError:
        return "ext/" + "/".join(full.parts[-2:]), full


def _dvc_source_class():
    """``DvcPathSource``: an MLflow dataset source naming a path of this DVC repository (source type
    ``dvc``, JSON ``{"path": "data/prepared/ptb/train.npy"}``), registered with MLflow once, so
    ``mlflow.data.get_source`` reads it back. Its ``load`` returns the path (``dvc pull`` brings the file)."""
    global _DVC_SOURCE
    if _DVC_SOURCE is None:
        from mlflow.data.dataset_source import DatasetSource
        from mlflow.data.dataset_source_registry import register_dataset_source

        class DvcPathSource(DatasetSource):
            def __init__(self, path: str):
                self.path = path

            @staticmethod
            def _get_source_type() -> str:
                return "dvc"

            def load(self) -> str:
                return self.path

            @staticmethod
            def _can_resolve(raw_source: Any) -> bool:
                return False  # never guessed from a bare string: built explicitly

            @classmethod
            def _resolve(cls, raw_source: Any) -> DvcPathSource:
                return cls(str(raw_source))

            def to_dict(self) -> dict[str, Any]:
                return {"path": self.path}

            @classmethod
            def from_dict(cls, source_dict: dict) -> DvcPathSource:
                return cls(source_dict["path"])

        register_dataset_source(DvcPathSource)
        _DVC_SOURCE = DvcPathSource
    return _DVC_SOURCE


_DVC_SOURCE = None


def data_dataset(dep: str | Path, root: Path, digest: str | None = None):
    """An MLflow dataset for data file/folder ``dep`` (the run's Dataset column): name = its last two
    path parts (``ptb/train.npy``), digest = its md5 as DVC computes it (:func:`md5_path`), source =
    its path relative to the repository (as in ``dvc.yaml``; ``ext/...`` outside it)."""
    from mlflow.data.meta_dataset import MetaDataset

    key, full = _dep_key(dep, root)
    name = "/".join(Path(key).parts[-2:])
    return MetaDataset(source=_dvc_source_class()(key), name=name, digest=digest or md5_path(full))


def source_tags(stage: str, git: Mapping[str, str]) -> dict[str, str]:
    """MLflow's own source tags (the runs table's Source column, the run page's Source and Git
    commit): the stage's script ``pipeline/<stage>.py``, type LOCAL (a script run on this machine,
    by DVC or by hand), and the git commit when it is known."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    tags = {MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_SOURCE_NAME: f"pipeline/{stage.split('@')[0]}.py"}
    if git.get("git_commit", "unknown") != "unknown":
        tags[MLFLOW_GIT_COMMIT] = git["git_commit"]
    return tags


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
    dataset_context: str | None = "training",
) -> Iterator[NullTracker]:
    """Open an MLflow run (or a NullTracker) and close it FINISHED / FAILED / KILLED.

    Lineage in MLflow's own terms: the source tags (:func:`source_tags`) and, unless
    ``dataset_context`` is None, each of ``data_deps`` as a dataset input of the run
    (:func:`data_dataset`, tagged with that context); ``data_md5.<path>`` tags hold the same md5s.

    ``run_id`` continues an existing run (resume) instead of creating a new one; if the store no
    longer has it, a new run is created with a warning. An exception carrying ``run_status``
    (``rnnlab.resume.TrainingInterrupted``) or a KeyboardInterrupt closes the run KILLED.
    """
    from rnnlab.distributed import global_rank

    root = (root or Path.cwd()).resolve()
    if not enabled or global_rank() != 0:
        yield NullTracker()
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning("mlflow is not installed: tracking disabled for %s", run_name)
        yield NullTracker()
        return
    from rnnlab.errors import RnnlabError

    uri = default_tracking_uri(root)
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        probe_server(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        exp_id = _get_experiment_id(client, experiment, root)
        existing_params: dict[str, str] = {}
        if run_id is not None:
            try:
                existing_params = dict(client.get_run(run_id).data.params)
                client.update_run(run_id, status="RUNNING")
                log.info("continuing MLflow run %s", run_id)
            except Exception as exc:  # noqa: BLE001
                if _is_unreachable(exc):
                    raise
                log.warning(
                    "MLflow run %s to continue is not in %s (%s); starting a new run",
                    run_id,
                    redact_uri(uri),
                    str(exc).splitlines()[0][:200],
                )
                run_id = None
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    except RnnlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend failure is reported the same way
        text = str(exc)
        if "error code 401" in text or "error code 403" in text:
            code = "401" if "error code 401" in text else "403"
            raise RnnlabError(
                f"MLflow tracking server {redact_uri(uri)} refused the credentials (HTTP {code}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment (never in params.yaml)"
            ) from exc
        raise RnnlabError(f"MLflow tracking store {redact_uri(uri)} is unreachable: {exc}") from exc
    tracker = MlflowTracker(client, run_id, uri)
    git = git_info(root)
    all_tags = {"dvc_stage": stage, "rnnlab.run_name": run_name, **git, **source_tags(stage, git), **(tags or {})}
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run` (and its queue workers): which experiment this is
        all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    digests = {dep: md5_path(_dep_key(dep, root)[1]) for dep in data_deps or []}
    for dep, digest in digests.items():
        all_tags[f"data_md5.{_dep_key(dep, root)[0]}"] = digest
    tracker.set_tags(all_tags)
    if dataset_context:
        tracker.log_datasets([data_dataset(dep, root, digest) for dep, digest in digests.items()], dataset_context)
    if params:
        flat = flatten(scrub(dict(params), root))
        changed = {
            k: (existing_params[k], str(v))
            for k, v in flat.items()
            if k in existing_params and existing_params[k] != str(v)[:MAX_PARAM_LEN]
        }
        for key, (old, new) in changed.items():
            log.warning(
                "param %s changed from %r to %r since MLflow run %s started; MLflow keeps %r",
                key,
                old,
                new,
                run_id,
                old,
            )
        tracker.log_params({k: v for k, v in flat.items() if k not in existing_params})
    status = "FINISHED"
    try:
        yield tracker
    except BaseException as exc:
        status = getattr(exc, "run_status", None) or ("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        tracker.set_tags({"rnnlab.error": _scrub_text(f"{type(exc).__name__}: {exc}", root)[:500]})
        raise
    finally:
        tracker.close(status)
