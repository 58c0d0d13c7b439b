"""Frozen encoder vs fine-tuning its last blocks at an equal budget (issue 16 item 0; README
"Fine-tuning the encoder").

    nice python benchmarks/finetune.py --work /tmp/ft                 # 1000 images per split, 3 epochs
    nice python benchmarks/finetune.py --work /tmp/ft --blocks 2      # another setting (same features)

With the real stage code and tracking off: features of the first ``--images`` images of each
Flickr8k split (``features.limit_images``), then one soft-attention captioner per ``--blocks``
setting (``finetune_blocks``; 0 = frozen; the CPU profile's architecture and params), the
same seed, batches and number of batches (``--epochs`` epochs). A small budget: the absolute
scores are far below the default profile's. Prints one markdown row per setting: BLEU-4 greedy and
beam 3 on the test images, best dev loss, seconds per training batch (the batches alone, from the
tokens/s the run reports) and the fine-tuned run's one pass of the frozen prefix over the images.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from rnnlab.config import load_params
from rnnlab.data.captions import read_flickr8k
from rnnlab.data.tokenize import WordTokenizer
from rnnlab.io import read_json
from rnnlab.stages.features import features_stage, images_to_encode
from rnnlab.stages.train import train_stage
from rnnlab.tasks.base import StagePaths

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("RNNLAB_MIRROR", REPO.parent / "shared" / "corpora"))
RUN = "flickr8k-soft_attention"


def train_tokens(captions, names: set[str], max_len: int) -> int:
    """Target tokens of one epoch (each train caption, cut at max_len words, + <eos>)."""
    tokenizer = WordTokenizer(lowercase=True)
    train = captions[(captions["split"] == "train") & captions["image"].isin(names)]
    return sum(min(len(tokenizer.tokenize(c)), max_len) + 1 for c in train["caption"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1000, help="first N images of each split")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 1], help="finetune_blocks settings (0: frozen)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work
    params = load_params(REPO / "params.yaml")
    params["tracking"] = {"enabled": False}
    params["trainer"] = {**params["trainer"], "checkpoint_every_n_steps": 0, "resume": False}
    params["features"] = {**params["features"], "limit_images": args.images}
    prepared = work / "prepared"
    captions = read_flickr8k(MIRROR / "flickr8k")[0]
    if not (prepared / "flickr8k" / "captions.parquet").is_file():
        (prepared / "flickr8k").mkdir(parents=True, exist_ok=True)
        captions.to_parquet(prepared / "flickr8k" / "captions.parquet")
    if not (work / "features" / "features.npy").is_file():
        started = time.perf_counter()
        features_stage(params, prepared, MIRROR, work / "features", work / "features.json")
        print(f"features: {time.perf_counter() - started:.0f} s", flush=True)
    paths = StagePaths(prepared=prepared, features=work / "features", raw=MIRROR)
    cap = params["train_captioner"]
    run_keys = cap["runs"][RUN]
    base = {**cap["defaults"], **run_keys}
    names = set(images_to_encode(captions, args.images))
    tokens = train_tokens(captions, names, base["max_len"]) * args.epochs
    rows = []
    for blocks in args.blocks:
        name = f"{RUN}-ft{blocks}"
        cap["defaults"] = {**cap["defaults"], "grid_images": 0, "coco_metrics": False, "beam_sizes": [1, 3]}
        cap["runs"] = {name: {**run_keys, "max_epochs": args.epochs, "finetune_blocks": blocks}}
        started = time.perf_counter()
        row = train_stage(
            params, "train_captioner", name, paths, work / "models", work / f"{name}.json", work / "plots.json",
            work / "checkpoints",
        )  # fmt: skip
        wall = time.perf_counter() - started
        details = read_json(work / "models" / name / "metrics.json")
        batch_seconds = tokens / details["train_tokens_per_s"] / row["steps"]
        rows.append(
            f"| {'frozen (cache)' if blocks == 0 else f'fine-tune last {blocks} block(s)'} | {row['steps']} "
            f"| {row['bleu']['greedy']['bleu4']:.2f} | {row['bleu']['beam3']['bleu4']:.2f} "
            f"| {row['best_val_loss']:.3f} | {batch_seconds:.2f} | {row.get('prefix_cache_seconds') or '-'} "
            f"| {wall:.0f} |"
        )
        print(rows[-1], flush=True)
    print(f"\n{args.images} images per split, {args.epochs} epochs, soft attention, CPU profile params")
    print("| encoder | batches | BLEU-4 greedy | BLEU-4 beam 3 | best dev loss | s / batch | prefix pass s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
