"""Command-line entry points: ``rnnlab <command>`` and the DVC stage scripts' error handling."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rnnlab.errors import RnnlabError


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage; user-facing errors become one clear line on stderr and exit code 2."""
    setup_logging()
    try:
        main()
    except RnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rnnlab", description="rnnlab: recurrent sequence models pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p_repr = sub.add_parser("represent", help="show bag-of-words / one-hot codes of a sentence over a vocab")
    p_repr.add_argument("sentence")
    p_repr.add_argument("--vocab", default="data/prepared/ptb/vocab.json")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    try:
        if args.command == "represent":
            from rnnlab.data.vocab import Vocab
            from rnnlab.represent import bag_of_words, one_hot_sequence

            vocab = Vocab.load(args.vocab)
            tokens = args.sentence.split()
            bow = bag_of_words(tokens, vocab)
            nz = {vocab.itos[i]: int(bow[i]) for i in bow.nonzero().flatten().tolist()}
            print("bag of words:", nz)
            print("one-hot ids :", one_hot_sequence(tokens, vocab).argmax(dim=1).tolist())
    except RnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
