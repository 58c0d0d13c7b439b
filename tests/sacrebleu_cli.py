"""Scores by the ``sacrebleu`` command line: its own file reading and defaults, independent of the
library calls the stages make (tests recompute a reported number from the written files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def sacrebleu_cli(hyps: Path, *refs: Path, lowercase: bool = False) -> dict:
    """BLEU and chrF of a hypothesis file against one reference file per reference (line-aligned),
    by name (``BLEU``, ``chrF2``): the CLI's JSON rows. ``lowercase``: ``-lc``."""
    exe = Path(sys.executable).parent / "sacrebleu"
    out = subprocess.run(
        [
            str(exe),
            *map(str, refs),
            "-i",
            str(hyps),
            "-m",
            "bleu",
            "chrf",
            "-w",
            "2",
            "--format",
            "json",
            *(["-lc"] if lowercase else []),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {r["name"]: r for r in json.loads(out)}
