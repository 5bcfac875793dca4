"""Lightning data modules: genome windows for pretraining, labelled sequences for classification."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ..datasets import GenomeWindowDataset, LabelledFastaDataset, LabelledSequenceDataset, collate
from ..io import Fasta
from ..windows import Window, filter_by_n, split_windows, tile


class EpochPermutation(Sampler):
    """A permutation seeded by (seed, epoch) that can start `skip` items in: resuming a run
    mid-epoch replays exactly the batches the uninterrupted run would have seen next."""

    def __init__(self, n: int, seed: int, skip: int = 0):
        self.n, self.seed, self.skip = n, seed, skip

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return iter(order[self.skip:])

    def __len__(self):
        # The whole epoch: Lightning counts a resumed epoch's batches from where it stopped,
        # so it must see the full length while the iteration yields only the remainder.
        return self.n


def _train_loader(trainer, dataset, batch_size, seed, num_workers):
    epoch = trainer.current_epoch if trainer is not None else 0
    skip = 0
    loop = trainer.fit_loop.epoch_loop if trainer is not None else None
    if loop is not None and trainer.fit_loop.restarting:
        # Batches of this epoch already trained on. The checkpoint is written at the end of a
        # batch, before `completed` is counted, so `ready` is the number to skip.
        skip = loop.batch_progress.current.ready * batch_size
    sampler = EpochPermutation(len(dataset), seed * 1000 + epoch, min(skip, len(dataset)))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers)


class PretrainData(L.LightningDataModule):
    """Windows tiled over one or more FASTA files, split by chromosome or by a held-out tail.

    Sequence-length warmup (`data.warmup: [[window, epochs], ...]`): early epochs use shorter
    windows and proportionally larger batches, so tokens per step stay constant (HyenaDNA).
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg, self.d = cfg, cfg["data"]
        self.fastas = [Fasta(p) for p in self.d["fasta"]]

    def _windows(self, window: int, split: str):
        d, out = self.d, []
        stride = d["stride"] or window
        for fa in self.fastas:
            if d["train_contigs"] or d["val_contigs"] or d["test_contigs"]:
                ws = tile(fa.lengths, window, stride)
                ws = split_windows(ws, train=d["train_contigs"], val=d["val_contigs"], test=d["test_contigs"])[split]
            else:
                ws = []
                for contig, n in fa.lengths.items():
                    cut = int(n * (1 - d["holdout_fraction"])) if d["holdout_fraction"] else n
                    lo, hi = {"train": (0, cut), "val": (cut, n), "test": (cut, n)}[split]
                    # whole windows only, so the splits never share a base
                    ws += [Window(contig, s, s + window) for s in range(lo, hi - window + 1, stride)]
            kept, _ = filter_by_n(fa, ws, d["max_n"])
            out.append(GenomeWindowDataset(fa, kept, rc_augment=d["rc_augment"] and split == "train",
                                           seed=self.cfg["seed"]))
        return torch.utils.data.ConcatDataset(out)

    def stage(self, epoch: int) -> tuple[int, int]:
        """(window, batch size) for this epoch under the warmup schedule."""
        d = self.d
        tokens = d["window"] * d["batch_size"]
        seen = 0
        for window, epochs in d["warmup"]:
            seen += epochs
            if epoch < seen:
                return window, max(1, tokens // window)
        return d["window"], d["batch_size"]

    def train_dataloader(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        window, batch = self.stage(epoch)
        windows = self._windows(window, "train")
        for ds in windows.datasets:
            ds.epoch = epoch
        return _train_loader(self.trainer, windows, batch, self.cfg["seed"], self.d["num_workers"])

    def val_dataloader(self):
        return DataLoader(self._windows(self.d["window"], "val"), batch_size=self.d["batch_size"],
                          collate_fn=collate, num_workers=self.d["num_workers"])

    def test_dataloader(self):
        return DataLoader(self._windows(self.d["window"], "test"), batch_size=self.d["batch_size"],
                          collate_fn=collate, num_workers=self.d["num_workers"])


class ClassifyData(L.LightningDataModule):
    """train/val/test each a `sequence,label` CSV/TSV or a list of FASTA files (one per class)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg, self.d = cfg, cfg["data"]

    def _dataset(self, spec):
        if isinstance(spec, list):
            return LabelledFastaDataset(spec)
        return LabelledSequenceDataset(spec, max_rows=self.d["max_rows"])

    def _loader(self, split):
        spec = self.d[split]
        if spec is None:
            return None
        return DataLoader(self._dataset(spec), batch_size=self.d["batch_size"], collate_fn=collate,
                          num_workers=self.d["num_workers"])

    def train_dataloader(self):
        return _train_loader(self.trainer, self._dataset(self.d["train"]), self.d["batch_size"], self.cfg["seed"],
                             self.d["num_workers"])

    def val_dataloader(self):
        return self._loader("val") or []

    def test_dataloader(self):
        return self._loader("test") or []
