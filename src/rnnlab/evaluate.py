"""Stage ``evaluate``: score every trained model from its checkpoint in a fresh process.

For language models the loop is a plain PyTorch one (no Lightning, no training state): the
model is rebuilt from the checkpoint, and perplexity is token-weighted over the whole split
with the hidden state carried, exactly as pytorch/examples' ``evaluate()``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rnnlab.checkpoints import check_vocab, load_language_model
from rnnlab.data.lm_data import BPTTWindows, batchify
from rnnlab.data.vocab import Vocab
from rnnlab.training import safe_exp


@torch.inference_mode()
def stream_perplexity(model, ids: np.ndarray, batch_size: int = 10, bptt: int = 35) -> dict:
    windows = BPTTWindows(batchify(ids, batch_size), bptt)
    state = model.init_state(batch_size, "cpu")
    total, count = 0.0, 0
    for tokens, targets in windows:
        logits, state = model(tokens, state)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    loss = total / count
    return {"loss": loss, "ppl": safe_exp(loss), "bpc": loss / math.log(2), "tokens": count}


def evaluate_language_model(checkpoint: Path, prepared_dir: Path, batch_size: int, bptt: int) -> dict:
    """Score a trained LM on the test split (valid where a corpus has no test split).

    ``checkpoint``: a neural ``model.ckpt``, or a ``train_lm`` run folder (``model.ckpt`` or an
    n-gram ``ngram.npz`` inside). Neural LMs: token-weighted over the batchified stream
    (``batch_size`` columns, ``bptt`` windows, state carried). n-gram: every position 1..len-1
    of the stream (``batch_size``/``bptt`` do not apply); the same number train_lm reports.
    Returns ``{split, loss, ppl, bpc, tokens}`` (bpc = loss / ln 2, meaningful for char corpora).
    """
    from rnnlab.generate import load_ngram, model_kind

    expected = Vocab.load(prepared_dir / "vocab.json")
    split = "test" if (prepared_dir / "test.npy").exists() else "valid"
    ids = np.load(prepared_dir / f"{split}.npy")
    kind, target = model_kind(Path(checkpoint))
    if kind == "ngram":
        model, vocab, _ = load_ngram(target)
        check_vocab(vocab, expected, str(target))
        log_probs = model.log_prob(ids)
        loss = -float(np.mean(log_probs))
        return {"split": split, "loss": loss, "ppl": safe_exp(loss), "bpc": loss / math.log(2),
                "tokens": int(log_probs.size)}
    model, _, hp = load_language_model(target, expected)
    result = stream_perplexity(model, ids, batch_size, bptt)
    return {"split": split, **result}
