"""Start a local HTTP service (``mlflow server`` / ``mlflow ui`` / ``mlflow models serve``) on
127.0.0.1 for a test, wait until its health URL answers, and stop it with its children."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_service(
    cmd: list[str], log_path: Path, health: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 240
):
    """Yield ``(base_url, proc)`` for ``cmd`` (its ``{port}`` placeholders filled with a free port)
    once ``base_url + health`` answers 200; the service's output goes to ``log_path``."""
    # MLflow's background job runner (GenAI scorers: 6-10 worker processes per server) is of no use
    # here and costs a shared machine's cores.
    env = {**(os.environ if env is None else env)}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    port = free_port()
    cmd = [part.replace("{port}", str(port)) for part in cmd]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(base + health):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"{' '.join(cmd[:3])} did not answer {health}:\n" + log_path.read_text()[-3000:]
                    )
                time.sleep(0.5)
            yield base, proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
