"""DVC stage study: gradient flow vs lag, long-lag recall and clipping for RNN vs LSTM (params study)."""

import argparse
from pathlib import Path

from rnnlab.cli import run_stage
from rnnlab.config import load_params
from rnnlab.stages.study import study_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    ap.add_argument("--pictures", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    study_stage(load_params(args.params), args.prepared, args.plots, args.pictures, args.metrics)


if __name__ == "__main__":
    run_stage(main)
