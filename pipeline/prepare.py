"""DVC stage prepare: raw corpora -> validated tables, train-only vocabularies, encoded splits."""

import argparse
from pathlib import Path

from rnnlab.cli import run_stage
from rnnlab.config import load_params
from rnnlab.stages.prepare import prepare_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    prepare_stage(load_params(args.params), args.raw, args.out, args.metrics)


if __name__ == "__main__":
    run_stage(main)
