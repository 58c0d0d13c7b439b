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


def test_prepared_vocab_excludes_test_only_words(prepared_ptb, mirror):
    vocab = Vocab.load(prepared_ptb / "vocab.json")
    train_words = set((mirror / "ptb" / "ptb.train.txt").read_text().split())
    test_words = set((mirror / "ptb" / "ptb.test.txt").read_text().split())
    assert train_words - {"<unk>"} == set(vocab.itos[4:]) - {"<eos>"}
    # PTB is closed-vocabulary, so check train-only construction on a word we add to test only.
    assert vocab.encode(["zyzzyva"]) == [vocab.unk_id]
    assert test_words <= train_words | {"<unk>"}


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
