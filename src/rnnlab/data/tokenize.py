"""Tokenizers.

Every tokenizer implements the same small interface so a subword (BPE) tokenizer can be
dropped in later: ``tokenize(text) -> list[str]`` and ``detokenize(tokens) -> str``, plus
``name`` and ``to_dict()`` so the choice is saved next to the vocabulary and reused at inference.
"""

from __future__ import annotations

import re
from typing import Protocol

from rnnlab.errors import ConfigError


class Tokenizer(Protocol):
    name: str

    def tokenize(self, text: str) -> list[str]: ...

    def detokenize(self, tokens: list[str]) -> str: ...

    def to_dict(self) -> dict: ...


class WhitespaceTokenizer:
    """For corpora that ship pre-tokenized (PTB, WikiText-2): split on whitespace."""

    name = "whitespace"

    def tokenize(self, text: str) -> list[str]:
        return text.split()

    def detokenize(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def to_dict(self) -> dict:
        return {"name": self.name}


# Words (with inner apostrophes/hyphens), numbers, or any single non-space symbol.
_WORD_RE = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]", re.UNICODE)
# Detokenization: no space before closing punctuation, none after opening brackets.
_NO_SPACE_BEFORE = set(".,!?;:%)]}'\"")
_NO_SPACE_AFTER = set("([{")


class WordTokenizer:
    """Raw text (Multi30k, captions): optional lower-casing and punctuation splitting."""

    name = "word"

    def __init__(self, lowercase: bool = True):
        self.lowercase = lowercase

    def tokenize(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        return _WORD_RE.findall(text)

    def detokenize(self, tokens: list[str]) -> str:
        out = ""
        for i, tok in enumerate(tokens):
            if i > 0 and tok not in _NO_SPACE_BEFORE and tokens[i - 1] not in _NO_SPACE_AFTER:
                out += " "
            out += tok
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "lowercase": self.lowercase}


class CharTokenizer:
    """Character level (Tiny Shakespeare): every character, newline included, is a token."""

    name = "char"

    def tokenize(self, text: str) -> list[str]:
        return list(text)

    def detokenize(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def to_dict(self) -> dict:
        return {"name": self.name}


TOKENIZERS = {"whitespace": WhitespaceTokenizer, "word": WordTokenizer, "char": CharTokenizer}


def build_tokenizer(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from ``to_dict()`` output (or a params section)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TOKENIZERS:
        raise ConfigError(f"tokenizer name {name!r} is unknown; expected one of {sorted(TOKENIZERS)}")
    try:
        return TOKENIZERS[name](**spec)
    except TypeError as exc:
        raise ConfigError(f"tokenizer {name!r}: bad options {spec}: {exc}") from exc
