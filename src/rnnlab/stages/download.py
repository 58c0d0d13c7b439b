"""Stage ``download``: fetch every corpus of ``download.corpora`` into ``data/raw`` (checksums verified)."""

from __future__ import annotations

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

    def validate(self, where: str) -> None:
        from rnnlab.data.registry import get_corpus

        for i, name in enumerate(self.corpora):
            try:
                get_corpus(name)
            except ConfigError as exc:
                raise ConfigError(f"{where}.corpora[{i}]: {exc}") from None


def download_stage(params: dict, raw_dir: Path, metrics_path: Path) -> dict:
    from rnnlab.data.download import fetch_corpus, resolve_mirror

    cfg = parse_section(DownloadConfig, section(params, "download"), "download")
    mirror = resolve_mirror(cfg.mirror)
    report = {}
    for name in cfg.corpora:
        r = fetch_corpus(name, raw_dir, mirror, cfg.retries, cfg.timeout_s, cfg.progress)
        log.info(
            "%s: %d files from %s (%d fetched, %d already verified)",
            name,
            r.files,
            r.origin,
            r.fetched,
            r.already_present,
        )
        report[name] = {"files": r.files, "origin": r.origin}
    write_json(metrics_path, report)
    return report
