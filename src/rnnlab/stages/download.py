"""Stage ``download``: fetch every corpus of ``download.corpora`` into ``data/raw`` (checksums verified).

The sha256 of every file taken from a local ``path`` is recorded in the lock file
(``data/corpora.lock.json``, committed with the code); a later run whose file no longer matches
fails naming the file, the sha256 recorded and the one found.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rnnlab.config import parse_section, section
from rnnlab.errors import ConfigError
from rnnlab.io import write_json

log = logging.getLogger(__name__)


@dataclass
class DownloadConfig:
    corpora: list[str]
    mirror: str | None = None
    retries: int = 3
    timeout_s: float = 60.0
    progress: bool = True


def read_lock(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); delete it to record the checksums again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping corpus -> {{file: sha256}}")
    return data


def download_stage(
    params: dict, raw_dir: Path, metrics_path: Path, lock_path: Path | None = None, repo_root: Path = Path(".")
) -> dict:
    from rnnlab.data import corpora
    from rnnlab.data.download import fetch_corpus, resolve_mirror

    cfg = parse_section(DownloadConfig, section(params, "download"), "download")
    specs = corpora.selected(params, cfg.corpora, "download.corpora")
    mirror = resolve_mirror(cfg.mirror)
    lock = read_lock(lock_path)
    report = {}
    for name, spec in specs.items():
        r = fetch_corpus(spec, raw_dir, mirror, cfg.retries, cfg.timeout_s, cfg.progress, repo_root, lock.get(name, {}))
        log.info(
            "%s: %d files from %s (%d fetched, %d already verified)",
            name,
            r.files,
            r.origin,
            r.fetched,
            r.already_present,
        )
        report[name] = {"files": r.files, "origin": r.origin}
        if r.local_sha256:
            lock[name] = {**lock.get(name, {}), **r.local_sha256}
    if lock_path is not None:
        write_json(lock_path, dict(sorted(lock.items())))
    write_json(metrics_path, report)
    return report
