import numpy as np

from rnnlab.study.ngram_orders import ngram_order_rows


def test_hand_computed_unseen_shares():
    train = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    test = np.array([0, 1, 2, 1, 0])
    rows = ngram_order_rows(train, train, test, vocab_size=3, max_order=3)
    shares = [r["test_unseen_share"] for r in rows]
    # unigrams: all in train -> 0; bigrams 01 12 21 10: 21 and 10 unseen -> 2/4;
    # trigrams 012 121 210: 121 and 210 unseen -> 2/3
    assert shares == [0.0, 0.5, round(2 / 3, 6)]
    assert all(np.isfinite(r["test_ppl"]) and r["test_ppl"] > 1 for r in rows)


def test_unseen_share_monotone_on_random_stream():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=3000)
    rows = ngram_order_rows(ids[:2000], ids[2000:2500], ids[2500:], vocab_size=20, max_order=5)
    shares = [r["test_unseen_share"] for r in rows]
    assert shares[0] == 0.0
    assert all(a <= b for a, b in zip(shares, shares[1:]))
