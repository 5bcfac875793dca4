"""Lightning data modules: genome windows for pretraining, labelled sequences for classification."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ..datasets import BedIntervalDataset, GenomeWindowDataset, LabelledFastaDataset, LabelledSequenceDataset, collate
from ..io import Fasta, read_bed
from ..tokenizer import PAD_ID
from ..windows import Window, filter_by_n, split_windows
from .config import is_bed


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

    def _spans(self, fa):
        """(contig, start, end) to tile: the `regions` BED, or every contig whole."""
        if self.d["regions"]:
            return [(fa.resolve(r.contig), r.start, r.end) for r in read_bed(self.d["regions"])]
        return [(c, 0, n) for c, n in fa.lengths.items()]

    def _windows(self, window: int, split: str):
        """Whole windows only (never padded), so the splits never share a base."""
        d, out = self.d, []
        stride = d["stride"] or window
        by_contig = bool(d["train_contigs"] or d["val_contigs"] or d["test_contigs"])
        for fa in self.fastas:
            ws = []
            for contig, lo, hi in self._spans(fa):
                if not by_contig and d["holdout_fraction"]:  # hold out the tail of each span
                    cut = lo + int((hi - lo) * (1 - d["holdout_fraction"]))
                    lo, hi = (lo, cut) if split == "train" else (cut, hi)
                elif not by_contig and split != "train":
                    continue
                ws += [Window(contig, s, s + window) for s in range(lo, hi - window + 1, stride)]
            if by_contig:
                ws = split_windows(ws, train=d["train_contigs"], val=d["val_contigs"], test=d["test_contigs"])[split]
            kept, _ = filter_by_n(fa, ws, d["max_n"])
            out.append(self._dataset(fa, kept, split))
        return torch.utils.data.ConcatDataset(out)

    def _dataset(self, fa, windows, split):
        return GenomeWindowDataset(fa, windows, rc_augment=self.d["rc_augment"] and split == "train",
                                   seed=self.cfg["seed"])

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
        if is_bed(spec):  # intervals over the one data.fasta, class in a BED column, '-' strand read as RC
            k = self.cfg["classify"]["num_classes"]
            return BedIntervalDataset(self.d["fasta"][0], spec, label_column=self.d["bed_label_column"],
                                      label_map={str(i): i for i in range(k)})
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


class TokenLabelledWindows(torch.utils.data.Dataset):
    """Genome windows with a per-position label: 1 inside `labels_bed` intervals, else 0
    (-100, ignored by the loss, where the window runs past the contig end)."""

    def __init__(self, windows: GenomeWindowDataset, labels_bed):
        self.windows = windows
        self.by_contig: dict[str, list[tuple[int, int]]] = {}
        for iv in read_bed(labels_bed):
            self.by_contig.setdefault(windows.fasta.resolve(iv.contig), []).append((iv.start, iv.end))

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows.windows[i]
        item = self.windows[i]
        labels = torch.zeros(w.end - w.start, dtype=torch.long)
        for s, e in self.by_contig.get(self.windows.fasta.resolve(w.contig), ()):
            lo, hi = max(s, w.start), min(e, w.end)
            if lo < hi:
                labels[lo - w.start: hi - w.start] = 1
        if item["rc"]:
            labels = labels.flip(0)  # the window was reverse-complemented: labels follow the strand
        labels[item["input_ids"] == PAD_ID] = -100  # positions past the contig end
        item["token_labels"] = labels
        return item


class TokenClassifyData(PretrainData):
    """Per-base labels from a BED track over genome windows (same splitting as pretraining)."""

    def _dataset(self, fa, windows, split):
        return TokenLabelledWindows(super()._dataset(fa, windows, split), self.d["labels_bed"])
