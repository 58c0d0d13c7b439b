"""Readers: raw corpus files -> tables (pandas DataFrames) with ``file`` and ``line`` columns.

Every reader decodes strictly (a non-UTF-8 byte is an error naming file and line) and never
drops a row silently: rows it cannot use are returned with a reason, for the caller to count.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from rnnlab.errors import DataError

LM_FILES = {
    "ptb": {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
    "wikitext2": {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"},
}
PARALLEL_FILES = {"train": "raw/train", "val": "raw/val", "test": "raw/test_2016_flickr"}
CAPTION_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without the newline); gzip by suffix; strict UTF-8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path} line {lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                    ) from None
                yield lineno, text.rstrip("\n").rstrip("\r")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DataError(f"{path}: file not found") from None
        raise DataError(f"{path}: cannot read ({exc})") from None


def _require_lines(rows: list, path: Path) -> None:
    if not rows:
        raise DataError(f"{path}: split is empty (no lines)")


def read_lm_corpus(name: str, raw_dir: Path) -> pd.DataFrame:
    """Word LM corpora (PTB, WikiText-2): one row per line of each split file."""
    rows = []
    for split, fname in LM_FILES[name].items():
        path = raw_dir / fname
        split_rows = [(split, fname, n, text) for n, text in read_lines(path)]
        _require_lines(split_rows, path)
        rows.extend(split_rows)
    return pd.DataFrame(rows, columns=["split", "file", "line", "text"])


def read_char_corpus(raw_dir: Path, fname: str = "input.txt", train_fraction: float = 0.9) -> pd.DataFrame:
    """Tiny Shakespeare: nanoGPT's contiguous split (first 90% of characters train, rest valid).

    The cut falls inside a line; that line is split between the two splits. Joining a split's
    rows with '\\n' gives back exactly nanoGPT's ``data[:n]`` / ``data[n:]``.
    """
    path = raw_dir / fname
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        lineno = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {lineno}: not valid UTF-8") from None
    if not text:
        raise DataError(f"{path}: file is empty")
    cut = int(len(text) * train_fraction)
    rows = []
    first_line = 1
    for split, part in (("train", text[:cut]), ("valid", text[cut:])):
        lines = part.split("\n")
        rows.extend((split, fname, first_line + i, line) for i, line in enumerate(lines))
        first_line += len(lines) - 1  # the cut line continues in the next split
    return pd.DataFrame(rows, columns=["split", "file", "line", "text"])


def read_parallel_corpus(raw_dir: Path, src_lang: str = "en", tgt_lang: str = "de") -> pd.DataFrame:
    """Multi30k: line i of ``X.en.gz`` pairs with line i of ``X.de.gz``; counts must match."""
    rows = []
    for split, stem in PARALLEL_FILES.items():
        src_path, tgt_path = raw_dir / f"{stem}.{src_lang}.gz", raw_dir / f"{stem}.{tgt_lang}.gz"
        src = list(read_lines(src_path))
        tgt = list(read_lines(tgt_path))
        if len(src) != len(tgt):
            raise DataError(
                f"misaligned parallel corpus: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}"
            )
        _require_lines(src, src_path)
        fname = f"{stem}.{src_lang}|{tgt_lang}.gz"
        rows.extend((split, fname, n, s, t) for (n, s), (_, t) in zip(src, tgt))
    return pd.DataFrame(rows, columns=["split", "file", "line", "src", "tgt"])


def read_captions(raw_dir: Path, image_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flickr8k: ``<image>.jpg#<k>\\t<caption>`` lines + official split files.

    Returns (captions, rejected): rejected rows (caption id naming no existing image, or no
    such file in ``image_dir``) carry a ``reason``; the caller decides to drop-and-count or fail.
    """
    image_dir = image_dir or raw_dir / "images"
    split_of: dict[str, str] = {}
    for split, fname in CAPTION_SPLIT_FILES.items():
        names = [t.strip() for _, t in read_lines(raw_dir / fname) if t.strip()]
        if not names:
            raise DataError(f"{raw_dir / fname}: split is empty (no image names)")
        for name in names:
            split_of[name] = split
    token_file = "Flickr8k.token.txt"
    rows, rejected = [], []
    for n, text in read_lines(raw_dir / token_file):
        if not text.strip():
            continue  # trailing blank line: no caption, nothing lost
        key, sep, caption = text.partition("\t")
        image, hash_, idx = key.rpartition("#")
        if not sep or not hash_ or not idx.isdigit():
            raise DataError(
                f"{raw_dir / token_file} line {n}: expected '<image>.jpg#<0-4>\\t<caption>', got {text[:80]!r}"
            )
        row = (split_of.get(image, "none"), token_file, n, image, int(idx), caption.strip())
        if not image.endswith(".jpg"):
            rejected.append((*row, f"caption id {image!r} names no image file"))
        elif not (image_dir / image).is_file():
            rejected.append((*row, f"image {image} not found in {image_dir}"))
        else:
            rows.append(row)
    cols = ["split", "file", "line", "image", "caption_index", "caption"]
    return pd.DataFrame(rows, columns=cols), pd.DataFrame(rejected, columns=[*cols, "reason"])
