"""Resumable training for every training stage (LM, seq2seq, captioning), on Lightning's own
checkpoint/restore machinery (used by :func:`rnnlab.training.fit`).

A run killed at any moment (SIGKILL, OOM, power loss) and started again continues from its last
checkpoint instead of starting over, and on CPU with a fixed seed it ends with the same weights
and metrics as a run that was never interrupted. What a checkpoint holds:

- model, optimizer, LR scheduler, loop progress, callback states: Lightning's checkpoint;
- the data position: ``ResumableLoader.state_dict`` (batches already served this epoch, and the
  RNG state the epoch's shuffle was drawn from), restored by Lightning's fit loop (a plain
  DataLoader would restart the epoch);
- per-rank state, gathered from every DDP rank: the torch/numpy/python (and CUDA) RNG states
  and whatever the LightningModule returns from ``resume_state()`` (the LM's carried hidden
  state: each rank carries its own batch columns).

Layout of a run's resume folder (``data/checkpoints/<stage>/<run>/``, outside every DVC output
so that ``dvc repro`` deleting the stage's outputs before rerunning it does not delete it)::

    state.json             fingerprint of the run's config + data, MLflow run id, resume count
    step-000000120.ckpt    the newest ``keep`` periodic / epoch-end / interrupt checkpoints
    best/best.ckpt         the best-so-far checkpoint (ModelCheckpoint) the final model comes from

Checkpoints are written atomically (temp file + fsync + rename, ``AtomicCheckpointIO``) and
loaded with ``weights_only=True``. A checkpoint that does not load (truncated, corrupt) is
skipped with a warning and the previous one is used. A folder whose fingerprint differs from
the current config (params or data changed) is discarded, never resumed. The stage deletes the
folder after it has written its outputs.

SIGINT (Ctrl-C) and SIGTERM (schedulers, ``kill``) do not abort mid-step: the callback saves a
checkpoint at the end of the current batch and raises ``TrainingInterrupted`` (the MLflow run
is marked KILLED). A second Ctrl-C aborts at once (the last saved checkpoint still stands).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from rnnlab import io as rio
from rnnlab.distributed import global_rank
from rnnlab.errors import RnnlabError
from rnnlab.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

RANK_STATES_KEY = "rnnlab_rank_states"
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


class TrainingInterrupted(RnnlabError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; rerunning resumes it."""

    run_status = "KILLED"  # how tracking.tracked_run closes the MLflow run


def fingerprint(identity: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what makes a run this run (config, seed, data md5s)."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- checkpoint files -------------------------------------------------------------------------
def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True``; any failure becomes a clear ``RnnlabError``."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise RnnlabError(f"{path}: checkpoint not found") from exc
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise RnnlabError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing temp + fsync + rename and loading ``weights_only=True``.

    Every checkpoint the Trainer writes (resume, ModelCheckpoint's best) goes through this, so a
    kill or a full disk never leaves a half-written ``.ckpt`` at its final path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        # Serialised in memory first (as Lightning does): torch.save turns a failed write into an
        # opaque RuntimeError, a plain file write keeps the errno (disk full -> a clear message).
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_path(path) as tmp:
            with rio.open_output(tmp) as fh:  # looked up at call time: tests simulate a full disk there
                fh.write(buffer.getbuffer())
                fh.flush()
                with contextlib.suppress(io.UnsupportedOperation):
                    os.fsync(fh.fileno())  # durable before the rename (power loss, not just a kill)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu")


# -- the resume folder ------------------------------------------------------------------------
class ResumeDir:
    """One run's resume folder. Only global rank 0 writes or deletes anything in it."""

    def __init__(self, path: str | Path, identity: Mapping[str, Any], enabled: bool = True, keep: int = 2):
        self.path = Path(path)
        self.enabled = enabled
        self.keep = max(keep, 1)
        self.fingerprint = fingerprint(identity)
        self._identity = dict(identity)
        self.state: dict[str, Any] = {}
        self._open()

    @classmethod
    def scratch(cls, path: str | Path) -> ResumeDir:
        """A folder for one run outside any stage (library use, tests): never resumed."""
        return cls(path, {}, enabled=False)

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def _open(self) -> None:
        state = None
        if self.state_path.is_file():
            try:
                state = read_json(self.state_path)
            except (OSError, ValueError) as exc:
                log.warning("%s: unreadable (%s); starting this run over", self.state_path, exc)
        stale = state is not None and state.get("fingerprint") != self.fingerprint
        if self.path.exists() and (stale or not self.enabled or state is None):
            if state is not None or any(self.path.iterdir()):
                why = (
                    "its config or data changed"
                    if stale
                    else "resume is disabled (trainer.resume: false)"
                    if not self.enabled
                    else "it has no state.json"
                )
                log.warning("%s: discarding the previous checkpoints because %s", self.path, why)
            self._remove()
            state = None
        if state is None:
            state = {"fingerprint": self.fingerprint, "mlflow_run_id": None, "resumes": 0}
            self.state = state
            self._save_state()  # before any checkpoint, so a checkpoint is never without its fingerprint
        self.state = state

    def _remove(self) -> None:
        if global_rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.state.get("mlflow_run_id")

    def record_run_id(self, run_id: str | None) -> None:
        if run_id and run_id != self.state.get("mlflow_run_id"):
            self.state["mlflow_run_id"] = run_id
            self._save_state()

    def _save_state(self) -> None:
        if global_rank() == 0:
            write_json(self.state_path, {**self.state, "identity": self._identity})

    def step_path(self, step: int) -> Path:
        return self.path / f"step-{step:09d}.ckpt"

    def checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that loads; unreadable (truncated) ones are skipped with a warning."""
        if not self.enabled:
            return None
        for path in reversed(self.checkpoints()):
            try:
                load_checkpoint_file(path)
            except RnnlabError as exc:
                log.warning("skipping a damaged checkpoint, falling back to the previous one: %s", exc)
                continue
            return path
        return None

    def note_resume(self, path: Path) -> None:
        self.state["resumes"] = int(self.state.get("resumes", 0)) + 1
        self.state["resumed_from"] = path.name
        self._save_state()

    def prune(self) -> None:
        """Keep the newest ``keep`` step checkpoints (a damaged newest one falls back to the previous)."""
        if global_rank() != 0:
            return
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        for stray in self.path.glob(".step-*.tmp"):  # left by a process killed while writing
            stray.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete the folder (after the stage has written its outputs)."""
        self._remove()


# -- data position ----------------------------------------------------------------------------
class ResumableLoader:
    """Wraps a training DataLoader (or any re-iterable of batches with a length, such as a dataset of
    ready-made BPTT windows) so that an epoch
    interrupted after N batches continues at batch N+1 with the same batches, in the same order.

    Lightning saves ``state_dict()`` in every checkpoint and, when it restarts mid-epoch, calls
    ``load_state_dict`` before iterating. The order of an epoch is reproduced, not stored: the
    torch RNG state at the start of the pass (what a shuffling sampler draws from) is part of the
    state, and a sampler with ``set_epoch`` (the bucket sampler) is told the pass index. The
    batches already trained on are drawn again and skipped: cheap for BPTT windows and cached
    features, and it keeps the uninterrupted run untouched (this wrapper consumes no randomness).
    """

    def __init__(self, loader):
        self.loader = loader
        self._passes = 0  # passes started (the epoch index)
        self._served = 0
        self._skip = 0
        self._pass_rng: torch.Tensor | None = None
        self._resume_rng: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        pass_index = self._passes
        self._passes += 1
        skip, self._skip = self._skip, 0
        if skip and self._resume_rng is not None:
            torch.set_rng_state(self._resume_rng)  # the epoch's shuffle is drawn as it was
        self._pass_rng = torch.get_rng_state()
        sampler = getattr(self.loader, "batch_sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(pass_index)
        self._served = skip
        for position, batch in enumerate(self.loader):
            if position < skip:
                continue
            self._served = position + 1  # counted when handed out: Lightning does not prefetch sized loaders
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "served": self._served,
            "pass_index": self._passes - 1,
            "pass_rng": self._pass_rng if self._pass_rng is not None else torch.get_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._skip = int(state["served"])
        self._passes = int(state.get("pass_index", 0))
        self._served = self._skip
        self._resume_rng = state.get("pass_rng")


# -- RNG states (converted to tensors/ints so weights_only loading accepts them) ---------------
def collect_rng_states() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- the callback -----------------------------------------------------------------------------
class ResumeCallback(pl.Callback):
    """Saves resume checkpoints every ``every_n_steps`` optimizer steps (0 = never), at the end
    of every epoch (after validation), and on SIGINT/SIGTERM; restores per-rank state.

    A periodic save never falls on an epoch's last batch: Lightning resumes an epoch that ended
    only from its epoch-end checkpoint (written after validation), so that case is left to it.
    """

    def __init__(self, resume_dir: ResumeDir, every_n_steps: int):
        self.resume_dir = resume_dir
        self.every_n_steps = every_n_steps
        self.stop_signal: str | None = None
        self.saved: list[Path] = []
        self.elapsed_before_s = 0.0  # training wall time of earlier (interrupted) processes
        self._fit_started = 0.0
        self._pending_rank_state: dict | None = None
        self._catching = False

    # callback state (in every checkpoint)
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed_before_s = float(state_dict.get("elapsed_s", 0.0))

    @property
    def elapsed_s(self) -> float:
        now = time.perf_counter() - self._fit_started if self._fit_started else 0.0
        return self.elapsed_before_s + now

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_started = time.perf_counter()

    # signals
    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """While training: SIGINT/SIGTERM request a save-and-stop at the end of the current batch."""
        import threading

        if self._catching or threading.current_thread() is not threading.main_thread():
            yield  # already catching (nested use), or signals cannot be caught here
            return
        self._catching = True
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now, the last saved checkpoint stands
            self.stop_signal = name
            log.warning(
                "%s received: saving a checkpoint at the end of this batch, then stopping "
                "(press Ctrl-C again to stop at once)",
                name,
            )

        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            self._catching = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def raise_if_stopped(self) -> None:
        """After training: a signal that arrived during the final validation/test still stops the stage."""
        if self.stop_signal is not None:
            raise TrainingInterrupted(
                f"training stopped by {self.stop_signal} after its last epoch; the final checkpoint is in "
                f"{self.resume_dir.path}; run the stage again to evaluate and write the outputs"
            )

    def _stop_requested(self, trainer) -> bool:
        local = self.stop_signal is not None
        if trainer.world_size > 1:  # every rank must stop at the same batch or DDP deadlocks
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    # saving
    def save(self, trainer, why: str) -> Path:
        path = self.resume_dir.step_path(trainer.global_step)
        # A full checkpoint (weights_only=False here means: not weights only). Collective under DDP;
        # rank 0 writes through AtomicCheckpointIO.
        trainer.save_checkpoint(path, weights_only=False)
        self.resume_dir.prune()
        self.saved.append(path)
        log.debug("resume checkpoint (%s): %s", why, path)
        return path

    def _interrupt(self, trainer, path: Path) -> None:
        raise TrainingInterrupted(
            f"training stopped by {self.stop_signal or 'a signal on another rank'} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); checkpoint saved to {path}; run the stage again to resume"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        stop = self._stop_requested(trainer)
        if last_of_epoch:
            return  # validation and the epoch-end checkpoint come next
        if stop:
            self._interrupt(trainer, self.save(trainer, "interrupt"))
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, "periodic")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = self.save(trainer, "epoch end")
        if self._stop_requested(trainer) and trainer.current_epoch + 1 < trainer.max_epochs:
            self._interrupt(trainer, path)

    # per-rank state
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        mine = {"rng": collect_rng_states()}
        if hasattr(pl_module, "resume_state"):
            mine["module"] = pl_module.resume_state()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
            checkpoint[RANK_STATES_KEY] = gathered
        else:
            checkpoint[RANK_STATES_KEY] = [mine]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get(RANK_STATES_KEY)
        if not states:
            return
        if len(states) != trainer.world_size:
            raise RnnlabError(
                f"the resume checkpoint was written by {len(states)} processes but this run has "
                f"{trainer.world_size}; delete {self.resume_dir.path} to start over"
            )
        self._pending_rank_state = states[trainer.global_rank]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Applied right before the first resumed step: nothing between the save and this point
        # consumed randomness in the uninterrupted run either.
        if self._pending_rank_state is None:
            return
        state, self._pending_rank_state = self._pending_rank_state, None
        set_rng_states(state["rng"])
        if "module" in state and hasattr(pl_module, "load_resume_state"):
            pl_module.load_resume_state(state["module"])


def fit_resumable(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule, resume: ResumeDir, callback: ResumeCallback
) -> Path | None:
    """``trainer.fit`` from the newest readable checkpoint in ``resume`` (or from scratch).

    Returns the checkpoint resumed from. SIGINT/SIGTERM become ``TrainingInterrupted`` after a
    checkpoint is saved; a second Ctrl-C (Lightning turns it into ``SystemExit``) too.
    """
    ckpt = resume.latest_checkpoint()
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
        resume.note_resume(ckpt)
    try:
        with callback.catch_signals():
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except SystemExit as exc:
        if callback.stop_signal is None:
            raise
        raise TrainingInterrupted(
            f"training aborted by {callback.stop_signal}; the last checkpoint in {resume.path} stands; "
            "run the stage again to resume"
        ) from exc
    callback.raise_if_stopped()  # a signal during the last validation: training is complete
    return ckpt


PAUSE_AT_STEP_ENV = "RNNLAB_PAUSE_AT_STEP"
PAUSE_DIR_ENV = "RNNLAB_PAUSE_DIR"


class PauseAtStep(pl.Callback):
    """Test hook: at global step ``step`` each rank writes ``paused-rank<R>.json`` (step, pid) into
    ``folder`` and waits until a ``release`` file appears there, or until ``stopped()`` is true (a
    SIGINT/SIGTERM caught by :class:`ResumeCallback`, which then saves and stops as usual).

    Tests signal or race a second process against a run paused at a known step, instead of against
    the clock (a fast machine finishes a 40-step run before a timed signal arrives)."""

    def __init__(self, step: int, folder: str | Path, stopped=lambda: False, poll_s: float = 0.02):
        self.step, self.folder, self.stopped, self.poll_s = step, Path(folder), stopped, poll_s

    @classmethod
    def from_env(cls, stopped=lambda: False) -> PauseAtStep | None:
        step, folder = os.environ.get(PAUSE_AT_STEP_ENV), os.environ.get(PAUSE_DIR_ENV)
        if not step:
            return None
        if not folder:
            raise RnnlabError(f"{PAUSE_AT_STEP_ENV}={step} needs {PAUSE_DIR_ENV} (the folder for the marker)")
        return cls(int(step), folder, stopped)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / f"paused-rank{global_rank()}.json", {"step": self.step, "pid": os.getpid()})
        while not (self.folder / "release").exists() and not self.stopped():
            time.sleep(self.poll_s)
