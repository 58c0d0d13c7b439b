"""DVC stage train_captioner: train and test every decoder in params train_captioner.runs on cached features."""

import argparse
from pathlib import Path

from rnnlab.caption_stage import train_captioner_stage
from rnnlab.cli import run_stage
from rnnlab.config import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    args = ap.parse_args()
    train_captioner_stage(load_params(args.params), args.prepared, args.features, args.raw, args.models,
                          args.metrics, args.plots)


if __name__ == "__main__":
    run_stage(main)
