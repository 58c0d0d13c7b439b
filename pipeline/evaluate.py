"""DVC stage evaluate: rebuild each trained model from its checkpoint and score it on test."""

import argparse
from pathlib import Path

from rnnlab.cli import run_stage
from rnnlab.config import load_params
from rnnlab.stages import evaluate_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--train-metrics", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    evaluate_stage(load_params(args.params), args.prepared, args.models, args.train_metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
