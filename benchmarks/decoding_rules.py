"""Decoding rules before/after (issue 16 items 1, 2; README "Decoding rules"): the trained translator
and captioner scored on their test sets under the old rules (the model's distribution as it is:
``<unk>`` allowed, no n-gram block) and under the new ones, side by side.

    python benchmarks/decoding_rules.py                       # the default-profile models in data/models
    python benchmarks/decoding_rules.py --train-small /tmp/dr # no trained models: train small ones first

``--train-small DIR`` trains, with the real stage code and tracking off, a translator (the CPU
profile's architecture, ``--s2s-batches`` batches of one epoch) and a soft-attention captioner
(features of the first ``--images`` images of each Flickr8k split, one epoch) into DIR and scores
those: a cheaper stand-in for the default-profile models, whose absolute scores are far lower.
Prints one table per task: BLEU (sacreBLEU) and chrF / BLEU-4 and CIDEr-D per decoding setting,
and the ``<unk>`` count of the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from rnnlab.config import load_params
from rnnlab.decoding import OutputRules
from rnnlab.stages.train import train_stage
from rnnlab.tasks import captioning, translation
from rnnlab.tasks.base import StagePaths

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("RNNLAB_MIRROR", REPO.parent / "shared" / "corpora"))
S2S_RUN, CAP_RUN = "multi30k-attention", "flickr8k-soft_attention"


def train_small(work: Path, s2s_batches: int, images: int) -> tuple[Path, Path, StagePaths]:
    from rnnlab.data.captions import read_flickr8k
    from rnnlab.data.readers import read_parallel_corpus
    from rnnlab.io import write_parquet
    from rnnlab.stages.features import features_stage

    params = load_params(REPO / "params.yaml")
    params["tracking"] = {"enabled": False}
    params["trainer"] = {**params["trainer"], "checkpoint_every_n_steps": 0, "resume": False}
    prepared = work / "prepared"
    if not (prepared / "multi30k" / "pairs.parquet").is_file():
        (prepared / "multi30k").mkdir(parents=True, exist_ok=True)
        write_parquet(prepared / "multi30k" / "pairs.parquet", read_parallel_corpus(MIRROR / "multi30k"))
    if not (prepared / "flickr8k" / "captions.parquet").is_file():
        (prepared / "flickr8k").mkdir(parents=True, exist_ok=True)
        read_flickr8k(MIRROR / "flickr8k")[0].to_parquet(prepared / "flickr8k" / "captions.parquet")
    paths = StagePaths(prepared=prepared, features=work / "features", raw=MIRROR)
    s2s = params["train_seq2seq"]
    s2s["defaults"] = {**s2s["defaults"], "max_epochs": 1, "limit_train_batches": s2s_batches, "heatmaps": 0}
    s2s["defaults"]["beam_sizes"] = [1]
    s2s["runs"] = {S2S_RUN: s2s["runs"][S2S_RUN]}
    cap = params["train_captioner"]
    cap["defaults"] = {**cap["defaults"], "max_epochs": 1, "beam_sizes": [1], "grid_images": 0, "coco_metrics": False}
    cap["runs"] = {CAP_RUN: {"decoder": "soft_attention"}}
    params["features"] = {**params["features"], "limit_images": images}
    for section, run in (("train_seq2seq", S2S_RUN), ("train_captioner", CAP_RUN)):
        if (work / "models" / run / "model.ckpt").is_file():
            continue
        if section == "train_captioner" and not (work / "features" / "features.npy").is_file():
            features_stage(params, prepared, MIRROR, work / "features", work / "features.json")
        started = time.perf_counter()
        train_stage(params, section, run, paths, work / "models", work / f"{run}.json", work / "plots.json",
                    work / "checkpoints")  # fmt: skip
        print(f"trained {section}@{run} in {time.perf_counter() - started:.0f} s")
    return work / "models" / S2S_RUN, work / "models" / CAP_RUN, paths


def variants(block: int, alpha: float) -> list[tuple[str, OutputRules | None]]:
    """(label, rules): the old behaviour, each rule added in turn, and the new defaults (None: the
    checkpoint's own rules, i.e. params.yaml's)."""
    old = OutputRules(mask_specials=False, length_penalty=alpha)
    return [
        ("before (no rules)", old),
        ("mask <unk>/<pad>/<bos>", OutputRules(length_penalty=alpha)),
        (f"mask + block {block}", OutputRules(block_ngram_repeat=block, length_penalty=alpha)),
        (f"mask + block {block} + average", OutputRules(block_ngram_repeat=block, length_norm="average")),
        ("after (checkpoint's rules)", None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-small", type=Path, default=None, metavar="DIR")
    parser.add_argument("--s2s-batches", type=int, default=150)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--coco", action="store_true", help="captioning: CIDEr-D etc. (Java; slower)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.train_small:
        s2s_dir, cap_dir, paths = train_small(args.train_small, args.s2s_batches, args.images)
    else:
        s2s_dir, cap_dir = REPO / "data/models/seq2seq" / S2S_RUN, REPO / "data/models/captioner" / CAP_RUN
        paths = StagePaths(prepared=REPO / "data/prepared", features=REPO / "data/features/flickr8k", raw=MIRROR)
    beams = [1, args.beam]

    s2s_rules = translation.load(s2s_dir).rules
    print(f"\ntranslation ({s2s_dir}; checkpoint rules {dataclasses.asdict(s2s_rules)})")
    print(f"| rules | sacreBLEU greedy | sacreBLEU beam {args.beam} | chrF beam {args.beam} | <unk> greedy+beam |")
    print("|---|---|---|---|---|")
    for label, rules in variants(3, s2s_rules.length_penalty):
        r = translation.score(s2s_dir, paths, beams, rules=rules)
        print(
            f"| {label} | {r['sacrebleu_greedy']:.2f} | {r[f'sacrebleu_beam{args.beam}']:.2f} "
            f"| {r[f'chrf_beam{args.beam}']:.2f} | {r['unk_in_output']} |",
            flush=True,
        )

    cap_module = captioning.load(cap_dir)
    print(f"\ncaptioning ({cap_dir}; checkpoint rules {dataclasses.asdict(cap_module.rules)})")
    if args.coco:
        import json

        run_json = json.loads((cap_dir / "run.json").read_text())
        run_json["eval"]["coco_metrics"] = True
        (cap_dir / "run.json").write_text(json.dumps(run_json, indent=2))
    extra = f" CIDEr-D beam {args.beam} |" if args.coco else ""
    print(f"| rules | BLEU-4 greedy | BLEU-4 beam {args.beam} |{extra} <unk> greedy+beam |")
    print("|---|---|---|" + ("---|" if args.coco else "") + "---|")
    for label, rules in variants(2, cap_module.rules.length_penalty):
        r = captioning.score(cap_dir, paths, beams, rules=rules)
        b = f"beam{args.beam}"
        cider = f" {100 * r[b]['coco']['cider_d']:.2f} |" if args.coco else ""
        print(
            f"| {label} | {r['greedy']['bleu4']:.2f} | {r[b]['bleu4']:.2f} |{cider} {r['unk_in_output']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
