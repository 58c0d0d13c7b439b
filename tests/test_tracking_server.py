"""The team tracking setup (``scripts/tracking-server``, README "Scaling"): real PostgreSQL + a real
``mlflow server`` on 127.0.0.1 (free ports, a temporary state folder), driven through the
project's own ``rnnlab.tracking.tracked_run``.

- runs, params, metrics, tags, artifacts and a registered model arrive, and are in PostgreSQL;
- the mlflow server restarted, and PostgreSQL crash-stopped, in the middle of a run that keeps
  logging: every metric point arrives (the tracker's queue re-sends) and the run ends FINISHED;
- ``--auth`` (MLflow's basic-auth app): no credentials -> 401 and nothing written; credentials
  from MLFLOW_TRACKING_USERNAME/PASSWORD -> the run logs, and the password is in no param or tag.

Every server is stopped by the fixtures' finalizers, also when a test fails. The script installs
PostgreSQL with apt-get when it is missing (a fresh CI machine); psycopg2-binary and Flask-WTF
come with the project's ``test`` extra.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from local_server import free_port

from rnnlab.tracking import md5_path, tracked_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tracking-server"
START_TIMEOUT = 240  # a cold mlflow server migrates an empty PostgreSQL store on a 2-core machine


def wait_until(condition, timeout: float, what: str, poll: float = 0.1):
    """Poll ``condition`` (an event, not a fixed sleep) until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class TrackingSetup:
    """One ``scripts/tracking-server`` state folder: its own PostgreSQL cluster and mlflow server."""

    def __init__(self, auth: bool = False, admin: tuple[str, str] | None = None):
        # Not under pytest's tmp_path: that is mode 700 under /tmp/pytest-of-root, and PostgreSQL
        # runs as another user when the tests run as root (it must reach its data folder).
        self.dir = Path(tempfile.mkdtemp(prefix="rnnlab-tracking-"))
        os.chmod(self.dir, 0o711)
        self.pg_port = self.port = free_port()
        while self.port == self.pg_port:
            self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TRACKING_DIR": str(self.dir),
            "TRACKING_PG_PORT": str(self.pg_port),
            "TRACKING_MLFLOW_PORT": str(self.port),
            "TRACKING_AUTH": "1" if auth else "0",
            "TRACKING_MLFLOW_WORKERS": "1",
            "TRACKING_PYTHON": sys.executable,
            "TRACKING_START_TIMEOUT": str(START_TIMEOUT),
        }
        for key in (
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_AUTH_ADMIN_USERNAME",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
        ):
            self.env.pop(key, None)
        if admin:
            self.env.update(MLFLOW_AUTH_ADMIN_USERNAME=admin[0], MLFLOW_AUTH_ADMIN_PASSWORD=admin[1])

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=START_TIMEOUT + 60
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"tracking-server {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{self.log_tail()}"
            )
        return proc

    def log_tail(self) -> str:
        log = self.dir / "mlflow.log"
        return "mlflow.log:\n" + log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def health(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def sql(self, query: str, *args, db: str = "mlflow"):
        """Rows straight from PostgreSQL (database ``mlflow``, or ``mlflow_auth``), as the server's role."""
        import psycopg2

        password = (self.dir / "pgpass").read_text().strip().split(":")[4]
        with contextlib.closing(
            psycopg2.connect(
                host="127.0.0.1", port=self.pg_port, dbname=db, user="mlflow", password=password, connect_timeout=5
            )
        ) as conn:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()

    def _pids(self) -> tuple[int | None, int | None]:
        def read(path: Path) -> int | None:
            try:
                return int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None

        return read(self.dir / "mlflow.pid"), read(self.dir / "pg" / "postmaster.pid")

    def teardown(self) -> None:
        """Stop everything (the script; then signals for anything it left), remove the folder."""
        problems = []
        try:
            proc = self.script("stop", check=False)
            if proc.returncode != 0:
                problems.append(f"stop failed: {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
        finally:
            mlflow_pid, pg_pid = self._pids()
            if mlflow_pid and _alive(-mlflow_pid):
                problems.append(f"mlflow server group {mlflow_pid} still alive after stop")
                with contextlib.suppress(OSError):
                    os.killpg(mlflow_pid, signal.SIGKILL)
            if pg_pid and _alive(pg_pid):
                problems.append(f"postmaster {pg_pid} still alive after stop")
                with contextlib.suppress(OSError):
                    os.kill(pg_pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: not _alive(pg_pid), 30, "the postmaster to exit")
            shutil.rmtree(self.dir, ignore_errors=True)
        assert not problems, problems


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0) if pid > 0 else os.killpg(-pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if pid > 0:  # a zombie is gone for our purposes
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


def _start(setup: TrackingSetup) -> TrackingSetup:
    for module, pip in (("psycopg2", "psycopg2-binary"), ("flask_wtf", "Flask-WTF")):
        try:
            __import__(module)
        except ImportError:
            raise AssertionError(f"{module} is missing: pip install -e '.[test]' (it brings {pip})") from None
    out = setup.script("start").stdout
    assert f"MLFLOW_TRACKING_URI={setup.url}" in out and setup.health()
    return setup


@pytest.fixture(scope="module")
def server():
    setup = TrackingSetup()
    try:
        yield _start(setup)
    finally:
        setup.teardown()


@pytest.fixture(scope="module")
def auth_server():
    admin = ("admin", "adm-" + secrets.token_urlsafe(12))
    setup = TrackingSetup(auth=True, admin=admin)
    setup.admin = admin
    try:
        yield _start(setup)
    finally:
        setup.teardown()


@pytest.fixture
def tracking_env(monkeypatch):
    """The environment a stage sees; the MLflow HTTP settings tracked_run sets are restored after."""
    monkeypatch.setenv("RNNLAB_MLFLOW_RETRY_S", "0.5")
    for key, value in {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_tracked_run_params_metrics_tags_artifacts_and_model_land_in_postgres(server, tracking_env, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking_env.setenv("MLFLOW_TRACKING_URI", server.url)
    status = server.script("status")
    assert f"running on 127.0.0.1:{server.pg_port}" in status.stdout and server.url in status.stdout
    data = tmp_path / "data" / "train.txt"
    data.parent.mkdir()
    data.write_text("the cat sat on the mat\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.ckpt").write_bytes(os.urandom(4096))
    (model / "vocab.json").write_text(json.dumps({"<unk>": 0, "cat": 1}))
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"epoch": 1, "val_ppl": 310.5}]))

    with tracked_run(
        "train_lm/ptb-lstm",
        "train_lm",
        experiment="team-scale",
        enabled=True,
        root=tmp_path,
        params={"model": {"hidden_size": 32, "dropout": 0.25}, "prepared": str(tmp_path / "data")},
        data_deps=[data],
        tags={"team": "nlp"},
    ) as tracker:
        for step in range(1, 6):
            tracker.log_metrics({"train/loss": 6.0 / step, "lr": 20.0}, step=step)
        tracker.log_artifact(history)
        tracker.log_artifact(model, "model")
        run_id = tracker.run_id
    assert tracker.queued_calls == 0 and tracker.outages == 0

    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train_lm/ptb-lstm"
    assert run.data.params == {"model.hidden_size": "32", "model.dropout": "0.25", "prepared": "data"}
    assert run.data.tags["dvc_stage"] == "train_lm" and run.data.tags["team"] == "nlp"
    assert run.data.tags["data_md5.data/train.txt"] == md5_path(data)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (s, pytest.approx(6.0 / s)) for s in range(1, 6)
    ]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # through the server's proxy
    assert {a.path for a in client.list_artifacts(run_id)} == {"history.json", "model"}
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.ckpt", "model/vocab.json"}
    (stored,) = (server.dir / "artifacts").rglob("model.ckpt")
    assert stored.read_bytes() == (model / "model.ckpt").read_bytes()

    # A registered model on the logged folder.
    client.create_registered_model("ptb-lstm")
    version = client.create_model_version("ptb-lstm", f"{run.info.artifact_uri}/model", run_id=run_id)
    got = client.get_model_version("ptb-lstm", version.version)
    assert got.status == "READY" and got.run_id == run_id and got.source.endswith("/model")
    fetched = Path(client.download_artifacts(run_id, "model", str(tmp_path / "dl")))
    assert (fetched / "vocab.json").read_text() == (model / "vocab.json").read_text()

    # And it is all in PostgreSQL itself (no local store anywhere).
    assert server.sql("SELECT status, name FROM runs WHERE run_uuid = %s", run_id) == [
        ("FINISHED", "train_lm/ptb-lstm")
    ]
    assert dict(server.sql("SELECT key, value FROM params WHERE run_uuid = %s", run_id))["model.hidden_size"] == "32"
    assert server.sql("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'", run_id) == [(5,)]
    assert server.sql("SELECT value FROM tags WHERE run_uuid = %s AND key = 'team'", run_id) == [("nlp",)]
    assert server.sql("SELECT name, version, run_id FROM model_versions") == [("ptb-lstm", 1, run_id)]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


class KeepsLogging(threading.Thread):
    """A tracked run in a thread that logs one metric point every ``pace`` seconds until told to stop
    (the tracker is used from this thread only; the test reads its counters)."""

    def __init__(self, name: str, root: Path, pace: float = 0.05):
        super().__init__(daemon=True)
        self.run_name, self.root, self.pace = name, root, pace
        self.logged: list[tuple[int, float]] = []
        self.tracker = None
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            with tracked_run(
                self.run_name,
                "train_lm",
                experiment="team-scale-outages",
                root=self.root,
                params={"hidden_size": 32},
                tags={"outage": self.run_name},
            ) as tracker:
                self.tracker = tracker
                step = 0
                while not self.stop.is_set():
                    value = 1000.0 / (step + 1)
                    tracker.log_metrics({"train/loss": value}, step=step)
                    self.logged.append((step, value))
                    step += 1
                    self.stop.wait(self.pace)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_logged(self, n: int, what: str, timeout: float = 120):
        target = len(self.logged) + n
        wait_until(lambda: len(self.logged) >= target or not self.is_alive(), timeout, what)
        assert self.is_alive(), f"the tracked run ended early: {self.error!r}"


def _through_an_outage(server, tmp_path, name: str, go_down, come_back):
    """Run a tracked run through ``go_down()`` ... ``come_back()``; check nothing was lost."""
    from mlflow.tracking import MlflowClient

    run = KeepsLogging(name, tmp_path)
    run.start()
    try:
        run.wait_logged(20, "20 points before the outage")
        assert run.tracker.outages == 0  # (queued_calls is 1 for an instant during each call)
        go_down()
        # The tracker notices by itself (a call fails), keeps the run going and queues.
        wait_until(
            lambda: run.tracker.down_since is not None or not run.is_alive(), 120, "the tracker to see the outage"
        )
        run.wait_logged(20, "20 points logged during the outage")
        assert run.tracker.queued_metrics > 0
        come_back()
        # The queue drains while the run goes on (re-sent in order), not only at its end.
        wait_until(
            lambda: (run.tracker.down_since is None and run.tracker.queued_calls == 0) or not run.is_alive(),
            180,
            "the queue to be re-sent after the outage",
        )
        run.wait_logged(20, "20 points after the outage")
    finally:
        run.stop.set()
        run.join(120)
    assert not run.is_alive() and run.error is None, repr(run.error)
    tracker = run.tracker
    assert tracker.outages == 1 and tracker.dropped_metrics == 0 and tracker.rejected_calls == 0
    assert tracker.queued_calls == 0
    client = MlflowClient(tracking_uri=server.url)
    stored = client.get_run(tracker.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"hidden_size": "32"} and stored.data.tags["outage"] == name
    history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train/loss"))
    assert len(history) == len(run.logged) >= 60, (len(history), len(run.logged))
    assert history == [(s, pytest.approx(v)) for s, v in run.logged]  # every point, once, none altered
    assert server.sql("SELECT count(*) FROM metrics WHERE run_uuid = %s", tracker.run_id) == [(len(run.logged),)]


def test_mlflow_server_restart_mid_run_loses_no_metric_point(server, tracking_env, tmp_path):
    tracking_env.setenv("MLFLOW_TRACKING_URI", server.url)

    def go_down():
        server.script("stop", "mlflow")  # returns once the server's process group is gone
        assert not server.health()

    def come_back():
        server.script("start", "mlflow")  # returns once /health answers
        assert server.health()

    _through_an_outage(server, tmp_path, "restart-mlflow", go_down, come_back)


def test_postgres_killed_mid_run_loses_no_metric_point(server, tracking_env, tmp_path):
    tracking_env.setenv("MLFLOW_TRACKING_URI", server.url)
    pg_down = {}

    def go_down():
        server.script("stop", "postgres", "--immediate")  # a crash: no checkpoint, recovery on start
        pg_down["at"] = time.monotonic()
        assert server.health()  # the mlflow server stays up and answers 5xx for the store

    def come_back():
        # Keep PostgreSQL away a few seconds while the run goes on logging into the queue.
        time.sleep(max(0.0, 3.0 - (time.monotonic() - pg_down["at"])))
        server.script("start", "postgres")  # pg_ctl -w: returns once it accepts connections
        assert "running on" in server.script("status").stdout

    _through_an_outage(server, tmp_path, "kill-postgres", go_down, come_back)


def _request(url: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_basic_auth_refuses_anonymous_writes_and_logs_with_env_credentials(auth_server, tracking_env, tmp_path):
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    from rnnlab.errors import RnnlabError

    url, admin = auth_server.url, auth_server.admin
    api = url + "/api/2.0/mlflow"
    # No credentials: 401, and nothing is written.
    assert _request(api + "/experiments/create", {"name": "intruder"}) == 401
    assert _request(api + "/experiments/search", {"max_results": 10}) == 401
    assert _request(api + "/experiments/create", {"name": "intruder"}, auth=("admin", "wrong")) == 401
    tracking_env.setenv("MLFLOW_TRACKING_URI", url)
    with pytest.raises(RnnlabError, match=r"refused the credentials \(HTTP 401\): set MLFLOW_TRACKING_USERNAME"):
        with tracked_run("anonymous", "train_lm", experiment="team-auth", root=tmp_path):
            pass
    assert auth_server.sql("SELECT count(*) FROM experiments WHERE name IN ('intruder', 'team-auth')") == [(0,)]
    assert auth_server.sql("SELECT count(*) FROM runs") == [(0,)]

    # A lab member created by the admin logs through the environment's credentials.
    alice = ("alice", "pw-" + secrets.token_urlsafe(16))
    tracking_env.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    tracking_env.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    get_app_client("basic-auth", tracking_uri=url).create_user(*alice)
    tracking_env.setenv("MLFLOW_TRACKING_USERNAME", alice[0])
    tracking_env.setenv("MLFLOW_TRACKING_PASSWORD", alice[1])
    note = tmp_path / "note.txt"
    note.write_text("logged with credentials\n")
    with tracked_run(
        "with-credentials",
        "train_lm",
        experiment="team-auth",
        root=tmp_path,
        params={"hidden_size": 32, "tracking": {"enabled": True}},
        tags={"team": "nlp"},
    ) as tracker:
        tracker.log_metrics({"train/loss": 1.5}, step=1)
        tracker.log_artifact(note)
        run_id = tracker.run_id
    assert tracker.queued_calls == 0 and tracker.rejected_calls == 0

    run = MlflowClient(tracking_uri=url).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["hidden_size"] == "32"
    assert run.data.metrics == {"train/loss": 1.5} and run.data.tags["team"] == "nlp"
    assert [a.path for a in MlflowClient(tracking_uri=url).list_artifacts(run_id)] == ["note.txt"]
    # The password is nowhere in what was logged (params, tags), nor in the server's store or log.
    for password in (alice[1], admin[1]):
        logged = json.dumps([run.data.params, run.data.tags])
        assert password not in logged
        assert auth_server.sql(
            "SELECT count(*) FROM params WHERE value LIKE %s OR key LIKE %s", f"%{password}%", f"%{password}%"
        ) == [(0,)]
        assert auth_server.sql("SELECT count(*) FROM tags WHERE value LIKE %s", f"%{password}%") == [(0,)]
        assert password not in (auth_server.dir / "mlflow.log").read_text(errors="replace")
    # The auth app's users are in PostgreSQL too (database mlflow_auth), passwords only hashed.
    users = auth_server.sql("SELECT username, is_admin, password_hash FROM users ORDER BY username", db="mlflow_auth")
    assert [(u, a) for u, a, _ in users] == [("admin", True), ("alice", False)]
    assert not [h for _, _, h in users if alice[1] in h or admin[1] in h]
    assert _request(api + "/experiments/search", {"max_results": 10}, auth=alice) == 200
    assert _request(api + "/experiments/search", {"max_results": 10}, auth=(alice[0], admin[1])) == 401
    for written in ("basic_auth.ini", "state.env"):  # the script keeps the admin password out of its files
        assert admin[1] not in (auth_server.dir / written).read_text()
