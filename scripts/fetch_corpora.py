#!/usr/bin/env python
"""Fetch every corpus declared in params.yaml (``corpora``) from its canonical URLs into a folder
laid out like the mirror (``<out>/<corpus>/<file>``, default ``.corpora``), each file checked
against its sha256. For machines without the shared mirror (a hosted CI runner):

    python scripts/fetch_corpora.py                 # -> .corpora/, then RNNLAB_MIRROR=$PWD/.corpora
    python scripts/fetch_corpora.py --key           # a cache key: the hash of every URL + checksum

Corpora whose files are local paths (your own) are skipped: they are in the repository already.
Flickr8k's canonical zip holds the full-size originals and no ``images.tsv``: a mirror made here
has its images copied as they are by ``download`` and validated by decoding in ``prepare``.
``--key`` needs only PyYAML (it runs before the project is installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def cache_key(params_path: Path) -> str:
    """sha256 over every corpus's files (name, url, archive member, sha256): the corpora fetched."""
    corpora = (yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}).get("corpora") or {}
    pinned = {
        name: {rel: f for rel, f in sorted((entry.get("files") or {}).items()) if f.get("url")}
        for name, entry in sorted(corpora.items())
    }
    return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()[:32]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--out", type=Path, default=REPO / ".corpora")
    ap.add_argument("--key", action="store_true", help="print the cache key and exit")
    ap.add_argument("--corpora", nargs="*", help="only these corpora (default: every one with a URL)")
    args = ap.parse_args()
    if args.key:
        print(cache_key(args.params))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from rnnlab.config import load_params
    from rnnlab.data.corpora import load_corpora
    from rnnlab.data.download import fetch_corpus

    specs = load_corpora(load_params(args.params))
    for name in args.corpora or sorted(specs):
        spec = specs[name]
        if not any(f.url for f in spec.files.values()):
            continue
        report = fetch_corpus(spec, args.out, mirror=None, progress=sys.stderr.isatty())
        logging.info("%s: %d files from the canonical URLs (%d fetched)", name, report.files, report.fetched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
