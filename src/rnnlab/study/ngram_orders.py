"""The n-gram's own lesson (issue 12): why n must stay small.

For each order k = 1..max_order, a Kneser-Ney model of order k is fitted on the train id stream;
reported are its validation/test perplexity and the share of test k-grams (the k tokens ending at
each position t >= k-1 of the test stream) never seen in training. The share grows with k: the
curse of dimensionality (V^k possible k-grams, a corpus of ~10^6 tokens).

Part of the ``study`` stage (params ``study.ngram_orders``, :class:`NgramOrdersConfig`): the table
goes to ``study.json``, a DVC plot (``ngram_orders.json``, one row per order, one column per corpus
and number) and ``<pictures>/ngram_orders.json``, which the evaluate report shows next to the neural rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnlab.config import require
from rnnlab.errors import ConfigError
from rnnlab.models.ngram import KneserNeyLanguageModel

NUMBERS = ("valid_ppl", "test_ppl", "test_unseen_share")  # per order and corpus


@dataclass
class NgramOrdersConfig:
    """Params ``study.ngram_orders``; every default is written here and nowhere else."""

    corpora: list[str] = field(default_factory=lambda: ["ptb", "wikitext2"])  # [] = skip the table
    max_order: int = 7  # orders 1..max_order

    def validate(self, where: str) -> None:
        require(self.max_order >= 1, f"{where}.max_order", "an integer >= 1", self.max_order)
        for name in self.corpora:
            if not name or "/" in name:
                raise ConfigError(f"{where}.corpora: expected corpus names of params corpora, got {name!r}")
        require(len(set(self.corpora)) == len(self.corpora), f"{where}.corpora", "distinct names", self.corpora)


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


def corpus_order_table(cfg: NgramOrdersConfig, prepared_dir: Path, where: str = "study.ngram_orders") -> dict:
    """``{corpus: {"rows": [...], "wall_s": s}}`` for every corpus of ``cfg`` (its prepared folder)."""
    from rnnlab.data.vocab import Vocab

    table = {}
    for corpus in cfg.corpora:
        folder = Path(prepared_dir) / corpus
        for name in ("train.npy", "valid.npy", "test.npy", "vocab.json"):
            if not (folder / name).is_file():
                raise ConfigError(
                    f"{where}.corpora: {folder / name} is missing (prepare the LM corpus {corpus!r}: list it "
                    "in params download.corpora and prepare.corpora, or drop it from this list)"
                )
        started = time.perf_counter()
        splits = [np.load(folder / f"{split}.npy") for split in ("train", "valid", "test")]
        rows = ngram_order_rows(*splits, len(Vocab.load(folder / "vocab.json")), cfg.max_order)
        table[corpus] = {"rows": rows, "wall_s": round(time.perf_counter() - started, 1)}
    return table


def plot_rows(table: dict) -> list[dict]:
    """The DVC plot: one row per order, columns ``<corpus>_<number>`` (one key set for every row)."""
    orders = sorted({r["order"] for t in table.values() for r in t["rows"]})
    by_order = {o: {"order": o} for o in orders}
    for corpus, t in table.items():
        for r in t["rows"]:
            by_order[r["order"]].update({f"{corpus}_{k}": r[k] for k in NUMBERS})
    return list(by_order.values())


def metrics(table: dict) -> dict:
    """study.json: ``<corpus>.order_<k>.<number>`` (DVC metrics show flattens dicts, not lists) and
    the order with the best validation perplexity."""
    out = {}
    for corpus, t in table.items():
        node = {f"order_{r['order']}": {k: r[k] for k in NUMBERS} for r in t["rows"]}
        node["best_valid_order"] = min(t["rows"], key=lambda r: r["valid_ppl"])["order"]
        node["wall_s"] = t["wall_s"]
        out[corpus] = node
    return out


def picture(table: dict, path: Path) -> Path:
    """Two panels against the order: val/test perplexity (log y) and the unseen test n-gram share."""
    from rnnlab.plots import pyplot, save_figure

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    for corpus, t in table.items():
        orders = [r["order"] for r in t["rows"]]
        for split, style in (("valid", "--"), ("test", "-")):
            left.plot(orders, [r[f"{split}_ppl"] for r in t["rows"]], style, marker="o", label=f"{corpus} {split}")
        right.plot(orders, [100 * r["test_unseen_share"] for r in t["rows"]], marker="o", label=corpus)
    left.set(xlabel="order n", ylabel="perplexity (log)", yscale="log", title="Kneser-Ney perplexity vs order")
    right.set(xlabel="order n", ylabel="% of test n-grams", ylim=(0, 100), title="Test n-grams never seen in train")
    for ax in (left, right):
        ax.legend()
    return save_figure(fig, path, dpi=100)
