"""Run a frozen CNN encoder once over all images and cache the spatial features.

Output (the contract with :mod:`rnnlab.data.feature_cache`, its reader):

- ``features.npy``: float16 ``[images, positions, channels]`` = ``[N, 49, C]`` (the 7x7 grid
  flattened row-major, position ``p`` = row ``p // 7``, column ``p % 7``), row ``i`` for ``names[i]``;
  that is the layout attention wants (one C-vector per position), so the decoder never permutes.
- ``features.json`` (the index): encoder name, grid size, channels, dtype, ``names`` and the
  ``problems`` (images that failed to decode: name and reason; they get no row).

Fast path (measured by ``benchmarks/features.py`` against the PyPI EfficientNet as is):

- BatchNorm folded into the preceding convolutions (eval-mode BN is an affine map per channel),
- EfficientNet's "static same padding" (a separate ``ZeroPad2d`` copy before every conv) replaced
  by the convolution's own padding wherever it is symmetric (all stride-1 convs), inplace ReLU6,
- channels-last (NHWC) tensors, which oneDNN's depthwise and 1x1 convolutions run much faster,
- ``torch.inference_mode``, and JPEG decoding in a DataLoader worker while the CNN runs,
- batches of 16 (measured per core: 8 -> 35, 16 -> 39, 32 -> 32, 64 -> 28 images/s; smaller
  activations stay in cache).

The folded network is checked against the original on a probe batch when it is built (max abs
difference must stay within float32 rounding), so an architecture where folding is wrong fails
loudly instead of producing silently different features. ``torch.jit.freeze`` gave no gain over
the eager folded network and ``torch.compile`` (inductor, freezing) was slower on this 2-core CPU
after a ~35 s compile, so neither is used. On a shared machine set ``OMP_WAIT_POLICY=PASSIVE``:
OpenMP threads that spin-wait for a descheduled sibling made 2 threads slower than 1.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from rnnlab.data.feature_cache import FEATURES_FORMAT
from rnnlab.data.images import ImageError, load_image
from rnnlab.errors import DataError
from rnnlab.io import atomic_path, write_json
from rnnlab.models.image_encoder import IMAGE_SIZE, ImageEncoder, build_image_encoder

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Fast inference network
# --------------------------------------------------------------------------------------------
def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the Conv2d registered just before it (in place).

    Conv -> BN pairs are found as consecutive children (true for EfficientNet, torchvision
    ResNets and ``small_cnn``); :func:`optimize_for_inference` checks the result numerically.
    Returns the number of folded pairs.
    """
    folded = 0
    children = list(module.named_children())
    for (prev_name, prev), (name, child) in zip(children, children[1:]):
        if (
            isinstance(prev, nn.Conv2d)
            and isinstance(child, nn.BatchNorm2d)
            and child.num_features == prev.out_channels
            and child.track_running_stats
        ):
            setattr(module, prev_name, fuse_conv_bn_eval(prev, child))  # a copy with folded weight/bias
            setattr(module, name, nn.Identity())
            folded += 1
    for _, child in module.named_children():
        folded += fold_batchnorm(child)
    return folded


def _native_padding(conv: nn.Conv2d) -> nn.Module:
    """EfficientNet ``Conv2dStaticSamePadding`` -> a plain Conv2d with its own (symmetric) padding.

    TensorFlow "same" padding is asymmetric for stride-2 convs on even sizes (0 before, 1 after);
    those keep the explicit pad. Stride-1 convs pad (k-1)/2 on every side, which nn.Conv2d does
    without materialising a padded copy of the activation.
    """
    pad = conv.static_padding
    left, right, top, bottom = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    if left == right and top == bottom:
        plain.padding = (top, left)
        return plain
    return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), plain)


def _replace_static_padding(module: nn.Module) -> int:
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and hasattr(child, "static_padding"):
            setattr(module, name, _native_padding(child))
            replaced += 1
        else:
            replaced += _replace_static_padding(child)
    return replaced


def _inplace_activations(module: nn.Module) -> None:
    # Safe for these CNNs: an activation's input is never read again after it.
    for child in module.modules():
        if isinstance(child, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            child.inplace = True


@torch.inference_mode()
def optimize_for_inference(
    encoder: ImageEncoder, channels_last: bool = True, check: bool = True, tolerance: float = 1e-3
) -> ImageEncoder:
    """A frozen, faster copy of ``encoder`` computing the same features (see the module docstring)."""
    original = encoder.eval()
    fast = copy.deepcopy(original).eval()
    fold_batchnorm(fast)
    _replace_static_padding(fast)
    _inplace_activations(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    if check:
        generator = torch.Generator().manual_seed(0)
        probe = original.normalize(
            torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.uint8)
        )
        expected = original(probe)
        got = fast(probe.contiguous(memory_format=torch.channels_last) if channels_last else probe)
        diff = (got - expected).abs().max().item()
        scale = max(expected.abs().max().item(), 1.0)
        if not math.isfinite(diff) or diff > tolerance * scale:
            raise RuntimeError(
                f"optimized {encoder.name} differs from the original by {diff:.3g} (scale {scale:.3g}): "
                "BatchNorm folding does not fit this architecture"
            )
    return fast


# --------------------------------------------------------------------------------------------
# Images -> cached features
# --------------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Item ``i``: (i, uint8 image [3, 224, 224] or zeros, reason or ''); decoding runs in workers."""

    def __init__(self, image_dir: str | Path, names: Sequence[str], size: int = IMAGE_SIZE):
        self.image_dir = Path(image_dir)
        self.names = list(names)
        self.size = size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.image_dir / self.names[index])
        except ImageError as exc:
            return index, torch.zeros(3, self.size, self.size, dtype=torch.uint8), exc.reason
        if tuple(image.shape[1:]) != (self.size, self.size):
            # Squash like the mirror's images (already 224x224); uint8 stays uint8 (less IPC).
            image = TF.resize(image, [self.size, self.size], antialias=True)
        return index, image, ""


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the decoder worker must not compete with the CNN's threads


def iterate_image_batches(image_dir, names, batch_size: int, num_workers: int):
    loader = DataLoader(
        ImageFiles(image_dir, names),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    yield from loader


@torch.inference_mode()
def encode_batch(encoder: ImageEncoder, images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 images [batch, 3, 224, 224] -> float32 features [batch, positions, channels]."""
    x = encoder.normalize(images)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    maps = encoder(x)  # [batch, C, 7, 7]
    # For channels-last maps this permute+reshape is a view of memory already laid out as [B, 49, C].
    return maps.permute(0, 2, 3, 1).reshape(maps.size(0), -1, maps.size(1)).float()


def extract_features(
    image_dir: str | Path,
    names: Sequence[str],
    features_path: str | Path,
    index_path: str | Path,
    encoder_name: str = "efficientnet_lite0",
    weights_path: str | Path | None = None,
    batch_size: int = 16,
    num_workers: int = 1,
    fast: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Encode ``names`` (files in ``image_dir``) once; write the ``.npy`` + index JSON atomically.

    Images that are missing or fail to decode are reported (name, reason) in the returned dict
    and in the index, and get no row; they are never dropped silently. Returns a summary dict:
    images, encoded, problems, seconds, images_per_s, shape, encoder.
    """
    names = list(names)
    if not names:
        raise DataError(f"{image_dir}: no images to encode")
    if len(set(names)) != len(names):
        raise DataError(f"{image_dir}: duplicate image names in the list to encode")
    encoder = build_image_encoder(encoder_name, weights_path)
    net = optimize_for_inference(encoder) if fast else encoder
    channels, positions = encoder.out_channels, (IMAGE_SIZE // 32) ** 2
    features_path, index_path = Path(features_path), Path(index_path)
    start = time.perf_counter()
    problems: list[tuple[str, str]] = []
    with atomic_path(features_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(names), positions, channels))
        bad_rows: list[int] = []
        done = 0
        for index, images, reasons in iterate_image_batches(image_dir, names, batch_size, num_workers):
            for i, reason in zip(index.tolist(), reasons):
                if reason:
                    problems.append((names[i], reason))
                    bad_rows.append(i)
            feats = encode_batch(net, images, channels_last=fast)  # [batch, 49, C]
            out[index[0].item() : index[-1].item() + 1] = feats.numpy().astype(np.float16)
            done += len(index)
            if progress is not None:
                progress(done, len(names))
        out.flush()
        bad = set(bad_rows)
        ok_rows = [i for i in range(len(names)) if i not in bad]
        if bad_rows:
            for name, reason in problems:
                log.warning("image %s: %s (no features)", name, reason)
            if not ok_rows:
                raise DataError(f"{image_dir}: none of the {len(names)} images could be decoded")
            # Compact: rows of undecodable images are removed so row i always matches names[i].
            compact_path = tmp.with_name(tmp.name + ".compact")
            compact = np.lib.format.open_memmap(
                compact_path, mode="w+", dtype=np.float16, shape=(len(ok_rows), positions, channels)
            )
            for j in range(0, len(ok_rows), 512):
                compact[j : j + 512] = out[ok_rows[j : j + 512]]
            compact.flush()
            del compact, out
            compact_path.replace(tmp)
        else:
            del out
    seconds = time.perf_counter() - start
    kept = [names[i] for i in ok_rows]
    index_data = {
        "format": FEATURES_FORMAT,
        "encoder": encoder_name,
        "layout": "images x positions x channels",
        "grid": IMAGE_SIZE // 32,
        "channels": channels,
        "dtype": "float16",
        "normalization": {"mean": encoder.mean.flatten().tolist(), "std": encoder.std.flatten().tolist()},
        "names": kept,
        "problems": [{"image": n, "reason": r} for n, r in problems],
    }
    write_json(index_path, index_data)
    return {
        "encoder": encoder_name,
        "images": len(names),
        "encoded": len(kept),
        "problems": [{"image": n, "reason": r} for n, r in problems],
        "seconds": round(seconds, 2),
        "images_per_s": round(len(names) / seconds, 2),
        "shape": [len(kept), positions, channels],
    }


def encode_images(
    encoder: ImageEncoder,
    image_dir: str | Path,
    names: Sequence[str],
    batch_size: int = 16,
    num_workers: int = 1,
    fast: bool = True,
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """In memory, what :func:`extract_features` writes to disk: (float16 maps [kept, positions,
    channels], kept names, (name, reason) per image that did not decode), for any encoder,
    e.g. the frozen prefix of a fine-tuned one (:func:`rnnlab.models.image_encoder.split_encoder`),
    by the same fast path and the same float16 rounding as the feature cache."""
    names = list(names)
    if not names:
        raise DataError(f"{image_dir}: no images to encode")
    net = optimize_for_inference(encoder) if fast else encoder.eval()
    rows: list[np.ndarray] = []
    kept: list[str] = []
    problems: list[tuple[str, str]] = []
    for index, images, reasons in iterate_image_batches(image_dir, names, batch_size, num_workers):
        feats = encode_batch(net, images, channels_last=fast).numpy().astype(np.float16)  # [batch, P, C]
        for j, (i, reason) in enumerate(zip(index.tolist(), reasons)):
            if reason:
                problems.append((names[i], reason))
            else:
                rows.append(feats[j])
                kept.append(names[i])
    if not kept:
        raise DataError(f"{image_dir}: none of the {len(names)} images could be decoded")
    return np.stack(rows), kept, problems
