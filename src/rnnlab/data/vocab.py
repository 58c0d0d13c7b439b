"""Vocabulary: built from the train split only, saved as JSON, embedded in every checkpoint.

Ids are assigned specials first, then by descending train frequency, ties broken
alphabetically, so the same train split always gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)


class Vocab:
    def __init__(self, itos: list[str], counts: dict[str, int] | None = None):
        if list(itos[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with the specials {SPECIALS}, got {itos[:4]}")
        if len(set(itos)) != len(itos):
            raise ValueError("vocabulary has duplicate tokens")
        self.itos = list(itos)
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}
        self.counts = dict(counts or {})

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    @classmethod
    def build(cls, token_lists: Iterable[Iterable[str]], min_freq: int = 1, max_size: int | None = None) -> Vocab:
        """Count tokens (of the train split only) and keep those with count >= min_freq.

        ``max_size`` caps the total size, specials included.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counter: Counter[str] = Counter()
        for tokens in token_lists:
            counter.update(tokens)
        for special in SPECIALS:
            counter.pop(special, None)  # e.g. PTB's literal "<unk>" is our <unk>
        kept = sorted((t for t, c in counter.items() if c >= min_freq), key=lambda t: (-counter[t], t))
        if max_size is not None:
            if max_size <= len(SPECIALS):
                raise ValueError(f"max_size must exceed the {len(SPECIALS)} specials, got {max_size}")
            kept = kept[: max_size - len(SPECIALS)]
        return cls(list(SPECIALS) + kept, {t: counter[t] for t in kept})

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Iterable[str]) -> list[int]:
        unk = self.unk_id
        return [self.stoi.get(t, unk) for t in tokens]

    def encode_array(self, tokens: Iterable[str]) -> np.ndarray:
        return np.asarray(self.encode(tokens), dtype=np.int32)

    def decode(self, ids: Iterable[int], strip_specials: bool = False) -> list[str]:
        toks = [self.itos[int(i)] for i in ids]
        if strip_specials:
            toks = [t for t in toks if t not in (PAD, BOS, EOS)]
        return toks

    def fingerprint(self) -> str:
        """Short hash of the id->token map: checkpoints store it to catch vocab mismatches."""
        return hashlib.sha256("\n".join(self.itos).encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"itos": self.itos, "counts": self.counts, "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        vocab = cls(data["itos"], data.get("counts"))
        if "fingerprint" in data and data["fingerprint"] != vocab.fingerprint():
            raise ValueError("vocabulary fingerprint does not match its tokens (file edited?)")
        return vocab

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def check_vocab(model_vocab: Vocab, expected: Vocab | None, where: str) -> None:
    """A model's vocabulary must be the one saved beside it / prepared with its data (same ids)."""
    from rnnlab.errors import RnnlabError

    if expected is not None and model_vocab.fingerprint() != expected.fingerprint():
        raise RnnlabError(
            f"{where}: the checkpoint's vocabulary ({len(model_vocab)} tokens, {model_vocab.fingerprint()}) "
            f"does not match the saved vocabulary ({len(expected)} tokens, {expected.fingerprint()})"
        )
