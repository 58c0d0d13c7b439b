"""Decoding throughput on the 1,000 Multi30k test_2016_flickr sentences: greedy, batched beam
search, and beam search run one sentence at a time (the loop that batching replaces).

    python benchmarks/decoding.py [--checkpoint data/models/seq2seq/attention/model.ckpt] [--beam 5]

With ``--checkpoint`` a trained TranslationTask is used (realistic output lengths). Without it a
randomly initialised model of the default CPU size is built on the word-level vocabularies of the
train split; it rarely emits <eos>, so every hypothesis runs to ``--max-len`` (worst case).
Prints sentences/s for each mode and the two ratios the issue sets goals for:
batched beam >= 5x the per-sentence loop, and beam k costs <= 3x greedy.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from rnnlab.data.parallel import ParallelDataModule, read_multi30k
from rnnlab.tasks.translation import TranslationTask

REPO = Path(__file__).resolve().parents[1]
RAW_DIR = Path(os.environ.get("RNNLAB_MIRROR", REPO.parent / "shared" / "corpora")) / "multi30k" / "raw"


def build_task(args) -> tuple[TranslationTask, str]:
    if args.checkpoint:
        task = TranslationTask.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True)
        return task, f"trained checkpoint {args.checkpoint}"
    torch.manual_seed(0)
    dm = ParallelDataModule(read_multi30k(args.raw_dir), tokenizer="word", min_freq=2)
    dm.setup()
    task = TranslationTask(
        len(dm.src_vocab),
        len(dm.tgt_vocab),
        attention="bahdanau",
        decode_max_len=args.max_len,
        src_vocab=dm.src_vocab,
        tgt_vocab=dm.tgt_vocab,
        src_tokenizer=dm.src_tokenizer,
        tgt_tokenizer=dm.tgt_tokenizer,
    )
    return task, "random-init model (default CPU size, word vocab)"


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--raw-dir", type=Path, default=RAW_DIR)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256, help="sentences per decoding batch")
    parser.add_argument(
        "--loop-sentences",
        type=int,
        default=1000,
        help="sentences for the one-at-a-time loop (rate extrapolates; 1000 = all)",
    )
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task, what = build_task(args)
    task.eval()
    pairs = read_multi30k(args.raw_dir)
    sources = pairs[pairs["split"] == "test"]["src"].tolist()
    n = len(sources)
    opts = dict(max_len=args.max_len, batch_size=args.batch_size)

    greedy_s = timed(lambda: task.decode_sentences(sources, beam_size=1, greedy=True, **opts))
    beam_s = timed(lambda: task.decode_sentences(sources, beam_size=args.beam, **opts))
    loop = sources[: args.loop_sentences]
    loop_s = timed(lambda: [task.decode_sentences([s], beam_size=args.beam, **opts) for s in loop])

    rates = {
        "greedy (batched)": n / greedy_s,
        f"beam {args.beam} (batched)": n / beam_s,
        f"beam {args.beam} (one sentence at a time)": len(loop) / loop_s,
    }
    print(
        f"model: {what}; {torch.get_num_threads()} threads; {n} test sentences; max_len {args.max_len}; "
        f"batch {args.batch_size}; loop over {len(loop)} sentences"
    )
    for name, rate in rates.items():
        print(f"  {name:<40} {rate:8.1f} sentences/s")
    batched_vs_loop = rates[f"beam {args.beam} (batched)"] / rates[f"beam {args.beam} (one sentence at a time)"]
    beam_cost = greedy_s and beam_s / greedy_s
    print(f"  batched beam / per-sentence loop: {batched_vs_loop:.1f}x faster (goal >= 5x)")
    print(f"  beam {args.beam} cost / greedy cost: {beam_cost:.2f}x (goal <= 3x)")


if __name__ == "__main__":
    main()
