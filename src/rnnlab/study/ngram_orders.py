"""The n-gram's own lesson (issue 12): why n must stay small.

For each order k = 1..max_order, a Kneser-Ney model of order k is fitted on the train id stream;
reported are its validation/test perplexity and the share of test k-grams (the k tokens ending at
each position t >= k-1 of the test stream) never seen in training. The share grows with k: the
curse of dimensionality (V^k possible k-grams, a corpus of ~10^6 tokens).

Not yet wired into the ``study`` DVC stage (see the helper report for issue 12).
"""

from __future__ import annotations

import numpy as np

from rnnlab.errors import ConfigError
from rnnlab.models.ngram import KneserNeyLanguageModel


def unseen_share(model: KneserNeyLanguageModel, train_ids: np.ndarray, test_ids: np.ndarray) -> float:
    """Share of the test stream's ``model.order``-grams that never occur in the training stream."""
    k = model.order
    test = np.asarray(test_ids, dtype=np.int64)
    if k == 1:
        return float(np.mean(~np.isin(test, np.asarray(train_ids))))
    levels = model._gram_ids(test)
    grams = levels[k - 1][k - 1 :]  # positions where a full k-gram fits
    return float(np.mean(grams < 0))


def ngram_order_rows(
    train_ids: np.ndarray, valid_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int, max_order: int = 7
) -> list[dict]:
    """One row per order: ``{order, valid_ppl, test_ppl, test_unseen_share}``."""
    if max_order < 1:
        raise ConfigError(f"max_order must be >= 1, got {max_order!r}")
    rows = []
    for order in range(1, max_order + 1):
        model = KneserNeyLanguageModel(order=order, vocab_size=vocab_size).fit(train_ids)
        rows.append(
            {
                "order": order,
                "valid_ppl": round(model.perplexity(valid_ids), 3),
                "test_ppl": round(model.perplexity(test_ids), 3),
                "test_unseen_share": round(unseen_share(model, train_ids, test_ids), 6),
            }
        )
    return rows
