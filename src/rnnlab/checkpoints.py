"""Loading trained models from checkpoints, safely (``weights_only=True``) and with the vocab check."""

from __future__ import annotations

from pathlib import Path

import torch

from rnnlab.data.vocab import Vocab
from rnnlab.errors import RnnlabError
from rnnlab.models.lm import build_language_model


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RnnlabError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise RnnlabError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def check_vocab(checkpoint_vocab: Vocab, expected: Vocab | None, where: str) -> None:
    if expected is not None and checkpoint_vocab.fingerprint() != expected.fingerprint():
        raise RnnlabError(
            f"{where}: the checkpoint's vocabulary ({len(checkpoint_vocab)} tokens, {checkpoint_vocab.fingerprint()}) "
            f"does not match the saved vocabulary ({len(expected)} tokens, {expected.fingerprint()})"
        )


def load_language_model(path: str | Path, expected_vocab: Vocab | None = None):
    """Rebuild a plain LM ``nn.Module`` (eval mode) and its vocab from a train_lm checkpoint."""
    ckpt = load_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    vocab = Vocab.from_dict(ckpt["vocab"])
    check_vocab(vocab, expected_vocab, str(path))
    if hp["vocab_size"] != len(vocab):
        raise RnnlabError(f"{path}: model has {hp['vocab_size']} outputs but its vocabulary has {len(vocab)} tokens")
    model = build_language_model(hp["model_name"], hp["vocab_size"], **hp["model_hparams"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.eval()
    return model, vocab, hp
