"""DVC stages ``features`` and ``train_captioner`` (issue 5: CNN+LSTM captioning on Flickr8k).

``features``: decode every image named by the prepared captions table once, run the frozen CNN
(:func:`rnnlab.features.extract_features`, BN folded, channels-last) and cache the 7x7xC maps as
float16 in ``data/features/flickr8k/{features.npy,features.json}``. Images that are missing or do
not decode are reported by name with their reason and counted in ``data/metrics/features.json``,
together with the number of captions that lose their image; ``on_bad_image: drop`` (default)
keeps going without them, ``fail`` stops the stage with an error naming every bad file.

``train_captioner``: one run per entry of ``train_captioner.runs`` (``defaults`` overridden by the
run's own keys), each its own MLflow run: params, test BLEU-1..4 per beam size, sacreBLEU, the
PNG caption grid and attention maps, and the model folder. A model folder
``data/models/captioner/<run>/`` holds everything a fresh process needs to caption a new image:
``model.ckpt`` (weights, hparams incl. the encoder name, vocabulary, tokenizer), ``vocab.json``
and ``run.json`` (the run config and the evaluation settings that
:func:`rnnlab.caption_eval.evaluate_caption_checkpoint` reuses to reproduce the numbers).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rnnlab.config import merged_runs, parse_section, require, section
from rnnlab.errors import DataError
from rnnlab.io import read_json, write_json

log = logging.getLogger(__name__)

CORPUS = "flickr8k"
FEATURES_FILE = "features.npy"
INDEX_FILE = "features.json"
RUN_FILE = "run.json"
DEFAULT_MODEL_DIR = Path("data/models/captioner/flickr8k-soft_attention")


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------
@dataclass
class FeaturesConfig:
    """``features`` params section.

    encoder: CNN for the cache (efficientnet_lite0 | resnet18 | resnet50 | small_cnn).
    weights: optional local weights file for the encoder (null: its default weights).
    batch_size: images per CNN batch (16 is fastest per core, see :mod:`rnnlab.features`).
    num_workers: DataLoader workers decoding JPEGs while the CNN runs (0: in the main process).
    on_bad_image: ``drop`` (report + count, go on) or ``fail`` (stop, naming every bad image).
    limit_images: null for all; N keeps the first N images (by name) of each of train/dev/test
        (tiny test profiles only).
    """

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
        require(self.limit_images is None or self.limit_images >= 1, f"{where}.limit_images",
                "null or an integer >= 1", self.limit_images)


@dataclass
class CaptionRunsConfig:
    """``train_captioner`` params section: experiment, defaults (CaptionTrainConfig keys), runs."""

    experiment: str = "rnnlab-captioner"
    defaults: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def validate(self, where: str) -> None:
        require(bool(self.runs), f"{where}.runs", "a non-empty list of runs", self.runs)


def parse_features_config(params: dict) -> FeaturesConfig:
    return parse_section(FeaturesConfig, section(params, "features"), "features")


def parse_caption_runs(params: dict) -> tuple[str, list[tuple[str, dict]]]:
    """-> (experiment, [(run name, merged CaptionTrainConfig dict)]); every run is validated."""
    from rnnlab.caption_train import parse_caption_config

    cfg = parse_section(CaptionRunsConfig, section(params, "train_captioner"), "train_captioner")
    parse_caption_config(cfg.defaults, "train_captioner.defaults")  # unknown keys named here
    runs = []
    for where, merged in merged_runs("train_captioner", cfg.defaults, cfg.runs):
        name = merged.pop("name")
        parse_caption_config(merged, where)
        runs.append((name, merged))
    return cfg.experiment, runs


# --------------------------------------------------------------------------------------------
# features stage
# --------------------------------------------------------------------------------------------
def _read_captions(prepared_dir: Path):
    import pandas as pd

    path = Path(prepared_dir) / CORPUS / "captions.parquet"
    if not path.is_file():
        raise DataError(f"{path}: prepared captions missing (run the prepare stage)")
    return pd.read_parquet(path)


def images_to_encode(captions, limit: int | None) -> list[str]:
    """Every image named by the captions table (all splits), or the first ``limit`` per split."""
    if limit is None:
        return sorted(set(captions["image"]))
    keep: set[str] = set()
    for split in ("train", "dev", "test"):
        keep.update(sorted(set(captions.loc[captions["split"] == split, "image"]))[:limit])
    return sorted(keep)


def features_stage(params: dict, prepared_dir: Path, raw_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    from rnnlab.features import extract_features

    cfg = parse_features_config(params)
    captions = _read_captions(prepared_dir)
    names = images_to_encode(captions, cfg.limit_images)
    image_dir = Path(raw_dir) / CORPUS / "images"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: Flickr8k image folder missing (run the download stage)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            log.info("features: %d / %d images", done, total)

    summary = extract_features(image_dir, names, out_dir / FEATURES_FILE, out_dir / INDEX_FILE,
                               encoder_name=cfg.encoder, weights_path=cfg.weights, batch_size=cfg.batch_size,
                               num_workers=cfg.num_workers, progress=progress)
    bad = {p["image"]: p["reason"] for p in summary["problems"]}
    lost = captions[captions["image"].isin(bad)]
    metrics = {
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
        log.warning("features: dropped %d bad image(s) and their %d captions: %s", len(bad), len(lost),
                    list(bad.items())[:5])
    log.info("features: %d images at %.1f images/s", summary["encoded"], summary["images_per_s"])
    return metrics


# --------------------------------------------------------------------------------------------
# train_captioner stage
# --------------------------------------------------------------------------------------------
def captions_with_features(captions, index: dict):
    """Captions whose image has a row in the feature cache, and how many were left out."""
    names = set(index["names"])
    keep = captions["image"].isin(names) & captions["split"].isin(("train", "dev", "test"))
    return captions[keep].reset_index(drop=True), int((~keep & captions["split"].isin(("train", "dev", "test"))).sum())


def train_captioner_stage(params: dict, prepared_dir: Path, features_dir: Path, raw_dir: Path, models_dir: Path,
                          metrics_path: Path, plots_dir: Path) -> dict:
    from rnnlab.caption_train import parse_caption_config, train_captioner
    from rnnlab.stages import get_seed, tracking_enabled
    from rnnlab.tracking import tracked_run

    experiment, runs = parse_caption_runs(params)
    seed, tracking = get_seed(params), tracking_enabled(params)
    features_dir, models_dir = Path(features_dir), Path(models_dir)
    index = read_json(features_dir / INDEX_FILE) if (features_dir / INDEX_FILE).is_file() else None
    if index is None:
        raise DataError(f"{features_dir / INDEX_FILE}: feature cache missing (run the features stage)")
    captions, left_out = captions_with_features(_read_captions(prepared_dir), index)
    image_dir = Path(raw_dir) / CORPUS / "images"
    table: dict = {}
    plot_rows = []
    for name, config in runs:
        cfg = parse_caption_config(config)
        out_dir = models_dir / name
        started = time.perf_counter()
        with tracked_run(
            run_name=f"train_captioner/{name}",
            stage="train_captioner",
            experiment=experiment,
            enabled=tracking,
            params={"seed": seed, "run": name, **dataclasses.asdict(cfg)},
            data_deps=[Path(prepared_dir) / CORPUS / "captions.parquet", features_dir / INDEX_FILE],
            tags={"task": "captioning", "corpus": CORPUS, "decoder": cfg.decoder, "encoder": cfg.encoder},
        ) as tracker:
            result = train_captioner(config, captions, features_dir / FEATURES_FILE, out_dir, seed,
                                     index_path=features_dir / INDEX_FILE,
                                     image_dir=image_dir if image_dir.is_dir() else None, tracker=tracker)
            wall = time.perf_counter() - started
            from rnnlab.tasks.caption_task import load_captioner

            task = load_captioner(out_dir / "model.ckpt")
            task.vocab.save(out_dir / "vocab.json")
            run_info = {"name": name, "config": dataclasses.asdict(cfg), "seed": seed,
                        "eval": {"beam_sizes": cfg.beam_sizes, "length_penalty": cfg.length_penalty,
                                 "batch_size": cfg.eval_batch_size},
                        "features": {"encoder": index.get("encoder"), "images": len(index["names"])}}
            write_json(out_dir / RUN_FILE, run_info)
            tracker.log_metrics({"wall_s": round(wall, 1), "train_seconds": result["train_seconds"]})
            for key in ("samples_png", "attention_png"):
                if key in result["artifacts"]:
                    tracker.log_artifact(result["artifacts"][key], "figures")
            for file in ("model.ckpt", "vocab.json", RUN_FILE):
                tracker.log_artifact(out_dir / file, "model")
            write_json(out_dir / "metrics.json", result)
            tracker.log_artifact(out_dir / "metrics.json")
            run_id = getattr(tracker, "run_id", None)
        test = result["test"]
        greedy_or_first = test.get("greedy") or next(iter(test.values()))
        table[name] = {
            "decoder": cfg.decoder,
            "encoder": cfg.encoder,
            "bleu": {setting: {k: s[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")} for setting, s in test.items()},
            "sacrebleu": {setting: s["sacrebleu"] for setting, s in test.items()},
            "captions_per_s": {setting: s["captions_per_s"] for setting, s in test.items()},
            "params": dataclasses.asdict(cfg),
            "best_val_loss": result["best_val_loss"],
            "epochs": result["epochs"],
            "steps": result["steps"],
            "train_seconds": result["train_seconds"],
            "eval_seconds": result["eval_seconds"],
            "wall_seconds": round(wall, 1),
            "data": {**result["data"], "captions_without_features": left_out},
            "mlflow_run_id": run_id,
            "model_path": str(out_dir),
        }
        log.info("train_captioner %s: greedy BLEU-4 %.2f in %.0f s", name, greedy_or_first["bleu4"], wall)
        for setting, s in test.items():
            beam = 1 if setting == "greedy" else int(setting.removeprefix("beam"))
            plot_rows.append({"run": name, "beam": beam, **{k: s[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")},
                              "sacrebleu": s["sacrebleu"]})
    write_json(metrics_path, table)
    write_json(Path(plots_dir) / "bleu_vs_beam.json", plot_rows)
    return table


# --------------------------------------------------------------------------------------------
# CLI: rnnlab caption
# --------------------------------------------------------------------------------------------
def resolve_captioner(run: str | None) -> Path:
    """A model folder / model.ckpt path, or an MLflow run id (its ``model`` artifact folder)."""
    from rnnlab.errors import RnnlabError
    from rnnlab.generate import resolve_model_path

    path = resolve_model_path(str(run or DEFAULT_MODEL_DIR))
    if path.is_dir():
        path = path / "model.ckpt"
    if not path.is_file():
        raise RnnlabError(f"{path}: no captioner checkpoint (train one with `dvc repro train_captioner`)")
    return path


def caption_command(image: str, beam: int = 3, run: str | None = None) -> str:
    from rnnlab.caption_eval import caption_image_files
    from rnnlab.data.images import load_image

    load_image(image)  # a bad file is reported before any model is loaded or fetched
    return caption_image_files(resolve_captioner(run), [image], beam_size=beam)[0]
