"""`predict --devices N`: per-base tracks scored by N processes through Lightning (DDP).

Each process scores a share of the tiles and saves it; the first merges the shares into the
same tracks one process would have made. A module of its own so that the single-device path
does not import Lightning.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from .predict import TileDataset, _collate, _place, _tiles, per_base_scores


class _TrackModule(L.LightningModule):
    """predict_step -> (tile indices, per-base scores) for Lightning's sharded prediction."""

    def __init__(self, model, target_class: int, rc_average: bool):
        super().__init__()
        self.model, self.target_class, self.rc_average = model, target_class, rc_average

    def predict_step(self, batch, _):
        idx, ids, mask = batch  # mask None: no padding (see _collate)
        return torch.as_tensor(idx), per_base_scores(self.model, ids, mask, target_class=self.target_class,
                                                     rc_average=self.rc_average).float().cpu()


class _ShardWriter(BasePredictionWriter):
    """Each process saves its share of the tiles; the first process merges them."""

    def __init__(self, directory: Path):
        super().__init__(write_interval="epoch")
        self.directory = directory

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        torch.save(predictions, self.directory / f"rank{trainer.global_rank}.pt")


def predict_track_sharded(model, fasta_path, regions, *, window: int, overlap: int, batch_size: int, devices: int,
                          accelerator: str, shard_dir: Path, target_class: int = 1, rc_average: bool = True,
                          workers: int = 0):
    """predict_track over `devices` processes (Lightning DDP: each scores a share of the tiles).
    Returns the tracks in the first process and None in the others."""
    tiles, owner = _tiles(regions, window, overlap)
    shard_dir.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                        precision="bf16-mixed" if accelerator == "gpu" else "32-true", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        callbacks=[_ShardWriter(shard_dir)])
    loader = DataLoader(TileDataset(fasta_path, tiles), batch_size=batch_size, collate_fn=_collate,
                        num_workers=workers)
    trainer.predict(_TrackModule(model, target_class, rc_average), loader, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    tracks = [np.full(e - s, np.nan, dtype=np.float32) for _, _, s, e in regions]
    for shard in sorted(shard_dir.glob("rank*.pt")):
        for idx, scores in torch.load(shard, weights_only=True):
            _place(tracks, tiles, owner, regions, idx.tolist(), scores.numpy())
        shard.unlink()
    shard_dir.rmdir()
    return tracks
