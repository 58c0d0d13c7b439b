"""Translation metrics and attention pictures. Which BLEU is which:

- ``sacrebleu``: sacreBLEU on **detokenized, cased** text, the WMT-comparable number. Hypotheses
  are detokenized by the model's tokenizer; references are the raw corpus lines. sacreBLEU's
  defaults (``tokenize="13a"``, case-sensitive, exp smoothing); its signature string is recorded
  (``sacrebleu_signature``, e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``).
- ``chrf``: sacreBLEU chrF (character 6-grams, beta 2) on the same detokenized cased text.
- ``tok_bleu``: **tokenized lower-cased** BLEU, the number Multi30k papers report (multi-bleu.perl
  on tokenized lower-cased text, e.g. nmtpy's 37.3): hypotheses and references are both split with
  ``WordTokenizer(lowercase=True)`` and re-joined with spaces, then scored by sacreBLEU with
  ``tokenize="13a", lowercase=True`` (13a changes next to nothing on text that is already split).

Perplexity here is always teacher-forced (plain cross-entropy per target token incl. ``<eos>``,
no label smoothing); BLEU/chrF always come from free-running decoding.
"""

from __future__ import annotations

import math
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F

from rnnlab.data.tokenize import WordTokenizer
from rnnlab.data.vocab import EOS, Vocab


def score_translations(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus sacreBLEU / chrF / tokenized lower-cased BLEU (see module docstring)."""
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


@torch.no_grad()
def teacher_forced_perplexity(task, loader) -> tuple[float, float]:
    """Token-weighted mean cross-entropy (nats) and its exponential over a whole loader."""
    was_training = task.model.training
    task.model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            batch = type(batch)(*(t.to(task.device) for t in batch))
            logits = task.model(batch.src, batch.src_lengths, batch.tgt_in)  # [batch, T, V]
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch.tgt_out.reshape(-1),
                                     ignore_index=Vocab.pad_id, reduction="sum").item()
            count += int((batch.tgt_out != Vocab.pad_id).sum())
    finally:
        task.model.train(was_training)
    mean = total / max(count, 1)
    return mean, (math.exp(mean) if mean < 700 else float("inf"))


def plot_attention(source_tokens: list[str], target_tokens: list[str], weights, path: str | Path,
                   title: str = "") -> Path:
    """Heatmap of weights [len(target_tokens), len(source_tokens)] (rows: output steps) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = torch.as_tensor(weights).float().numpy()
    if weights.shape != (len(target_tokens), len(source_tokens)):
        raise ValueError(f"weights {weights.shape} do not match {len(target_tokens)} x {len(source_tokens)} tokens")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(0.35 * len(source_tokens) + 2.5, 0.3 * len(target_tokens) + 2))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(source_tokens)), source_tokens, rotation=90)
    ax.set_yticks(range(len(target_tokens)), target_tokens)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attention_heatmaps(task, sentences: list[str], out_dir: str | Path, beam_size: int = 1,
                       prefix: str = "val") -> list[Path]:
    """Translate ``sentences`` and draw one heatmap per sentence; [] for a model without attention."""
    if task.hparams.attention == "none" or not sentences:
        return []
    encoded, result = task.decode_sentences(sentences, beam_size=beam_size, return_attention=True)
    paths = []
    for i, (ids, out_ids, finished, weights) in enumerate(
            zip(encoded, result.tokens, result.finished, result.attention)):
        source_tokens = task.src_vocab.decode(ids.tolist())
        target_tokens = task.tgt_vocab.decode(out_ids) + ([EOS] if finished else [])
        paths.append(plot_attention(source_tokens, target_tokens, weights, Path(out_dir) / f"{prefix}_{i:02d}.png",
                                    title=f"{task.hparams.attention} attention, beam {beam_size}"))
    return paths


def evaluate_translation_checkpoint(model_dir: str | Path, prepared_dir: str | Path, beam_sizes=(1, 5)) -> dict:
    """Rescore a ``train_seq2seq`` model folder on the whole Multi30k test split (test_2016_flickr).

    ``model_dir``: the folder (``model.ckpt`` + ``vocab.*.json`` + ``config.json``) or the
    checkpoint file itself; ``prepared_dir``: ``data/prepared/multi30k`` (or ``data/prepared``).
    Nothing is rebuilt from data: the vocabularies and tokenizers come from the checkpoint
    (``torch.load(weights_only=True)``), checked against the ``vocab.*.json`` beside it (a mismatch
    names both sizes); ``max_len`` and ``eval_batch_size`` come from ``config.json``. Decoding and
    perplexity run exactly as at the end of training, so the numbers equal ``train_seq2seq.json``.

    Returns ``{sacrebleu_greedy, sacrebleu_beamK, chrf_*, tok_lc_bleu_*, beam1_equals_greedy (when
    1 is a beam size), test_ppl, test_loss, *_signature, params, test_sentences, truncated_test_src,
    beams: [{beam, sacrebleu, chrf, tok_lc_bleu}]}`` (key meanings: module docstring and
    rnnlab.seq2seq_stage)."""
    from rnnlab.data.parallel import ParallelDataModule
    from rnnlab.io import read_json
    from rnnlab.seq2seq_stage import SCORE_NAMES, read_pairs, score_row
    from rnnlab.seq2seq_train import evaluate_translation
    from rnnlab.translate import load_translator

    beam_sizes = [int(k) for k in beam_sizes]
    if not beam_sizes or any(k < 1 for k in beam_sizes):
        raise ValueError(f"beam_sizes: expected integers >= 1, got {beam_sizes}")
    task, folder = load_translator(model_dir)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    max_len = int(config.get("max_len", task.hparams.decode_max_len))
    pairs = read_pairs(Path(prepared_dir))
    dm = ParallelDataModule(pairs, max_len=max_len, eval_batch_size=int(config.get("eval_batch_size", 256)),
                            tokenizers=(task.src_tokenizer, task.tgt_tokenizer),
                            vocabs=(task.src_vocab, task.tgt_vocab))
    dm.setup_split("test")
    test_loss, test_ppl = teacher_forced_perplexity(task, dm.loader("test"))
    metrics, rows = evaluate_translation(task, dm.sources("test"), dm.references("test"), beam_sizes)
    return {
        **score_row(metrics, beam_sizes),
        "test_ppl": round(test_ppl, 3), "test_loss": round(test_loss, 4),
        "params": task.num_parameters(),
        "test_sentences": len(dm.texts["test"]),
        "truncated_test_src": dm.truncated["test"]["src"],
        "beams": [{"beam": r["beam"], **{SCORE_NAMES[s]: r[s] for s in ("sacrebleu", "chrf", "tok_bleu")}}
                  for r in rows if r["beam"] > 0],
    }
