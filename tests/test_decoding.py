"""Greedy and batched beam search (rnnlab.decoding) on small decoders whose answers can be checked."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rnnlab.decoding import beam_search, greedy_decode, length_penalty_factor

BOS, EOS, A, B = 0, 1, 2, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for small ops


class MarkovDecoder:
    """Next-token distribution depends only on the previous token: a hand-written table."""

    def __init__(self, probs: list[list[float]]):
        self.log_table = torch.tensor(probs).clamp_min(1e-12).log()
        self.calls = 0

    def step(self, tokens, state):
        self.calls += 1
        return self.log_table[tokens], state + 1  # state: steps taken per row [rows]

    def reorder_state(self, state, index):
        return state.index_select(0, index)


class ContextDecoder:
    """A tiny random recurrent decoder: each input row has its own 'source' [src_len, dim],
    so different rows decode differently; it also returns attention weights over the source."""

    def __init__(self, vocab: int = 7, dim: int = 5, seed: int = 0, eos_bias: float = 0.0):
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(vocab, dim, generator=gen)
        self.out = torch.randn(2 * dim, vocab, generator=gen) * 1.5
        self.out[:, EOS] += eos_bias / dim
        self.vocab, self.dim = vocab, dim

    def initial_state(self, batch: int, src_len: int = 4, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        return {"src": torch.randn(batch, src_len, self.dim, generator=gen), "h": torch.zeros(batch, self.dim)}

    def step(self, tokens, state):
        h = torch.tanh(state["h"] + self.embed[tokens])  # h: [rows, dim]
        attn = torch.softmax(torch.einsum("rsd,rd->rs", state["src"], h), dim=-1)  # [rows, src_len]
        context = torch.einsum("rs,rsd->rd", attn, state["src"])
        log_probs = torch.log_softmax(torch.cat([h, context], dim=-1) @ self.out, dim=-1)
        return log_probs, {"src": state["src"], "h": h}, attn

    def reorder_state(self, state, index):
        return {key: value.index_select(0, index) for key, value in state.items()}


def rescore(decoder: ContextDecoder, state, row: int, tokens: list[int], finished: bool):
    """Teacher-force one hypothesis through the decoder: its log-prob and attention rows."""
    state = decoder.reorder_state(state, torch.tensor([row]))
    prev, total, attn_rows = BOS, 0.0, []
    for tok in tokens + ([EOS] if finished else []):
        log_probs, state, attn = decoder.step(torch.tensor([prev]), state)
        total += log_probs[0, tok].item()
        attn_rows.append(attn[0])
        prev = tok
    return total, torch.stack(attn_rows)


def test_beam_finds_more_probable_sequence_than_greedy():
    # From <bos>: a 0.6, b 0.4. After a: <eos> 0.4, a 0.3, b 0.3. After b: <eos> 0.9.
    # Greedy: "a <eos>" = 0.6 * 0.4 = 0.24. Beam 2 also keeps "b": "b <eos>" = 0.4 * 0.9 = 0.36.
    probs = [
        [0.0, 0.0, 0.6, 0.4],  # after <bos>
        [0.0, 1.0, 0.0, 0.0],  # after <eos> (never used)
        [0.0, 0.4, 0.3, 0.3],  # after a
        [0.0, 0.9, 0.05, 0.05],  # after b
    ]
    decoder = MarkovDecoder(probs)
    greedy = greedy_decode(decoder, torch.zeros(1), 1, BOS, EOS, max_len=10)
    assert greedy.tokens == [[A]]
    assert greedy.scores[0] == pytest.approx(math.log(0.24), abs=1e-6)

    decoder.calls = 0
    beam = beam_search(decoder, torch.zeros(1), 1, BOS, EOS, beam_size=2, max_len=10)
    assert beam.tokens == [[B]]
    assert beam.scores[0] == pytest.approx(math.log(0.36), abs=1e-6)
    assert beam.finished == [True]
    # Both <eos> candidates rank in the top 2 at step 2, so the search stops after 2 of 10 steps.
    assert decoder.calls == 2


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_size_one_is_exactly_greedy(length_penalty):
    decoder = ContextDecoder(vocab=9, seed=3, eos_bias=2.0)
    state = decoder.initial_state(16, seed=4)
    greedy = greedy_decode(decoder, state, 16, BOS, EOS, max_len=8, return_attention=True)
    beam = beam_search(
        decoder, state, 16, BOS, EOS, beam_size=1, max_len=8, length_penalty=length_penalty, return_attention=True
    )
    assert beam.tokens == greedy.tokens
    assert beam.scores == greedy.scores  # same float operations, so bit-identical
    assert beam.finished == greedy.finished
    assert 0 < sum(greedy.finished) < 16  # the case covers both ended and cut-off hypotheses
    for a, b in zip(beam.attention, greedy.attention):
        assert torch.equal(a, b)


def test_beam_size_one_breaks_exact_ties_like_greedy():
    # Untrained models do produce exactly equal log-probs (and torch's max and topk break ties
    # differently on wide rows); both searches must then pick the same token.
    vocab = 500
    probs = torch.full((vocab, vocab), 1.0)
    probs[:, [4, 9, 200, 333]] = 50.0  # four exactly tied favourites after every token
    probs[:, EOS] = 30.0
    probs = (probs / probs.sum(1, keepdim=True)).tolist()
    decoder = MarkovDecoder(probs)
    greedy = greedy_decode(decoder, torch.zeros(3), 3, BOS, EOS, max_len=6)
    beam = beam_search(decoder, torch.zeros(3), 3, BOS, EOS, beam_size=1, max_len=6)
    assert beam.tokens == greedy.tokens and beam.scores == greedy.scores
    assert set(greedy.tokens[0]) <= {4, 9, 200, 333}


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    vocab, max_len = 4, 3
    decoder = ContextDecoder(vocab=vocab, seed=11, eos_bias=1.0)
    state = decoder.initial_state(3, seed=12)
    result = beam_search(decoder, state, 3, BOS, EOS, beam_size=64, max_len=max_len, length_penalty=length_penalty)
    for row in range(3):
        best = None
        # Every hypothesis: t tokens then <eos> (t < max_len), or max_len tokens without <eos>.
        candidates = [(list(seq), True) for t in range(max_len) for seq in itertools.product([0, 2, 3], repeat=t)]
        candidates += [(list(seq), False) for seq in itertools.product([0, 2, 3], repeat=max_len)]
        for tokens, finished in candidates:
            raw, _ = rescore(decoder, state, row, tokens, finished)
            norm = raw / length_penalty_factor(len(tokens) + finished, length_penalty)
            if best is None or norm > best[0]:
                best = (norm, raw, tokens, finished)
        assert result.tokens[row] == best[2]
        assert result.finished[row] == best[3]
        assert result.scores[row] == pytest.approx(best[1], abs=1e-5)
        assert result.normalized_scores[row] == pytest.approx(best[0], abs=1e-5)


def test_returned_score_and_attention_belong_to_returned_hypothesis():
    # Checks the beam back-pointers: re-running the returned tokens reproduces score and attention.
    decoder = ContextDecoder(vocab=12, seed=5, eos_bias=1.0)
    state = decoder.initial_state(10, src_len=6, seed=6)
    result = beam_search(decoder, state, 10, BOS, EOS, beam_size=4, max_len=9, return_attention=True)
    greedy = greedy_decode(decoder, state, 10, BOS, EOS, max_len=9)
    for row in range(10):
        score, attn = rescore(decoder, state, row, result.tokens[row], result.finished[row])
        assert result.scores[row] == pytest.approx(score, abs=1e-5)
        assert result.attention[row].shape == (len(result.tokens[row]) + result.finished[row], 6)
        assert torch.allclose(result.attention[row], attn, atol=1e-6)
        # alpha = 0: beam search never returns a worse sequence than greedy on this model
        assert result.scores[row] >= greedy.scores[row] - 1e-6
    assert any(b > g + 1e-4 for b, g in zip(result.scores, greedy.scores))  # and here it finds better ones


def test_hypothesis_returned_when_eos_never_comes():
    probs = [[0.0, 0.0, 0.55, 0.45], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.7, 0.3], [0.0, 0.0, 0.2, 0.8]]
    decoder = MarkovDecoder(probs)
    greedy = greedy_decode(decoder, torch.zeros(2), 2, BOS, EOS, max_len=5)
    beam = beam_search(decoder, torch.zeros(2), 2, BOS, EOS, beam_size=3, max_len=5, length_penalty=0.6)
    assert greedy.finished == [False, False] and beam.finished == [False, False]
    assert all(len(t) == 5 for t in greedy.tokens + beam.tokens)
    # Greedy: a (0.55), then a stays a: 0.55 * 0.7^4 = 0.132.
    assert greedy.tokens[0] == [A] * 5
    assert greedy.scores[0] == pytest.approx(math.log(0.55 * 0.7**4), abs=1e-5)
    # Beam: b (0.45) then b stays b: 0.45 * 0.8^4 = 0.184.
    assert beam.tokens[0] == [B] * 5
    assert beam.scores[0] == pytest.approx(math.log(0.45 * 0.8**4), abs=1e-5)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_result_does_not_depend_on_the_rest_of_the_batch(beam_size):
    decoder = ContextDecoder(vocab=10, seed=7, eos_bias=1.5)
    state = decoder.initial_state(6, seed=8)
    batched = beam_search(decoder, state, 6, BOS, EOS, beam_size=beam_size, max_len=10, length_penalty=0.6)
    for row in range(6):
        alone_state = decoder.reorder_state(state, torch.tensor([row]))
        alone = beam_search(decoder, alone_state, 1, BOS, EOS, beam_size=beam_size, max_len=10, length_penalty=0.6)
        assert alone.tokens[0] == batched.tokens[row]
        assert alone.scores[0] == pytest.approx(batched.scores[row], abs=1e-5)
    # and a different neighbour order (reversed batch) gives the same rows too
    reversed_state = decoder.reorder_state(state, torch.arange(5, -1, -1))
    reversed_result = beam_search(
        decoder, reversed_state, 6, BOS, EOS, beam_size=beam_size, max_len=10, length_penalty=0.6
    )
    assert reversed_result.tokens[::-1] == batched.tokens


def test_bad_arguments_are_rejected():
    decoder = MarkovDecoder([[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(decoder, torch.zeros(1), 1, 0, 1, beam_size=0, max_len=3)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(decoder, torch.zeros(1), 1, 0, 1, max_len=0)
