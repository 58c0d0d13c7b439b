"""Flickr8k captions: reading, tokenising, and batching them with cached image features.

Inputs (written by ``prepare`` and the ``features`` stage; read by :mod:`rnnlab.data.feature_cache`):

- the captions table ``captions.parquet``: one row per caption with columns ``split``
  (train/dev/test; other values such as ``none`` are ignored), ``image`` (file name),
  ``caption_index`` (0-4) and ``caption`` (raw text); extra columns (``file``, ``line``) are allowed;
- ``features.npy`` float16 [images, 49, channels] + ``features.json`` (names, problems).

:class:`CaptionDataModule` tokenises with :class:`WordTokenizer` (lower-cased), builds the
vocabulary from the train split only (``min_freq``), caps captions at ``max_len`` words, and
batches *images*: a training batch holds ``batch_size`` images with all their captions (about
5 per image), so each image's features and image-side projections are computed once for its 5
captions. Captions are padded with ``<pad>``; inputs are ``<bos> w_1 .. w_n``, targets
``w_1 .. w_n <eos>``. The whole feature cache is held in memory as float16 (~1 GB for
EfficientNet-Lite0) and each batch is converted to float32. The training loader is a
:class:`rnnlab.resume.ResumableLoader` over the shuffling DataLoader (same batches, same order), so
a run killed mid-epoch resumes at the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from rnnlab.data import readers
from rnnlab.data.feature_cache import load_features
from rnnlab.data.tokenize import Tokenizer, WordTokenizer
from rnnlab.data.vocab import Vocab
from rnnlab.errors import DataError
from rnnlab.resume import ResumableLoader

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def scored_splits(splits) -> list[str]:
    """:data:`SPLITS` and the extra evaluation sets (``eval_<name>``) among ``splits``, in that order."""
    return [*SPLITS, *sorted(s for s in set(splits) if str(s).startswith("eval_"))]


REQUIRED_COLUMNS = ("split", "image", "caption_index", "caption")
CAPTIONS_FILE = "captions.parquet"


def read_prepared_captions(prepared_dir: str | Path, corpus: str = "flickr8k") -> pd.DataFrame:
    """``<prepared_dir>/<corpus>/captions.parquet`` (what ``prepare`` writes), its validation split
    named ``dev`` (Flickr8k's name) whatever the corpus calls it (a carve rule's ``valid``)."""
    path = Path(prepared_dir) / corpus / CAPTIONS_FILE
    if not path.is_file():
        raise DataError(f"{path}: prepared captions missing (run the prepare stage with {corpus} in prepare.corpora)")
    table = pd.read_parquet(path)
    present = set(table["split"]) if "split" in table.columns else set()
    if "dev" not in present and present & {"valid", "val"}:
        table = table.assign(split=table["split"].replace({"valid": "dev", "val": "dev"}))
    return table


def read_flickr8k(
    raw_dir: str | Path, image_dir: str | Path | None = None
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Parse ``Flickr8k.token.txt`` and the three official split files in ``raw_dir``.

    Returns (captions, problems). ``captions`` has columns split (train/dev/test/none), file, line,
    image, caption_index, caption. ``problems`` has one ``(caption id, reason)`` per caption row that
    cannot be used, e.g. the 5 rows of the real file's id ``2258277193_586949ec62.jpg.1`` (it names
    no image), or an image missing from ``image_dir`` (default ``raw_dir/images``). The parsing
    itself is :func:`rnnlab.data.readers.read_captions` (the one reader ``prepare`` also uses).
    """
    raw_dir = Path(raw_dir)
    table, rejected = readers.read_captions(raw_dir, Path(image_dir) if image_dir else None)
    problems = [(str(r.image), f"{r.file} line {r.line}: {r.reason}") for r in rejected.itertuples(index=False)]
    return table, problems


def check_captions_table(captions: pd.DataFrame, where: str = "captions") -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in captions.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    for split in ("train", "dev"):
        if not (captions["split"] == split).any():
            raise DataError(f"{where}: no {split} captions")


@dataclass
class CaptionSplit:
    """One split: its images (feature rows) and, per image, the encoded and the reference captions."""

    names: list[str]
    feature_rows: np.ndarray  # int64 [images]: row of each image in the feature cache
    encoded: list[list[np.ndarray]]  # per image: int64 ids <bos> w_1..w_n <eos> per caption
    references: list[list[list[str]]]  # per image: all its captions, tokenised, never truncated/unk'ed
    truncated: int = 0  # captions cut at max_len words

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.encoded)


class _ImageCaptions(Dataset):
    def __init__(self, split: CaptionSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.names)

    def __getitem__(self, i: int):
        return i


@dataclass
class CaptionBatch:
    features: torch.Tensor  # float32 [images, positions, channels]
    inputs: torch.Tensor  # int64 [captions, steps]: <bos> w_1 .. w_n <pad>...
    targets: torch.Tensor  # int64 [captions, steps]: w_1 .. w_n <eos> <pad>...
    image_index: torch.Tensor  # int64 [captions]: row in ``features`` of each caption's image

    def to(self, device) -> CaptionBatch:
        return CaptionBatch(*(t.to(device) for t in (self.features, self.inputs, self.targets, self.image_index)))

    def __len__(self) -> int:
        return self.inputs.size(0)


def pad_captions(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[<bos> w.. <eos>] id arrays -> (inputs, targets) [captions, longest - 1], padded with ``pad_id``."""
    steps = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), steps), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), steps), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = ids[1:]
    return inputs, targets


class CaptionDataModule(pl.LightningDataModule):
    """Cached features + captions -> image-grouped batches (see the module docstring)."""

    def __init__(
        self,
        captions: pd.DataFrame,
        features_path: str | Path,
        index_path: str | Path | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 100,
        min_freq: int = 5,
        max_len: int = 30,
        vocab: Vocab | None = None,
        tokenizer: Tokenizer | None = None,
        features: tuple[np.ndarray, dict] | None = None,
    ):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        check_captions_table(captions)
        self.captions = captions
        self.features_path = Path(features_path)
        self.index_path = Path(index_path) if index_path else self.features_path.with_suffix(".json")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.min_freq, self.max_len = min_freq, max_len
        self.vocab = vocab
        self.tokenizer = tokenizer or WordTokenizer(lowercase=True)
        self._preloaded = features
        self.splits: dict[str, CaptionSplit] = {}
        self.problems: list[tuple[str, str]] = []  # (image, reason) for captions left out
        self.features: torch.Tensor | None = None  # float16 [images, positions, channels]
        self.feature_index: dict = {}

    # -- setup -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        array, self.feature_index = self._preloaded or load_features(self.features_path, self.index_path)
        row_of = {name: i for i, name in enumerate(self.feature_index["names"])}
        failed = {p["image"]: p["reason"] for p in self.feature_index.get("problems", [])}
        splits = scored_splits(self.captions["split"])  # extra evaluation sets too: scored, never trained on
        table = self.captions[self.captions["split"].isin(splits)]
        has_row = table["image"].map(lambda n: n in row_of)
        for image in sorted(set(table.loc[~has_row, "image"])):
            reason = failed.get(image, "no cached features for this image")
            self.problems.append((image, reason))
        if self.problems:
            log.warning(
                "%d images have no features; their captions are left out: %s", len(self.problems), self.problems[:3]
            )
        table = table[has_row]
        tokenized = [self.tokenizer.tokenize(c) for c in table["caption"]]
        table = table.assign(tokens=tokenized)
        if self.vocab is None:
            train_tokens = table.loc[table["split"] == "train", "tokens"]
            if train_tokens.empty:
                raise DataError("captions: no train caption has cached features")
            self.vocab = Vocab.build(train_tokens, min_freq=self.min_freq)  # train split only
        for split in splits:
            self.splits[split] = self._encode_split(table[table["split"] == split], row_of)
        used_rows = np.unique(np.concatenate([s.feature_rows for s in self.splits.values() if len(s.names)]))
        # Keep only the rows used, in memory (float16), and renumber the splits' rows.
        renumber = np.full(len(row_of), -1, dtype=np.int64)
        renumber[used_rows] = np.arange(len(used_rows))
        self.features = torch.from_numpy(np.ascontiguousarray(array[used_rows]))
        for s in self.splits.values():
            s.feature_rows = renumber[s.feature_rows]

    def _encode_split(self, table: pd.DataFrame, row_of: dict[str, int]) -> CaptionSplit:
        names, rows, encoded, references, truncated = [], [], [], [], 0
        bos, eos = self.vocab.bos_id, self.vocab.eos_id
        for image, group in table.sort_values(["image", "caption_index"]).groupby("image", sort=True):
            ids = []
            for tokens in group["tokens"]:
                truncated += len(tokens) > self.max_len
                ids.append(np.asarray([bos, *self.vocab.encode(tokens[: self.max_len]), eos], dtype=np.int64))
            names.append(image)
            rows.append(row_of[image])
            encoded.append(ids)
            references.append(list(group["tokens"]))
        return CaptionSplit(names, np.asarray(rows, dtype=np.int64), encoded, references, truncated)

    # -- loaders -----------------------------------------------------------------------------
    def collate(self, split: CaptionSplit, image_ids: Sequence[int]) -> CaptionBatch:
        image_ids = list(image_ids)
        features = self.features[torch.as_tensor(split.feature_rows[image_ids])].float()  # [images, P, C]
        sequences, image_index = [], []
        for j, i in enumerate(image_ids):
            sequences.extend(split.encoded[i])
            image_index.extend([j] * len(split.encoded[i]))
        inputs, targets = pad_captions(sequences, self.vocab.pad_id)
        return CaptionBatch(features, inputs, targets, torch.as_tensor(image_index, dtype=torch.long))

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        data = self.splits[split]
        if not data.names:
            raise DataError(f"captions: the {split} split is empty")
        return DataLoader(
            _ImageCaptions(data),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=lambda ids: self.collate(data, ids),
            num_workers=0,
        )

    def train_dataloader(self) -> ResumableLoader:
        # Resumable mid-epoch: its position and the epoch's shuffle RNG go into every checkpoint.
        return ResumableLoader(self._loader("train", True, self.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)

    def image_batches(self, split: str, batch_size: int | None = None) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(names, float32 features [images, P, C]) for free-running decoding, in name order."""
        data = self.splits[split]
        size = batch_size or self.eval_batch_size
        for start in range(0, len(data.names), size):
            rows = torch.as_tensor(data.feature_rows[start : start + size])
            yield data.names[start : start + size], self.features[rows].float()

    def summary(self) -> dict:
        return {
            "vocab_size": len(self.vocab),
            "feature_channels": int(self.features.shape[2]),
            "images_without_features": len(self.problems),
            **{f"{s}_images": len(d.names) for s, d in self.splits.items()},
            **{f"{s}_captions": d.num_captions for s, d in self.splits.items()},
            "truncated_captions": sum(d.truncated for d in self.splits.values()),
        }
