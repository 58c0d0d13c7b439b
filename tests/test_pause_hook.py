"""The test hook that pauses training at a known step (what the process-level tests sync on)."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
from pause import release, wait_for_marker

from rnnlab.errors import RnnlabError
from rnnlab.resume import PauseAtStep


def _batch_end(callback, step):
    callback.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, 0)


def test_pauses_at_its_step_writes_the_marker_and_waits_for_release(tmp_path):
    callback = PauseAtStep(7, tmp_path)
    _batch_end(callback, 6)  # another step: no marker, no wait
    assert not list(tmp_path.iterdir())
    worker = threading.Thread(target=_batch_end, args=(callback, 7), daemon=True)
    worker.start()
    assert wait_for_marker(tmp_path, timeout_s=10) == {"step": 7, "pid": os.getpid()}
    worker.join(0.3)
    assert worker.is_alive()  # still paused: nothing released it
    release(tmp_path)
    worker.join(10)
    assert not worker.is_alive()


def test_a_caught_signal_ends_the_pause(tmp_path):
    stop = threading.Event()
    worker = threading.Thread(target=_batch_end, args=(PauseAtStep(3, tmp_path, stopped=stop.is_set), 3), daemon=True)
    worker.start()
    wait_for_marker(tmp_path, timeout_s=10)
    worker.join(0.3)
    assert worker.is_alive()
    stop.set()
    worker.join(10)
    assert not worker.is_alive() and not (tmp_path / "release").exists()


def test_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RNNLAB_PAUSE_AT_STEP", raising=False)
    assert PauseAtStep.from_env() is None
    monkeypatch.setenv("RNNLAB_PAUSE_AT_STEP", "5")
    monkeypatch.delenv("RNNLAB_PAUSE_DIR", raising=False)
    with pytest.raises(RnnlabError, match="RNNLAB_PAUSE_DIR"):
        PauseAtStep.from_env()
    monkeypatch.setenv("RNNLAB_PAUSE_DIR", str(tmp_path))
    callback = PauseAtStep.from_env()
    assert (callback.step, callback.folder) == (5, tmp_path)
