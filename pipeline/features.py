"""DVC stage features: run the frozen CNN once over every Flickr8k image and cache 7x7xC feature maps."""

import argparse
from pathlib import Path

from rnnlab.cli import run_stage
from rnnlab.config import load_params
from rnnlab.stages.features import features_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    features_stage(load_params(args.params), args.prepared, args.raw, args.out, args.metrics)


if __name__ == "__main__":
    run_stage(main)
