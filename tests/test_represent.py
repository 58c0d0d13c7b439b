"""Lecture §1.1 on its own example sentences."""

import torch

from rnnlab.data.vocab import Vocab
from rnnlab.represent import bag_of_words, cosine_similarity, embed, nearest_neighbours, one_hot_sequence

A = "April is the cruelest month".split()
B = "the cruelest month is April".split()


def test_bag_of_words_ignores_order_one_hot_keeps_it():
    vocab = Vocab.build([A])
    assert torch.equal(bag_of_words(A, vocab), bag_of_words(B, vocab))
    assert bag_of_words(A, vocab).sum() == 5
    assert not torch.equal(one_hot_sequence(A, vocab), one_hot_sequence(B, vocab))
    assert one_hot_sequence(A, vocab).shape == (5, len(vocab))


def test_one_hot_words_are_orthogonal_but_embeddings_have_similarity():
    vocab = Vocab.build([A + ["June"]])
    oh = one_hot_sequence(["April", "month", "June"], vocab)
    assert cosine_similarity(oh[0], oh[1]) == 0.0 and cosine_similarity(oh[0], oh[2]) == 0.0
    torch.manual_seed(0)
    table = torch.randn(len(vocab), 8)
    table[vocab.stoi["June"]] = table[vocab.stoi["April"]] + 0.1 * torch.randn(8)  # "learned": months alike
    emb = embed(["April", "June", "cruelest"], vocab, table)
    assert cosine_similarity(emb[0], emb[1]) > 0.9
    assert abs(cosine_similarity(emb[0], emb[2])) < 0.9
    assert nearest_neighbours("April", vocab, table, k=1)[0][0] == "June"
