"""DVC stage train_seq2seq: train every En->De translator listed in params train_seq2seq.runs on Multi30k."""

import argparse
from pathlib import Path

from rnnlab.cli import run_stage
from rnnlab.config import load_params
from rnnlab.seq2seq_stage import train_seq2seq_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    args = ap.parse_args()
    train_seq2seq_stage(load_params(args.params), args.prepared, args.models, args.metrics, args.plots)


if __name__ == "__main__":
    run_stage(main)
