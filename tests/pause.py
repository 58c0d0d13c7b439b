"""Synchronise a test with a training process paused by ``RNNLAB_PAUSE_AT_STEP`` (see
:class:`rnnlab.resume.PauseAtStep`): no sleeps, no racing a fast machine."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rnnlab.resume import PAUSE_AT_STEP_ENV, PAUSE_DIR_ENV


def pause_env(step: int, folder: Path) -> dict[str, str]:
    """Environment variables that pause a training process at global step ``step``."""
    return {PAUSE_AT_STEP_ENV: str(step), PAUSE_DIR_ENV: str(folder)}


def wait_for_marker(folder: Path, rank: int = 0, timeout_s: float = 300, process=None) -> dict:
    """The marker ``paused-rank<rank>.json`` ({step, pid}) once the trainer is paused; fails after
    ``timeout_s`` or as soon as ``process`` (a Popen) exits without pausing."""
    marker = Path(folder) / f"paused-rank{rank}.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if marker.exists():
            try:
                return json.loads(marker.read_text())
            except json.JSONDecodeError:
                pass  # written atomically, but be safe on odd file systems
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process exited ({process.returncode}) before pausing:\n{out}\n{err}")
        time.sleep(0.05)
    raise AssertionError(f"no {marker} within {timeout_s} s")


def release(folder: Path) -> None:
    """Let every paused rank continue."""
    (Path(folder) / "release").touch()
