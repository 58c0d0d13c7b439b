"""Temporary copies of this repository for the pipeline-level reliability tests (real DVC, the real
stage scripts, real PTB through the mirror, tiny profile).

``prepared_template()`` runs ``download`` + ``prepare`` once per test session in a git-initialised
copy; each test copies that template (seconds) instead of preparing PTB again.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
MIRROR = Path(os.environ.get("RNNLAB_MIRROR", REPO.parent / "shared" / "corpora")).resolve()
RUN_DIR = "data/checkpoints/train_lm/ptb-lstm"  # the tiny profile's resume folder


def env(**extra: str) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RNNLAB_MIRROR")}
    out["PATH"] = VENV_BIN + os.pathsep + out.get("PATH", "")
    out.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900, **extra_env: str):
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class Started(subprocess.Popen):
    """A background command in its own session (a test can signal it and its children); output
    goes to files, so a chatty process never blocks on a full pipe."""

    def __init__(self, cmd: list[str], cwd: Path, environ: dict):
        logs = Path(tempfile.mkdtemp(prefix="rnnlab-proc-"))
        atexit.register(shutil.rmtree, logs, True)
        self.out_path, self.err_path = logs / "stdout", logs / "stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            super().__init__(cmd, cwd=cwd, env=environ, stdout=out, stderr=err, text=True, start_new_session=True)

    def communicate(self, input=None, timeout=None):  # noqa: A002 - Popen's signature
        self.wait(timeout)
        return self.out_path.read_text(), self.err_path.read_text()


def start(cmd: list[str], cwd: Path, **extra_env: str) -> Started:
    return Started(cmd, cwd, env(**extra_env))


def copy_repo(dst: Path) -> Path:
    """Copy the tracked + untracked-not-ignored files (what a fresh clone would have)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith("data/"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)
    return dst


def tiny_params(params: dict) -> dict:
    """PTB only (2,000-word vocabulary), a 32-unit one-layer LSTM on 5% of the train stream, one
    epoch of 20 windows, a checkpoint every 4 steps, one thread per process."""
    params["download"].update(corpora=["ptb"], mirror=str(MIRROR))
    params["prepare"]["corpora"] = ["ptb"]
    params["prepare"]["vocab"]["ptb"] = {"min_freq": 1, "max_size": 2000}  # a 5x cheaper softmax
    params["train_lm"]["trainer"].update(num_threads=1, checkpoint_every_n_steps=4)
    params["train_lm"]["defaults"].update(embedding_size=32, hidden_size=32, num_layers=1, train_fraction=0.05,
                                          limit_train_batches=20, max_epochs=1)
    params["train_lm"]["runs"] = [{"name": "ptb-lstm", "corpus": "ptb", "model": "lstm"}]
    if "study" in params:  # issue 3's study stage, ~5 s (README "Long-term dependencies")
        params["study"].update(
            gradient_flow={"embedding_size": 16, "hidden_size": 16, "window": 12, "report_lag": 10, "batch_size": 4,
                           "num_windows": 1, "train_steps": 10, "train_batch_size": 8, "bptt": 10},
            long_lag={"lags": [2, 5], "steps": 30, "hidden_size": 8},
            clipping={"steps": 10, "hidden_size": 16, "batch_size": 8, "bptt": 10})
    return params


def pipeline_tiny_params(params: dict) -> dict:
    """Every stage, small: PTB (n-gram + LSTM), the study, Multi30k (BPE+attention vs word+none, 300
    pairs), Flickr8k (8 images per split through the untrained-weight CNN, both decoders)."""
    tiny_params(params)
    corpora = ["ptb", "multi30k", "flickr8k"]
    params["download"]["corpora"] = corpora
    params["prepare"]["corpora"] = corpora
    params["prepare"]["vocab"]["flickr8k"] = {"min_freq": 1, "max_size": None}  # 8 images' captions
    params["train_lm"]["defaults"].update(embedding_size=16, hidden_size=16, batch_size=16, bptt=20,
                                          train_fraction=0.02, limit_train_batches=10, samples=1)
    params["train_lm"]["runs"] = [{"name": "ptb-ngram", "corpus": "ptb", "model": "ngram", "order": 3},
                                  {"name": "ptb-lstm", "corpus": "ptb", "model": "lstm"}]
    params["train_seq2seq"]["defaults"].update(
        tokenizer="bpe", bpe_vocab_size=400, embedding_size=32, hidden_size=32, max_len=20, batch_size=32,
        max_epochs=2, limit_train_batches=8, lr=0.01, beam_sizes=[1, 2], heatmaps=2, num_threads=1,
        max_train_pairs=300, max_val_pairs=60)
    params["train_seq2seq"]["runs"] = [
        {"name": "multi30k-attention", "attention": "bahdanau"},
        {"name": "multi30k-none", "attention": "none", "tokenizer": "word", "min_freq": 2}]
    params["features"].update(encoder="efficientnet_lite0", weights=None, batch_size=8, num_workers=0,
                              on_bad_image="drop", limit_images=8)
    params["train_captioner"]["defaults"].update(
        embedding_size=16, hidden_size=32, attention_size=16, batch_size=4, max_epochs=2, min_freq=1, max_len=12,
        lr=3e-3, beam_sizes=[1, 3], grid_images=2, eval_batch_size=8, num_threads=1)
    params["train_captioner"]["runs"] = [{"name": "flickr8k-show_tell", "decoder": "show_tell"},
                                         {"name": "flickr8k-soft_attention", "decoder": "soft_attention"}]
    params["evaluate"].update(seq2seq_beam_sizes=[1, 2], caption_beam_sizes=[1, 2], sample_tokens=10)
    return params


def git_repo(repo: Path) -> Path:
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "test copy"], repo)
    return repo


def edit_params(repo: Path, edit) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@functools.cache
def prepared_template() -> Path:
    base = Path(tempfile.mkdtemp(prefix="rnnlab-template-"))
    atexit.register(shutil.rmtree, base, True)
    repo = copy_repo(base / "repo")
    edit_params(repo, tiny_params)
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "template"], repo)
    run(["dvc", "repro", "prepare"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "prepared"], repo)
    return repo


def prepared_copy(dst: Path) -> Path:
    """A copy of the prepared template (git history, DVC cache, data/raw, data/prepared)."""
    shutil.copytree(prepared_template(), dst, symlinks=True)
    return dst


def train_cmd(out: Path, params: str = "params.yaml") -> list[str]:
    """The train_lm stage script writing to ``out`` instead of the DVC outputs."""
    return [sys.executable, "pipeline/train_lm.py", "--params", params, "--prepared", "data/prepared",
            "--models", str(out / "models"), "--metrics", str(out / "train_lm.json"), "--plots", str(out / "plots")]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def step_checkpoints(repo: Path) -> list[int]:
    folder = repo / RUN_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt"))


def stage_process(parent: subprocess.Popen, script: str = "pipeline/train_lm.py"):
    """The python process running ``script`` under ``parent`` (e.g. ``dvc repro``), via psutil.

    The script must be an argument of its own: DVC runs the stage through ``$SHELL -c "<cmd>"`` (or
    ``/bin/sh -c`` when SHELL is unset, as in CI), and a shell that does not exec its last command stays
    alive as the parent with the whole command line in one argument; killing it would orphan the trainer."""
    import psutil

    try:
        procs = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    for proc in procs:
        try:
            if script in proc.cmdline():
                return proc
        except psutil.NoSuchProcess:
            continue
    return None
