"""DVC stage ``features``: encode every image of a captions corpus (params ``features.corpus``,
default Flickr8k) once with the frozen CNN and cache its maps.

Decodes every image named by the corpus's prepared captions table, runs the frozen CNN
(:func:`rnnlab.features.extract_features`, BN folded, channels-last) and caches the 7x7xC maps as
float16 in ``data/features/<corpus>/{features.npy,features.json}`` (read back by
:mod:`rnnlab.data.feature_cache`). Images that are missing or do not decode are reported by name
with their reason and counted in ``data/metrics/features.json``, together with the number of
captions that lose their image; ``on_bad_image: drop`` (default) keeps going without them,
``fail`` stops the stage with an error naming every bad file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rnnlab.config import parse_section, require, section
from rnnlab.data.captions import read_prepared_captions, scored_splits
from rnnlab.data.feature_cache import FEATURES_FILE, INDEX_FILE
from rnnlab.errors import ConfigError, DataError
from rnnlab.io import write_json

log = logging.getLogger(__name__)

CORPUS = "flickr8k"  # the default features.corpus


@dataclass
class FeaturesConfig:
    """``features`` params section.

    corpus: the captions corpus of params ``corpora`` whose images are encoded (dvc.yaml names
        its folders from this key of params.yaml: set it there, not in a profile).
    encoder: CNN for the cache (efficientnet_lite0 | resnet18 | resnet50 | small_cnn).
    weights: optional local weights file for the encoder (null: its default weights).
    batch_size: images per CNN batch (16 is fastest per core, see :mod:`rnnlab.features`).
    num_workers: DataLoader workers decoding JPEGs while the CNN runs (0: in the main process).
    on_bad_image: ``drop`` (report + count, go on) or ``fail`` (stop, naming every bad image).
    limit_images: null for all; N keeps the first N images (by name) of each of train/dev/test
        (tiny test profiles only).
    """

    corpus: str = CORPUS
    encoder: str = "efficientnet_lite0"
    weights: str | None = None
    batch_size: int = 16
    num_workers: int = 1
    on_bad_image: Literal["drop", "fail"] = "drop"
    limit_images: int | None = None

    def validate(self, where: str) -> None:
        from rnnlab.models.image_encoder import ENCODER_NAMES

        require(self.encoder in ENCODER_NAMES, f"{where}.encoder", f"one of {list(ENCODER_NAMES)}", self.encoder)
        require(self.batch_size >= 1, f"{where}.batch_size", "an integer >= 1", self.batch_size)
        require(self.num_workers >= 0, f"{where}.num_workers", "an integer >= 0", self.num_workers)
        require(
            self.limit_images is None or self.limit_images >= 1,
            f"{where}.limit_images",
            "null or an integer >= 1",
            self.limit_images,
        )


def parse_features_config(params: dict) -> FeaturesConfig:
    return parse_section(FeaturesConfig, section(params, "features"), "features")


def images_to_encode(captions, limit: int | None) -> list[str]:
    """Every image named by the captions table (all splits), or the first ``limit`` per split
    (train, dev, test and the extra evaluation sets)."""
    if limit is None:
        return sorted(set(captions["image"]))
    keep: set[str] = set()
    for split in scored_splits(captions["split"]):
        keep.update(sorted(set(captions.loc[captions["split"] == split, "image"]))[:limit])
    return sorted(keep)


def image_folder(params: dict, corpus: str) -> str:
    """The corpus's image folder inside ``data/raw/<corpus>`` (its ``captions.images``; ``images``
    where params declare no corpora, as in the unit tests' params)."""
    from rnnlab.data.corpora import get, load_corpora

    if "corpora" not in params:
        return "images"
    spec = get(load_corpora(params), corpus, "features.corpus")
    if spec.task != "captions":
        raise ConfigError(f"features.corpus: {corpus!r} is not a captions corpus (task {spec.task!r})")
    return spec.captions.images


def features_stage(params: dict, prepared_dir: Path, raw_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    """Encode the images of ``prepared_dir/<corpus>/captions.parquet`` from ``raw_dir/<corpus>/<its
    image folder>`` into the cache folder ``out_dir``; write and return the stage's metrics."""
    from rnnlab.features import extract_features

    cfg = parse_features_config(params)
    image_dir = Path(raw_dir) / cfg.corpus / image_folder(params, cfg.corpus)
    captions = read_prepared_captions(prepared_dir, cfg.corpus)
    names = images_to_encode(captions, cfg.limit_images)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder of {cfg.corpus} missing (run the download stage)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            log.info("features: %d / %d images", done, total)

    summary = extract_features(
        image_dir,
        names,
        out_dir / FEATURES_FILE,
        out_dir / INDEX_FILE,
        encoder_name=cfg.encoder,
        weights_path=cfg.weights,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        progress=progress,
    )
    bad = {p["image"]: p["reason"] for p in summary["problems"]}
    lost = captions[captions["image"].isin(bad)]
    metrics = {
        "corpus": cfg.corpus,
        "encoder": cfg.encoder,
        "images": summary["images"],
        "encoded": summary["encoded"],
        "bad_images": len(bad),
        "bad_image_names": [{"image": n, "reason": r} for n, r in bad.items()],
        "captions_of_bad_images": int(len(lost)),
        "captions_of_bad_images_by_split": {str(k): int(v) for k, v in lost["split"].value_counts().items()},
        "on_bad_image": cfg.on_bad_image,
        "limit_images": cfg.limit_images,
        "shape": summary["shape"],
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
    }
    write_json(metrics_path, metrics)
    if bad and cfg.on_bad_image == "fail":
        for path in (out_dir / FEATURES_FILE, out_dir / INDEX_FILE):
            path.unlink(missing_ok=True)  # a failed stage leaves no cache behind
        listing = "; ".join(f"{image_dir / n}: {r}" for n, r in bad.items())
        raise DataError(f"features: {len(bad)} image(s) could not be used (features.on_bad_image: fail): {listing}")
    if bad:
        log.warning(
            "features: dropped %d bad image(s) and their %d captions: %s", len(bad), len(lost), list(bad.items())[:5]
        )
    log.info("features: %d images at %.1f images/s", summary["encoded"], summary["images_per_s"])
    return metrics
