"""Token streams for language modelling: batchify + truncated-BPTT windows, as in
pytorch/examples word_language_model (time-first).

``batchify`` lays the stream out in ``batch_size`` columns ([n_steps, batch]); window ``i``
holds rows ``i*bptt .. i*bptt+bptt-1`` and its targets are the same rows shifted by one.
Windows come in order so the LightningModule can carry the hidden state (detached) from one
window to the next: column b of window i+1 continues column b of window i.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from rnnlab.data.vocab import Vocab
from rnnlab.errors import DataError


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
    stream (small profiles); evaluation always uses the whole valid/test split.
    """

    def __init__(self, prepared_dir: str | Path, batch_size: int, bptt: int, eval_batch_size: int = 10,
                 train_fraction: float = 1.0):
        super().__init__()
        self.prepared_dir = Path(prepared_dir)
        self.batch_size, self.bptt, self.eval_batch_size = batch_size, bptt, eval_batch_size
        self.train_fraction = train_fraction
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
