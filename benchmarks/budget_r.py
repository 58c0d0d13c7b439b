"""The budget unit R, and the `train_lm` stage measured in it, in one run on this machine.

R = the wall time of one PTB epoch of a plain PyTorch loop at pytorch/examples' word_language_model
defaults (LSTM 2x200, dropout 0.2, untied, batch 20, bptt 35, SGD lr 20, clip 0.25, full 10k vocab;
training only, no evaluation). Then every run of `train_lm` (the default profile, or --profile) is
run through its real stage script into a scratch folder (the DVC outputs are left alone), and the
script prints each run's wall time, the total, and both in R. Measure on an idle machine: two
OpenMP threads spin-wait against any other process.

    python benchmarks/budget_r.py [--section train_lm] [--profile cpu] [--r-batches 0] [--skip-stage]

--r-batches N times N batches and scales to the epoch (a quick, rougher R); 0 = the whole epoch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]


def measure_r(prepared: Path, batches: int = 0, seed: int = 1) -> dict:
    """One epoch of pytorch/examples' main.py loop on PTB, timed (training only)."""
    from rnnlab.data.lm_data import LMDataModule
    from rnnlab.models.lm import build_language_model
    from rnnlab.models.lm_parts import detach_state

    torch.manual_seed(seed)
    dm = LMDataModule(prepared, batch_size=20, bptt=35)
    model = build_language_model("lstm", len(dm.vocab), embedding_size=200, hidden_size=200, num_layers=2, dropout=0.2)
    model.train()
    windows = dm.windows("train")
    total = len(windows)
    n = total if batches <= 0 else min(batches, total)
    state = model.init_state(20)
    started = time.perf_counter()
    for i in range(n):
        x, y = windows[i]
        state = detach_state(state)
        model.zero_grad()
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-20.0)
    seconds = time.perf_counter() - started
    return {
        "R_s": round(seconds * total / n, 1),
        "batches_timed": n,
        "batches_per_epoch": total,
        "tokens_per_s": round(n * 20 * 35 / seconds, 1),
        "threads": torch.get_num_threads(),
    }


def run_stage(section: str, run: str, params_file: Path, out: Path) -> float:
    script = {
        "train_lm": "pipeline/train_lm.py",
        "train_seq2seq": "pipeline/train_seq2seq.py",
        "train_captioner": "pipeline/train_captioner.py",
    }[section]
    cmd = [
        sys.executable,
        script,
        "--params",
        str(params_file),
        "--run",
        run,
        "--prepared",
        "data/prepared",
        "--features",
        "data/features/flickr8k",
        "--raw",
        "data/raw",
        "--models",
        str(out / "models"),
        "--metrics",
        str(out / f"{run}.json"),
        "--plots",
        str(out / f"{run}-plot.json"),
        "--checkpoints",
        str(out / "checkpoints"),
    ]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=REPO / "data/prepared")
    ap.add_argument("--section", default="train_lm", choices=["train_lm", "train_seq2seq", "train_captioner"])
    ap.add_argument("--profile", default=None, help="default: params.yaml's own")
    ap.add_argument("--r-batches", type=int, default=0)
    ap.add_argument("--skip-stage", action="store_true", help="measure R only")
    args = ap.parse_args()
    r = measure_r(args.prepared / "ptb", args.r_batches)
    report = {"R": r}
    print(f"R = {r['R_s']} s ({r['tokens_per_s']} tokens/s, {r['threads']} threads)", file=sys.stderr, flush=True)
    if not args.skip_stage:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        if args.profile:
            params["profile"] = args.profile
        params["tracking"] = {"enabled": False}
        with tempfile.TemporaryDirectory(prefix="rnnlab-budget-") as tmp:
            params_file = REPO / "params.budget-run.yaml"  # beside profiles/, which it may name
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
            try:
                runs = {}
                for name in params[args.section]["runs"]:
                    runs[name] = round(run_stage(args.section, name, params_file, Path(tmp)), 1)
                    print(
                        f"{args.section}@{name}: {runs[name]} s = {runs[name] / r['R_s']:.2f} R",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                params_file.unlink(missing_ok=True)
        total = sum(runs.values())
        report[args.section] = {
            "runs_s": runs,
            "total_s": round(total, 1),
            "total_R": round(total / r["R_s"], 2),
            "runs_R": {k: round(v / r["R_s"], 2) for k, v in runs.items()},
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
