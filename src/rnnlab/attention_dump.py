"""Per-token attention weights from the command line (``rnnlab translate|caption --attention FILE``).

What OpenNMT-py's ``-attn_debug`` prints, as a file: a JSON list with one record per sentence or
image, ``{"input", "source", "target", "weights"}``: ``source`` names the attended positions (the
source sentence's tokens as the model saw them, or the CNN feature map's regions ``r<row>c<col>``),
``target`` the emitted tokens (``<eos>`` last when it was emitted) and ``weights`` the
``[len(target)][len(source)]`` matrix (row ``t``: step ``t``'s attention, summing to 1). With
``plot``, one heatmap PNG per record (:func:`rnnlab.plots.plot_attention`): ``FILE`` with suffix
``.png`` for one record, ``<stem>_<i>.png`` for several.
"""

from __future__ import annotations

import math
from pathlib import Path

from rnnlab.data.vocab import EOS
from rnnlab.errors import RnnlabError


def attention_record(input_text: str, source: list[str], target: list[str], weights) -> dict:
    """One record; ``weights`` [len(target), len(source)] (tensor or nested list)."""
    rows = [[round(float(w), 6) for w in row] for row in weights.tolist()] if hasattr(weights, "tolist") else weights
    if len(rows) != len(target) or any(len(r) != len(source) for r in rows):
        raise ValueError(f"attention weights are not {len(target)} x {len(source)} (target x source)")
    return {"input": input_text, "source": list(source), "target": list(target), "weights": rows}


def region_names(positions: int) -> list[str]:
    """Names of a square CNN feature map's positions, row-major (7 x 7: r0c0 .. r6c6)."""
    side = math.isqrt(positions)
    if side * side != positions:
        return [f"p{i}" for i in range(positions)]
    return [f"r{i // side}c{i % side}" for i in range(positions)]


def write_attention(records: list[dict], path: str | Path, plot: bool = False) -> list[Path]:
    """Write the JSON (and with ``plot`` the PNGs); returns every path written."""
    from rnnlab.io import write_json

    path = Path(path)
    write_json(path, records)
    written = [path]
    if plot:
        from rnnlab.plots import plot_attention

        for i, rec in enumerate(records):
            png = path.with_suffix(".png") if len(records) == 1 else path.with_name(f"{path.stem}_{i}.png")
            written.append(plot_attention(rec["source"], rec["target"], rec["weights"], png, title=rec["input"][:80]))
    return written


def translation_attention(module, sentences: list[str], beam_size: int) -> list[dict]:
    """Records for raw sentences decoded by a :class:`rnnlab.tasks.translation.TranslationTask`."""
    if module.hparams.attention == "none":
        raise RnnlabError("--attention: this translator has no attention (attention: none)")
    encoded, result = module.decode_sentences(sentences, beam_size=beam_size, return_attention=True)
    records = []
    for sentence, src_ids, ids, finished, weights in zip(
        sentences, encoded, result.tokens, result.finished, result.attention
    ):
        target = module.tgt_vocab.decode(ids) + ([EOS] if finished else [])
        records.append(attention_record(sentence, module.src_vocab.decode(src_ids.tolist()), target, weights))
    return records


def caption_attention(captioner, image_paths: list[str], beam_size: int) -> list[dict]:
    """Records for image files captioned by a :class:`rnnlab.tasks.captioning.ImageCaptioner`."""
    from rnnlab.data.images import load_image

    module = captioner.module
    if module.hparams.decoder != "soft_attention":
        raise RnnlabError(f"--attention: the {module.hparams.decoder} captioner has no attention")
    features = captioner.features([load_image(p) for p in image_paths])
    result = module.caption(features.clone(), beam_size=beam_size, return_attention=True)
    source = region_names(features.size(1))
    records = []
    for path, tokens, weights in zip(image_paths, result.tokens, result.attention):
        target = list(tokens) + ([EOS] if weights.size(0) > len(tokens) else [])
        records.append(attention_record(str(path), source, target, weights))
    return records
