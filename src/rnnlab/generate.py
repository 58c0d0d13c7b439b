"""Text generation from a trained language model (``rnnlab generate``, the run's samples.txt, serving).

:func:`sample` takes a loaded model (:func:`rnnlab.tasks.lm.load`): a neural LM is primed on the
prompt and then samples token by token from softmax(logits / temperature) with its state carried;
the n-gram samples from its Kneser-Ney next-token distribution. ``<pad>`` and ``<bos>`` are never
sampled; ``<unk>`` is a real PTB word and ``<eos>`` ends a line (a newline in the text).
"""

from __future__ import annotations

import torch

from rnnlab.data.vocab import EOS, Vocab
from rnnlab.errors import RnnlabError


def sample(lm, prompt: str, n_tokens: int, temperature: float = 1.0, seed: int = 0) -> str:
    """One sample of ``n_tokens`` tokens after ``prompt`` from a :class:`rnnlab.tasks.lm.LoadedLM`."""
    if temperature <= 0:
        raise RnnlabError(f"temperature must be > 0, got {temperature}")
    if lm.kind == "ngram":
        ids = prompt_ids(prompt, lm.vocab, lm.char_level) if prompt else [lm.vocab.eos_id]  # start of a line
        out = lm.model.generate(ids, n_tokens, temperature, seed)
        return detokenize(lm.vocab.decode(out), lm.char_level)
    return sample_neural(lm.model, lm.vocab, prompt, n_tokens, temperature, seed, lm.char_level)


def prompt_ids(prompt: str, vocab: Vocab, char_level: bool) -> list[int]:
    tokens = list(prompt) if char_level else prompt.split()
    return vocab.encode(tokens) if tokens else [vocab.eos_id]


@torch.inference_mode()
def sample_neural(
    model, vocab: Vocab, prompt: str, n_tokens: int, temperature: float = 1.0, seed: int = 0, char_level: bool = False
) -> str:
    if temperature <= 0:
        raise RnnlabError(f"temperature must be > 0, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    ids = prompt_ids(prompt, vocab, char_level)
    state = model.init_state(1, "cpu")
    logits, state = model(torch.tensor(ids).view(-1, 1), state)  # prime on the whole prompt
    out: list[int] = []
    for _ in range(n_tokens):
        probs = torch.softmax(logits[-1, 0].float() / temperature, dim=-1)
        probs[vocab.pad_id] = 0.0
        probs[vocab.bos_id] = 0.0
        nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
    return detokenize(vocab.decode(out), char_level)


def detokenize(tokens: list[str], char_level: bool) -> str:
    if char_level:
        return "".join(tokens)
    return " ".join("\n" if t == EOS else t for t in tokens).replace(" \n ", "\n").replace(" \n", "\n")
