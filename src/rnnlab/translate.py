"""``rnnlab translate``: English -> German with a ``train_seq2seq`` model.

    rnnlab translate "A man is riding a bike." [--beam 5] [--run ID_or_model_dir]
    cat sentences.en | rnnlab translate --beam 5 > sentences.de

``--run`` (default ``data/models/seq2seq/multi30k-attention``) is a model folder written by the
stage, a ``model.ckpt`` file, or an MLflow run id (32 hex digits; the run's ``model/`` artifact
folder is downloaded, as ``rnnlab generate`` does for language models).

Bad input:

- A sentence given as the argument that is empty or whitespace-only is an error (exit code 2).
  On stdin, such a line gives an **empty output line** (so output line i always belongs to input
  line i), and a count of those lines is reported on stderr.
- Sentences longer than the model's ``max_len`` tokens are truncated to it; the count is reported
  on stderr (never a crash).
- Unknown words (and, with BPE, unseen characters) become ``<unk>``.
- A ``vocab.*.json`` beside the checkpoint that does not match the checkpoint's own vocabulary
  is an error naming both sizes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from rnnlab.errors import RnnlabError

DEFAULT_RUN = "data/models/seq2seq/multi30k-attention"
STDIN_BATCH = 256  # lines translated together when stdin is a file or a pipe


def resolve_translation_model(run: str | Path) -> Path:
    """A model folder or checkpoint path as is; an MLflow run id -> its downloaded ``model/`` folder."""
    path = Path(run)
    if path.exists():
        return path
    from rnnlab.generate import resolve_model_path

    if str(run) == DEFAULT_RUN:
        raise RnnlabError(f"{run}: no such model folder; train it with `dvc repro train_seq2seq` or pass --run")
    return resolve_model_path(str(run), artifact="model")


def load_translator(model: str | Path):
    """(TranslationTask in eval mode on CPU, its folder) from a model folder / checkpoint / run id."""
    from rnnlab.data.vocab import Vocab
    from rnnlab.tasks.seq2seq_task import load_translation_task

    path = resolve_translation_model(model)
    folder, ckpt = (path, path / "model.ckpt") if path.is_dir() else (path.parent, path)
    if not ckpt.is_file():
        raise RnnlabError(f"{ckpt}: checkpoint not found (expected a train_seq2seq model folder)")
    expected = [Vocab.load(folder / f"vocab.{side}.json") if (folder / f"vocab.{side}.json").is_file() else None
                for side in ("src", "tgt")]
    return load_translation_task(ckpt, expected_src_vocab=expected[0], expected_tgt_vocab=expected[1]), folder


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\r\n"))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def translate_lines(task, lines: list[str], beam: int) -> tuple[list[str], int, int]:
    """Translations (``""`` for blank lines), number of blank lines, number truncated."""
    keep = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    truncated = 0
    if keep:
        for i, hyp in zip(keep, task.translate([lines[i] for i in keep], beam_size=beam)):
            out[i] = hyp
        truncated = task.last_truncated
    return out, len(lines) - len(keep), truncated


def translate_command(sentence: str | None, beam: int = 5, run: str = DEFAULT_RUN, stdin=None, stdout=None,
                      stderr=None) -> int:
    """The ``rnnlab translate`` command body; returns the number of sentences translated."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if beam < 1:
        raise RnnlabError(f"--beam: expected an integer >= 1, got {beam}")
    if sentence is not None and not sentence.strip():
        raise RnnlabError("the sentence to translate is empty or whitespace-only")
    task, _ = load_translator(run)
    if sentence is not None:
        (hyp,), _, truncated = translate_lines(task, [sentence], beam)
        print(hyp, file=stdout)
        blank = 0
        done = 1
    else:
        interactive = hasattr(stdin, "isatty") and stdin.isatty()
        done = blank = truncated = 0
        for lines in _batches(stdin, 1 if interactive else STDIN_BATCH):
            hyps, n_blank, n_cut = translate_lines(task, lines, beam)
            for hyp in hyps:
                print(hyp, file=stdout, flush=interactive)
            done += len(lines) - n_blank
            blank += n_blank
            truncated += n_cut
    if blank:
        print(f"rnnlab translate: {blank} empty or whitespace-only line(s) gave empty output lines", file=stderr)
    if truncated:
        print(f"rnnlab translate: warning: {truncated} sentence(s) longer than {task.hparams.decode_max_len} tokens "
              "were truncated", file=stderr)
    return done
