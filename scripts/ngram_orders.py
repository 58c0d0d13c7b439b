"""The n-gram's own lesson (issue 12): Kneser-Ney val/test perplexity and the share of test n-grams
never seen in training, orders 1..N, on prepared LM corpora (README "Why n must stay small").

    python scripts/ngram_orders.py [--prepared data/prepared] [--corpora ptb wikitext2] [--max-order 7]

Prints one JSON line per corpus: the same table the ``study`` stage writes (params
``study.ngram_orders``; the defaults are :class:`rnnlab.study.ngram_orders.NgramOrdersConfig`'s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rnnlab.study.ngram_orders import NgramOrdersConfig, corpus_order_table


def main() -> None:
    defaults = NgramOrdersConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--corpora", nargs="+", default=defaults.corpora)
    parser.add_argument("--max-order", type=int, default=defaults.max_order)
    args = parser.parse_args()
    cfg = NgramOrdersConfig(corpora=args.corpora, max_order=args.max_order)
    cfg.validate("--")
    for corpus, t in corpus_order_table(cfg, args.prepared, where="--").items():
        print(json.dumps({"corpus": corpus, **t}))


if __name__ == "__main__":
    main()
