"""Stage ``prepare``: tokenize, build vocabularies (train split only), write pandera-validated tables."""

from __future__ import annotations

from pathlib import Path

from rnnlab.config import section
from rnnlab.io import write_json


def prepare_stage(params: dict, raw_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    # Imported here: pandera/pandas are data-stage needs; training stages must import without them.
    from rnnlab.data.corpora import selected
    from rnnlab.data.prepare import parse_prepare_config, prepare_corpora

    cfg = parse_prepare_config(section(params, "prepare"))
    specs = selected(params, cfg.corpora, "prepare.corpora")
    metrics = prepare_corpora(cfg, raw_dir, out_dir, specs)
    write_json(metrics_path, metrics)
    return metrics
