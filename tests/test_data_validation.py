"""Readers + pandera schemas: each bad input gives an error naming the file and line."""

import gzip
import shutil

import pandas as pd
import pytest

from rnnlab.data import readers, schemas
from rnnlab.data.prepare import parse_prepare_config, prepare_corpora
from rnnlab.errors import ConfigError, DataError


def _copy_ptb(mirror, dst):
    dst.mkdir(parents=True)
    for f in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        shutil.copyfile(mirror / "ptb" / f, dst / f)
    return dst


def test_non_utf8_line_is_named(tmp_path, mirror):
    raw = _copy_ptb(mirror, tmp_path / "ptb")
    lines = (raw / "ptb.valid.txt").read_bytes().split(b"\n")
    lines[6] = lines[6] + b" caf\xe9"
    (raw / "ptb.valid.txt").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"ptb.valid.txt line 7: not valid UTF-8 \(byte 0xe9"):
        readers.read_lm_corpus("ptb", raw)


def test_empty_split_is_an_error(tmp_path, mirror):
    raw = _copy_ptb(mirror, tmp_path / "ptb")
    (raw / "ptb.test.txt").write_text("")
    with pytest.raises(DataError, match="ptb.test.txt: split is empty"):
        readers.read_lm_corpus("ptb", raw)


def _multi30k_copy(mirror, dst):
    shutil.copytree(mirror / "multi30k" / "raw", dst / "raw")
    for p in (dst / "raw").iterdir():
        p.chmod(0o644)
    return dst


def test_misaligned_parallel_corpus_names_both_counts(tmp_path, mirror):
    raw = _multi30k_copy(mirror, tmp_path / "m30k")
    with gzip.open(raw / "raw/val.de.gz", "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    with gzip.open(raw / "raw/val.de.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=r"val.en.gz has 1014 lines but .*val.de.gz has 1013"):
        readers.read_parallel_corpus(raw)


def test_parallel_schema_rejects_empty_target_with_file_and_line(tmp_path, mirror):
    raw = _multi30k_copy(mirror, tmp_path / "m30k")
    with gzip.open(raw / "raw/test_2016_flickr.de.gz", "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    lines[41] = "   "
    with gzip.open(raw / "raw/test_2016_flickr.de.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    table = readers.read_parallel_corpus(raw)
    with pytest.raises(
        DataError, match=r"test_2016_flickr.en\|de.gz line 42: column 'tgt' failed 'target sentence is empty'"
    ):
        schemas.validate(table, schemas.PARALLEL_PAIRS, "multi30k pairs")


def test_lm_schema_rejects_unknown_split_and_bad_line():
    df = pd.DataFrame({"split": ["train", "dev"], "file": ["a.txt", "a.txt"], "line": [1, 0], "text": ["x", "y"]})
    with pytest.raises(DataError) as info:
        schemas.validate(df, schemas.LM_LINES, "lm")
    msg = str(info.value)
    assert "a.txt line 0: column 'split'" in msg and "a.txt line 0: column 'line'" in msg


def test_caption_schema_requires_existing_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    df = pd.DataFrame(
        {
            "split": ["train", "train"],
            "file": ["tok.txt"] * 2,
            "line": [3, 4],
            "image": ["a.jpg", "missing.jpg"],
            "caption_index": [0, 1],
            "caption": ["a dog", "a cat"],
        }
    )
    with pytest.raises(DataError, match=r"tok.txt line 4: column 'image' failed 'image file missing"):
        schemas.validate(df, schemas.caption_schema(tmp_path), "captions")


def test_flickr8k_quirky_caption_id_is_counted_not_lost(mirror):
    table, rejected = readers.read_captions(mirror / "flickr8k")
    assert len(table) + len(rejected) == 40460
    assert len(rejected) == 5
    assert set(rejected.image) == {"2258277193_586949ec62.jpg.1"}
    assert rejected.reason.str.contains("names no image").all()


def test_prepare_fails_on_bad_caption_rows_when_asked(tmp_path, mirror):
    cfg = parse_prepare_config({"corpora": ["flickr8k"], "on_bad_rows": "fail"})
    with pytest.raises(DataError, match=r"Flickr8k.token.txt line \d+: caption id '2258277193_586949ec62.jpg.1'"):
        prepare_corpora(cfg, mirror, tmp_path)


def test_prepare_config_rejects_unknown_corpus_and_key(tmp_path):
    from rnnlab.data.corpora import parse_corpora, repo_corpora

    with pytest.raises(ConfigError, match=r"prepare.corpora\[0\]: unknown corpus 'ptbx'; declared in params.yaml"):
        prepare_corpora(parse_prepare_config({"corpora": ["ptbx"]}), tmp_path, tmp_path, repo_corpora())
    with pytest.raises(ConfigError, match=r"prepare.vocab: unknown key"):
        parse_prepare_config({"corpora": ["ptb"], "vocab": {"ptb": {"min_freq": 2}}})
    entry = {
        "task": "lm-word",
        "files": {"a.txt": {"path": "a.txt"}},
        "carve": {"file": "a.txt", "by": "lines", "valid": 0.1},
    }
    with pytest.raises(ConfigError, match=r"corpora.mine.options.min_frq: unknown key"):
        parse_corpora({"mine": {**entry, "options": {"min_frq": 2}}})
    with pytest.raises(ConfigError, match=r"corpora.mine.options.min_freq: expected an integer >= 1, got 0"):
        parse_corpora({"mine": {**entry, "options": {"min_freq": 0}}})


def test_prepared_ptb_matches_published_counts(prepared_ptb):
    import numpy as np

    from rnnlab.data.vocab import Vocab

    vocab = Vocab.load(prepared_ptb / "vocab.json")
    assert len(vocab) == 10002  # 10k PTB types incl. <unk> and <eos>, + <pad>, <bos>
    assert [len(np.load(prepared_ptb / f"{s}.npy")) for s in ("train", "valid", "test")] == [929589, 73760, 82430]


def test_char_split_matches_nanogpt(tmp_path, mirror):
    table = readers.read_char_corpus(mirror / "tinyshakespeare")
    text = (mirror / "tinyshakespeare" / "input.txt").read_text()
    n = int(len(text) * 0.9)
    train = "\n".join(table[table.split == "train"].text)
    valid = "\n".join(table[table.split == "valid"].text)
    assert train == text[:n] and valid == text[n:]
