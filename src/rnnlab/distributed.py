"""Process rank and seeding: known before any Trainer exists, imported by everything that writes."""

from __future__ import annotations

import os

import pytorch_lightning as pl


def global_rank() -> int:
    """This process's rank in a distributed run, from the launcher's environment (0 when alone).

    Known before the Trainer exists, so a stage can open the MLflow run and write outputs on
    rank 0 only: torchrun sets RANK, SLURM sets SLURM_PROCID, Lightning's own launcher starts
    ranks > 0 with LOCAL_RANK (and NODE_RANK on other machines).
    """
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if os.environ.get("SLURM_PROCID", "").isdigit() and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(os.environ["SLURM_PROCID"])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    return local + node * 1_000_000  # exact value irrelevant off node 0: only "is it 0" matters there


def seed_everything(seed: int) -> None:
    # cuBLAS needs this for deterministic GEMMs on GPU (pytorch #35661); harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    pl.seed_everything(seed, workers=True, verbose=False)
