"""Representing sequences (lecture §1.1): bag of words, one-hot codes, learned embeddings.

- Bag of words: a |V| count vector; word order is lost ("April is the cruelest month" and
  "the cruelest month is April" get the same vector).
- One-hot sequence: a [T, |V|] matrix, one row per position; order is kept, but distinct words
  are orthogonal, so one-hot codes carry no notion of similarity.
- Embedding: a learned [|V|, d] table; rows can be compared by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rnnlab.data.vocab import Vocab


def bag_of_words(tokens: Sequence[str], vocab: Vocab) -> torch.Tensor:
    """[|V|] float counts of each vocabulary id in ``tokens``."""
    ids = torch.tensor(vocab.encode(tokens), dtype=torch.long)
    return torch.bincount(ids, minlength=len(vocab)).float()


def one_hot_sequence(tokens: Sequence[str], vocab: Vocab) -> torch.Tensor:
    """[T, |V|] float one-hot rows, one per position."""
    ids = torch.tensor(vocab.encode(tokens), dtype=torch.long)
    return F.one_hot(ids, num_classes=len(vocab)).float()


def embed(tokens: Sequence[str], vocab: Vocab, embedding: torch.nn.Embedding | torch.Tensor) -> torch.Tensor:
    """[T, d] embedding rows for ``tokens`` from an ``nn.Embedding`` or a [|V|, d] matrix."""
    weight = embedding.weight if isinstance(embedding, torch.nn.Embedding) else embedding
    if weight.size(0) != len(vocab):
        raise ValueError(f"embedding has {weight.size(0)} rows but the vocabulary has {len(vocab)} tokens")
    ids = torch.tensor(vocab.encode(tokens), dtype=torch.long)
    return weight[ids]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def nearest_neighbours(word: str, vocab: Vocab, embedding: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` words whose embedding rows are closest by cosine (specials and the word excluded)."""
    if word not in vocab:
        raise KeyError(f"{word!r} is not in the vocabulary")
    normed = F.normalize(embedding.detach().float(), dim=1)
    sims = normed @ normed[vocab.stoi[word]]
    sims[:4] = -2.0  # specials
    sims[vocab.stoi[word]] = -2.0
    top = torch.topk(sims, min(k, len(vocab) - 5))
    return [(vocab.itos[int(i)], round(float(s), 4)) for s, i in zip(top.values, top.indices)]
