"""Train one language-model run through the real stage loop (rnnlab.stages.train) in-process."""

from __future__ import annotations

from pathlib import Path

from rnnlab.stages.train import train_stage
from rnnlab.tasks.base import StagePaths


def lm_params(runs: dict, seed: int = 7, trainer: dict | None = None, defaults: dict | None = None) -> dict:
    from rnnlab.config import read_yaml

    return {
        "seed": seed,
        "corpora": read_yaml(Path(__file__).resolve().parents[1] / "params.yaml")["corpora"],  # the declared ones
        "tracking": {"enabled": False},
        "trainer": {"num_threads": 1, **(trainer or {})},
        "train_lm": {"defaults": defaults or {}, "runs": runs},
    }


def train_lm_run(
    prepared_corpus: Path, out: Path, name: str = "run", seed: int = 7, trainer: dict | None = None, **run
) -> dict:
    """Train ``run`` (RunConfig keys) on ``prepared_corpus`` (data/prepared/<corpus>); model folder
    ``out/models/<name>``; returns the metrics row."""
    prepared_corpus = Path(prepared_corpus)
    run = {"corpus": prepared_corpus.name, **run}
    params = lm_params({name: run}, seed, trainer)
    return train_stage(
        params,
        "train_lm",
        name,
        StagePaths(prepared=prepared_corpus.parent),
        out / "models",
        out / "metrics" / f"{name}.json",
        out / "plots" / f"{name}.json",
        out / "checkpoints",
    )
