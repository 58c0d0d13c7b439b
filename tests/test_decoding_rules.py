"""Decoding rules (issue 16 items 1, 2): no special tokens, n-gram repeat block, length normalisation."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from rnnlab.data.vocab import Vocab
from rnnlab.decoding import OutputRules, beam_search, greedy_decode, ngram_blocked
from rnnlab.generate import sample_neural

PAD, UNK, BOS, EOS = Vocab.pad_id, Vocab.unk_id, Vocab.bos_id, Vocab.eos_id
WORDS = [4, 5, 6, 7]
SPECIAL = {PAD, UNK, BOS}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for small ops


class SpecialLover:
    """Top tokens at every step: <unk>, then <pad>, then <bos>; then the words 4..7 (4 best); <eos>
    is likely only once 6 steps have been taken. state: steps taken per row [rows]."""

    vocab = 8

    def step(self, tokens, state):
        rows = tokens.size(0)
        logits = torch.tensor([5.0, 6.0, 4.5, -5.0, 3.0, 2.0, 1.0, 0.5]).repeat(rows, 1)
        logits[state >= 6, EOS] = 10.0
        return torch.log_softmax(logits, dim=-1), state + 1

    def reorder_state(self, state, index):
        return state.index_select(0, index)


def _decodes(rules):
    dec = SpecialLover()
    state = torch.zeros(3, dtype=torch.long)
    yield greedy_decode(dec, state, 3, BOS, EOS, max_len=12, rules=rules)
    for beam in (2, 4):
        yield beam_search(dec, state, 3, BOS, EOS, beam_size=beam, max_len=12, rules=rules)


def test_special_tokens_never_emitted_by_greedy_or_beam():
    for result in _decodes(OutputRules()):
        for tokens in result.tokens:
            assert tokens and not SPECIAL & set(tokens), tokens
            assert tokens[0] == 4  # the best allowed token, not nothing
    # Without the rules the model's top token is emitted at every step: the test can fail.
    raw = greedy_decode(SpecialLover(), torch.zeros(1, dtype=torch.long), 1, BOS, EOS, max_len=12)
    assert raw.tokens[0][:6] == [UNK] * 6


def test_allow_unk_lets_unk_through_but_never_pad_or_bos():
    for result in _decodes(OutputRules(allow_unk=True)):
        for tokens in result.tokens:
            assert UNK in tokens and PAD not in tokens and BOS not in tokens


class SpecialLoverLM(torch.nn.Module):
    """An LM (time-first, as rnnlab.models) whose logits put <unk>, <pad>, <bos> on top."""

    def init_state(self, batch, device):
        return None

    def forward(self, x, state):
        logits = torch.tensor([8.0, 9.0, 8.5, 0.0, 1.0, 1.0, 1.0, 1.0]).expand(x.size(0), x.size(1), 8)
        return logits, state


def test_sampling_never_emits_special_tokens():
    vocab = Vocab(["<pad>", "<unk>", "<bos>", "<eos>", "a", "b", "c", "d"])
    assert len(vocab) == 8
    text = sample_neural(SpecialLoverLM(), vocab, "a", 200, temperature=1.0, seed=3)
    assert "<unk>" not in text and "<pad>" not in text and "<bos>" not in text
    assert len(text.split()) > 150  # words were sampled (200 tokens, some of them <eos> newlines)
    with_unk = sample_neural(SpecialLoverLM(), vocab, "a", 200, temperature=1.0, seed=3, allow_unk=True)
    assert "<unk>" in with_unk and "<pad>" not in with_unk


def reference_blocked(hyp: list[int], n: int) -> set[int]:
    """OpenNMT-py's rule, written out: the tokens w for which hyp + [w] ends with an n-gram that
    already occurs in hyp."""
    if len(hyp) < n:
        return set()
    grams = {tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1)}
    prefix = tuple(hyp[len(hyp) - n + 1 :]) if n > 1 else ()
    return {g[-1] for g in grams if g[:-1] == prefix}


def test_ngram_block_matches_hand_computed_reference():
    # By hand: "4 5 4" with n 2 has bigrams (4 5), (5 4); the next bigram starts with 4: 5 is blocked.
    assert ngram_blocked(torch.tensor([[4, 5, 4]]), 2, 8)[0].nonzero().flatten().tolist() == [5]
    # n 3 on "4 5 6 4 5": trigrams (4 5 6), (5 6 4), (6 4 5); prefix (4 5): 6 blocked.
    assert ngram_blocked(torch.tensor([[4, 5, 6, 4, 5]]), 3, 8)[0].nonzero().flatten().tolist() == [6]
    # n 1: any token already emitted.
    assert ngram_blocked(torch.tensor([[7, 4, 7]]), 1, 8)[0].nonzero().flatten().tolist() == [4, 7]
    assert not ngram_blocked(torch.tensor([[4, 5]]), 3, 8).any()  # no complete trigram yet
    rng = random.Random(0)
    for n, t in itertools.product((1, 2, 3, 4), (0, 1, 3, 6, 12)):
        hyps = [[rng.choice([4, 5, 6]) for _ in range(t)] for _ in range(5)]
        got = ngram_blocked(torch.tensor(hyps, dtype=torch.long).view(5, t), n, 8)
        for hyp, row in zip(hyps, got):
            assert set(row.nonzero().flatten().tolist()) == reference_blocked(hyp, n), (hyp, n)


class Stutterer:
    """After 4 always 5, after 5 always 4 (then 6, 7; <eos> late): unblocked it says "4 5 4 5 ..."."""

    def step(self, tokens, state):
        table = torch.full((8, 8), -9.0)
        table[BOS, 4] = 0.0
        table[4, 5], table[4, 6] = 0.0, -1.0
        table[5, 4], table[5, 7] = 0.0, -1.0
        table[6, 4], table[6, EOS] = -1.0, 0.0
        table[7, 5], table[7, EOS] = -1.0, 0.0
        return torch.log_softmax(table[tokens], dim=-1), state

    def reorder_state(self, state, index):
        return state.index_select(0, index)


def test_block_ngram_repeat_stops_the_stutter():
    dec, state = Stutterer(), torch.zeros(1)
    assert greedy_decode(dec, state, 1, BOS, EOS, max_len=8, rules=OutputRules()).tokens == [[4, 5, 4, 5, 4, 5, 4, 5]]
    # n 2, by hand: 4 5 4, then (4 5) is blocked -> 6; after 6, (6 4) is new -> 4? no: <eos> is best after 6.
    rules = OutputRules(block_ngram_repeat=2)
    greedy = greedy_decode(dec, state, 1, BOS, EOS, max_len=8, rules=rules)
    assert greedy.tokens == [[4, 5, 4, 6]] and greedy.finished == [True]
    assert beam_search(dec, state, 1, BOS, EOS, beam_size=1, max_len=8, rules=rules).tokens == greedy.tokens
    for beam in (2, 3):
        for tokens in beam_search(dec, state, 1, BOS, EOS, beam_size=beam, max_len=8, rules=rules).tokens:
            bigrams = list(zip(tokens, tokens[1:]))
            assert len(bigrams) == len(set(bigrams)), tokens


class TwoEndings:
    """From <bos>: 4 (p .6) then <eos>; or 5 (p .4) then 6 6 <eos> at p ~1 each: the raw log-prob
    prefers the short one, the per-token average the long one."""

    def step(self, tokens, state):
        table = torch.full((8, 8), -30.0)
        table[BOS, 4], table[BOS, 5] = torch.tensor(0.6).log(), torch.tensor(0.4).log()
        table[4, EOS] = 0.0
        table[5, 6] = 0.0
        table[6, 6], table[6, EOS] = torch.where(state[0] < 3, 0.0, -30.0), torch.where(state[0] < 3, -30.0, 0.0)
        return torch.log_softmax(table[tokens], dim=-1), state + 1

    def reorder_state(self, state, index):
        return state.index_select(0, index)


def test_length_norm_choices():
    assert OutputRules(length_norm="average").lp(4) == 4.0
    assert OutputRules(length_norm="none", length_penalty=2.0).lp(4) == 1.0
    assert OutputRules(length_norm="gnmt", length_penalty=1.0).lp(7) == pytest.approx(2.0)
    dec = TwoEndings()

    def best(norm):
        rules = OutputRules(length_norm=norm, length_penalty=1.0)
        return beam_search(dec, torch.zeros(1), 1, BOS, EOS, beam_size=2, max_len=8, rules=rules).tokens[0]

    assert best("none") == [4]
    assert best("average") == [5, 6, 6]  # log(.4) / 4 = -0.23 > log(.6) / 2 = -0.26
    with pytest.raises(ValueError, match="length_norm"):
        OutputRules(length_norm="mean")
