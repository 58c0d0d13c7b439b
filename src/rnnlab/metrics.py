"""Every score the project reports, in one place.

Language models
    ``perplexity(mean_loss)`` (the one clamp: ``inf`` for a diverged model instead of an
    OverflowError) and ``bits_per_char(mean_loss)``.

Translation (:func:`score_translations`)
    - ``sacrebleu``: sacreBLEU on **detokenized, cased** text, the WMT-comparable number
      (13a tokenizer, case-sensitive, exp smoothing; signature recorded).
    - ``chrf``: sacreBLEU chrF (character 6-grams, beta 2) on the same text.
    - ``tok_bleu``: **tokenized lower-cased** BLEU, what Multi30k papers report (multi-bleu.perl on
      tokenized lower-cased text): both sides split with ``WordTokenizer(lowercase=True)``, re-joined
      with spaces, scored by sacreBLEU ``tokenize="13a", lowercase=True``.

Captioning (:func:`corpus_bleu`, :func:`sacrebleu_standard`)
    BLEU-n is Papineni et al.'s corpus BLEU with uniform weights over 1..n-gram precisions, clipped
    counts, brevity penalty from the closest reference length, no smoothing: the definition of
    ``nltk.translate.bleu_score.corpus_bleu(weights=(1/n,)*n)`` (tests check equality) and of most
    captioning papers, computed by sacreBLEU on our tokens (``tokenize='none'``), scaled 0-100. One
    corner case: a hypothesis shorter than n words adds no n-grams to the denominator here (as in
    multi-bleu.perl and sacreBLEU), where nltk adds one. ``sacrebleu_standard`` is sacreBLEU's own
    13a tokenization on the detokenized hypothesis vs the raw references, lower-cased.

Decoding settings are named by beam size everywhere: beam 1 is greedy decoding (``greedy``), beam
k > 1 is batched beam search (``beam<k>``): :func:`decode_name`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sacrebleu
from sacrebleu.metrics import BLEU

MAX_LOG_PPL = 700.0  # exp() of more overflows a float


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy in nats); ``inf`` for a diverged model."""
    return math.exp(mean_loss) if mean_loss < MAX_LOG_PPL else float("inf")


def bits_per_char(mean_loss: float) -> float:
    return mean_loss / math.log(2)


def decode_name(beam: int) -> str:
    """``greedy`` for beam 1, ``beam<k>`` otherwise (the key used in every table)."""
    return "greedy" if beam == 1 else f"beam{beam}"


def decode_names(beam_sizes: Sequence[int]) -> list[str]:
    """Distinct setting names of ``beam_sizes`` in order (beam 1 and greedy are one setting)."""
    names: list[str] = []
    for beam in beam_sizes:
        if decode_name(beam) not in names:
            names.append(decode_name(beam))
    return names


# -- translation ------------------------------------------------------------------------------
def score_translations(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus sacreBLEU / chrF / tokenized lower-cased BLEU (see the module docstring)."""
    from rnnlab.data.tokenize import WordTokenizer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    # force: the input is tokenized on purpose (else sacreBLEU warns that it looks tokenized)
    tok_bleu = sacrebleu.metrics.BLEU(tokenize="13a", lowercase=True, force=True)
    splitter = WordTokenizer(lowercase=True)
    hyp_tok = [" ".join(splitter.tokenize(h)) for h in hypotheses]
    ref_tok = [" ".join(splitter.tokenize(r)) for r in references]
    return {
        "sacrebleu": bleu.corpus_score(hypotheses, [references]).score,
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
        "tok_bleu": tok_bleu.corpus_score(hyp_tok, [ref_tok]).score,
        "sacrebleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "tok_bleu_signature": "wordtok-lower+" + str(tok_bleu.get_signature()),
    }


def sentence_sacrebleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus sacreBLEU only (validation rounds)."""
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


# -- captioning -------------------------------------------------------------------------------
def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis reference lists -> sacreBLEU's reference streams (None where fewer refs)."""
    width = max(len(r) for r in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], max_order: int = 4
) -> dict[str, float]:
    """Corpus BLEU-1..``max_order`` (0-100) of token lists against all references of each item."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    if any(len(r) == 0 for r in references):
        raise ValueError("every hypothesis needs at least one reference")
    hyps = [" ".join(h) for h in hypotheses]
    refs = _reference_streams([[" ".join(r) for r in rs] for rs in references])
    scores = {}
    for n in range(1, max_order + 1):
        bleu = BLEU(tokenize="none", max_ngram_order=n, effective_order=False, smooth_method="none")
        scores[f"bleu{n}"] = round(float(bleu.corpus_score(hyps, refs).score), 4)
    return scores


def sacrebleu_standard(hypothesis_texts: Sequence[str], reference_texts: Sequence[Sequence[str]]) -> dict:
    """Standard sacreBLEU (13a tokenization, lower-cased) on detokenized text; score + signature."""
    bleu = BLEU(lowercase=True)
    result = bleu.corpus_score(list(hypothesis_texts), _reference_streams(reference_texts))
    return {"score": round(float(result.score), 4), "signature": str(bleu.get_signature())}
