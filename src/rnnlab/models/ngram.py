"""Count-based n-gram language model with interpolated Kneser-Ney smoothing.

Probabilities (Chen & Goodman 1998, "interpolated Kneser-Ney"; h a context of k-1 tokens, h'
the same context without its oldest token, D_k the discount of order k)::

    P_k(w | h) = max(a_k(h w) - D_k, 0) / S_k(h)  +  D_k * F_k(h) / S_k(h) * P_{k-1}(w | h')

- at the highest order N, a_N(h w) = c(h w), the raw count;
- at lower orders a_k(h w) = N1+(. h w), the number of distinct tokens seen *before* h w
  (continuation count: how many contexts a word completes, not how often it occurs);
- S_k(h) = sum_w a_k(h w), F_k(h) = #{w : a_k(h w) > 0} (distinct continuations of h);
- a context h never seen (S_k(h) = 0) passes the lower-order estimate through unchanged;
- the recursion ends at the unigram continuation distribution, itself discounted and
  interpolated with the uniform distribution over the vocabulary, so every vocabulary word
  has non-zero probability (``interpolate_uniform=False`` stops at the undiscounted unigram
  continuation distribution instead, as ``nltk.lm.KneserNeyInterpolated`` does).

``discount=None`` estimates D_k = n1 / (n1 + 2 n2) per order from the counts of counts
(Ney, Essen & Kneser 1994); a number uses that one discount at every order.

Data: the model reads one int32 id stream (the corpus with ``<eos>`` after every line). The
prediction at position t uses the up to N-1 previous tokens of the same stream; ``log_prob``
and ``perplexity`` score positions 1..len-1, the targets a neural LM predicts from the same
stream, ``<eos>`` positions included.

Counting is vectorised with numpy: each k-gram gets an integer id by ``np.unique`` over
(id of its (k-1)-gram prefix) * V + (last token), so no Python loop runs over tokens.
The model is saved as ``.npz`` (arrays plus a JSON header; no pickle).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rnnlab.errors import ConfigError, DataError

FORMAT_VERSION = 1


class KneserNeyLanguageModel:
    def __init__(
        self,
        order: int = 5,
        discount: float | None = None,
        vocab_size: int | None = None,
        interpolate_uniform: bool = True,
    ):
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ConfigError(f"order must be an integer >= 1 (1 = unigram), got {order!r}")
        if discount is not None and not (0.0 < discount <= 1.0):
            raise ConfigError(f"discount must be in (0, 1] (or null to estimate it), got {discount!r}")
        if vocab_size is not None and vocab_size < 1:
            raise ConfigError(f"vocab_size must be >= 1, got {vocab_size!r}")
        self.order = order
        self.discount = discount
        self.vocab_size = vocab_size
        self.interpolate_uniform = interpolate_uniform
        self.discounts: list[float] = []  # D_1 .. D_N once fitted
        # Per order k (index k-1). Order 1: numerators is dense [V]; context stats are scalars.
        self.keys: list[np.ndarray | None] = []  # k>=2: sorted unique prefix_id * V + word, int64
        self.numerators: list[np.ndarray] = []  # a_k per k-gram id (raw at N, continuation below)
        self.context_totals: list[np.ndarray] = []  # S_k per (k-1)-gram id
        self.context_types: list[np.ndarray] = []  # F_k per (k-1)-gram id

    # ------------------------------------------------------------------ fitting

    def _check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"{what}: expected a 1-d integer id stream, got dtype {ids.dtype} shape {ids.shape}")
        if ids.size < 2:
            raise DataError(f"{what}: the id stream needs at least 2 tokens, got {ids.size}")
        if ids.min() < 0:
            raise DataError(f"{what}: negative token id {int(ids.min())}")
        if self.vocab_size is not None and ids.max() >= self.vocab_size:
            raise DataError(f"{what}: token id {int(ids.max())} is outside the vocabulary of {self.vocab_size}")
        return ids.astype(np.int64)

    def fit(self, ids: np.ndarray) -> KneserNeyLanguageModel:
        """Count every k-gram (k = 1..order) of the training id stream."""
        if self.vocab_size is None:
            self.vocab_size = int(np.max(ids)) + 1
        tokens = self._check_ids(ids, "fit")
        V, N, n = self.vocab_size, self.order, tokens.size
        # gram_ids[k-1][t]: id of the k-gram tokens[t-k+1 .. t], -1 where it does not fit (t < k-1).
        gram_ids = [tokens]
        first_index = [None]  # position of each k-gram id's first occurrence
        self.keys = [None]
        for k in range(2, N + 1):
            prev = gram_ids[-1]
            num_prefixes = V if k == 2 else self.keys[-1].size
            if num_prefixes * V >= 2**63:
                raise DataError(f"fit: {num_prefixes} distinct {k - 1}-grams x {V} words overflow 64-bit n-gram keys")
            ends = np.arange(k - 1, n)
            keys = prev[ends - 1] * V + tokens[ends]  # (prefix (k-1)-gram id, last token)
            unique_keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            ids_k = np.full(n, -1, dtype=np.int64)
            ids_k[ends] = inverse
            gram_ids.append(ids_k)
            first_index.append(first + (k - 1))
            self.keys.append(unique_keys)

        self.numerators, self.context_totals, self.context_types, self.discounts = [], [], [], []
        for k in range(1, N + 1):
            num_grams = V if k == 1 else self.keys[k - 1].size
            if k == N:  # raw counts
                ends = gram_ids[k - 1][k - 1 :]
                numer = np.bincount(ends, minlength=num_grams)
            else:  # continuation counts: distinct (k+1)-grams whose last k tokens are this k-gram
                suffix = gram_ids[k - 1][first_index[k]]
                numer = np.bincount(suffix, minlength=num_grams)
            numer = numer.astype(np.int64)
            if k == 1:
                totals = np.array([numer.sum()], dtype=np.int64)
                types = np.array([np.count_nonzero(numer)], dtype=np.int64)
            else:
                prefix = self.keys[k - 1] // V  # the (k-1)-gram context of each k-gram
                num_contexts = V if k == 2 else self.keys[k - 2].size
                totals = np.bincount(prefix, weights=numer, minlength=num_contexts).astype(np.int64)
                types = np.bincount(prefix, weights=numer > 0, minlength=num_contexts).astype(np.int64)
            self.numerators.append(numer)
            self.context_totals.append(totals)
            self.context_types.append(types)
            self.discounts.append(self._estimate_discount(numer) if self.discount is None else float(self.discount))
        return self

    @staticmethod
    def _estimate_discount(numer: np.ndarray) -> float:
        n1, n2 = np.count_nonzero(numer == 1), np.count_nonzero(numer == 2)
        if n1 == 0 or n2 == 0:  # estimate undefined on tiny data: take the middle of (0, 1]
            return 0.5
        return float(n1 / (n1 + 2 * n2))

    def _check_fitted(self) -> None:
        if not self.numerators:
            raise RuntimeError("the n-gram model is not fitted: call fit() or load() first")

    # ------------------------------------------------------------------ scoring

    def _unigram(self, words: np.ndarray | slice) -> np.ndarray:
        numer = self.numerators[0][words].astype(np.float64)
        total, types = float(self.context_totals[0][0]), float(self.context_types[0][0])
        if not self.interpolate_uniform:
            return numer / total
        d = self.discounts[0]
        return (np.maximum(numer - d, 0.0) + d * types / self.vocab_size) / total

    def _lookup(self, k: int, prefix_ids: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Ids of the k-grams (prefix (k-1)-gram id, word), -1 where unseen or prefix is -1."""
        keys = self.keys[k - 1]
        if keys.size == 0:
            return np.full(words.shape, -1, dtype=np.int64)
        query = prefix_ids * self.vocab_size + words
        pos = np.searchsorted(keys, query)
        pos_clipped = np.minimum(pos, keys.size - 1)
        found = (prefix_ids >= 0) & (pos < keys.size) & (keys[pos_clipped] == query)
        return np.where(found, pos_clipped, -1)

    def probabilities(self, ids: np.ndarray) -> np.ndarray:
        """P(ids[t] | up to order-1 previous ids of the stream) for t = 0..len-1 (float64)."""
        self._check_fitted()
        tokens = self._check_ids(ids, "score")
        prob = self._unigram(tokens)
        levels = self._gram_ids(tokens)
        for k in range(2, self.order + 1):
            # context of position t = the (k-1)-gram ending at t-1; -1 where unseen or cut off
            context = np.concatenate([[-1], levels[k - 2][:-1]])
            gram = levels[k - 1]
            totals, types = self.context_totals[k - 1], self.context_types[k - 1]
            safe_ctx = np.maximum(context, 0)
            total = np.where(context >= 0, totals[safe_ctx], 0).astype(np.float64)
            numer = np.where(gram >= 0, self.numerators[k - 1][np.maximum(gram, 0)], 0)
            d = self.discounts[k - 1]
            seen = total > 0
            denom = np.where(seen, total, 1.0)
            interpolated = (np.maximum(numer - d, 0.0) + d * types[safe_ctx] * prob) / denom
            prob = np.where(seen, interpolated, prob)
        return prob

    def _gram_ids(self, tokens: np.ndarray) -> list[np.ndarray]:
        """levels[k-1][t]: training id of the k-gram ending at t (k = 1..order), -1 if unseen."""
        levels = [tokens]
        for k in range(2, self.order + 1):
            prefix = np.concatenate([[-1], levels[-1][:-1]])
            levels.append(self._lookup(k, prefix, tokens))
        return levels

    def log_prob(self, ids: np.ndarray) -> np.ndarray:
        """Natural-log probabilities of ids[1:], each given its predecessors in the stream."""
        with np.errstate(divide="ignore"):
            return np.log(self.probabilities(ids)[1:])

    def num_stored(self) -> int:
        """Counts and k-gram keys held (the n-gram's "parameters")."""
        self._check_fitted()
        arrays = (*self.numerators, *self.context_totals, *self.context_types, *self.keys[1:])
        return sum(int(np.asarray(a).size) for a in arrays)

    def perplexity(self, ids: np.ndarray) -> float:
        return float(math.exp(-float(np.mean(self.log_prob(ids)))))

    def next_token_distribution(self, context_ids) -> np.ndarray:
        """P(w | the last order-1 tokens of ``context_ids``) for every vocabulary word: [V] float64."""
        self._check_fitted()
        context = [int(i) for i in context_ids][-(self.order - 1) :] if self.order > 1 else []
        if any(not 0 <= i < self.vocab_size for i in context):
            raise DataError(f"context ids must be in [0, {self.vocab_size}), got {context}")
        V = self.vocab_size
        prob = self._unigram(slice(None))
        levels = self._gram_ids(np.asarray(context, dtype=np.int64)) if context else []
        for k in range(2, self.order + 1):
            if len(context) < k - 1:
                break
            prefix_id = int(levels[k - 2][-1])  # the (k-1)-gram made of the last k-1 context tokens
            if prefix_id < 0:
                break
            total = float(self.context_totals[k - 1][prefix_id])
            if total == 0:
                continue
            keys = self.keys[k - 1]
            lo, hi = np.searchsorted(keys, [prefix_id * V, (prefix_id + 1) * V])
            words = keys[lo:hi] - prefix_id * V
            numer = self.numerators[k - 1][lo:hi].astype(np.float64)
            d = self.discounts[k - 1]
            prob = d * float(self.context_types[k - 1][prefix_id]) / total * prob
            prob[words] += np.maximum(numer - d, 0.0) / total
        return prob

    def generate(self, prompt_ids, n_tokens: int, temperature: float = 1.0, seed: int = 0, banned_ids=()) -> list[int]:
        """Sample ``n_tokens`` ids after ``prompt_ids``, never one of ``banned_ids``; returns only the new ids."""
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        rng = np.random.default_rng(seed)
        history = [int(i) for i in prompt_ids]
        new: list[int] = []
        for _ in range(n_tokens):
            prob = self.next_token_distribution(history)
            if temperature != 1.0:
                with np.errstate(divide="ignore"):
                    logits = np.log(prob) / temperature
                prob = np.exp(logits - logits.max())
            if len(banned_ids):
                prob = prob.copy()
                prob[list(banned_ids)] = 0.0
            prob = prob / prob.sum()
            token = int(rng.choice(prob.size, p=prob))
            history.append(token)
            new.append(token)
        return new

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        self._check_fitted()
        header = dict(
            format_version=FORMAT_VERSION,
            order=self.order,
            discount=self.discount,
            discounts=self.discounts,
            vocab_size=self.vocab_size,
            interpolate_uniform=self.interpolate_uniform,
        )
        arrays = {"header": np.array(json.dumps(header))}
        for k in range(1, self.order + 1):
            if k >= 2:
                arrays[f"keys_{k}"] = self.keys[k - 1]
            arrays[f"numerators_{k}"] = self.numerators[k - 1]
            arrays[f"context_totals_{k}"] = self.context_totals[k - 1]
            arrays[f"context_types_{k}"] = self.context_types[k - 1]
        with open(path, "wb") as fh:  # a file handle, so numpy does not append ".npz"
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> KneserNeyLanguageModel:
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if header.get("format_version") != FORMAT_VERSION:
                    raise DataError(
                        f"{path}: n-gram model format {header.get('format_version')}, expected {FORMAT_VERSION}"
                    )
                model = cls(header["order"], header["discount"], header["vocab_size"], header["interpolate_uniform"])
                model.discounts = list(header["discounts"])
                model.keys = [None] + [data[f"keys_{k}"] for k in range(2, model.order + 1)]
                for k in range(1, model.order + 1):
                    model.numerators.append(data[f"numerators_{k}"])
                    model.context_totals.append(data[f"context_totals_{k}"])
                    model.context_types.append(data[f"context_types_{k}"])
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a saved n-gram model ({exc})") from exc
        return model
