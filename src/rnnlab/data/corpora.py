"""Corpora declared in ``params.yaml`` (section ``corpora``): the five built-ins and the user's own.

One entry per corpus, one mechanism for all (README "Your own corpora"):

- ``task``: ``lm-word`` | ``lm-char`` | ``parallel`` | ``captions``;
- ``files``: name inside ``data/raw/<corpus>/`` -> where it comes from: ``path`` (a local file,
  relative to the repository root; its sha256 is recorded in ``data/corpora.lock.json`` on the
  first download and checked on every later one) or ``url`` + ``sha256`` (required), optionally a
  member of an ``archive`` (``zip`` | ``tar``; a member ending in ``/`` is a folder, verified in a
  mirror by its ``manifest``);
- ``splits``: split name -> a file of ``files`` (parallel: ``{src: ..., tgt: ...}``), or ``carve``:
  one file (pair) cut by a deterministic rule (:class:`CarveSpec`);
- ``eval_sets``: further test sets, scored by ``evaluate`` with every model of the corpus;
- ``options``: tokenizer, lower-casing, vocabulary limits, language codes.

A profile (``profiles/<name>.yaml``) may change a corpus's ``options`` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rnnlab.config import parse_section, require
from rnnlab.errors import ConfigError

TASKS = ("lm-word", "lm-char", "parallel", "captions")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
REPO_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"


@dataclass
class FileSpec:
    path: str | None = None  # local file (or folder, ending in '/'), relative to the repository root
    url: str | None = None  # canonical download (a mirror laid out <corpus>/<name> is tried first)
    sha256: str | None = None  # required with url; for a path, recorded in the lock when absent
    archive: Literal["zip", "tar"] | None = None  # url is an archive; take `member` from it
    member: str | None = None  # archive member; ending in '/': a whole folder
    manifest: str | None = None  # folder entries: TSV (file, ..., sha256) in the mirror listing every file
    manifest_sha256: str | None = None

    def validate(self, where: str) -> None:
        if (self.path is None) == (self.url is None):
            raise ConfigError(f"{where}: give exactly one of `path` (a local file) or `url`")
        if self.url is not None and self.sha256 is None and not self.is_folder:
            raise ConfigError(
                f"{where}.sha256: missing; a file from a URL needs its sha256 (`sha256sum FILE`), "
                f"so a changed download is caught (url {self.url})"
            )
        for key in ("sha256", "manifest_sha256"):
            value = getattr(self, key)
            if value is not None and not _SHA256.match(value):
                raise ConfigError(f"{where}.{key}: expected 64 lower-case hex digits, got {value!r}")
        if (self.archive is None) != (self.member is None):
            raise ConfigError(f"{where}: `archive` and `member` go together (the member to take from the archive)")
        if self.path is not None and (self.archive or self.manifest):
            raise ConfigError(f"{where}: a local `path` takes no archive/member/manifest")
        if (self.manifest is None) != (self.manifest_sha256 is None):
            raise ConfigError(f"{where}: `manifest` and `manifest_sha256` go together")

    @property
    def is_folder(self) -> bool:
        return self.member is not None and self.member.endswith("/")


@dataclass
class CarveSpec:
    """Splits cut from one file (parallel: ``{src: ..., tgt: ...}``), in file order, deterministic:

    - ``by: lines``: the first lines are train, then ``valid`` (a fraction of the lines), then
      ``test`` (the last fraction): e.g. ``valid: 0.05, test: 0.05`` = the last 10% held out;
    - ``by: chars``: the same on characters (char LMs; the cut line is shared by both splits);
    - ``by: every_nth``: line i (from 0) goes to valid when ``i % every == every - 2``, to test
      when ``i % every == every - 1``, else to train (``every: 10`` = 80/10/10, interleaved).
      A captions corpus is carved by image (all captions of an image in one split).
    """

    file: str | dict[str, str]
    by: Literal["lines", "chars", "every_nth"]
    valid: float = 0.0
    test: float = 0.0
    every: int | None = None

    def validate(self, where: str) -> None:
        if self.by == "every_nth":
            require(self.every is not None and self.every >= 3, f"{where}.every", "an integer >= 3", self.every)
            if self.valid or self.test:
                raise ConfigError(f"{where}: by every_nth takes `every`, not valid/test fractions")
        else:
            if self.every is not None:
                raise ConfigError(f"{where}.every: only for by: every_nth")
            require(0 < self.valid < 1, f"{where}.valid", "a fraction in (0, 1)", self.valid)
            require(0 <= self.test < 1, f"{where}.test", "a fraction in [0, 1)", self.test)
            require(self.valid + self.test < 1, f"{where}", "valid + test < 1", self.valid + self.test)

    def split_names(self) -> list[str]:
        return ["train", "valid", "test"] if (self.by == "every_nth" or self.test > 0) else ["train", "valid"]


@dataclass
class OptionsSpec:
    tokenizer: Literal["whitespace", "word", "char"] = "word"
    lowercase: bool = False  # word tokenizer only
    min_freq: int = 1  # vocabulary (built from the train split only)
    max_size: int | None = None
    src_lang: str | None = None  # parallel corpora: the language codes (README, MLflow tags)
    tgt_lang: str | None = None

    def validate(self, where: str) -> None:
        require(self.min_freq >= 1, f"{where}.min_freq", "an integer >= 1", self.min_freq)
        require(self.max_size is None or self.max_size > 4, f"{where}.max_size", "null or > 4", self.max_size)
        if self.lowercase and self.tokenizer != "word":
            raise ConfigError(f"{where}.lowercase: only the word tokenizer lower-cases")


@dataclass
class CaptionsSpec:
    """A captions corpus: ``file`` (flickr8k: ``<image>#<k>\\t<caption>``; tsv: ``image\\tcaption``;
    jsonl: ``{"image": ..., "caption": ...}``) and the image folder ``images`` inside the corpus."""

    format: Literal["flickr8k", "tsv", "jsonl"]
    file: str
    images: str = "images"


@dataclass
class CorpusSpec:
    task: Literal["lm-word", "lm-char", "parallel", "captions"]
    files: dict[str, FileSpec]
    options: OptionsSpec = field(default_factory=OptionsSpec)
    splits: dict[str, Any] | None = None  # split -> file (parallel: {src, tgt}; flickr8k: image lists)
    carve: CarveSpec | None = None
    eval_sets: dict[str, Any] = field(default_factory=dict)
    captions: CaptionsSpec | None = None
    citation: str = ""
    name: str = ""  # filled from the key

    def validate(self, where: str) -> None:
        if not self.files:
            raise ConfigError(f"{where}.files: a corpus needs at least one file")
        if (self.splits is None) == (self.carve is None):
            raise ConfigError(f"{where}: give exactly one of `splits` (a file per split) or `carve` (a rule)")
        pair = self.task == "parallel"
        if self.splits is not None:
            for split, ref in self.splits.items():
                self._check_ref(ref, f"{where}.splits.{split}", pair)
            names = list(self.splits)
        else:
            self._check_ref(self.carve.file, f"{where}.carve.file", pair)
            names = self.carve.split_names()
            if self.carve.by == "chars" and self.task != "lm-char":
                raise ConfigError(f"{where}.carve.by: chars is for lm-char corpora; use lines or every_nth")
        if "train" not in names or len(names) < 2:
            raise ConfigError(f"{where}.splits: need a `train` split and at least one held-out split, got {names}")
        for name, ref in self.eval_sets.items():
            self._check_ref(ref, f"{where}.eval_sets.{name}", pair)
            if name in names:
                raise ConfigError(f"{where}.eval_sets.{name}: the name of a split; name extra sets apart")
        tok = self.options.tokenizer
        if self.task == "lm-char" and tok != "char":
            raise ConfigError(f"{where}.options.tokenizer: an lm-char corpus uses tokenizer char, got {tok!r}")
        if self.task != "lm-char" and tok == "char":
            raise ConfigError(f"{where}.options.tokenizer: char is for task lm-char")
        if pair and not (self.options.src_lang and self.options.tgt_lang):
            raise ConfigError(f"{where}.options: a parallel corpus names src_lang and tgt_lang")
        if (self.task == "captions") != (self.captions is not None):
            raise ConfigError(f"{where}.captions: required for (and only for) task captions")
        if self.captions is not None:
            self._check_ref(self.captions.file, f"{where}.captions.file", False)
            if self.eval_sets and self.captions.format == "flickr8k":
                raise ConfigError(
                    f"{where}.eval_sets: extra caption sets are captions files (format tsv or jsonl) over the "
                    f"corpus's image folder; format flickr8k has image lists instead"
                )

    def _check_ref(self, ref: Any, where: str, pair: bool) -> None:
        if pair:
            if not isinstance(ref, dict) or sorted(ref) != ["src", "tgt"]:
                raise ConfigError(f"{where}: a parallel corpus names a file pair {{src: FILE, tgt: FILE}}, got {ref!r}")
            refs = list(ref.values())
        else:
            if not isinstance(ref, str):
                raise ConfigError(f"{where}: expected a file name of `files`, got {ref!r}")
            refs = [ref]
        for r in refs:
            if r not in self.files:
                raise ConfigError(f"{where}: {r!r} is not one of this corpus's files: {sorted(self.files)}")


def parse_corpora(data: Any, where: str = "corpora") -> dict[str, CorpusSpec]:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: expected a mapping of corpus name -> its entry, got {data!r}")
    out = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            raise ConfigError(f"{where}.{name}: a corpus name is letters, digits, '_', '-', '.' (a folder name)")
        spec = parse_section(CorpusSpec, entry, f"{where}.{name}")
        if spec.name:
            raise ConfigError(f"{where}.{name}.name: a corpus is named by its key")
        spec.name = name
        out[name] = spec
    return out


def load_corpora(params: dict) -> dict[str, CorpusSpec]:
    """The ``corpora`` section of (profile-merged) params, parsed and checked."""
    if "corpora" not in params:
        raise ConfigError("params.yaml: missing section 'corpora' (the corpus declarations)")
    return parse_corpora(params["corpora"])


def get(corpora: dict[str, CorpusSpec], name: str, where: str) -> CorpusSpec:
    if name not in corpora:
        raise ConfigError(f"{where}: unknown corpus {name!r}; declared in params.yaml corpora: {sorted(corpora)}")
    return corpora[name]


def repo_corpora() -> dict[str, CorpusSpec]:
    """The repository's own declarations (``params.yaml`` beside ``src/``), for tools and tests."""
    from rnnlab.config import load_params

    return load_corpora(load_params(REPO_PARAMS))


def selected(params: dict, names: list[str], where: str) -> dict[str, CorpusSpec]:
    """``{name: CorpusSpec}`` of the corpora a stage's list (``download.corpora``) names, each declared."""
    declared = load_corpora(params)
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a corpus is listed twice: {names}")
    return {name: get(declared, name, f"{where}[{i}]") for i, name in enumerate(names)}
