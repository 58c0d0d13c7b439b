"""Token streams for language modelling: batchify + truncated-BPTT windows, as in
pytorch/examples word_language_model (time-first).

``batchify`` lays the stream out in ``batch_size`` columns ([n_steps, batch]); window ``i``
holds rows ``i*bptt .. i*bptt+bptt-1`` and its targets are the same rows shifted by one.
Windows come in order so the LightningModule can carry the hidden state (detached) from one
window to the next: column b of window i+1 continues column b of window i.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError, DataError
from rnnlab.resume import ResumableLoader

log = logging.getLogger(__name__)


def batchify(ids: np.ndarray | torch.Tensor, batch_size: int) -> torch.Tensor:
    """[n] stream -> [n // batch_size, batch_size]; the remainder that does not fit is trimmed."""
    data = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    n_steps = data.numel() // batch_size
    if n_steps < 2:
        raise DataError(f"stream of {data.numel()} tokens is too short for batch_size {batch_size}")
    return data[: n_steps * batch_size].view(batch_size, n_steps).t().contiguous()


class BPTTWindows(Dataset):
    """Map-style dataset of consecutive windows over a batchified stream."""

    def __init__(self, batched: torch.Tensor, bptt: int):
        self.data, self.bptt = batched, bptt
        self.starts = list(range(0, batched.size(0) - 1, bptt))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.starts[index]
        seq_len = min(self.bptt, self.data.size(0) - 1 - i)
        return self.data[i : i + seq_len], self.data[i + 1 : i + 1 + seq_len]  # [seq, batch] each


class LMDataModule(pl.LightningDataModule):
    """Reads ``data/prepared/<corpus>/{train,valid,test}.npy`` + ``vocab.json``.

    Loaders use ``batch_size=None`` and no shuffling: each item is already a full window and
    the order carries the hidden state. ``train_fraction`` keeps only a prefix of the train
    stream (small profiles); ``eval_fraction`` (smoke tests only, default 1.0 = the whole split)
    likewise for valid/test.
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        batch_size: int,
        bptt: int,
        eval_batch_size: int = 10,
        train_fraction: float = 1.0,
        eval_fraction: float = 1.0,
    ):
        super().__init__()
        self.prepared_dir = Path(prepared_dir)
        self.batch_size, self.bptt, self.eval_batch_size = batch_size, bptt, eval_batch_size
        self.train_fraction, self.eval_fraction = train_fraction, eval_fraction
        self.vocab = Vocab.load(self.prepared_dir / "vocab.json")
        self._streams: dict[str, np.ndarray] = {}

    def stream(self, split: str) -> np.ndarray:
        if split not in self._streams:
            path = self.prepared_dir / f"{split}.npy"
            if not path.exists():
                raise DataError(f"{path}: prepared split missing (run the prepare stage)")
            ids = np.load(path)
            if ids.size and int(ids.max()) >= len(self.vocab):
                raise DataError(f"{path}: id {int(ids.max())} outside the vocabulary of {len(self.vocab)}")
            if split == "train" and self.train_fraction < 1.0:
                ids = ids[: max(int(len(ids) * self.train_fraction), self.batch_size * (self.bptt + 1))]
            elif split != "train" and self.eval_fraction < 1.0:
                ids = ids[: max(int(len(ids) * self.eval_fraction), self.eval_batch_size * (self.bptt + 1))]
            self._streams[split] = ids
        return self._streams[split]

    def has_split(self, split: str) -> bool:
        return (self.prepared_dir / f"{split}.npy").exists()

    def windows(self, split: str) -> BPTTWindows:
        bsz = self.batch_size if split == "train" else self.eval_batch_size
        return BPTTWindows(batchify(self.stream(split), bsz), self.bptt)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.windows(split), batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if self.has_split("test") else "valid")


class ShardedLMDataModule(LMDataModule):
    """``LMDataModule`` with resumable training windows, split between DDP ranks by batch column.

    The stream is batchified with the global ``batch_size`` exactly as on one process; rank r of
    W then keeps columns ``r*B/W .. (r+1)*B/W - 1``. Each column is an independent contiguous
    piece of the stream, so each rank carries the hidden state of its own columns from window to
    window, and the ranks together train on exactly the single-process batch (DDP averages the
    gradients of equal-sized shards = the gradient of the global mean loss). Evaluation splits
    are sharded the same way with ``eval_batch_size``.
    """

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def windows(self, split: str) -> BPTTWindows:
        bsz = self.batch_size if split == "train" else self.eval_batch_size
        batched = batchify(self.stream(split), bsz)  # [n_steps, bsz]
        rank, world = self._rank_world()
        if world > 1:
            key = "batch_size" if split == "train" else "eval_batch_size"
            if bsz % world:
                raise ConfigError(
                    f"train_lm.runs.*.{key}: expected a multiple of the {world} processes "
                    f"(trainer.devices x num_nodes), got {bsz}"
                )
            per_rank = bsz // world
            batched = batched[:, rank * per_rank : (rank + 1) * per_rank].contiguous()  # [n_steps, bsz/W]
            if split == "train":
                digest = hashlib.md5(batched.numpy().tobytes()).hexdigest()
                log.info(
                    "rank %d/%d trains on columns %d..%d of %d (shard md5 %s)",
                    rank,
                    world,
                    rank * per_rank,
                    (rank + 1) * per_rank - 1,
                    bsz,
                    digest,
                )
        return BPTTWindows(batched, self.bptt)

    def train_dataloader(self) -> ResumableLoader:
        # Its position (windows served this epoch) is saved in every checkpoint. The windows are
        # iterated as they are: a DataLoader would draw a worker seed from the RNG every epoch.
        return ResumableLoader(self.windows("train"))

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.windows(split), batch_size=None, shuffle=False)
