"""Full vs adaptive softmax (train_lm ``output: full|adaptive``), side by side in one run.

For PTB (10k words) and WikiText-2 (33k words): the training step's tokens/s of the same LSTM
(pytorch/examples defaults: 2x200, batch 20, bptt 35, SGD lr 20, clip 0.25, dropout 0.2) with each
output layer over the same first ``--batches`` windows, and the exact validation perplexity
(full-vocabulary log-probabilities, state carried) on the first ``--val-tokens`` tokens of the
valid split after that equal budget. Run after `dvc repro prepare` (or pass --prepared).

    python benchmarks/adaptive_softmax.py [--prepared data/prepared] [--batches 300] [--val-tokens 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rnnlab.data.lm_data import BPTTWindows, batchify
from rnnlab.data.vocab import Vocab
from rnnlab.distributed import seed_everything
from rnnlab.models.lm import build_language_model
from rnnlab.models.lm_parts import detach_state
from rnnlab.tasks.lm import evaluate, parse_run


def train_steps(model, train_ids: np.ndarray, run, batches: int) -> float:
    """``batches`` truncated-BPTT SGD steps; tokens/s over the steps (data slicing included)."""
    windows = BPTTWindows(batchify(train_ids, run.batch_size), run.bptt)
    opt = torch.optim.SGD(model.parameters(), lr=run.lr)
    model.train()
    state = model.init_state(run.batch_size)
    tokens, started = 0, time.perf_counter()
    for i in range(min(batches, len(windows))):
        x, y = windows[i]
        state = detach_state(state)
        if model.adaptive:
            loss, state = model.adaptive_loss(x, y, state)  # the head + the targets' clusters only
        else:
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip)
        opt.step()
        tokens += y.numel()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--corpora", nargs="+", default=["ptb", "wikitext2"])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--val-tokens", type=int, default=40000)
    ap.add_argument("--cutoffs", type=int, nargs="+", default=None, help="default: train_lm's RunConfig default")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    results = []
    for corpus in args.corpora:
        folder = args.prepared / corpus
        train_ids, valid_ids = np.load(folder / "train.npy"), np.load(folder / "valid.npy")[: args.val_tokens]
        vocab_size = len(Vocab.load(folder / "vocab.json"))
        row = {"corpus": corpus, "vocab": vocab_size, "batches": args.batches}
        for output in ("full", "adaptive"):
            keys = {"corpus": corpus, "model": "lstm", "output": output}  # every other key: the defaults
            if args.cutoffs:
                keys["cutoffs"] = args.cutoffs
            run = parse_run(keys, f"bench.{corpus}.{output}")
            seed_everything(args.seed)
            model = build_language_model("lstm", vocab_size, **run.model_hparams())
            tokens_per_s = train_steps(model, train_ids, run, args.batches)
            model.eval()
            started = time.perf_counter()
            val = evaluate(model, valid_ids, run.eval_batch_size, run.bptt)
            row[output] = {
                "tokens_per_s": round(tokens_per_s, 1),
                "val_ppl": round(val["ppl"], 2),
                "eval_s": round(time.perf_counter() - started, 1),
                **({"cutoffs": run.cutoffs} if output == "adaptive" else {}),
            }
        row["adaptive_speedup"] = round(row["adaptive"]["tokens_per_s"] / row["full"]["tokens_per_s"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
