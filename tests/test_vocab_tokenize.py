import numpy as np
import pytest

from rnnlab.data.tokenize import CharTokenizer, WordTokenizer, build_tokenizer
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError


def test_vocab_from_train_only_maps_unseen_words_to_unk():
    train = [["the", "cat", "sat"], ["the", "dog"]]
    vocab = Vocab.build(train)
    assert vocab.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert vocab.itos[4] == "the"  # most frequent first; ties alphabetical
    assert vocab.itos[5:] == ["cat", "dog", "sat"]
    assert vocab.encode(["the", "zebra"]) == [4, vocab.unk_id]


def test_vocab_min_freq_max_size_and_roundtrip(tmp_path):
    vocab = Vocab.build([["a", "a", "b", "b", "c"]], min_freq=2)
    assert vocab.itos[4:] == ["a", "b"]
    capped = Vocab.build([["a", "a", "b", "b", "c"]], max_size=5)
    assert capped.itos[4:] == ["a"]
    vocab.save(tmp_path / "v.json")
    loaded = Vocab.load(tmp_path / "v.json")
    assert loaded.itos == vocab.itos and loaded.fingerprint() == vocab.fingerprint()


def test_prepared_ptb_vocab_is_the_train_word_set(prepared_ptb, mirror):
    """The whole of PTB: the vocabulary is train's words. PTB is closed-vocabulary (every valid and
    test word is a train word, asserted here), so this cannot tell a train-only vocabulary from one
    built on all splits: the two tests below do, on splits that are not closed."""
    vocab = Vocab.load(prepared_ptb / "vocab.json")
    words = {s: set((mirror / "ptb" / f"ptb.{s}.txt").read_text().split()) for s in ("train", "valid", "test")}
    assert set(vocab.itos[4:]) - {"<eos>"} == words["train"] - {"<unk>"} and len(vocab) == 10002
    assert words["valid"] | words["test"] <= words["train"]


def test_prepared_lm_vocab_maps_a_valid_only_word_to_unk(tmp_path, mirror):
    """The LM path of prepare on a real-text split that is not closed: the first 2,000 lines of PTB
    train, 500 of valid and test. "sotheby" occurs 10 times in those valid lines, never in those
    train lines: it must be <unk> in the vocabulary and in valid.npy."""
    from rnnlab.data.prepare import parse_prepare_config, prepare_corpora

    raw = tmp_path / "raw" / "ptb"
    raw.mkdir(parents=True)
    head = {"train": 2000, "valid": 500, "test": 500}
    lines = {}
    for split, n in head.items():
        lines[split] = (mirror / "ptb" / f"ptb.{split}.txt").read_text().splitlines(keepends=True)[:n]
        (raw / f"ptb.{split}.txt").write_text("".join(lines[split]))
    train_words = {w for line in lines["train"] for w in line.split()}
    valid_tokens = [w for line in lines["valid"] for w in (*line.split(), "<eos>")]
    assert "sotheby" not in train_words and valid_tokens.count("sotheby") == 10
    metrics = prepare_corpora(parse_prepare_config({"corpora": ["ptb"]}), tmp_path / "raw", tmp_path / "prepared")[
        "ptb"
    ]
    vocab = Vocab.load(tmp_path / "prepared" / "ptb" / "vocab.json")
    assert set(vocab.itos[4:]) == train_words - {"<unk>"} and "sotheby" not in vocab
    valid = np.load(tmp_path / "prepared" / "ptb" / "valid.npy")
    assert len(valid) == len(valid_tokens)
    positions = [i for i, w in enumerate(valid_tokens) if w == "sotheby"]
    assert all(valid[i] == vocab.unk_id for i in positions)
    oov = sum(w not in train_words | {"<unk>", "<eos>"} for w in valid_tokens)
    assert oov == 957 and metrics["splits"]["valid"]["oov_rate"] == round(oov / len(valid_tokens), 6)


@pytest.fixture(scope="module")
def prepared_multi30k(tmp_path_factory, mirror):
    """Multi30k prepared by the real prepare code: (output folder, prepare metrics)."""
    import dataclasses

    from rnnlab.data.corpora import repo_corpora
    from rnnlab.data.prepare import parse_prepare_config, prepare_corpora

    out = tmp_path_factory.mktemp("prepared-multi30k")
    spec = repo_corpora()["multi30k"]
    spec = dataclasses.replace(spec, options=dataclasses.replace(spec.options, min_freq=1))  # every train word
    metrics = prepare_corpora(parse_prepare_config({"corpora": ["multi30k"]}), mirror, out, {"multi30k": spec})
    return out / "multi30k", metrics["multi30k"]


def _word_count(path, word: str) -> int:
    """Occurrences of ``word`` as a whole word in a gzipped raw corpus file (lower-cased)."""
    import gzip
    import re

    return len(re.findall(rf"\b{word}\b", gzip.open(path, "rt", encoding="utf-8").read().lower()))


def test_prepared_vocab_maps_a_valid_only_word_to_unk(prepared_multi30k, mirror):
    """PTB is closed-vocabulary (every valid/test word is a train word, so are WikiText-2's), so a
    vocabulary built from every split would pass the test above. Multi30k is open: "regalia" occurs
    twice in val and once in test_2016_flickr but never in train (German "rastalocken": three times
    in val, never in train). A train-only vocabulary must map them to <unk>."""
    folder, metrics = prepared_multi30k
    raw = mirror / "multi30k" / "raw"
    for lang, side, word, counts in (("en", "src", "regalia", (0, 2, 1)), ("de", "tgt", "rastalocken", (0, 3, 0))):
        assert (
            tuple(_word_count(raw / f"{stem}.{lang}.gz", word) for stem in ("train", "val", "test_2016_flickr"))
            == counts
        )
        vocab = Vocab.load(folder / f"vocab.{side}.json")
        assert word not in vocab and vocab.encode([word]) == [vocab.unk_id]
        assert vocab.encode(["ein" if lang == "de" else "a"]) != [vocab.unk_id]  # a train word keeps its id
    # The vocabulary is exactly the train split's words (tokenized as prepare does), nothing more.
    tok = WordTokenizer(lowercase=True)
    import pandas as pd

    pairs = pd.read_parquet(folder / "pairs.parquet")
    train_words = {w for s in pairs[pairs.split == "train"]["src"] for w in tok.tokenize(s)}
    assert set(Vocab.load(folder / "vocab.src.json").itos[4:]) == train_words
    # ... so val/test have out-of-vocabulary words, counted by prepare: 171 of val's 13,290 source
    # tokens and 143 of test's 12,956 (a vocabulary from all splits would give 0).
    splits = metrics["splits"]
    assert splits["train"]["src_oov_rate"] == splits["train"]["tgt_oov_rate"] == 0.0
    assert (splits["val"]["src_tokens"], splits["val"]["src_oov_rate"]) == (13290, round(171 / 13290, 6))
    assert (splits["test"]["src_tokens"], splits["test"]["src_oov_rate"]) == (12956, round(143 / 12956, 6))


def test_word_tokenizer_lowercases_and_splits_punctuation():
    tok = WordTokenizer()
    tokens = tok.tokenize("Two young, White males are outside near many bushes.")
    assert tokens == ["two", "young", ",", "white", "males", "are", "outside", "near", "many", "bushes", "."]
    assert tok.detokenize(tokens) == "two young, white males are outside near many bushes."
    assert tok.tokenize("Ein Mädchen (rechts) springt!") == ["ein", "mädchen", "(", "rechts", ")", "springt", "!"]


def test_tokenizer_spec_roundtrip_and_unknown_name():
    assert build_tokenizer(WordTokenizer(lowercase=False).to_dict()).lowercase is False
    assert isinstance(build_tokenizer(CharTokenizer().to_dict()), CharTokenizer)
    with pytest.raises(ConfigError, match="tokenizer name 'bpe2' is unknown"):
        build_tokenizer({"name": "bpe2"})
