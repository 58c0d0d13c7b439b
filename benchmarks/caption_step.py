"""Captioning training step: cached features vs the frozen CNN run every step; beam decoding speed.

On real Flickr8k images and captions from the mirror (the first ``--images`` images of each split):

- cached: one training step (forward, backward, Adam) of each decoder (show_tell,
  soft_attention; default sizes) on a batch of ``--batch`` images (~5 captions each) whose
  features come from the feature cache;
- cnn: the same step, but the batch's JPEGs are decoded and run through the frozen
  EfficientNet-Lite0 (rnnlab's fast path: BN folded, channels-last, inference mode) every step,
  which is what training without the cache pays (``--no-decode``: images decoded once, CNN only);
- decoding: captions/s of batched greedy and beam search (k = 3, 5) over the test images.

Prints the median step time of each path and the speed-up, with the load average before and
after (the machine may be shared).

    python benchmarks/caption_step.py --images 32 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rnnlab.data.captions import CaptionDataModule, read_flickr8k
from rnnlab.data.images import load_image
from rnnlab.features import encode_batch, extract_features, optimize_for_inference
from rnnlab.models.image_encoder import build_image_encoder
from rnnlab.stages.features import images_to_encode
from rnnlab.tasks.captioning import CaptioningTask

DEFAULT_RAW = Path("/work/shared/corpora/flickr8k")


def timed_steps(task, optimizer, make_batch, steps: int) -> list[float]:
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        batch = make_batch()
        loss, _, _ = task._losses(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="folder with Flickr8k.token.txt and images/")
    parser.add_argument("--images", type=int, default=32, help="images per split")
    parser.add_argument("--batch", type=int, default=32, help="images per training batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-decode", action="store_true", help="cnn path: JPEGs decoded once, not every step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average before {os.getloadavg()}")
    table, _ = read_flickr8k(args.raw)
    names = images_to_encode(table, args.images)
    captions = table[table["image"].isin(names)].reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        feats = Path(tmp) / "features.npy"
        summary = extract_features(
            args.raw / "images", names, feats, Path(tmp) / "features.json", batch_size=16, num_workers=0
        )
        print(f"feature cache: {summary['encoded']} images at {summary['images_per_s']} images/s")
        dm = CaptionDataModule(captions, feats, batch_size=args.batch, min_freq=1)
        dm.setup()
    train = dm.splits["train"]
    ids = list(range(min(args.batch, len(train.names))))
    files = [args.raw / "images" / train.names[i] for i in ids]
    decoded = torch.stack([load_image(f) for f in files])
    encoder = optimize_for_inference(build_image_encoder("efficientnet_lite0"))

    def cached_batch():
        return dm.collate(train, ids)

    def cnn_batch():
        batch = dm.collate(train, ids)
        images = decoded if args.no_decode else torch.stack([load_image(f) for f in files])
        batch.features = encode_batch(encoder, images).clone()  # frozen CNN, every step (clone: leave inference mode)
        return batch

    n_captions = len(dm.collate(train, ids).inputs)
    what = "CNN only" if args.no_decode else "JPEG decode + CNN"
    for decoder in ("show_tell", "soft_attention"):
        torch.manual_seed(0)
        task = CaptioningTask(decoder, vocab_size=len(dm.vocab), feature_size=int(dm.features.shape[2]), vocab=dm.vocab)
        task.train()
        optimizer = torch.optim.Adam(task.parameters(), lr=4e-4)
        cached = statistics.median(timed_steps(task, optimizer, cached_batch, args.steps))
        cnn = statistics.median(timed_steps(task, optimizer, cnn_batch, args.steps))
        print(f"training step, {decoder}, {len(ids)} images / {n_captions} captions (median of {args.steps}):")
        print(f"  cached features       : {cached * 1000:8.1f} ms")
        print(f"  {what:22s}: {cnn * 1000:8.1f} ms")
        print(f"  speed-up              : {cnn / cached:8.1f}x")

    test_features = torch.cat([f for _, f in dm.image_batches("test", 100)])
    task.eval()
    for beam in (1, 3, 5):
        start = time.perf_counter()
        task.caption(test_features, beam_size=beam, batch_size=100)
        seconds = time.perf_counter() - start
        label = "greedy" if beam == 1 else f"beam {beam}"
        print(
            f"decoding {label:7s}: {len(test_features) / seconds:8.1f} captions/s ({len(test_features)} test images, "
            "untrained weights: lengths may differ from a trained model)"
        )
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
