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

from rnnlab.checkpoints import load_language_model
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
    expected = Vocab.load(prepared_dir / "vocab.json")
    model, _, hp = load_language_model(checkpoint, expected)
    split = "test" if (prepared_dir / "test.npy").exists() else "valid"
    result = stream_perplexity(model, np.load(prepared_dir / f"{split}.npy"), batch_size, bptt)
    return {"split": split, **result}
