"""Subword tokenizer: byte-pair encoding (Sennrich et al. 2016) learned with HF ``tokenizers``.

Same interface as :mod:`rnnlab.data.tokenize` (``tokenize`` / ``detokenize`` / ``to_dict``):

1. Pretokenize with :class:`WordTokenizer` (punctuation split; lower-cased when ``lowercase``),
   so detokenizing gives exactly what the word tokenizer's round trip gives.
2. Each word gets a leading ``▁`` (HF ``Metaspace`` pre-tokenizer, as in SentencePiece) and is
   split into learned subwords: ``"Handys" -> ["▁Hand", "ys"]``. A piece starting with ``▁``
   begins a word, so ``detokenize`` rebuilds the words without any extra bookkeeping.
3. Characters never seen in the train split become ``<unk>`` (and come back as ``<unk>``).

Training uses the train split only (``BPETokenizer.train``). We mark word starts with ``▁``
instead of the trainer's ``end_of_word_suffix``/``continuing_subword_prefix`` options because
those assign token ids in hash-map order, which makes merges with tied counts differ from run
to run (huggingface/tokenizers#1794); with ``▁`` the same train split always gives the same
merges. ``to_dict`` embeds the whole HF tokenizer JSON, so checkpoints carry it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from rnnlab.data.tokenize import Tokenizer, WordTokenizer, build_tokenizer
from rnnlab.errors import ConfigError

WORD_START = "▁"  # U+2581, as in SentencePiece
BPE_UNK = "<unk>"


class BPETokenizer:
    name = "bpe"

    def __init__(
        self, lowercase: bool = True, vocab_size: int = 8000, min_frequency: int = 2, model_json: str | None = None
    ):
        if vocab_size < 10:
            raise ConfigError(f"bpe_vocab_size: expected an integer >= 10, got {vocab_size!r}")
        self.lowercase, self.vocab_size, self.min_frequency = lowercase, vocab_size, min_frequency
        self.words = WordTokenizer(lowercase=lowercase)
        self._model: HFTokenizer | None = HFTokenizer.from_str(model_json) if model_json else None

    @staticmethod
    def _empty_model() -> HFTokenizer:
        model = HFTokenizer(models.BPE(unk_token=BPE_UNK))
        model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
        return model

    def _pretokenized(self, text: str) -> str:
        # The word-start mark must not occur inside a word, or detokenize would split there.
        return " ".join(self.words.tokenize(text.replace(WORD_START, " ")))

    def train(self, texts: Iterable[str]) -> BPETokenizer:
        """Learn merges from ``texts`` (the train split only); returns self."""
        model = self._empty_model()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=[BPE_UNK],
            show_progress=False,
        )
        model.train_from_iterator((self._pretokenized(t) for t in texts), trainer)
        self._model = model
        return self

    @property
    def model(self) -> HFTokenizer:
        if self._model is None:
            raise RuntimeError("BPETokenizer is not trained: call train(train_texts) or load it")
        return self._model

    def tokenize(self, text: str) -> list[str]:
        words = self._pretokenized(text)
        return self.model.encode(words).tokens if words else []

    def detokenize(self, tokens: list[str]) -> str:
        words: list[str] = []
        for piece in tokens:
            if piece.startswith(WORD_START) or not words:
                words.append(piece[len(WORD_START) :] if piece.startswith(WORD_START) else piece)
            else:
                words[-1] += piece
        return self.words.detokenize([w for w in words if w])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "lowercase": self.lowercase,
            "vocab_size": self.vocab_size,
            "min_frequency": self.min_frequency,
            "model_json": self.model.to_str(),
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def tokenizer_from_dict(spec: dict) -> Tokenizer:
    """Rebuild any tokenizer from its ``to_dict()`` (BPE here, the others via ``build_tokenizer``)."""
    if spec.get("name") == BPETokenizer.name:
        options = {k: v for k, v in spec.items() if k != "name"}
        if not options.get("model_json"):
            raise ConfigError("bpe tokenizer spec has no trained model (model_json); train it on the train split")
        return BPETokenizer(**options)
    return build_tokenizer(spec)
