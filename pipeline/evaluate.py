"""DVC stage evaluate: score every trained model from its saved files (this fresh process), write
the table, plot data and report, and log + register the models in MLflow (rnnlab.stages.evaluate)."""

import argparse
from pathlib import Path

from rnnlab.cli import run_stage
from rnnlab.config import load_params
from rnnlab.stages.evaluate import evaluate_stage
from rnnlab.tasks.base import StagePaths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--models", type=Path, required=True, help="root of the model folders (lm/, seq2seq/, captioner/)")
    ap.add_argument("--train-metrics", type=Path, required=True, help="folder of the training stages' metrics JSON")
    ap.add_argument("--features", type=Path, default=Path("data/features/flickr8k"))
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, default=Path("data/plots/evaluate"))
    ap.add_argument("--report", type=Path, default=Path("data/reports"))
    ap.add_argument(
        "--pictures",
        type=Path,
        nargs="*",
        default=[Path("data/study")],
        help="extra folders whose PNGs go into the report",
    )
    args = ap.parse_args()
    paths = StagePaths(prepared=args.prepared, features=args.features, raw=args.raw)
    evaluate_stage(
        load_params(args.params),
        paths,
        args.models,
        args.train_metrics,
        args.metrics,
        args.report,
        args.plots,
        tuple(args.pictures),
    )


if __name__ == "__main__":
    run_stage(main)
