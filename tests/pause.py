"""Synchronise a test with a training process paused by ``RNNLAB_PAUSE_AT_STEP`` (see
:class:`rnnlab.resume.PauseAtStep`): no sleeps, no racing a fast machine."""

from __future__ import annotations

import json
import os
import random
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


def save_steps(every: int, steps_per_epoch: int, epochs: int) -> list[int]:
    """The global steps :class:`rnnlab.resume.ResumeCallback` writes ``step-*.ckpt`` at: every
    ``every`` steps except an epoch's last batch (that one is saved at the epoch end), and every
    epoch end. A run paused at ``s + 1`` has the checkpoint of step ``s`` as its newest on disk (the
    pause comes before that step's own save)."""
    periodic = {s for s in range(every, steps_per_epoch * epochs, every) if s % steps_per_epoch} if every else set()
    return sorted(periodic | {steps_per_epoch * e for e in range(1, epochs + 1)})


def random_step(choices: list[int], env: str = "RNNLAB_KILL_AFTER") -> int:
    """A random step out of ``choices`` (``$env`` pins it), printed so that a failure can be replayed."""
    pinned = os.environ.get(env)
    step = int(pinned) if pinned else random.SystemRandom().choice(choices)
    print(f"kill step {step} (replay with {env}={step})")
    return step
