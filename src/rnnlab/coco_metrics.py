"""The captioning field's metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D from the COCO caption toolkit.

:func:`coco_caption_scores` computes the numbers captioning papers report, with the COCO caption
evaluation code as packaged on PyPI (``pycocoevalcap``, the code behind the MS-COCO evaluation
server): its ``Bleu(4)``, ``Meteor``, ``Rouge`` and ``Cider`` scorers, on text tokenised by its
Stanford ``PTBTokenizer`` jar. Corpus scores, 0-100 scale (see the function's docstring).

These are **not** the BLEU numbers of :mod:`rnnlab.caption_eval`, which scores rnnlab's own
``WordTokenizer`` tokens with sacrebleu: same BLEU definition, different tokenisation (the
toolkit drops punctuation, WordTokenizer keeps it as tokens) and the toolkit's tiny smoothing
constants (see below), so the two are not interchangeable: report the ones named here as "COCO".

Java: METEOR (``meteor-1.5.jar``) and the PTB tokenizer (``stanford-corenlp-3.4.1.jar``) run on a
Java runtime (Debian: ``apt-get install default-jre-headless``). Without ``java`` on PATH the call
raises :class:`~rnnlab.errors.RnnlabError`, unless the caller opts out of both explicitly
(``meteor=False, tokenizer="none"``): nothing is ever skipped silently.

Cost, measured on a shared 2-core machine: 1,000 images x 5 references take 10-13 s, 9-12 s
of it METEOR (its JVM loads a 60 MB paraphrase table first and holds ~1 GB);
``meteor=False`` takes 1.2-1.6 s (0.4-0.5 s of it the PTB tokenizer).

SPICE (``pycocoevalcap.spice``) is not offered: on first use it downloads Stanford CoreNLP models
(``get_stanford_models.py``), which machines without internet cannot do, so it is unavailable
offline and never called here.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb

from rnnlab.errors import RnnlabError

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d")
JAVA_HINT = "apt-get install default-jre-headless"
TOKENIZERS = ("ptb", "none")

# Characters that Java's PTBLexer (or the METEOR line protocol) would take as a line break, plus
# the C0 separators Python's str.splitlines() splits on. A caption holding one would shift every
# later caption onto the wrong image, so they become spaces before any text reaches Java.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def _as_items(hypotheses, references) -> tuple[list[str], list[str], list[list[str]]]:
    """Validate the inputs; return (ids, hypothesis strings, reference lists) aligned by position."""
    if isinstance(hypotheses, str):
        raise RnnlabError("hypotheses must be a list of strings or a dict id -> string, not one string")
    if isinstance(hypotheses, Mapping):
        ids = list(hypotheses)
        hyps = [hypotheses[k] for k in ids]
        if isinstance(references, Mapping):
            if set(references) != set(ids):
                missing, extra = set(ids) - set(references), set(references) - set(ids)
                raise RnnlabError(
                    f"hypothesis and reference ids differ: {len(missing)} ids without references "
                    f"(e.g. {sorted(map(str, missing))[:3]}), {len(extra)} references without a "
                    f"hypothesis (e.g. {sorted(map(str, extra))[:3]})"
                )
            refs = [references[k] for k in ids]
        else:
            refs = references
    else:
        if isinstance(references, Mapping):
            raise RnnlabError("references given as a dict need hypotheses as a dict with the same ids")
        hyps = list(hypotheses)
        ids = [str(i) for i in range(len(hyps))]
        refs = references
    if isinstance(refs, str) or not isinstance(refs, Sequence):
        raise RnnlabError("references must be a list (one list of reference strings per hypothesis)")
    refs = list(refs)
    if len(hyps) != len(refs):
        raise RnnlabError(f"{len(hyps)} hypotheses but {len(refs)} reference sets: they must pair up one to one")
    if not hyps:
        raise RnnlabError("no hypotheses to score: the hypothesis set is empty")
    for key, hyp, rs in zip(ids, hyps, refs):
        if not isinstance(hyp, str):
            raise RnnlabError(f"hypothesis {key!r} is a {type(hyp).__name__}, not a string")
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise RnnlabError(
                f"references of {key!r} must be a list of strings, not {type(rs).__name__} "
                "(pass one list of references per hypothesis)"
            )
        if len(rs) == 0:
            raise RnnlabError(f"hypothesis {key!r} has no references")
        for r in rs:
            if not isinstance(r, str) or not r.strip():
                raise RnnlabError(f"hypothesis {key!r} has a blank or non-string reference: {r!r}")
    return ids, hyps, [list(r) for r in refs]


def ptb_tokenize(texts: Sequence[str], timeout_s: float = 300.0) -> list[str]:
    """The COCO toolkit's tokenisation of each text: one space-joined token string per input.

    Same as ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer.tokenize``: the toolkit's own
    ``stanford-corenlp-3.4.1.jar``, run as ``java -cp JAR edu.stanford.nlp.process.PTBTokenizer
    -preserveLines -lowerCase FILE``, then the toolkit's ``PUNCTUATIONS`` tokens dropped. The
    differences are only in plumbing, none in the tokens (a test checks equality with the toolkit
    class on Flickr8k captions): the temporary file goes to a fresh temporary directory instead
    of inside site-packages (which may be read-only), every line-break character within a text
    becomes a space (the toolkit replaces only ``\\n``; ``\\r``, ``\\v``, ``\\f`` or U+2028 would
    make Java start a new line and silently shift all later captions), and the number of output
    lines is checked (a mismatch raises instead of mis-pairing captions with images).
    """
    texts = list(texts)
    if not texts:
        return []
    java = shutil.which("java")
    if java is None:
        raise RnnlabError(f"PTB tokenization (the toolkit's Stanford tokenizer) needs a Java runtime: {JAVA_HINT}")
    jar = Path(_ptb.__file__).resolve().parent / _ptb.STANFORD_CORENLP_3_4_1_JAR
    lines = [t.translate(_LINE_BREAKS) for t in texts]
    with tempfile.TemporaryDirectory(prefix="rnnlab-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        cmd = [
            java,
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            str(path),
        ]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RnnlabError(f"PTB tokenizer did not finish {len(texts)} captions in {timeout_s:g}s") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[-800:]
        raise RnnlabError(f"PTB tokenizer (java) failed with exit code {proc.returncode}: {err}")
    out = proc.stdout.decode("utf-8").split("\n")
    if out and out[-1] == "":
        out.pop()  # the final newline
    if len(out) != len(texts):
        raise RnnlabError(
            f"PTB tokenizer returned {len(out)} lines for {len(texts)} captions: "
            "refusing to pair tokenised captions with the wrong images"
        )
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _ptb.PUNCTUATIONS) for line in out]


class _MeteorRun:
    """The toolkit's :class:`Meteor` (one ``java -jar meteor-1.5.jar -stdio`` child) with a bounded life.

    The toolkit's class starts its java process in ``__init__`` and only kills it in ``__del__``,
    which also re-takes a lock that ``compute_score`` never releases if it fails, so a failed run
    would hang at garbage collection. Here the process is closed explicitly in ``close()`` (stdin
    EOF, which makes METEOR exit; kill after 10 s; the process is reaped, so no zombie), the lock
    is released if a failure left it held, stderr is drained by a thread (so a chatty JVM cannot
    fill the pipe and block), and a watchdog kills the process after ``timeout_s`` so a stuck JVM
    turns into an error instead of a hang.
    """

    def __init__(self, timeout_s: float):
        self.meteor = Meteor()
        self.proc = self.meteor.meteor_p
        self.stderr_tail = b""
        self.timed_out = False
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._watchdog = threading.Timer(timeout_s, self._kill_on_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _read_stderr(self) -> None:
        try:
            for chunk in iter(lambda: self.proc.stderr.read(4096), b""):
                self.stderr_tail = (self.stderr_tail + chunk)[-2000:]
        finally:  # closed by its reader: closing it from another thread would block on the read
            self.proc.stderr.close()

    def _kill_on_timeout(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def score(self, gts: dict, res: dict) -> float:
        score, _ = self.meteor.compute_score(gts, res)
        return float(score)

    def close(self) -> None:
        self._watchdog.cancel()
        if self.meteor.lock.locked():  # compute_score failed half-way: let the toolkit's __del__ proceed
            self.meteor.lock.release()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)  # the process is gone, so stderr is at EOF
        self.proc.stdout.close()


def _meteor(gts: dict, res: dict, timeout_s: float) -> float:
    try:
        run = _MeteorRun(timeout_s)
    except OSError as exc:
        raise RnnlabError(f"METEOR could not start java ({exc}): {JAVA_HINT}") from exc
    try:
        return run.score(gts, res)
    except (ValueError, OSError) as exc:  # empty line from a dead process, or a broken pipe
        run.close()
        err = run.stderr_tail.decode("utf-8", "replace").strip()
        if run.timed_out:
            raise RnnlabError(
                f"METEOR did not finish {len(res)} captions in {timeout_s:g}s (java process killed)"
            ) from exc
        raise RnnlabError(f"METEOR (java) stopped with exit code {run.proc.returncode}: {err[-800:] or exc}") from exc
    finally:
        run.close()


def coco_caption_scores(
    hypotheses: Mapping[str, str] | Sequence[str],
    references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]],
    *,
    meteor: bool = True,
    tokenizer: str = "ptb",
    timeout_s: float = 600.0,
) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of captions, as the COCO caption toolkit computes them.

    ``hypotheses``: one generated caption per image, a list or a dict ``image id -> caption``.
    ``references``: for each hypothesis, the list of its reference captions (all of them, e.g. 5
    for Flickr8k/COCO): a list aligned with the hypotheses (a dict's insertion order), or a dict
    with exactly the hypotheses' ids. Raw text is fine: with ``tokenizer="ptb"`` (default)
    hypotheses and references are lower-cased and tokenised by the toolkit's Stanford
    PTBTokenizer with its punctuation dropped (:func:`ptb_tokenize`), as for the COCO server's
    numbers. ``tokenizer="none"`` takes the text as already tokenised (split on whitespace,
    nothing lower-cased or dropped) and needs no Java.

    ``meteor=False`` leaves METEOR out (the result then has no ``"meteor"`` key): an explicit
    choice for machines without Java. With ``meteor=True`` (default) a missing ``java`` raises
    :class:`~rnnlab.errors.RnnlabError`. ``timeout_s`` bounds each Java step (tokenizer, METEOR);
    past it the process is killed and RnnlabError raised. METEOR's java process is always
    terminated before this returns or raises.

    Returns ``{"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d"}`` as floats on
    the papers' **0-100 scale**: the toolkit's value x 100 (so BLEU, METEOR and ROUGE-L lie in
    0..100; CIDEr-D, whose toolkit value lies in 0..10, lies in 0..1000 and is read like the
    "CIDEr 120.1" of papers, i.e. toolkit 1.201).

    What each toolkit scorer computes (checked against pycocoevalcap 1.2's source):

    * ``Bleu(4)``: corpus BLEU-n (n = 1..4) with clipped n-gram counts against the maximum count
      in any reference, uniform weights, brevity penalty from the summed closest reference lengths
      (ties to the shorter), no smoothing other than the constants 1e-15 added to every matched
      count and 1e-9 to every n-gram total: a perfect match gives 99.9999999..., a set with no
      4-gram match gives a small positive BLEU-4 (e.g. 0.008 here) instead of 0. A hypothesis
      shorter than n words adds no n-grams to the denominator (nltk's ``corpus_bleu`` adds one).
    * ``Meteor``: METEOR 1.5 (``-l en -norm``: exact, stem, synonym and paraphrase matching),
      corpus score of the jar's ``EVAL`` over all images' statistics, not the mean of per-image scores.
    * ``Rouge``: ROUGE-L per image (LCS with each reference; the max precision and the max recall
      over references, combined as F with beta = 1.2), averaged over images.
    * ``Cider``: **CIDEr-D**, although the class and its ``method()`` say "CIDEr": it is the
      variant the COCO server reports as CIDEr, with the source's three CIDEr-D changes to the
      original CIDEr: hypothesis tf-idf weights clipped by the reference's (``min(vec_hyp,
      vec_ref) * vec_ref``, "added clipping"), the Gaussian length penalty
      ``exp(-(l_hyp - l_ref)^2 / (2 * 6.0^2))`` ("added a length based gaussian penalty",
      sigma = 6.0), and the factor 10; no stemming. Per image: the mean over n = 1..4 of that
      clipped, penalised cosine, averaged over the image's references, times 10; the corpus score
      is the mean over images. Details of the source worth knowing: term frequencies are raw
      counts; idf is ``log(N images) - log(max(1, df))`` with ``df`` the number of images whose
      references contain the n-gram, computed **from the references passed in this call** (so
      the score of a subset differs from the score of the whole split, and a single image always
      scores 0); the length ``l`` counts bigrams (words - 1; the same difference as words except
      for empty or one-word captions).

    SPICE is not computed: it downloads Stanford models at run time, unavailable offline.
    """
    if tokenizer not in TOKENIZERS:
        raise RnnlabError(f"tokenizer must be one of {TOKENIZERS}, not {tokenizer!r}")
    ids, hyps, refs = _as_items(hypotheses, references)
    if (meteor or tokenizer == "ptb") and shutil.which("java") is None:
        if meteor:
            raise RnnlabError(
                f"METEOR needs a Java runtime: {JAVA_HINT} (so does tokenizer='ptb'; to score "
                "without Java pass meteor=False and tokenizer='none' with pre-tokenised text)"
            )
        raise RnnlabError(
            f"PTB tokenization (tokenizer='ptb') needs a Java runtime: {JAVA_HINT} "
            "(or pass tokenizer='none' with pre-tokenised text)"
        )

    if tokenizer == "ptb":
        flat = ptb_tokenize(hyps + [r for rs in refs for r in rs], timeout_s=timeout_s)
        tok_hyps, rest = flat[: len(hyps)], iter(flat[len(hyps) :])
        tok_refs = [[next(rest) for _ in rs] for rs in refs]
    else:
        tok_hyps = [" ".join(h.split()) for h in hyps]
        tok_refs = [[" ".join(r.split()) for r in rs] for rs in refs]
    # The METEOR line protocol separates fields by '|||'; the toolkit strips it from hypotheses only.
    gts = {k: [r.replace("|||", "") for r in rs] for k, rs in zip(ids, tok_refs)}
    res = {k: [h.replace("|||", "")] for k, h in zip(ids, tok_hyps)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{n}": 100.0 * float(b) for n, b in enumerate(bleu, start=1)}
    if meteor:
        scores["meteor"] = 100.0 * _meteor(gts, res, timeout_s)
    rouge, _ = Rouge().compute_score(gts, res)
    scores["rouge_l"] = 100.0 * float(rouge)
    cider, _ = Cider().compute_score(gts, res)
    scores["cider_d"] = 100.0 * float(cider)
    return {m: scores[m] for m in METRICS if m in scores}
