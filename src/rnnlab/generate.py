"""Text generation from a trained language model (``rnnlab generate``, the run's samples.txt, serving).

:func:`sample` takes a loaded model (:func:`rnnlab.tasks.lm.load`): a neural LM is primed on the
prompt and then samples token by token from softmax(logits / temperature) with its state carried;
the n-gram samples from its Kneser-Ney next-token distribution. ``<pad>`` and ``<bos>`` are never
sampled, nor ``<unk>`` unless ``allow_unk`` (PTB has it as a word, but people do not write it; the
same rule as translation and captioning, :class:`rnnlab.decoding.OutputRules`); ``<eos>`` ends a
line (a newline in the text).
"""

from __future__ import annotations

import torch

from rnnlab.data.vocab import EOS, Vocab
from rnnlab.decoding import OutputRules
from rnnlab.errors import RnnlabError


def check_sampling(n_tokens: int, temperature: float, dashes: str = "") -> None:
    """The sampling arguments (``rnnlab generate`` checks them with ``dashes="--"`` before it loads a model)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise RnnlabError(f"{dashes}tokens: expected an integer >= 1, got {n_tokens!r}")
    if not temperature > 0:  # also rejects NaN
        raise RnnlabError(f"{dashes}temperature: expected a number > 0, got {temperature!r}")


def sample(lm, prompt: str, n_tokens: int, temperature: float = 1.0, seed: int = 0, allow_unk: bool = False) -> str:
    """One sample of ``n_tokens`` tokens after ``prompt`` from a :class:`rnnlab.tasks.lm.LoadedLM`."""
    check_sampling(n_tokens, temperature)
    banned = OutputRules(allow_unk=allow_unk).banned_ids()
    if lm.kind == "ngram":
        ids = prompt_ids(prompt, lm.vocab, lm.char_level) if prompt else [lm.vocab.eos_id]  # start of a line
        out = lm.model.generate(ids, n_tokens, temperature, seed, banned_ids=banned)
        return detokenize(lm.vocab.decode(out), lm.char_level)
    return sample_neural(lm.model, lm.vocab, prompt, n_tokens, temperature, seed, lm.char_level, allow_unk)


def prompt_ids(prompt: str, vocab: Vocab, char_level: bool) -> list[int]:
    tokens = list(prompt) if char_level else prompt.split()
    return vocab.encode(tokens) if tokens else [vocab.eos_id]


@torch.inference_mode()
def sample_neural(
    model,
    vocab: Vocab,
    prompt: str,
    n_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    char_level: bool = False,
    allow_unk: bool = False,
) -> str:
    check_sampling(n_tokens, temperature)
    banned = OutputRules(allow_unk=allow_unk).banned_ids()
    generator = torch.Generator().manual_seed(seed)
    ids = prompt_ids(prompt, vocab, char_level)
    state = model.init_state(1, "cpu")
    logits, state = model(torch.tensor(ids).view(-1, 1), state)  # prime on the whole prompt
    out: list[int] = []
    for _ in range(n_tokens):
        probs = torch.softmax(logits[-1, 0].float() / temperature, dim=-1)
        probs[banned] = 0.0
        nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
    return detokenize(vocab.decode(out), char_level)


def detokenize(tokens: list[str], char_level: bool) -> str:
    if char_level:
        return "".join(tokens)
    return " ".join("\n" if t == EOS else t for t in tokens).replace(" \n ", "\n").replace(" \n", "\n")
