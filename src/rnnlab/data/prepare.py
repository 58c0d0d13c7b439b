"""Stage ``prepare``: raw corpora -> validated tables, train-only vocabularies, encoded splits.

Outputs per corpus under ``data/prepared/<corpus>/``:
- LM corpora: ``lines.parquet`` (split, file, line, text), ``vocab.json``, ``tokenizer.json``,
  ``<split>.npy`` (int32 ids; one ``<eos>`` per line for word corpora, newlines are chars for char).
- parallel corpora (multi30k): ``pairs.parquet`` (split, file, line, src, tgt; extra evaluation
  sets as splits ``eval_<name>``), ``vocab.src.json``, ``vocab.tgt.json``, ``tokenizer.json``
  (word-level; seq2seq may train BPE on the train split instead).
- flickr8k: ``captions.parquet`` (split, file, line, image, caption_index, caption),
  ``vocab.json``, ``tokenizer.json``, ``rejected.parquet`` (rows not used, with the reason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from rnnlab.config import parse_section
from rnnlab.data import readers, schemas
from rnnlab.data.corpora import CorpusSpec, get, repo_corpora
from rnnlab.data.tokenize import CharTokenizer, Tokenizer, WhitespaceTokenizer, WordTokenizer
from rnnlab.data.vocab import UNK, Vocab
from rnnlab.errors import DataError
from rnnlab.io import write_json, write_npy, write_parquet

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    corpora: list[str]
    # Caption rows whose image is missing/undecodable: "drop" (counted in metrics) or "fail".
    on_bad_rows: Literal["drop", "fail"] = "drop"


def parse_prepare_config(data: dict) -> PrepareConfig:
    return parse_section(PrepareConfig, data, "prepare")


def tokenizer_for(spec: CorpusSpec) -> Tokenizer:
    opts = spec.options
    if opts.tokenizer == "whitespace":
        return WhitespaceTokenizer()  # PTB / WikiText-2 ship tokenized
    if opts.tokenizer == "char":
        return CharTokenizer()
    return WordTokenizer(lowercase=opts.lowercase)


def _split_stats(ids: np.ndarray, tokens_total: int, oov: int, vocab: Vocab, lines: int) -> dict:
    return {
        "lines": int(lines),
        "tokens": int(tokens_total),
        "oov_rate": round(oov / max(tokens_total, 1), 6),
        "unk_rate": round(float((ids == vocab.unk_id).sum()) / max(len(ids), 1), 6),
    }


def prepare_lm(spec: CorpusSpec, raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> dict:
    """Extra evaluation sets become ``eval_<name>.npy`` (encoded with the train vocabulary)."""
    corpus, task = spec.name, spec.task
    table = schemas.validate(readers.read_lm(spec, raw_dir), schemas.LM_LINES, f"{corpus} lines")
    tok = tokenizer_for(spec)
    vcfg = spec.options
    splits = {s: g for s, g in table.groupby("split", sort=False)}
    if task == "lm-char":
        streams = {s: tok.tokenize("\n".join(g["text"])) for s, g in splits.items()}
        vocab = Vocab.build([streams["train"]], vcfg.min_freq, vcfg.max_size)
    else:
        line_tokens = {s: [tok.tokenize(t) for t in g["text"]] for s, g in splits.items()}
        vocab = Vocab.build(line_tokens["train"], vcfg.min_freq, vcfg.max_size)
        streams = {s: [t for toks in lts for t in (*toks, "<eos>")] for s, lts in line_tokens.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for split, stream in streams.items():
        ids = vocab.encode_array(stream)
        oov = sum(1 for t in stream if t not in vocab and t != UNK)
        write_npy(out_dir / f"{split}.npy", ids)
        metrics[split] = _split_stats(ids, len(stream), oov, vocab, len(splits[split]))
    write_parquet(out_dir / "lines.parquet", table)
    vocab.save(out_dir / "vocab.json")
    write_json(out_dir / "tokenizer.json", tok.to_dict())
    return {"vocab_size": len(vocab), "dropped": {}, "splits": metrics}


def prepare_parallel(spec: CorpusSpec, raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> dict:
    corpus = spec.name
    pairs = readers.read_parallel(raw_dir, spec.splits, spec.carve, f"corpora.{corpus}", spec.eval_sets)
    table = schemas.validate(pairs, schemas.PARALLEL_PAIRS, f"{corpus} pairs")
    tok = tokenizer_for(spec)
    vcfg = spec.options
    train = table[table.split == "train"]
    vocabs = {
        side: Vocab.build((tok.tokenize(t) for t in train[side]), vcfg.min_freq, vcfg.max_size)
        for side in ("src", "tgt")
    }
    metrics = {}
    for split, group in table.groupby("split", sort=False):
        stats = {"lines": int(len(group))}
        for side, vocab in vocabs.items():
            toks = [t for text in group[side] for t in tok.tokenize(text)]
            oov = sum(1 for t in toks if t not in vocab)
            stats[f"{side}_tokens"] = len(toks)
            stats[f"{side}_oov_rate"] = round(oov / max(len(toks), 1), 6)
        metrics[split] = stats
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "pairs.parquet", table)
    vocabs["src"].save(out_dir / "vocab.src.json")
    vocabs["tgt"].save(out_dir / "vocab.tgt.json")
    write_json(out_dir / "tokenizer.json", tok.to_dict())
    return {
        "vocab_size": {"src": len(vocabs["src"]), "tgt": len(vocabs["tgt"])},
        "dropped": {},
        "splits": metrics,
    }


def prepare_captions(spec: CorpusSpec, raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> dict:
    corpus = spec.name
    image_dir = raw_dir / spec.captions.images
    flickr8k = spec.captions.format == "flickr8k"
    if flickr8k:
        table, rejected = readers.read_captions(raw_dir, image_dir, spec.splits, spec.captions.file)
    else:
        table, rejected = readers.read_caption_files(spec, raw_dir)
    if len(rejected) and cfg.on_bad_rows == "fail":
        first = rejected.iloc[0]
        raise DataError(
            f"{raw_dir / first.file} line {first.line}: {first.reason} "
            f"({len(rejected)} such rows; set prepare.on_bad_rows: drop to drop and count them)"
        )
    for reason, n in rejected.groupby("reason").size().items():
        log.warning("%s: dropping %d caption rows: %s", corpus, n, reason)
    schema = schemas.caption_schema(image_dir, any_image_type=not flickr8k)
    table = schemas.validate(table, schema, f"{corpus} captions")
    tok = tokenizer_for(spec)
    vcfg = spec.options
    vocab = Vocab.build((tok.tokenize(c) for c in table[table.split == "train"].caption), vcfg.min_freq, vcfg.max_size)
    metrics = {}
    for split, group in table.groupby("split", sort=False):
        toks = [t for c in group.caption for t in tok.tokenize(c)]
        oov = sum(1 for t in toks if t not in vocab)
        metrics[split] = {
            "lines": int(len(group)),
            "images": int(group.image.nunique()),
            "tokens": len(toks),
            "oov_rate": round(oov / max(len(toks), 1), 6),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "captions.parquet", table)
    write_parquet(out_dir / "rejected.parquet", rejected)
    vocab.save(out_dir / "vocab.json")
    write_json(out_dir / "tokenizer.json", tok.to_dict())
    dropped = {str(r): int(n) for r, n in rejected.groupby("reason").size().items()}
    return {"vocab_size": len(vocab), "dropped": dropped, "splits": metrics}


PREPARERS = {
    "lm-word": prepare_lm,
    "lm-char": prepare_lm,
    "parallel": prepare_parallel,
    "captions": prepare_captions,
}


def prepare_corpora(
    cfg: PrepareConfig, raw_root: Path, out_root: Path, specs: dict[str, CorpusSpec] | None = None
) -> dict:
    """Prepare every corpus of ``cfg.corpora`` (declared in ``specs``: params ``corpora``; the
    repository's own declarations by default); return the metrics for ``data/metrics/prepare.json``."""
    specs = repo_corpora() if specs is None else specs
    metrics = {}
    for i, corpus in enumerate(cfg.corpora):
        spec = get(specs, corpus, f"prepare.corpora[{i}]")
        raw_dir = raw_root / corpus
        if not raw_dir.is_dir():
            raise DataError(f"{raw_dir}: raw corpus missing; run the download stage with {corpus} in download.corpora")
        log.info("preparing %s", corpus)
        metrics[corpus] = PREPARERS[spec.task](spec, raw_dir, out_root / corpus, cfg)
    return metrics
