"""Multi30k reading, BPE tokenizer and the parallel DataModule, on the real corpus."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rnnlab.data.bpe import BPETokenizer, tokenizer_from_dict
from rnnlab.data.parallel import BucketBatchSampler, ParallelDataModule, read_multi30k
from rnnlab.data.tokenize import WordTokenizer
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def pairs(mirror) -> pd.DataFrame:
    return read_multi30k(mirror / "multi30k" / "raw")


@pytest.fixture(scope="module")
def bpe_de(pairs) -> BPETokenizer:
    train = pairs[pairs["split"] == "train"]["tgt"].head(5000)
    return BPETokenizer(lowercase=False, vocab_size=2000).train(train)


def test_read_multi30k_counts_and_alignment(pairs):
    assert pairs.groupby("split").size().to_dict() == {"train": 29000, "val": 1014, "test": 1000}
    first = pairs.iloc[0]
    assert (first["split"], first["line"]) == ("train", 1)
    assert first["src"] == "Two young, White males are outside near many bushes."
    assert first["tgt"] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert pairs[pairs["split"] == "test"]["line"].tolist() == list(range(1, 1001))


def test_bpe_round_trip_on_real_sentences(pairs, bpe_de):
    words = WordTokenizer(lowercase=False)
    sentences = pairs[pairs["split"] == "val"]["tgt"].head(300).tolist()
    # <unk> only stands for a character never seen in the train split; measured: none of these 300
    # val sentences has one (nor any of the 1,014), so no sentence is excused from the round trip.
    with_unk = [s for s in sentences if "<unk>" in bpe_de.tokenize(s)]
    assert with_unk == []
    split_words = 0
    for sentence in sentences:
        pieces = bpe_de.tokenize(sentence)
        # Lossless at the word level: the pieces re-join into exactly the word tokens ...
        assert "".join(pieces).split("▁")[1:] == words.tokenize(sentence)
        # ... and detokenizing gives what the word tokenizer's own round trip gives.
        assert bpe_de.detokenize(pieces) == words.detokenize(words.tokenize(sentence))
        split_words += len(pieces) - len(words.tokenize(sentence))
    assert split_words > 100  # rare words really are split into subwords
    # Byte for byte: 298 of 300; the other two differ in whitespace only (a no-break space in
    # "120\xa0cm", "Obst- und" coming back as "Obst - und").
    back = [bpe_de.detokenize(bpe_de.tokenize(s)) for s in sentences]
    inexact = [(s, b) for s, b in zip(sentences, back) if b != s]
    assert len(inexact) == 2
    assert all("".join(s.split()) == "".join(b.split()) for s, b in inexact)
    # A character the train split never had does become <unk> (and stays visible as such).
    pieces = bpe_de.tokenize("Ein Mann mit einem Шапка.")
    assert pieces.count("<unk>") == 5 and bpe_de.detokenize(pieces) == "Ein Mann mit einem <unk><unk><unk><unk><unk>."


def test_bpe_is_deterministic_and_saves(pairs, bpe_de, tmp_path):
    train = pairs[pairs["split"] == "train"]["tgt"].head(5000)
    again = BPETokenizer(lowercase=False, vocab_size=2000).train(train)
    assert again.to_dict() == bpe_de.to_dict()
    bpe_de.save(tmp_path / "bpe.json")
    loaded = BPETokenizer.load(tmp_path / "bpe.json")
    sentence = "Ein Kleinkind klettert auf ein rotes Seil."
    assert loaded.tokenize(sentence) == bpe_de.tokenize(sentence)
    assert tokenizer_from_dict(bpe_de.to_dict()).tokenize(sentence) == bpe_de.tokenize(sentence)
    assert tokenizer_from_dict({"name": "word", "lowercase": True}).tokenize("A Dog.") == ["a", "dog", "."]
    with pytest.raises(ConfigError, match="model_json"):
        tokenizer_from_dict({"name": "bpe", "lowercase": True, "vocab_size": 100})


def test_bpe_lowercases_source_side():
    bpe = BPETokenizer(lowercase=True, vocab_size=50).train(["A dog runs.", "The dog sits."] * 10)
    assert all(p == p.lower() for p in bpe.tokenize("The DOG runs."))
    assert bpe.detokenize(bpe.tokenize("The DOG runs.")) == "the dog runs."


@pytest.fixture(scope="module")
def datamodule(pairs) -> ParallelDataModule:
    small = pairs.groupby("split").head(2000)
    dm = ParallelDataModule(small, tokenizer="word", min_freq=2, max_len=12, batch_size=32, seed=5)
    dm.setup()
    return dm


def test_vocab_from_train_only_and_truncation_counted(datamodule, pairs):
    dm = datamodule
    words = WordTokenizer(lowercase=True)
    train_words = {w for s in dm.texts["train"]["src"] for w in words.tokenize(s)}
    test_only = sorted({w for s in dm.texts["test"]["src"] for w in words.tokenize(s)} - train_words)
    assert test_only and all(w not in dm.src_vocab for w in test_only)
    assert dm.src_vocab.encode(test_only[:3]) == [Vocab.unk_id] * 3
    expected_cut = sum(len(words.tokenize(s)) > 12 for s in dm.texts["val"]["src"])
    assert dm.truncated["val"]["src"] == expected_cut > 0
    assert max(len(s) for s in dm.datasets["val"].src) == 12


def test_batches_are_padded_with_bos_and_eos(datamodule):
    dm = datamodule
    batch = next(iter(dm.loader("train")))  # training batches: batch_size 32, shuffled buckets
    assert batch.src.shape[0] == batch.tgt_in.shape[0] == 32
    assert batch.tgt_in.shape == batch.tgt_out.shape
    assert (batch.tgt_in[:, 0] == Vocab.bos_id).all()
    tgt_lengths = (batch.tgt_out != Vocab.pad_id).sum(1)
    rows = np.arange(32)
    assert (batch.tgt_out[rows, tgt_lengths - 1] == Vocab.eos_id).all()
    assert (batch.tgt_in[:, 1:][batch.tgt_in[:, 1:] != 0] == batch.tgt_out[:, :-1][batch.tgt_in[:, 1:] != 0]).all()
    assert ((batch.src != Vocab.pad_id).sum(1) == batch.src_lengths).all()
    # index maps back to the split's rows: the source text re-encodes to the batch's row
    i = int(batch.index[0])
    ids = dm.src_vocab.encode(dm.src_tokenizer.tokenize(dm.sources("train")[i]))[:12]
    assert batch.src[0, : len(ids)].tolist() == ids


def test_bucket_sampler_covers_each_item_once_and_is_seeded():
    lengths = np.random.default_rng(0).integers(1, 40, size=1000)
    sampler = BucketBatchSampler(lengths, batch_size=20, shuffle=True, seed=3)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert sorted(i for b in epoch1 for i in b) == list(range(1000))
    assert epoch1 != epoch2  # a new order each epoch
    assert list(BucketBatchSampler(lengths, 20, True, seed=3)) == epoch1  # same seed, same order
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in epoch1])
    random_spread = np.mean([lengths[b].max() - lengths[b].min() for b in np.arange(1000).reshape(50, 20)])
    assert spread < 0.2 * random_spread
    # set_epoch(k) gives epoch k's order (seed + k), as the k-th pass of a sampler never told
    later = [list(sampler) for _ in range(2)]  # passes 2 and 3
    told = BucketBatchSampler(lengths, 20, True, seed=3)
    told.set_epoch(3)
    assert list(told) == later[1] != later[0]
    assert list(told) == list(BucketBatchSampler(lengths, 20, True, seed=7))  # seed 3 + epoch 4


def test_train_loader_resumes_mid_epoch_with_the_same_batches(datamodule):
    """The train loader is resumable: after 3 batches of the second epoch, a fresh loader given
    the saved position serves exactly the batches the uninterrupted one goes on to serve."""
    from rnnlab.resume import ResumableLoader

    loader = datamodule.train_dataloader()
    assert isinstance(loader, ResumableLoader) and len(loader) == len(datamodule.loader("train"))
    first = [b.index.tolist() for b in loader]
    it = iter(loader)
    second = [next(it).index.tolist() for _ in range(3)]
    saved = loader.state_dict()
    second += [b.index.tolist() for b in it]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    plain = datamodule.loader("train")  # the order is the plain loader's: epoch k uses seed + k
    assert [[b.index.tolist() for b in plain] for _ in range(2)] == [first, second]
    resumed = datamodule.train_dataloader()
    resumed.load_state_dict(saved)
    assert [b.index.tolist() for b in resumed] == second[3:]
    assert [b.index.tolist() for b in resumed] == [b.index.tolist() for b in loader]  # then epoch 3, in step


def test_bad_pairs_are_named(pairs):
    bad = pairs.groupby("split").head(50).copy()
    bad.loc[bad.index[3], "src"] = "   "
    dm = ParallelDataModule(bad)
    with pytest.raises(DataError, match="split 'train' line 4: the source sentence is empty"):
        dm.setup()
    with pytest.raises(DataError, match="lacks columns"):
        ParallelDataModule(bad.drop(columns=["line"]))
    with pytest.raises(ConfigError, match="tokenizer"):
        ParallelDataModule(pairs.head(5), tokenizer="sentencepiece")
