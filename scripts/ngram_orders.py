"""The n-gram's own lesson (issue 12): Kneser-Ney val/test perplexity and the share of test n-grams
never seen in training, orders 1..N, on prepared LM corpora (README "Language models").

    python scripts/ngram_orders.py [--prepared data/prepared] [--corpora ptb wikitext2] [--max-order 7]

Prints one JSON line per corpus. Not yet a DVC stage (the study stage is where it belongs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rnnlab.data.vocab import Vocab
from rnnlab.study.ngram_orders import ngram_order_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--corpora", nargs="+", default=["ptb", "wikitext2"])
    parser.add_argument("--max-order", type=int, default=7)
    args = parser.parse_args()
    for corpus in args.corpora:
        folder = args.prepared / corpus
        vocab = Vocab.load(folder / "vocab.json")
        start = time.perf_counter()
        splits = [np.load(folder / f"{split}.npy") for split in ("train", "valid", "test")]
        rows = ngram_order_rows(*splits, len(vocab), args.max_order)
        print(json.dumps({"corpus": corpus, "wall_s": round(time.perf_counter() - start, 1), "rows": rows}))


if __name__ == "__main__":
    main()
