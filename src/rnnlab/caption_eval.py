"""Caption evaluation: corpus BLEU-1..4 from free-running decoding, sacreBLEU, image grids.

Tokenisation (the one used for every BLEU number here): :class:`rnnlab.data.tokenize.WordTokenizer`
with lower-casing, the tokenizer the model is trained with. References are all captions of an
image (5 for Flickr8k) tokenised that way, never truncated and never mapped to ``<unk>``;
hypotheses are the decoded tokens (``<unk>`` stays a token that matches nothing).

BLEU-n (:func:`corpus_bleu`) is Papineni et al.'s corpus BLEU with uniform weights over 1..n-gram
precisions, clipped counts against the maximum count in any reference, and the brevity penalty
from the closest reference length, with no smoothing: the same definition as
``nltk.translate.bleu_score.corpus_bleu(weights=(1/n,)*n)`` (tests check equality) and as most
captioning papers report, with one corner case: a hypothesis shorter than n words adds no
n-grams to the denominator here (as in multi-bleu.perl and sacrebleu), where nltk adds one. It is computed with sacrebleu on our tokens (``tokenize='none'``,
``max_ngram_order=n``), scaled 0-100.

For transparency :func:`sacrebleu_standard` also reports standard sacreBLEU (its own ``13a``
tokenizer on the detokenised hypothesis vs the raw reference captions, lower-cased), with its
signature string.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sacrebleu.metrics import BLEU

from rnnlab.data.images import ImageError, load_image

log = logging.getLogger(__name__)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis reference lists -> sacrebleu's reference streams (None where fewer refs)."""
    width = max(len(r) for r in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                max_order: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_order`` (0-100) of token lists against all references of each item."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    if any(len(r) == 0 for r in references):
        raise ValueError("every hypothesis needs at least one reference")
    hyps = [" ".join(h) for h in hypotheses]
    refs = _reference_streams([[" ".join(r) for r in rs] for rs in references])
    scores = {}
    for n in range(1, max_order + 1):
        bleu = BLEU(tokenize="none", max_ngram_order=n, effective_order=False, smooth_method="none")
        scores[f"bleu{n}"] = round(float(bleu.corpus_score(hyps, refs).score), 4)
    return scores


def sacrebleu_standard(hypothesis_texts: Sequence[str], reference_texts: Sequence[Sequence[str]]) -> dict:
    """Standard sacreBLEU (13a tokenisation, lower-cased) on detokenised text; score + signature."""
    bleu = BLEU(lowercase=True)
    result = bleu.corpus_score(list(hypothesis_texts), _reference_streams(reference_texts))
    return {"score": round(float(result.score), 4), "signature": str(bleu.get_signature())}


def evaluate_captioner(task, datamodule, split: str = "test", beam_sizes: Sequence[int] = (1, 3, 5),
                       length_penalty: float = 0.0, batch_size: int = 100,
                       captions: "object | None" = None) -> tuple[dict, dict]:
    """Decode every image of ``split`` with each beam size (1 = greedy) and score it.

    Returns (metrics, decoded): metrics[setting] = {bleu1..4, sacrebleu, sacrebleu_signature,
    mean_length, captions_per_s}; decoded[setting] = list of token lists in ``names`` order, plus
    ``decoded["names"]`` and, for soft attention, ``decoded["attention"]`` from greedy decoding.
    ``captions`` (the raw caption table) gives sacreBLEU its untokenised references.
    """
    import time

    data = datamodule.splits[split]
    names = list(data.names)
    features = torch.cat([f for _, f in datamodule.image_batches(split, batch_size)])
    references = data.references
    raw_refs = None
    if captions is not None:
        table = captions[captions["split"] == split].sort_values(["image", "caption_index"])
        by_image = table.groupby("image")["caption"].apply(list).to_dict()
        raw_refs = [by_image[n] for n in names]
    metrics, decoded = {}, {"names": names}
    tokenizer = task.tokenizer
    for beam in beam_sizes:
        setting = "greedy" if beam == 1 else f"beam{beam}"
        start = time.perf_counter()
        want_attention = beam == 1 and task.hparams.decoder == "soft_attention"
        result = task.caption(features, beam_size=beam, length_penalty=length_penalty,
                              return_attention=want_attention, batch_size=batch_size)
        seconds = time.perf_counter() - start
        scores = corpus_bleu(result.tokens, references)
        texts = result.texts(tokenizer)
        std = sacrebleu_standard(texts, raw_refs or [[tokenizer.detokenize(r) for r in rs] for rs in references])
        metrics[setting] = {
            **scores,
            "sacrebleu": std["score"],
            "sacrebleu_signature": std["signature"],
            "mean_length": round(float(np.mean([len(t) for t in result.tokens])), 3),
            "captions_per_s": round(len(names) / seconds, 2),
        }
        decoded[setting] = result.tokens
        if want_attention:
            decoded["attention"] = result.attention
        log.info("%s %s: %s", split, setting, scores)
    return metrics, decoded


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend: no display needed)
# --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image_or_blank(image_dir: Path, name: str) -> np.ndarray:
    try:
        return load_image(image_dir / name).permute(1, 2, 0).numpy()
    except ImageError as exc:
        log.warning("grid: %s", exc)
        return np.full((224, 224, 3), 127, dtype=np.uint8)


def _wrap(text: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def save_caption_grid(path: str | Path, image_dir: str | Path, names: Sequence[str], generated: Sequence[str],
                      references: Sequence[Sequence[str]], columns: int = 4, title: str = "") -> Path:
    """PNG grid: each test image with its generated caption (bold) and its first reference."""
    plt = _pyplot()
    path, image_dir = Path(path), Path(image_dir)
    n = len(names)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name, gen, refs in zip(axes.flat, names, generated, references):
        ax.imshow(_image_or_blank(image_dir, name))
        ax.set_title(f"{_wrap(gen)}", fontsize=9, fontweight="bold", loc="left")
        ref = refs[0] if refs else ""
        ax.text(0, 1.0, f"ref: {_wrap(ref)}", transform=ax.transAxes, fontsize=8, va="top",
                color="white", bbox=dict(facecolor="black", alpha=0.55, pad=2))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_attention_grid(path: str | Path, image_dir: str | Path, names: Sequence[str],
                        tokens: Sequence[Sequence[str]], attention: Sequence[torch.Tensor],
                        grid: int = 7, max_words: int = 12) -> Path:
    """PNG: one row per image, the image then one panel per generated word with its attention
    map (softmax weights over the grid x grid positions, upsampled) laid over the image."""
    plt = _pyplot()
    path, image_dir = Path(path), Path(image_dir)
    columns = 1 + max_words
    fig, axes = plt.subplots(len(names), columns, figsize=(1.9 * columns, 2.1 * len(names)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (name, words, alpha) in enumerate(zip(names, tokens, attention)):
        image = _image_or_blank(image_dir, name)
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(name[:18], fontsize=7)
        words = list(words) + ["<eos>"]
        for k, word in enumerate(words[: min(max_words, alpha.shape[0])]):
            weights = alpha[k].reshape(1, 1, grid, grid).float()
            up = torch.nn.functional.interpolate(weights, size=image.shape[:2], mode="bilinear", align_corners=False)
            ax = axes[row, 1 + k]
            ax.imshow(image)
            ax.imshow(up[0, 0].numpy(), cmap="jet", alpha=0.5)
            ax.set_title(word, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Captioning new image files (what ``rnnlab caption`` needs)
# --------------------------------------------------------------------------------------------
def caption_image_files(checkpoint: str | Path, image_paths: Sequence[str | Path], beam_size: int = 3,
                        encoder_weights: str | Path | None = None, length_penalty: float = 0.0) -> list[str]:
    """Caption image files with a trained checkpoint; raises ImageError (a DataError) naming a file
    that is missing or not a decodable image.

    The checkpoint names its encoder (``hparams.encoder``); images are squashed to 224x224,
    encoded by the same fast path as the feature cache and rounded through float16 like the cache,
    so a new image is seen exactly as the training images were.
    """
    from rnnlab.data.images import image_transform
    from rnnlab.features import optimize_for_inference
    from rnnlab.models.image_encoder import build_image_encoder
    from rnnlab.tasks.caption_task import load_captioner

    images = [load_image(p) for p in image_paths]  # fail on a bad file before any model loads
    task = load_captioner(checkpoint)
    encoder = build_image_encoder(task.hparams.encoder, encoder_weights)
    fast = optimize_for_inference(encoder)
    transform = image_transform(encoder.mean.flatten().tolist(), encoder.std.flatten().tolist())
    batch = torch.stack([transform(image) for image in images]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        maps = fast(batch)  # [images, C, 7, 7]
    features = maps.permute(0, 2, 3, 1).reshape(maps.size(0), -1, maps.size(1)).half().float()
    result = task.caption(features.clone(), beam_size=beam_size, length_penalty=length_penalty)
    return result.texts(task.tokenizer)


# --------------------------------------------------------------------------------------------
# Re-scoring a saved model folder (what the ``evaluate`` stage calls)
# --------------------------------------------------------------------------------------------
def evaluate_caption_checkpoint(model_dir: Path, prepared_dir: Path, features_dir: Path,
                                beam_sizes: Sequence[int] = (1, 3), split: str = "test") -> dict:
    """Score a ``train_captioner`` model folder on ``split`` from the saved folder only.

    The decoder, vocabulary and tokenizer come from ``model_dir/model.ckpt`` (read with
    ``torch.load(weights_only=True)``); the decoding settings (length penalty, batch size) from
    ``model_dir/run.json``; the test images' features from the cache in ``features_dir`` and their
    references from ``prepared_dir/flickr8k/captions.parquet``. With the same beam sizes the
    numbers equal those ``train_captioner`` reported (decoding is deterministic on CPU).
    Returns {setting: {bleu1..4, sacrebleu, ...}, "params": the run's config}.
    """
    import pandas as pd

    from rnnlab.caption_stage import CORPUS, FEATURES_FILE, INDEX_FILE, RUN_FILE, captions_with_features
    from rnnlab.data.captions import CaptionDataModule
    from rnnlab.errors import DataError
    from rnnlab.features import load_features
    from rnnlab.io import read_json
    from rnnlab.tasks.caption_task import load_captioner

    model_dir, features_dir = Path(model_dir), Path(features_dir)
    for path in (model_dir / "model.ckpt", model_dir / RUN_FILE):
        if not path.is_file():
            raise DataError(f"{path}: missing from the captioner model folder (run train_captioner)")
    run = read_json(model_dir / RUN_FILE)
    task = load_captioner(model_dir / "model.ckpt")
    features = load_features(features_dir / FEATURES_FILE, features_dir / INDEX_FILE)
    if features[1].get("encoder") != task.hparams.encoder:
        raise DataError(f"{features_dir / INDEX_FILE}: features of {features[1].get('encoder')!r}, but "
                        f"{model_dir} was trained on {task.hparams.encoder!r}")
    captions_path = Path(prepared_dir) / CORPUS / "captions.parquet"
    if not captions_path.is_file():
        raise DataError(f"{captions_path}: prepared captions missing")
    captions, _ = captions_with_features(pd.read_parquet(captions_path), features[1])
    settings = run["eval"]
    data = CaptionDataModule(captions, features_dir / FEATURES_FILE, features_dir / INDEX_FILE,
                             eval_batch_size=settings["batch_size"], max_len=task.hparams.max_len,
                             vocab=task.vocab, tokenizer=task.tokenizer, features=features)
    data.setup()
    metrics, _ = evaluate_captioner(task, data, split, list(beam_sizes), settings["length_penalty"],
                                    settings["batch_size"], captions=captions)
    return {**metrics, "params": run["config"]}
