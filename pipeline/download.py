"""DVC stage download: corpora -> data/raw/<corpus>/ (mirror first, canonical URLs otherwise)."""

import argparse
from pathlib import Path

from rnnlab.cli import run_stage
from rnnlab.config import load_params
from rnnlab.stages.download import download_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--lock", type=Path, default=None, help="sha256 of local corpus files (checked, then recorded)")
    args = ap.parse_args()
    download_stage(load_params(args.params), args.out, args.metrics, args.lock)


if __name__ == "__main__":
    run_stage(main)
