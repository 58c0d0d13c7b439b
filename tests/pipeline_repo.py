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
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def _test_mirror() -> Path:
    """The corpora the tests read: ``$RNNLAB_MIRROR``, else ../shared/corpora. An empty
    ``RNNLAB_MIRROR`` means "no mirror", as for ``download.resolve_mirror``: the corpora then come
    from their canonical URLs, fetched once into ``.corpora`` by scripts/fetch_corpora.py."""
    value = os.environ.get("RNNLAB_MIRROR")
    if value is None:
        return (REPO.parent / "shared" / "corpora").resolve()
    return Path(value).expanduser().resolve() if value else REPO / ".corpora"


MIRROR = _test_mirror()
RUN_DIR = "data/checkpoints/train_lm/ptb-lstm"  # the tiny profile's resume folder


def env(**extra: str) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RNNLAB_MIRROR")}
    out["PATH"] = VENV_BIN + os.pathsep + out.get("PATH", "")
    out.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.invalid",
        PYTHONUNBUFFERED="1",
    )
    out.update(extra)
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900, **extra_env: str):
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
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
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith("data/"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)
    return dst


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` merged into ``base`` key by key (in place), as a profile is merged over params."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def tiny_params(params: dict) -> dict:
    """The repository's ``tiny`` profile, corpora from the mirror (``RNNLAB_MIRROR`` or ../shared/corpora)."""
    params["profile"] = "tiny"
    params["download"]["mirror"] = str(MIRROR)
    return params


# The resume/fault/DDP tests' LM profile over `tiny`: PTB only, a 32-unit one-layer LSTM on 5% of the
# train stream, one epoch of 20 windows, a checkpoint every 4 steps, one thread per process.
LM_ONLY = {
    "download": {"corpora": ["ptb"]},
    "prepare": {"corpora": ["ptb"]},
    "train_lm": {
        "defaults": {
            "embedding_size": 32,
            "hidden_size": 32,
            "batch_size": 20,
            "bptt": 35,
            "train_fraction": 0.05,
            "limit_train_batches": 20,
            "samples": 3,
        },
        "runs": {
            "ptb-ngram": {"enabled": False},
            "ptb-lstm": {"tie_weights": False, "dropout": 0.2, "bptt": 35, "max_epochs": 1},
        },
    },
}


def edit_profile(repo: Path, overlay: dict, profile: str = "tiny") -> None:
    """Merge ``overlay`` into ``profiles/<profile>.yaml`` of a test copy."""
    path = repo / "profiles" / f"{profile}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    path.write_text(yaml.safe_dump(merge(data, overlay), sort_keys=False))


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
    edit_profile(repo, LM_ONLY)
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


def train_cmd(out: Path, params: str = "params.yaml", run_name: str = "ptb-lstm") -> list[str]:
    """The train_lm stage script for one run, writing to ``out`` instead of the DVC outputs
    (metrics: ``out/<run>.json``)."""
    return [
        sys.executable,
        "pipeline/train_lm.py",
        "--params",
        params,
        "--run",
        run_name,
        "--prepared",
        "data/prepared",
        "--models",
        str(out / "models"),
        "--metrics",
        str(out / f"{run_name}.json"),
        "--plots",
        str(out / "plots" / f"{run_name}.json"),
    ]


def step_checkpoints(repo: Path) -> list[int]:
    folder = repo / RUN_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt"))
