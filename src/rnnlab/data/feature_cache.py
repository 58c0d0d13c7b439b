"""Reading the image-feature cache (written by :func:`rnnlab.features.extract_features`).

The cache folder (``data/features/flickr8k``) holds:

- ``features.npy``: float16 ``[images, positions, channels]`` = ``[N, 49, C]`` (the 7x7 grid
  flattened row-major), row ``i`` for ``names[i]``;
- ``features.json`` (the index): format, encoder name, grid size, channels, dtype, ``names`` and
  the ``problems`` (images that failed to decode: name and reason; they get no row).

Only the reader lives here (no model import: :mod:`rnnlab.data` never imports
:mod:`rnnlab.models`); extraction, which needs the CNN, is :mod:`rnnlab.features`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rnnlab.errors import DataError

FEATURES_FORMAT = "rnnlab.features/1"
FEATURES_FILE = "features.npy"
INDEX_FILE = "features.json"


def read_index(index_path: str | Path) -> dict:
    """The cache's index (``features.json``), its format checked."""
    index_path = Path(index_path)
    if not index_path.is_file():
        raise DataError(f"{index_path}: feature cache missing (run the features stage)")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("format") != FEATURES_FORMAT:
        raise DataError(f"{index_path}: format {index.get('format')!r}, expected {FEATURES_FORMAT!r}")
    return index


def load_features(features_path: str | Path, index_path: str | Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """(features [N, positions, channels] float16, index dict); rows and names must agree."""
    features_path, index_path = Path(features_path), Path(index_path)
    for path in (features_path, index_path):
        if not path.is_file():
            raise DataError(f"{path}: feature cache missing (run feature extraction first)")
    index = read_index(index_path)
    features = np.load(features_path, mmap_mode="r" if mmap else None)
    expected = (len(index["names"]), index["grid"] ** 2, index["channels"])
    if features.ndim != 3 or tuple(features.shape) != expected:
        raise DataError(f"{features_path}: shape {tuple(features.shape)} does not match its index {expected}")
    return features, index


def load_cache(folder: str | Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """:func:`load_features` of a cache folder (``features.npy`` + ``features.json``)."""
    folder = Path(folder)
    return load_features(folder / FEATURES_FILE, folder / INDEX_FILE, mmap=mmap)
