"""Sampling text from a trained language model (neural checkpoint, or an n-gram model file).

``--run`` accepts a checkpoint path or an MLflow run id (the run's ``model/model.ckpt``
artifact is fetched). The vocabulary and tokenizer come from the checkpoint / model file, so
generation never rebuilds them from data.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from rnnlab.data.vocab import EOS, Vocab
from rnnlab.errors import RnnlabError


def resolve_model_path(run: str, artifact: str = "model") -> Path:
    """A local path as is (checkpoint file or a ``data/models/lm/<run>/`` folder); otherwise treat
    ``run`` as an MLflow run id and download its ``model`` artifact folder (``model.ckpt`` for a
    neural LM; ``ngram.npz`` + ``vocab.json`` + ``run.json`` for an n-gram)."""
    path = Path(run)
    if path.exists():
        return path
    if not re.fullmatch(r"[0-9a-f]{32}", run):
        raise RnnlabError(f"{run}: no such checkpoint file or model folder (nor an MLflow run id: 32 hex digits)")
    try:
        import mlflow
    except ImportError as exc:
        raise RnnlabError(f"{run}: no such file, and mlflow is not installed to look it up as a run id") from exc
    from rnnlab.tracking import default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run, artifact_path=artifact))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown runs
        raise RnnlabError(f"{run}: not a file and not an MLflow run with artifact {artifact} ({exc})") from exc


NGRAM_FILE = "ngram.npz"


def model_kind(path: Path) -> tuple[str, Path]:
    """('ngram', folder) or ('neural', model.ckpt) for a checkpoint file or a model folder."""
    path = Path(path)
    if path.is_dir():
        if (path / NGRAM_FILE).is_file():
            return "ngram", path
        if (path / "model.ckpt").is_file():
            return "neural", path / "model.ckpt"
        raise RnnlabError(f"{path}: folder holds neither model.ckpt nor {NGRAM_FILE}")
    if path.name == NGRAM_FILE:
        return "ngram", path.parent
    return "neural", path


def load_ngram(folder: Path):
    """-> (KneserNeyLanguageModel, Vocab, char_level) from a train_lm n-gram folder."""
    import json

    from rnnlab.models.ngram import KneserNeyLanguageModel

    folder = Path(folder)
    for name in (NGRAM_FILE, "vocab.json"):
        if not (folder / name).is_file():
            raise RnnlabError(f"{folder}: n-gram model folder lacks {name}")
    model = KneserNeyLanguageModel.load(folder / NGRAM_FILE)
    vocab = Vocab.load(folder / "vocab.json")
    if model.vocab_size != len(vocab):
        raise RnnlabError(f"{folder}: n-gram has {model.vocab_size} words but vocab.json has {len(vocab)}")
    char_level = False
    if (folder / "run.json").is_file():
        char_level = bool(json.loads((folder / "run.json").read_text()).get("char_level", False))
    elif (folder / "tokenizer.json").is_file():
        char_level = json.loads((folder / "tokenizer.json").read_text()).get("name") == "char"
    return model, vocab, char_level


def sample_ngram(model, vocab: Vocab, prompt: str, n_tokens: int, temperature: float = 1.0, seed: int = 0,
                 char_level: bool = False) -> str:
    if temperature <= 0:
        raise RnnlabError(f"temperature must be > 0, got {temperature}")
    ids = prompt_ids(prompt, vocab, char_level)
    if not prompt:
        ids = [vocab.eos_id]  # start of a line
    out = model.generate(ids, n_tokens, temperature, seed)
    return detokenize(vocab.decode(out), char_level)


def load_sampler(path: str | Path):
    """Load a neural checkpoint / model folder / n-gram folder once ->
    ``sample(prompt, n_tokens, temperature=1.0, seed=0) -> str``."""
    kind, target = model_kind(Path(path))
    if kind == "ngram":
        model, vocab, char_level = load_ngram(target)
        return functools.partial(sample_ngram, model, vocab, char_level=char_level)
    from rnnlab.checkpoints import load_language_model

    model, vocab, hp = load_language_model(target)
    char_level = (hp.get("tokenizer") or {}).get("name") == "char"
    return functools.partial(sample_neural, model, vocab, char_level=char_level)


def sample_from_path(path: str | Path, prompt: str, n_tokens: int, temperature: float = 1.0, seed: int = 0) -> str:
    """One sample (what ``rnnlab generate`` runs)."""
    return load_sampler(path)(prompt, n_tokens, temperature, seed)


def prompt_ids(prompt: str, vocab: Vocab, char_level: bool) -> list[int]:
    tokens = list(prompt) if char_level else prompt.split()
    return vocab.encode(tokens) if tokens else [vocab.eos_id]


@torch.inference_mode()
def sample_neural(model, vocab: Vocab, prompt: str, n_tokens: int, temperature: float = 1.0, seed: int = 0,
                  char_level: bool = False) -> str:
    if temperature <= 0:
        raise RnnlabError(f"temperature must be > 0, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    ids = prompt_ids(prompt, vocab, char_level)
    state = model.init_state(1, "cpu")
    logits, state = model(torch.tensor(ids).view(-1, 1), state)  # prime on the whole prompt
    out: list[int] = []
    for _ in range(n_tokens):
        probs = torch.softmax(logits[-1, 0].float() / temperature, dim=-1)
        # Never sample <pad> or <bos>; <unk> is a real PTB word and <eos> ends a line, so both stay.
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
