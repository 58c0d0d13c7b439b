"""Interpolated Kneser-Ney n-gram LM: hand-computed example, agreement with nltk, real PTB."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rnnlab.data.vocab import EOS, Vocab
from rnnlab.errors import ConfigError, DataError
from rnnlab.models.ngram import KneserNeyLanguageModel

A, B, C, D = 0, 1, 2, 3
STREAM = np.array([A, B, A, C, A, B], dtype=np.int32)  # "a b a c a b", vocabulary {a, b, c, d}


def test_bigram_worked_example_by_hand():
    # Order 2, D = 0.5, vocabulary V = 4 (d never occurs).
    # Bigram counts: ab 2, ba 1, ac 1, ca 1.
    # Unigram continuation counts N1+(.w): a 2 (ba, ca), b 1, c 1, d 0; total T1 = 4 bigram
    # types, F1 = 3 words with a continuation. With the uniform floor:
    #   P1(w) = (max(N1+(.w) - 0.5, 0) + 0.5 * 3/4) / 4
    #   P1(a) = (1.5 + 0.375)/4 = 0.46875, P1(b) = P1(c) = 0.21875, P1(d) = 0.09375  (sum 1)
    # Highest order uses raw counts. Context a: c(a.) = 3, F = 2 (b, c):
    #   P(b|a) = (2 - 0.5)/3 + 0.5*2/3 * P1(b) = 0.5 + 0.21875/3         = 0.5729166...
    #   P(c|a) = (1 - 0.5)/3 + 1/3 * 0.21875                              = 0.2395833...
    #   P(a|a) = 1/3 * 0.46875 = 0.15625,  P(d|a) = 1/3 * 0.09375 = 0.03125   (sum 1)
    # Context b (c = 1, F = 1): P(a|b) = 0.5 + 0.5 * 0.46875 = 0.734375, P(b|b) = 0.5 * 0.21875
    # Context c: P(a|c) = 0.734375.  Context d never seen: P(a|d) = P1(a) = 0.46875.
    kn = KneserNeyLanguageModel(order=2, discount=0.5, vocab_size=4).fit(STREAM)
    assert kn.discounts == [0.5, 0.5]
    expected_stream = [0.5729166667, 0.734375, 0.2395833333, 0.734375, 0.5729166667]  # P(ids[t] | ids[t-1])
    assert np.allclose(np.exp(kn.log_prob(STREAM)), expected_stream)
    assert np.allclose(kn.next_token_distribution([A]), [0.15625, 0.5729166667, 0.2395833333, 0.03125])
    assert np.allclose(kn.next_token_distribution([]), [0.46875, 0.21875, 0.21875, 0.09375])
    assert np.exp(kn.log_prob(np.array([D, A, B, B]))) == pytest.approx([0.46875, 0.5729166667, 0.109375])


def test_trigram_worked_example_uses_continuation_counts_below_the_top_order():
    # Order 3, D = 0.5 on the same stream. Trigrams: aba, bac, aca, cab (1 each).
    # Middle order: continuation counts N1+(. h w): ab 1 (cab; the first ab has no left
    # neighbour), ba 1, ac 1, ca 1. Context a: S = 2, F = 2; contexts b, c: S = 1, F = 1.
    #   P2(b|a) = (1 - 0.5)/2 + 0.5*2/2 * P1(b) = 0.25 + 0.109375 = 0.359375
    #   P2(a|b) = 0.5 + 0.5 * P1(a) = 0.734375;  P2(c|a) = 0.25 + 0.5 * P1(c) = 0.359375
    # Top order, raw counts: P3(a|ab) = (1 - 0.5)/1 + 0.5 * P2(a|b) = 0.8671875
    #   P3(c|ba) = 0.5 + 0.5 * P2(c|a) = 0.6796875
    # Position 1 has only one token of history, so it gets P2(b|a).
    kn = KneserNeyLanguageModel(order=3, discount=0.5, vocab_size=4).fit(STREAM)
    assert np.exp(kn.log_prob(STREAM))[:3] == pytest.approx([0.359375, 0.8671875, 0.6796875])


# A tiny corpus for nltk. Its first two tokens recur later with a left neighbour, so every
# context nltk is asked about has continuation counts (nltk divides by zero otherwise).
TINY = (
    "the cat sat on the mat </s> the dog sat on the log </s> a cat saw the dog </s> "
    "the cat ran </s> the dog sat on a mat </s> the cat sat </s>"
).split()


@pytest.mark.parametrize("order,discount", [(2, 0.1), (3, 0.1), (3, 0.75), (4, 0.5)])
def test_agrees_with_nltk_kneser_ney_interpolated(order, discount):
    """Same quantity in both: nltk is fitted on every 1..order-gram of the *unpadded* stream
    (no <s>/</s> padding, which nltk's padded_everygram_pipeline would add), with one fixed
    discount at every order, and ours with ``interpolate_uniform=False`` so the recursion
    ends at the undiscounted unigram continuation distribution, as nltk's does."""
    from nltk.lm import KneserNeyInterpolated
    from nltk.util import everygrams

    vocab = sorted(set(TINY)) + ["zebra"]  # a vocabulary word that never occurs: probability 0 in both
    stoi = {w: i for i, w in enumerate(vocab)}
    ids = np.array([stoi[w] for w in TINY], dtype=np.int32)
    nltk_lm = KneserNeyInterpolated(order, discount=discount)
    nltk_lm.fit([list(everygrams(TINY, max_len=order))], vocabulary_text=TINY + ["zebra"])
    ours = KneserNeyLanguageModel(order, discount=discount, vocab_size=len(vocab), interpolate_uniform=False).fit(ids)

    # Every position of the stream that has a full context, plus one unseen context.
    contexts = [TINY[t - order + 1 : t] for t in range(order - 1, len(TINY))] + [["mat", "ran", "cat"][-(order - 1) :]]
    compared = 0
    for context in contexts:
        dist = ours.next_token_distribution([stoi[w] for w in context])
        expected = [nltk_lm.score(w, context) for w in vocab]
        assert dist == pytest.approx(expected, abs=1e-12), context
        compared += len(vocab)
    assert compared > 200
    # And the stream scoring path gives the same numbers as the distribution path.
    full = np.exp(ours.log_prob(ids))[order - 2 :]
    assert full == pytest.approx(
        [nltk_lm.score(w, TINY[t - order + 1 : t]) for t, w in enumerate(TINY) if t >= order - 1]
    )


def test_distribution_is_normalised_and_matches_stream_scores():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 40, size=3000).astype(np.int32)
    ids[::7] = 3  # some structure: frequent <eos>
    kn = KneserNeyLanguageModel(order=5, vocab_size=50).fit(ids)
    assert all(0.0 < d <= 1.0 for d in kn.discounts)
    probs = kn.probabilities(ids[:60])
    for t in (0, 1, 2, 3, 4, 10, 59):  # 1..4: contexts at the stream start, whose first n-gram has no left neighbour
        dist = kn.next_token_distribution(ids[:t])
        assert dist.sum() == pytest.approx(1.0, abs=1e-12)
        assert dist.min() > 0  # the uniform floor reaches even the never-seen ids 0..3 and 40..49
        assert dist[ids[t]] == pytest.approx(probs[t], rel=1e-12)


def test_generate_is_seeded_and_follows_the_counts():
    cycle = np.tile(np.array([4, 5, 6, 7], dtype=np.int32), 200)
    kn = KneserNeyLanguageModel(order=3, vocab_size=10).fit(cycle)
    first = kn.generate([4, 5], n_tokens=12, temperature=0.3, seed=1)
    assert first == kn.generate([4, 5], n_tokens=12, temperature=0.3, seed=1)
    assert first == [6, 7, 4, 5] * 3  # a near-deterministic corpus is continued
    hot = [kn.generate([4, 5], 40, temperature=50.0, seed=s) for s in range(3)]
    assert len({tuple(h) for h in hot}) == 3 and len(set(sum(hot, []))) > 4  # flattened: other ids appear


def test_save_load_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 30, size=2000).astype(np.int32)
    kn = KneserNeyLanguageModel(order=4, vocab_size=30).fit(ids)
    path = tmp_path / "kn.npz"
    kn.save(path)
    with np.load(path, allow_pickle=False) as data:  # would raise if any entry needed pickle
        assert "header" in data.files
    loaded = KneserNeyLanguageModel.load(path)
    assert loaded.order == 4 and loaded.discounts == kn.discounts
    assert np.array_equal(loaded.log_prob(ids[:500]), kn.log_prob(ids[:500]))
    (tmp_path / "junk.npz").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.npz"):
        KneserNeyLanguageModel.load(tmp_path / "junk.npz")


def test_bad_input_names_the_problem():
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="order"):
            KneserNeyLanguageModel(order=bad)
    with pytest.raises(ConfigError, match="discount"):
        KneserNeyLanguageModel(order=3, discount=1.5)
    kn = KneserNeyLanguageModel(order=2, vocab_size=4).fit(STREAM)
    with pytest.raises(DataError, match="outside the vocabulary"):
        kn.perplexity(np.array([0, 1, 7]))
    with pytest.raises(DataError, match="integer"):
        kn.perplexity(np.array([0.0, 1.0]))


def test_counting_is_vectorised():
    ids = np.random.default_rng(2).integers(0, 10_000, size=300_000).astype(np.int32)
    start = time.perf_counter()
    KneserNeyLanguageModel(order=5, vocab_size=10_000).fit(ids)
    # ~0.5 s here; a Python loop over 300k tokens x 5 orders would take far longer.
    assert time.perf_counter() - start < 10


def test_ptb_5gram_perplexity_in_the_published_range(mirror):
    """Mikolov (2012) reports 141.2 for a (modified) KN5 on this PTB test set."""

    def stream(split):
        return [line.split() + [EOS] for line in (mirror / "ptb" / f"ptb.{split}.txt").open(encoding="utf-8")]

    train = stream("train")
    vocab = Vocab.build(train)
    train_ids = vocab.encode_array([t for line in train for t in line])
    test_ids = vocab.encode_array([t for line in stream("test") for t in line])
    kn = KneserNeyLanguageModel(order=5, vocab_size=len(vocab)).fit(train_ids)
    assert 138 < kn.perplexity(test_ids) < 150  # measured 143.7
