"""Shared fixtures: the real corpora mirror (../shared/corpora) and small prepared copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_repo import MIRROR  # one rule for where the corpora are

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    if not (MIRROR / "ptb" / "ptb.train.txt").is_file():
        raise pytest.UsageError(
            f"the corpora are missing at {MIRROR}; tests run on the real corpora (set "
            "RNNLAB_MIRROR=/path/to/shared/corpora, or run `python scripts/fetch_corpora.py` to fetch "
            "them from their canonical URLs into .corpora, which an empty RNNLAB_MIRROR selects)"
        )


@pytest.fixture(scope="session")
def mirror() -> Path:
    return MIRROR


@pytest.fixture(scope="session")
def prepared_ptb(tmp_path_factory, mirror) -> Path:
    """PTB prepared by the real prepare code (train/valid/test .npy + vocab.json)."""
    from rnnlab.data.prepare import parse_prepare_config, prepare_corpora

    out = tmp_path_factory.mktemp("prepared")
    cfg = parse_prepare_config({"corpora": ["ptb"]})
    prepare_corpora(cfg, mirror, out)
    return out / "ptb"


@pytest.fixture(scope="module")
def one_thread():
    """Small ops: one torch thread is faster and, on a shared 2-core machine, far more predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
