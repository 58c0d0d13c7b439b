"""Pictures every task draws (matplotlib, Agg backend): attention maps, BLEU vs beam, caption grids."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on our machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int):
    """Lay out, write (its folder made) and close a figure; returns the path."""
    from pathlib import Path

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# -- translation -----------------------------------------------------------------------------
def plot_attention(source_tokens: list[str], target_tokens: list[str], weights, path, title: str = ""):
    """Heatmap of ``weights`` [len(target_tokens), len(source_tokens)] (rows: output steps) to a PNG."""
    import torch

    plt = pyplot()
    weights = torch.as_tensor(weights).float().numpy()
    if weights.shape != (len(target_tokens), len(source_tokens)):
        raise ValueError(f"weights {weights.shape} do not match {len(target_tokens)} x {len(source_tokens)} tokens")
    fig, ax = plt.subplots(figsize=(0.35 * len(source_tokens) + 2.5, 0.3 * len(target_tokens) + 2))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(source_tokens)), source_tokens, rotation=90)
    ax.set_yticks(range(len(target_tokens)), target_tokens)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    return save_figure(fig, path, 100)


def plot_bleu_vs_beam(rows: list[dict], path, title: str):
    """sacreBLEU / tokenized BLEU / chrF against the beam size (rows ``{beam, sacrebleu, tok_bleu, chrf}``;
    beam 1 is greedy decoding)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (
        ("sacrebleu", "sacreBLEU (detok, cased)"),
        ("tok_bleu", "BLEU (tok, lower-cased)"),
        ("chrf", "chrF"),
    ):
        ax.plot([r["beam"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("beam size (1 = greedy)")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path, 100)


# -- captioning ------------------------------------------------------------------------------
def _caption_image(image_dir, name: str):
    """The image as a uint8 [H, W, 3] array, or mid-grey (with a warning) when it does not load."""
    import logging

    import numpy as np

    from rnnlab.data.images import ImageError, load_image

    try:
        return load_image(image_dir / name).permute(1, 2, 0).numpy()
    except ImageError as exc:
        logging.getLogger(__name__).warning("grid: %s", exc)
        return np.full((224, 224, 3), 127, dtype=np.uint8)


def _wrap_caption(text: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def save_caption_grid(path, image_dir, names, generated, references, columns: int = 4, title: str = ""):
    """PNG grid: each test image with its generated caption (bold) and its first reference.
    ``references``: per image, its reference captions (text). Returns the PNG's path."""
    import math
    from pathlib import Path

    plt = pyplot()
    path, image_dir = Path(path), Path(image_dir)
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name, gen, refs in zip(axes.flat, names, generated, references):
        ax.imshow(_caption_image(image_dir, name))
        ax.set_title(f"{_wrap_caption(gen)}", fontsize=9, fontweight="bold", loc="left")
        ref = refs[0] if refs else ""
        ax.text(
            0,
            1.0,
            f"ref: {_wrap_caption(ref)}",
            transform=ax.transAxes,
            fontsize=8,
            va="top",
            color="white",
            bbox=dict(facecolor="black", alpha=0.55, pad=2),
        )
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, 80)


def save_attention_grid(path, image_dir, names, tokens, attention, grid: int = 7, max_words: int = 12):
    """PNG: one row per image, the image then one panel per generated word with its attention
    map (softmax weights over the grid x grid positions, upsampled) laid over the image.
    ``attention``: per image a tensor [steps (words + <eos>), grid * grid]. Returns the PNG's path."""
    from pathlib import Path

    import torch

    plt = pyplot()
    path, image_dir = Path(path), Path(image_dir)
    columns = 1 + max_words
    fig, axes = plt.subplots(len(names), columns, figsize=(1.9 * columns, 2.1 * len(names)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (name, words, alpha) in enumerate(zip(names, tokens, attention)):
        image = _caption_image(image_dir, name)
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
    return save_figure(fig, path, 70)
