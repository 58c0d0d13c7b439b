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

# Multi30k's and Flickr8k's layouts (params.yaml corpora declares them; kept for direct reads in tests).
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
    """A word LM corpus declared in the repository's params.yaml (PTB, WikiText-2), by name."""
    from rnnlab.data.corpora import repo_corpora

    return read_lm(repo_corpora()[name], raw_dir)


def read_lm(spec, raw_dir: Path) -> pd.DataFrame:
    """An LM corpus (``CorpusSpec``): one row per line of each split file, or of the carved file.

    Extra evaluation sets follow as splits ``eval_<name>``."""
    if spec.carve is not None:
        fname = spec.carve.file
        if spec.carve.by == "chars":
            table = read_char_corpus(raw_dir, fname, valid=spec.carve.valid, test=spec.carve.test)
        else:
            lines = list(read_lines(raw_dir / fname))
            _require_lines(lines, raw_dir / fname)
            names = carve_indices(len(lines), spec.carve, f"corpora.{spec.name}.carve", raw_dir / fname)
            table = pd.DataFrame(
                [(names[i], fname, n, text) for i, (n, text) in enumerate(lines)],
                columns=["split", "file", "line", "text"],
            )
            table = pd.concat([table[table.split == s] for s in spec.carve.split_names()], ignore_index=True)
    else:
        rows = []
        for split, fname in spec.splits.items():
            rows.extend(_lm_rows(raw_dir, split, fname))
        table = pd.DataFrame(rows, columns=["split", "file", "line", "text"])
    extra = [r for name, fname in spec.eval_sets.items() for r in _lm_rows(raw_dir, f"eval_{name}", fname)]
    if extra:
        table = pd.concat([table, pd.DataFrame(extra, columns=table.columns)], ignore_index=True)
    return table


def _lm_rows(raw_dir: Path, split: str, fname: str) -> list[tuple]:
    path = raw_dir / fname
    rows = [(split, fname, n, text) for n, text in read_lines(path)]
    _require_lines(rows, path)
    return rows


def _fraction(x: float) -> float:
    """1 - 0.05 - 0.05 is 0.8999999999999999 in floating point: round so that 90% of 3000 lines is 2700."""
    return round(x, 12)


def carve_indices(n: int, carve, where: str, path: Path) -> list[str]:
    """The split of each of ``n`` items (lines, or images of a captions file) under a carve rule."""
    if carve.by == "every_nth":
        k = carve.every
        names = ["valid" if i % k == k - 2 else "test" if i % k == k - 1 else "train" for i in range(n)]
    else:
        cut1, cut2 = int(n * _fraction(1 - carve.valid - carve.test)), int(n * _fraction(1 - carve.test))
        names = ["train" if i < cut1 else "valid" if i < cut2 else "test" for i in range(n)]
    for split in carve.split_names():
        if split not in names:
            rule = f"every {carve.every}" if carve.by == "every_nth" else f"valid {carve.valid}, test {carve.test}"
            raise DataError(
                f"{where}: the rule (by {carve.by}, {rule}) leaves split {split!r} empty: {path} has only {n} items"
            )
    return names


def read_char_corpus(
    raw_dir: Path, fname: str = "input.txt", train_fraction: float | None = None, valid: float = 0.1, test: float = 0.0
) -> pd.DataFrame:
    """A char corpus carved by characters: nanoGPT's contiguous split for Tiny Shakespeare (first
    90% of the characters train, the rest valid); with ``test`` > 0 the last fraction is test.

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
    if train_fraction is not None:
        valid, test = 1 - train_fraction, 0.0
    cut = int(len(text) * (train_fraction if train_fraction is not None else _fraction(1 - valid - test)))
    cut2 = int(len(text) * _fraction(1 - test)) if test > 0 else len(text)
    parts = [("train", text[:cut]), ("valid", text[cut:cut2])] + ([("test", text[cut2:])] if test > 0 else [])
    rows = []
    first_line = 1
    for split, part in parts:
        if not part:
            raise DataError(f"{path}: carving by chars leaves split {split!r} empty ({len(text)} characters)")
        lines = part.split("\n")
        rows.extend((split, fname, first_line + i, line) for i, line in enumerate(lines))
        first_line += len(lines) - 1  # the cut line continues in the next split
    return pd.DataFrame(rows, columns=["split", "file", "line", "text"])


def pair_name(src: str, tgt: str) -> str:
    """One ``file`` value for a pair: the common prefix and suffix once, the parts that differ
    joined by '|' (``raw/train.en.gz`` + ``raw/train.de.gz`` -> ``raw/train.en|de.gz``)."""
    i = 0
    while i < min(len(src), len(tgt)) and src[i] == tgt[i]:
        i += 1
    j = 0
    while j < min(len(src), len(tgt)) - i and src[-1 - j] == tgt[-1 - j]:
        j += 1
    return f"{src[:i]}{src[i : len(src) - j]}|{tgt[i : len(tgt) - j]}{src[len(src) - j :]}"


def read_parallel_corpus(raw_dir: Path, src_lang: str = "en", tgt_lang: str = "de") -> pd.DataFrame:
    """Multi30k: line i of ``X.en.gz`` pairs with line i of ``X.de.gz``; counts must match."""
    splits = {s: {"src": f"{stem}.{src_lang}.gz", "tgt": f"{stem}.{tgt_lang}.gz"} for s, stem in PARALLEL_FILES.items()}
    return read_parallel(raw_dir, splits)


def read_parallel(
    raw_dir: Path, splits: dict, carve=None, where: str = "corpora", eval_sets: dict | None = None
) -> pd.DataFrame:
    """Two aligned files per split (line i of src with line i of tgt), or one pair carved by lines.

    Extra evaluation sets (``{name: {src, tgt}}``) follow as splits ``eval_<name>``."""
    rows = []
    pairs = {"all": carve.file} if carve is not None else splits
    extra = {f"eval_{name}": pair for name, pair in (eval_sets or {}).items()}
    for split, pair in {**pairs, **extra}.items():
        src_path, tgt_path = raw_dir / pair["src"], raw_dir / pair["tgt"]
        src = list(read_lines(src_path))
        tgt = list(read_lines(tgt_path))
        if len(src) != len(tgt):
            raise DataError(
                f"misaligned parallel corpus: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}"
            )
        _require_lines(src, src_path)
        fname = pair_name(pair["src"], pair["tgt"])
        carved = carve is not None and split == "all"
        names = carve_indices(len(src), carve, f"{where}.carve", src_path) if carved else [split] * len(src)
        rows.extend((name, fname, n, s, t) for name, (n, s), (_, t) in zip(names, src, tgt))
    table = pd.DataFrame(rows, columns=["split", "file", "line", "src", "tgt"])
    if carve is not None:
        order = [*carve.split_names(), *extra]
        table = pd.concat([table[table.split == s] for s in order], ignore_index=True)
    return table


def read_captions(
    raw_dir: Path,
    image_dir: Path | None = None,
    split_files: dict[str, str] = CAPTION_SPLIT_FILES,
    token_file: str = "Flickr8k.token.txt",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flickr8k: ``<image>.jpg#<k>\\t<caption>`` lines + official split files.

    Returns (captions, rejected): rejected rows (caption id naming no existing image, or no
    such file in ``image_dir``) carry a ``reason``; the caller decides to drop-and-count or fail.
    """
    image_dir = image_dir or raw_dir / "images"
    split_of: dict[str, str] = {}
    for split, fname in split_files.items():
        names = [t.strip() for _, t in read_lines(raw_dir / fname) if t.strip()]
        if not names:
            raise DataError(f"{raw_dir / fname}: split is empty (no image names)")
        for name in names:
            split_of[name] = split
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


def _caption_lines(path: Path, fmt: str) -> Iterator[tuple[int, str, str]]:
    """(line, image, caption) of a TSV (``image<TAB>caption``) or JSON-lines captions file."""
    import json

    for n, text in read_lines(path):
        if not text.strip():
            continue
        if fmt == "tsv":
            image, sep, caption = text.partition("\t")
            if not sep:
                raise DataError(f"{path} line {n}: expected 'image<TAB>caption', got {text[:80]!r}")
        else:
            try:
                obj = json.loads(text)
                image, caption = obj["image"], obj["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{path} line {n}: expected a JSON object with 'image' and 'caption', got {text[:80]!r}"
                ) from None
        yield n, image.strip(), caption.strip()


def read_caption_files(spec, raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A TSV / JSON-lines captions corpus (``CorpusSpec``) over its image folder.

    Splits: one captions file per split, or one file carved by image (all captions of an image in
    one split, images in order of first mention). Rows whose image is missing or does not decode
    are returned in ``rejected`` with the reason; a folder where no image decodes is an error."""
    from rnnlab.data.images import validate_images

    cap = spec.captions
    image_dir = raw_dir / cap.images
    if not image_dir.is_dir():
        raise DataError(f"corpora.{spec.name}.captions.images: {image_dir}: no such folder")
    sources = {"all": cap.file} if spec.carve is not None else dict(spec.splits)
    sources.update({f"eval_{name}": fname for name, fname in spec.eval_sets.items()})  # same format, same folder
    rows = []
    for split, fname in sources.items():
        lines = list(_caption_lines(raw_dir / fname, cap.format))
        _require_lines(lines, raw_dir / fname)
        carved = spec.carve is not None and split == "all"
        if carved:
            images = list(dict.fromkeys(image for _, image, _ in lines))
            names = carve_indices(len(images), spec.carve, f"corpora.{spec.name}.carve", raw_dir / fname)
            split_of = dict(zip(images, names))
        seen: dict[str, int] = {}
        for n, image, caption in lines:
            k = seen[image] = seen.get(image, -1) + 1
            rows.append((split_of[image] if carved else split, fname, n, image, k, caption))
    good_names, problems = validate_images(image_dir, sorted({r[3] for r in rows}))
    ok = {name: None for name in good_names} | {name: f"image {name}: {why}" for name, why in problems}
    if not any(v is None for v in ok.values()):
        files = sorted(p.name for p in image_dir.iterdir())
        raise DataError(
            f"corpora.{spec.name}.captions.images: {image_dir}: no decodable image among the {len(ok)} the "
            f"captions name ({len(files)} files in the folder: {files[:5]})"
        )
    cols = ["split", "file", "line", "image", "caption_index", "caption"]
    good = [r for r in rows if ok[r[3]] is None]
    bad = [(*r, ok[r[3]]) for r in rows if ok[r[3]] is not None]
    return pd.DataFrame(good, columns=cols), pd.DataFrame(bad, columns=[*cols, "reason"])
