"""Parallel (source, target) sentence pairs for seq2seq: tokenize, train-only vocabs, length buckets.

Input contract: a pandas frame with columns ``split`` (``train``/``val``/``test``), ``line``
(1-based line in the raw file), ``src`` and ``tgt`` (raw text); the ``prepare`` stage writes it to
``data/prepared/multi30k/pairs.parquet`` and :func:`read_multi30k` reads the raw corpus into it.

Batches are :class:`TranslationBatch` tuples, batch-first:
``src`` [batch, S] and ``src_lengths`` [batch]; ``tgt_in`` [batch, T] = ``<bos> y_1 .. y_n`` and
``tgt_out`` [batch, T] = ``y_1 .. y_n <eos>`` (padded with ``<pad>``); ``index`` [batch] = row
position in the split, so decoded hypotheses can be put back in corpus order.

Tokenization (``tokenizer``): ``word`` (punctuation split) or ``bpe`` (learned on the train split,
see :mod:`rnnlab.data.bpe`). The source side is lower-cased; the target side keeps its case
unless ``lowercase_target`` (German nouns are capitalised and cased sacreBLEU counts that).
Vocabularies come from the train split only (``min_freq``). Sentences longer than ``max_len``
tokens are truncated, counted per split and side, and reported with a warning.

Training batches group sentences of similar length (``BucketBatchSampler``): shuffled with
``seed + epoch``, sorted by length inside pools of 50 batches, cut into batches, batch order
shuffled. Evaluation batches are sorted by length, in a fixed order.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rnnlab.data.bpe import BPETokenizer, tokenizer_from_dict
from rnnlab.data.tokenize import Tokenizer, WordTokenizer
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError, DataError
from rnnlab.resume import ResumableLoader

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MULTI30K_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}
TOKENIZER_KINDS = ("word", "bpe")


def read_multi30k(raw_dir: str | Path, src_lang: str = "en", tgt_lang: str = "de") -> pd.DataFrame:
    """Raw Multi30k ``{train,val,test_2016_flickr}.{en,de}.gz`` -> frame (split, line, src, tgt)."""
    raw_dir = Path(raw_dir)
    frames = []
    for split, stem in MULTI30K_FILES.items():
        sides = []
        for lang in (src_lang, tgt_lang):
            path = raw_dir / f"{stem}.{lang}.gz"
            if not path.exists():
                raise DataError(f"{path}: Multi30k file missing")
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                sides.append([line.rstrip("\n") for line in fh])
        if len(sides[0]) != len(sides[1]):
            raise DataError(f"{raw_dir}/{stem}: {len(sides[0])} {src_lang} lines but {len(sides[1])} {tgt_lang} lines")
        frames.append(
            pd.DataFrame({"split": split, "line": np.arange(1, len(sides[0]) + 1), "src": sides[0], "tgt": sides[1]})
        )
    return pd.concat(frames, ignore_index=True)


class TranslationBatch(NamedTuple):
    src: torch.Tensor  # [batch, S] int64
    src_lengths: torch.Tensor  # [batch] int64
    tgt_in: torch.Tensor  # [batch, T] int64, starts with <bos>
    tgt_out: torch.Tensor  # [batch, T] int64, ends with <eos>
    index: torch.Tensor  # [batch] int64, row in the split


def pad_sequences(seqs: list[np.ndarray], pad_id: int) -> torch.Tensor:
    """List of 1-D int arrays -> [len(seqs), max_len] int64, right-padded."""
    out = torch.full((len(seqs), max((len(s) for s in seqs), default=0)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class ParallelDataset(Dataset):
    def __init__(self, src: list[np.ndarray], tgt: list[np.ndarray]):
        self.src, self.tgt = src, tgt

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self.src[i], self.tgt[i], i

    def lengths(self) -> np.ndarray:
        return np.asarray([max(len(s), len(t) + 1) for s, t in zip(self.src, self.tgt)])


class Collator:
    """Pads a list of (src_ids, tgt_ids, index) into a :class:`TranslationBatch`."""

    def __init__(self, src_pad: int, tgt_pad: int, bos_id: int, eos_id: int):
        self.src_pad, self.tgt_pad, self.bos_id, self.eos_id = src_pad, tgt_pad, bos_id, eos_id

    def __call__(self, items) -> TranslationBatch:
        src = [s for s, _, _ in items]
        tgt_in = [np.concatenate([[self.bos_id], t]) for _, t, _ in items]
        tgt_out = [np.concatenate([t, [self.eos_id]]) for _, t, _ in items]
        return TranslationBatch(
            src=pad_sequences(src, self.src_pad),
            src_lengths=torch.as_tensor([len(s) for s in src], dtype=torch.long),
            tgt_in=pad_sequences(tgt_in, self.tgt_pad),
            tgt_out=pad_sequences(tgt_out, self.tgt_pad),
            index=torch.as_tensor([i for _, _, i in items], dtype=torch.long),
        )


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length. With ``shuffle`` every pass (epoch) draws a new order from
    ``seed + epoch``; the epoch counter advances on each ``__iter__``, so a rerun is identical.
    ``set_epoch(k)`` sets the counter (a resumed run: its next pass is epoch ``k``, ordered as the
    uninterrupted run's epoch ``k``; :class:`rnnlab.resume.ResumableLoader` calls it each pass)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, pool_batches: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.seed, self.pool_batches = batch_size, shuffle, seed, pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        else:
            rng = np.random.default_rng(self.seed + self.epoch)
            self.epoch += 1
            order = rng.permutation(n)
            pool = self.batch_size * self.pool_batches
            batches = []
            for start in range(0, n, pool):
                chunk = order[start : start + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for batch in batches:
            yield batch.tolist()


def build_tokenizers(
    kind: str, train_src: list[str], train_tgt: list[str], bpe_vocab_size: int = 8000, lowercase_target: bool = False
) -> tuple[Tokenizer, Tokenizer]:
    """Source (lower-cased) and target tokenizers; BPE models are learned on the train texts given."""
    if kind == "word":
        return WordTokenizer(lowercase=True), WordTokenizer(lowercase=lowercase_target)
    if kind == "bpe":
        return (
            BPETokenizer(lowercase=True, vocab_size=bpe_vocab_size).train(train_src),
            BPETokenizer(lowercase=lowercase_target, vocab_size=bpe_vocab_size).train(train_tgt),
        )
    raise ConfigError(f"tokenizer: {kind!r} is unknown; expected one of {list(TOKENIZER_KINDS)}")


class ParallelDataModule(pl.LightningDataModule):
    """Tokenizers and vocabularies are fitted on the train split in ``setup()`` (or passed in, for
    inference/resume), then every split is encoded once and kept in memory."""

    def __init__(
        self,
        pairs: pd.DataFrame,
        tokenizer: str = "word",
        bpe_vocab_size: int = 8000,
        min_freq: int = 2,
        max_len: int = 50,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        seed: int = 0,
        lowercase_target: bool = False,
        tokenizers: tuple[Tokenizer, Tokenizer] | None = None,
        vocabs: tuple[Vocab, Vocab] | None = None,
    ):
        super().__init__()
        missing = {"split", "line", "src", "tgt"} - set(pairs.columns)
        if missing:
            raise DataError(f"parallel pairs table lacks columns {sorted(missing)} (has {list(pairs.columns)})")
        if tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer: {tokenizer!r} is unknown; expected one of {list(TOKENIZER_KINDS)}")
        if max_len < 1 or batch_size < 1 or min_freq < 1:
            raise ConfigError(f"max_len, batch_size and min_freq must be >= 1, got {max_len}, {batch_size}, {min_freq}")
        self.pairs = pairs
        self.tokenizer_kind, self.bpe_vocab_size, self.lowercase_target = tokenizer, bpe_vocab_size, lowercase_target
        self.min_freq, self.max_len = min_freq, max_len
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.src_tokenizer, self.tgt_tokenizer = tokenizers if tokenizers else (None, None)
        self.src_vocab, self.tgt_vocab = vocabs if vocabs else (None, None)
        self.datasets: dict[str, ParallelDataset] = {}
        self.texts: dict[str, pd.DataFrame] = {}
        self.truncated: dict[str, dict[str, int]] = {}

    def split_frame(self, split: str) -> pd.DataFrame:
        frame = self.pairs[self.pairs["split"] == split].sort_values("line").reset_index(drop=True)
        return frame

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train = self.split_frame("train")
        if train.empty:
            raise DataError("parallel pairs: the train split is empty")
        if self.src_tokenizer is None:
            self.src_tokenizer, self.tgt_tokenizer = build_tokenizers(
                self.tokenizer_kind,
                train["src"].tolist(),
                train["tgt"].tolist(),
                self.bpe_vocab_size,
                self.lowercase_target,
            )
        train_tokens = (
            [self.src_tokenizer.tokenize(t) for t in train["src"]],
            [self.tgt_tokenizer.tokenize(t) for t in train["tgt"]],
        )
        if self.src_vocab is None:
            self.src_vocab = Vocab.build(train_tokens[0], self.min_freq)
            self.tgt_vocab = Vocab.build(train_tokens[1], self.min_freq)
        for split in SPLITS:
            frame = train if split == "train" else self.split_frame(split)
            if frame.empty:
                continue
            self.texts[split] = frame
            self.datasets[split] = self._encode(split, frame, train_tokens if split == "train" else None)

    def setup_split(self, split: str) -> None:
        """Encode one split with the tokenizers and vocabularies passed in (inference: the train
        split is neither needed nor tokenized)."""
        if self.src_tokenizer is None or self.src_vocab is None:
            raise ConfigError("setup_split: pass tokenizers= and vocabs= (they are fitted on train by setup())")
        frame = self.split_frame(split)
        if frame.empty:
            raise DataError(f"parallel pairs: split {split!r} is empty or missing")
        self.texts[split] = frame
        self.datasets[split] = self._encode(split, frame)

    def _encode(
        self, split: str, frame: pd.DataFrame, tokens: tuple[list[list[str]], list[list[str]]] | None = None
    ) -> ParallelDataset:
        if tokens is None:
            tokens = (
                [self.src_tokenizer.tokenize(t) for t in frame["src"]],
                [self.tgt_tokenizer.tokenize(t) for t in frame["tgt"]],
            )
        src, tgt, cut = [], [], {"src": 0, "tgt": 0}
        for line, src_tokens, tgt_tokens in zip(frame["line"], *tokens):
            s_ids, t_ids = self.src_vocab.encode(src_tokens), self.tgt_vocab.encode(tgt_tokens)
            s_cut, t_cut = len(s_ids) > self.max_len, len(t_ids) > self.max_len
            s = np.asarray(s_ids[: self.max_len], dtype=np.int64)
            t = np.asarray(t_ids[: self.max_len], dtype=np.int64)
            if len(s) == 0 or len(t) == 0:
                side = "source" if len(s) == 0 else "target"
                raise DataError(f"parallel pairs, split {split!r} line {line}: the {side} sentence is empty")
            src.append(s)
            tgt.append(t)
            cut["src"] += s_cut
            cut["tgt"] += t_cut
        self.truncated[split] = cut
        if cut["src"] or cut["tgt"]:
            log.warning(
                "%s: truncated %d source and %d target sentences to max_len=%d tokens",
                split,
                cut["src"],
                cut["tgt"],
                self.max_len,
            )
        return ParallelDataset(src, tgt)

    def collator(self) -> Collator:
        return Collator(self.src_vocab.pad_id, self.tgt_vocab.pad_id, self.tgt_vocab.bos_id, self.tgt_vocab.eos_id)

    def loader(self, split: str, shuffle: bool | None = None) -> DataLoader:
        if split not in self.datasets:
            raise DataError(f"parallel pairs: split {split!r} is empty or missing (have {sorted(self.datasets)})")
        dataset = self.datasets[split]
        shuffle = (split == "train") if shuffle is None else shuffle
        batch_size = self.batch_size if split == "train" else self.eval_batch_size
        sampler = BucketBatchSampler(dataset.lengths(), batch_size, shuffle=shuffle, seed=self.seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collator())

    def train_dataloader(self) -> ResumableLoader:
        """The train loader, resumable mid-epoch (its position is saved in every checkpoint)."""
        return ResumableLoader(self.loader("train"))

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def references(self, split: str) -> list[str]:
        """Raw target sentences of ``split`` in dataset order (what BLEU compares against)."""
        return self.texts[split]["tgt"].tolist()

    def sources(self, split: str) -> list[str]:
        return self.texts[split]["src"].tolist()

    def tokenizer_specs(self) -> dict:
        return {"src": self.src_tokenizer.to_dict(), "tgt": self.tgt_tokenizer.to_dict()}

    @staticmethod
    def tokenizers_from_specs(specs: dict) -> tuple[Tokenizer, Tokenizer]:
        return tokenizer_from_dict(specs["src"]), tokenizer_from_dict(specs["tgt"])
