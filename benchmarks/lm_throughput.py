"""Language-model training throughput: rnnlab's Lightning loop vs a plain PyTorch loop.

Prints, for one config (default: pytorch/examples word_language_model defaults on PTB),
tokens/s of both loops over the same batches, their ratio (goal >= 0.97), achieved GFLOP/s
(24*h*(x+h) per LSTM layer + 6*h*V per token, training) and its share of a measured fp32 matmul
rate (goal >= 0.5). Run after `dvc repro` has prepared PTB, or pass --prepared.

    python benchmarks/lm_throughput.py [--batches 200] [--hidden 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rnnlab.data.lm_data import LMDataModule
from rnnlab.distributed import seed_everything
from rnnlab.models.lm import build_language_model
from rnnlab.models.lm_parts import detach_state
from rnnlab.stages.train import train_stage
from rnnlab.tasks.base import StagePaths
from rnnlab.tasks.lm import RunConfig as LMRunConfig
from rnnlab.tasks.lm import parse_run


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def flops_per_token(run: LMRunConfig, vocab: int) -> float:
    h, x = run.hidden_size, run.embedding_size
    layers = sum(24 * h * ((x if i == 0 else h) + h) for i in range(run.num_layers))
    return layers + 6 * h * vocab


def plain_loop(run: LMRunConfig, dm: LMDataModule, batches: int, seed: int) -> float:
    """pytorch/examples-style loop on the same windows; returns tokens/s over training steps."""
    seed_everything(seed)
    model = build_language_model(run.model, len(dm.vocab), **run.model_hparams())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=run.lr)
    windows = dm.windows("train")
    state = model.init_state(run.batch_size)
    tokens, seconds = 0, 0.0
    for i in range(min(batches, len(windows))):
        x, y = windows[i]
        t = time.perf_counter()
        state = detach_state(state)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip)
        opt.step()
        seconds += time.perf_counter() - t
        tokens += y.numel()
    return tokens / seconds


def lightning_loop(keys: dict, prepared: Path, out: Path, seed: int) -> float:
    # The stage's own loop; tokens/s counts training steps only (evaluation excluded).
    params = {
        "seed": seed,
        "tracking": {"enabled": False},
        "trainer": {"checkpoint_every_n_steps": 0},
        "train_lm": {"runs": {"bench": keys}},
    }
    row = train_stage(
        params,
        "train_lm",
        "bench",
        StagePaths(prepared=prepared.parent),
        out / "models",
        out / "bench.json",
        out / "bench-plot.json",
        out / "checkpoints",
    )
    return row["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared/ptb"))
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rnnlab-bench"))
    args = ap.parse_args()
    keys = dict(
        corpus=args.prepared.name,
        model="lstm",
        embedding_size=args.hidden,
        hidden_size=args.hidden,
        batch_size=args.batch_size,
        limit_train_batches=args.batches,
        train_fraction=1.0,
        samples=0,
    )
    run = parse_run(keys, "bench")
    # Keep evaluation out of the way: the Lightning run still validates once, excluded from tokens/s.
    dm = LMDataModule(args.prepared, run.batch_size, run.bptt, run.eval_batch_size)
    plain, light = [], []
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        plain.append(plain_loop(run, dm, args.batches, seed=r))
        light.append(lightning_loop(keys, args.prepared, args.out / f"r{r}", seed=r))
    best_plain, best_light = max(plain), max(light)
    peak = matmul_gflops()
    fpt = flops_per_token(run, len(dm.vocab))
    result = {
        "config": f"LSTM {run.num_layers}x{run.hidden_size}, batch {run.batch_size} x bptt {run.bptt}, "
        f"vocab {len(dm.vocab)}",
        "threads": torch.get_num_threads(),
        "plain_tokens_per_s": round(best_plain, 1),
        "lightning_tokens_per_s": round(best_light, 1),
        "lightning_over_plain": round(best_light / best_plain, 3),
        "ms_per_batch_lightning": round(1000 * run.batch_size * run.bptt / best_light, 1),
        "achieved_gflops": round(best_light * fpt / 1e9, 2),
        "matmul_gflops_fp32": round(peak, 2),
        "share_of_matmul_rate": round(best_light * fpt / 1e9 / peak, 3),
        "all_runs": {"plain": [round(p, 1) for p in plain], "lightning": [round(x, 1) for x in light]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
