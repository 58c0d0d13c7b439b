"""rnnlab.coco_metrics: the COCO caption toolkit's BLEU/METEOR/ROUGE-L/CIDEr-D, checked against known values.

Known values are hand-computed (BLEU, ROUGE-L, CIDEr-D on tiny inputs), nltk's corpus_bleu, the
toolkit's own pipeline (pycocoevalcap's PTBTokenizer + scorers, as in its eval.py, minus SPICE),
and on real Flickr8k captions the relation that must hold (true references beat references
shuffled between images) plus frozen values. Tests that run Java (METEOR, the PTB tokenizer) are
skipped where ``java`` is missing, unless RNNLAB_REQUIRE_JAVA=1 (set by .ci/run, which installs it).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import defaultdict

import psutil
import pytest

from rnnlab.coco_metrics import METRICS, coco_caption_scores, ptb_tokenize
from rnnlab.errors import RnnlabError

needs_java = pytest.mark.skipif(
    shutil.which("java") is None and os.environ.get("RNNLAB_REQUIRE_JAVA") != "1",
    reason="no java on PATH (apt-get install default-jre-headless; RNNLAB_REQUIRE_JAVA=1 makes this a failure)",
)

N_IMAGES = 100  # Flickr8k test-split images used by the real-caption tests


def _java_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "java" in child.name() or child.status() == psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


# ------------------------------------------------------------------------------------------------
# Hand-computed values (tokenizer="none", so no Java needed unless METEOR is asked for)
# ------------------------------------------------------------------------------------------------
def test_bleu_hand_computed():
    """hyp 'the cat sat on the mat' vs refs 'the cat is on the mat' / 'there is a cat on the mat':
    clipped matches 5/6 unigrams, 3/5 bigrams, 1/4 trigrams, 0/3 4-grams; closest ref length 6 -> BP 1."""
    s = coco_caption_scores(
        ["the cat sat on the mat"],
        [["the cat is on the mat", "there is a cat on the mat"]],
        meteor=False,
        tokenizer="none",
    )
    assert s["bleu1"] == pytest.approx(100 * 5 / 6, abs=1e-6)
    assert s["bleu2"] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert s["bleu3"] == pytest.approx(50.0, abs=1e-6)  # (5/6 * 3/5 * 1/4) ** (1/3) = 0.125 ** (1/3)
    assert 0 < s["bleu4"] < 0.01  # no 4-gram match: only the toolkit's 1e-15 constant is left


def test_bleu_brevity_penalty_hand_computed():
    """'the cat' vs 'the cat sat': all n-grams match, BP = exp(1 - 3/2)."""
    s = coco_caption_scores(["the cat"], [["the cat sat"]], meteor=False, tokenizer="none")
    assert s["bleu1"] == pytest.approx(100 * math.exp(-0.5), abs=1e-6)
    assert s["bleu2"] == pytest.approx(100 * math.exp(-0.5), abs=1e-6)


def test_rouge_l_hand_computed():
    """LCS('a b c d', 'a c d e f') = 3: P = 3/4, R = 3/5, F_beta with beta = 1.2."""
    s = coco_caption_scores(["a b c d"], [["a c d e f"]], meteor=False, tokenizer="none")
    p, r, b2 = 3 / 4, 3 / 5, 1.2**2
    assert s["rouge_l"] == pytest.approx(100 * (1 + b2) * p * r / (r + b2 * p), abs=1e-9)


def test_cider_d_hand_computed():
    """Two images with disjoint words, so every n-gram has the same idf log(2) and it cancels.
    Image B is an exact match: 10. Image A's hypothesis is the first 4 of its reference's 8 words:
    clipped cosine sqrt((5-n)/(9-n)) for n = 1..4, length penalty exp(-(3-7)^2 / (2 * 6^2)) on
    bigram counts, times 10. Corpus CIDEr-D = mean over images, then x100 for our scale."""
    s = coco_caption_scores(
        ["a b c d", "p q r s t"], [["a b c d e f g h"], ["p q r s t"]], meteor=False, tokenizer="none"
    )
    image_a = 10 * sum(math.sqrt((5 - n) / (9 - n)) for n in range(1, 5)) / 4 * math.exp(-16 / 72)
    assert s["cider_d"] == pytest.approx(100 * (image_a + 10) / 2, abs=1e-6)
    # idf comes from the references of the call itself: a lone image has idf 0 everywhere
    assert coco_caption_scores(["a b c d"], [["a b c d"]], meteor=False, tokenizer="none")["cider_d"] == 0.0


@needs_java
def test_identical_hypothesis_scores_maximum():
    """A hypothesis identical to all its references: BLEU-1..4, ROUGE-L, METEOR 100, CIDEr-D 1000
    (toolkit 10.0), through the default path (PTB tokenizer, METEOR); case and punctuation ignored."""
    hyps = {"img1": "A dog runs across the green grass.", "img2": "Two men are playing football in a park!"}
    refs = {"img1": ["a dog runs across the green grass"] * 3, "img2": ["Two men are playing football in a park"] * 2}
    s = coco_caption_scores(hyps, refs)
    assert list(s) == list(METRICS)
    for m in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert s[m] == pytest.approx(100.0, abs=1e-6), m
    assert s["meteor"] == pytest.approx(100.0, abs=1e-6)
    assert s["cider_d"] == pytest.approx(1000.0, abs=1e-6)
    assert not _java_children(), "METEOR's java process outlived the call"


def test_bleu_equals_nltk_corpus_bleu(mirror):
    """On 100 real Flickr8k captions (all >= 4 words), BLEU-1..4 equal nltk's corpus_bleu
    (closest reference length, no smoothing) up to the toolkit's 1e-9 constants."""
    from nltk.translate.bleu_score import corpus_bleu

    hyps, refs = _flickr(mirror)
    hyps = [" ".join(h.lower().split()) for h in hyps]
    refs = [[" ".join(r.lower().split()) for r in rs] for rs in refs]
    assert min(len(h.split()) for h in hyps) >= 4
    s = coco_caption_scores(hyps, refs, meteor=False, tokenizer="none")
    for n in range(1, 5):
        expected = corpus_bleu(
            [[r.split() for r in rs] for rs in refs], [h.split() for h in hyps], weights=(1 / n,) * n
        )
        assert s[f"bleu{n}"] == pytest.approx(100 * expected, rel=1e-6), n


# ------------------------------------------------------------------------------------------------
# Errors: clear RnnlabError, nothing skipped silently
# ------------------------------------------------------------------------------------------------
def test_length_mismatch_raises():
    with pytest.raises(RnnlabError, match="2 hypotheses but 1 reference sets"):
        coco_caption_scores(["a dog", "a cat"], [["a dog"]], meteor=False, tokenizer="none")
    with pytest.raises(RnnlabError, match="ids differ"):
        coco_caption_scores({"x": "a dog"}, {"y": ["a dog"]}, meteor=False, tokenizer="none")


@pytest.mark.parametrize("empty", [[], {}], ids=["list", "dict"])
def test_empty_hypothesis_set_raises(empty):
    with pytest.raises(RnnlabError, match="hypothesis set is empty"):
        coco_caption_scores(empty, [] if isinstance(empty, list) else {}, meteor=False, tokenizer="none")


def test_malformed_references_raise():
    # a flat list of strings instead of one list per hypothesis
    with pytest.raises(RnnlabError, match="must be a list of strings"):
        coco_caption_scores(["a dog runs"], ["a dog runs"], meteor=False, tokenizer="none")
    with pytest.raises(RnnlabError, match="has no references"):
        coco_caption_scores(["a dog runs"], [[]], meteor=False, tokenizer="none")
    with pytest.raises(RnnlabError, match="blank"):
        coco_caption_scores(["a dog runs"], [["  "]], meteor=False, tokenizer="none")


def test_missing_java_raises_unless_opted_out(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java anywhere on PATH
    with pytest.raises(RnnlabError, match="METEOR needs a Java runtime: apt-get install default-jre-headless"):
        coco_caption_scores(["a dog runs"], [["a dog runs fast"]], tokenizer="none")
    with pytest.raises(RnnlabError, match="METEOR needs a Java runtime"):
        coco_caption_scores(["a dog runs"], [["a dog runs fast"]])
    with pytest.raises(RnnlabError, match=r"PTB tokenization \(tokenizer='ptb'\) needs a Java runtime"):
        coco_caption_scores(["a dog runs"], [["a dog runs fast"]], meteor=False)
    s = coco_caption_scores(["a dog runs"], [["a dog runs fast"]], meteor=False, tokenizer="none")
    assert "meteor" not in s and set(s) == set(METRICS) - {"meteor"}


_TIMEOUT_CHILD = """
import gc, psutil
from rnnlab.coco_metrics import coco_caption_scores
from rnnlab.errors import RnnlabError
try:
    coco_caption_scores(["a dog runs"], [["a dog runs fast"]], tokenizer="none", timeout_s=0.5)
except RnnlabError as exc:
    print("ERROR:", exc)
gc.collect()  # the toolkit's Meteor.__del__ runs here: it must not block
print("CHILDREN:", [(c.name(), c.status()) for c in psutil.Process().children(recursive=True)])
"""


@needs_java
def test_meteor_timeout_kills_java_and_raises():
    """A METEOR run past timeout_s (the jar needs seconds to load its paraphrase table) is killed:
    RnnlabError, no java process or zombie left, and no hang afterwards (garbage collection and
    interpreter exit included), checked in a child interpreter so that a hang fails the test."""
    import subprocess
    import sys

    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _TIMEOUT_CHILD], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung after a METEOR timeout: {exc.stdout!r} {exc.stderr!r}")
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: METEOR did not finish 1 captions in 0.5s" in proc.stdout, proc.stdout + proc.stderr
    assert "CHILDREN: []" in proc.stdout, proc.stdout
    assert time.perf_counter() - start < 60


# ------------------------------------------------------------------------------------------------
# The toolkit itself, and real captions
# ------------------------------------------------------------------------------------------------
def _flickr(mirror, n: int = N_IMAGES, shift: int = 0) -> tuple[list[str], list[list[str]]]:
    """Caption #0 of the first n Flickr8k test images as hypotheses, #1..4 as references
    (references of the image ``shift`` places on when shift > 0)."""
    corpus = mirror / "flickr8k"
    caps: dict[str, dict[int, str]] = defaultdict(dict)
    with open(corpus / "Flickr8k.token.txt", encoding="utf-8") as f:
        for line in f:
            key, caption = line.rstrip("\n").split("\t")
            image, k = key.rsplit("#", 1)
            caps[image][int(k)] = caption
    test = [ln.strip() for ln in (corpus / "Flickr_8k.testImages.txt").read_text().splitlines() if ln.strip()][:n]
    hyps = [caps[i][0] for i in test]
    refs = [[caps[i][k] for k in (1, 2, 3, 4)] for i in test]
    if shift:
        refs = refs[shift:] + refs[:shift]
    return hyps, refs


@pytest.fixture(scope="module")
def flickr_scores(mirror):
    return coco_caption_scores(*_flickr(mirror))


@needs_java
def test_ptb_tokenize_equals_toolkit_tokenizer(mirror):
    """Our PTB wrapper gives exactly the toolkit PTBTokenizer's output on 500 real captions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    hyps, refs = _flickr(mirror)
    texts = hyps + [r for rs in refs for r in rs]
    toolkit = PTBTokenizer().tokenize({k: [{"caption": t}] for k, t in enumerate(texts)})
    assert ptb_tokenize(texts) == [toolkit[k][0] for k in range(len(texts))]


@needs_java
def test_ptb_tokenize_keeps_captions_aligned_across_line_breaks():
    """Java's tokenizer starts a new line at \\r, \\f, \\v and U+2028: each must stay inside its caption."""
    texts = ["A dog\rruns.", "a cat\u2028sleeps", "Two\fbirds\vfly!", "", "The end."]
    assert ptb_tokenize(texts) == ["a dog runs", "a cat sleeps", "two birds fly", "", "the end"]


@needs_java
def test_equals_toolkit_pipeline_on_flickr8k(mirror, flickr_scores):
    """Same numbers as the toolkit's own pipeline (eval.py's steps without SPICE), x100."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    hyps, refs = _flickr(mirror)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in rs] for k, rs in enumerate(refs)})
    res = tok.tokenize({k: [{"caption": h}] for k, h in enumerate(hyps)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        met, _ = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait(timeout=30)
    expected = {
        **{f"bleu{n}": b for n, b in enumerate(bleu, 1)},
        "meteor": met,
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider_d": Cider().compute_score(gts, res)[0],
    }
    for m in METRICS:
        assert flickr_scores[m] == pytest.approx(100 * expected[m], abs=1e-9), m


@needs_java
def test_flickr8k_true_references_beat_shuffled(mirror, flickr_scores):
    """Caption #0 scored against its own image's captions #1..4 beats the same caption scored
    against another image's captions, on every metric, by a wide margin."""
    shuffled = coco_caption_scores(*_flickr(mirror, shift=1))
    for m in METRICS:
        assert flickr_scores[m] > shuffled[m] + 5, (m, flickr_scores[m], shuffled[m])
    assert flickr_scores["cider_d"] > 10 * shuffled["cider_d"]
    assert not _java_children()


@needs_java
def test_flickr8k_frozen_values(flickr_scores):
    """Human caption #0 vs #1..4 on the first 100 test images, pycocoevalcap 1.2 (a change here
    means the toolkit, its jars or our plumbing changed the numbers)."""
    expected = {
        "bleu1": 61.6889,
        "bleu2": 42.4206,
        "bleu3": 28.1776,
        "bleu4": 18.9943,
        "meteor": 23.7209,
        "rouge_l": 46.3433,
        "cider_d": 76.9761,
    }
    assert flickr_scores == pytest.approx(expected, abs=1e-3)
