"""PyTorch datasets over the readers: genome windows, labelled sequences, labelled FASTA, BED, BAM reads.

Every item is a dict with `input_ids` (int64 tensor) and, where there is one, `label`.
`collate` pads a batch to its longest item with [PAD] and returns an `attention_mask` (None when
nothing is padded).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import tokenizer
from .errors import InputError
from .io import Fasta, iter_reads, iter_records, read_bed
from .io.text import open_text


def read_sequence_table(path, *, need_label: bool):
    """Rows of a CSV/TSV (delimiter from the header line) that has a `sequence` column (and `label`).

    Returns (header fields, [(line number, row dict), ...]); errors name the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("sequence table not found", path=path)
    with open_text(path) as fh:
        first = fh.readline()
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter="\t" if "\t" in first else ",")
        needed = ["sequence"] + (["label"] if need_label else [])
        if not reader.fieldnames or any(k not in reader.fieldnames for k in needed):
            raise InputError(f"needs {' and '.join(repr(k) for k in needed)} column(s), header is {reader.fieldnames}",
                             path=path)
        return reader.fieldnames, list(enumerate(reader, 2))


class GenomeWindowDataset(Dataset):
    """Token windows from a FASTA (pretraining, embedding, prediction), optionally RC-augmented."""

    def __init__(self, fasta: Fasta | str | os.PathLike, windows, *, rc_augment: bool = False, seed: int = 0):
        self.fasta = fasta if isinstance(fasta, Fasta) else Fasta(fasta)
        self.windows = list(windows)
        self.rc_augment = rc_augment
        self.seed = seed
        self.epoch = 0  # set by the data module: the strand of each window is a function of (seed, epoch, index)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        ids = self.fasta.fetch_ids(w.contig, w.start, w.end, pad=True)
        rc = bool(self.rc_augment and np.random.default_rng((self.seed, self.epoch, i)).random() < 0.5)
        if rc:
            ids = tokenizer.reverse_complement(ids).copy()
        return {"input_ids": torch.from_numpy(ids), "contig": w.contig, "start": w.start, "end": w.end, "rc": rc}


class LabelledSequenceDataset(Dataset):
    """CSV/TSV with a header holding `sequence` and `label` columns (the GUE format)."""

    def __init__(self, path: str | os.PathLike, *, max_rows: int | None = None, lenient: bool = False):
        self.path = Path(path)
        _, rows = read_sequence_table(self.path, need_label=True)
        self.sequences, self.labels = [], []
        for row_no, row in rows[:max_rows]:
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise InputError(f"label must be an integer, got {row['label']!r}", path=self.path,
                                 position=f"line {row_no}") from None
            self.sequences.append(tokenizer.encode(row["sequence"] or "", lenient=lenient,
                                                   record=f"line {row_no}", source=str(self.path)))
            self.labels.append(label)
        self.num_classes = max(self.labels) + 1 if self.labels else 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": torch.from_numpy(self.sequences[i]), "label": self.labels[i]}


class LabelledFastaDataset(Dataset):
    """One FASTA file per class (e.g. Oct4 vs MafK peaks); labels are the files' order."""

    def __init__(self, paths, *, lenient: bool = False):
        self.sequences, self.labels, self.names = [], [], []
        for label, path in enumerate(paths):
            for name, seq in iter_records(path):
                if not seq:
                    raise InputError("empty FASTA record", path=path, record=name)
                self.sequences.append(tokenizer.encode(seq, lenient=lenient, record=name, source=str(path)))
                self.labels.append(label)
                self.names.append(name)
        self.num_classes = len(paths)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": torch.from_numpy(self.sequences[i]), "label": self.labels[i]}


class BedIntervalDataset(Dataset):
    """BED intervals over a FASTA, each resized to `length` around its centre; label from a BED column."""

    def __init__(self, fasta, bed, *, length: int | None = None, label_column: int | None = None,
                 label_map: dict | None = None):
        self.fasta = fasta if isinstance(fasta, Fasta) else Fasta(fasta)
        self.intervals = read_bed(bed, label_column=label_column) if not isinstance(bed, list) else bed
        self.length = length
        labels = [iv.label for iv in self.intervals]
        if label_column is not None:
            self.label_map = label_map or {v: i for i, v in enumerate(sorted(set(labels)))}
            for iv in self.intervals:
                if iv.label not in self.label_map:
                    raise InputError(f"label {iv.label!r} (column {label_column}) is not one of "
                                     f"{sorted(self.label_map)}", path=bed if not isinstance(bed, list) else None,
                                     record=f"{iv.contig}:{iv.start}-{iv.end}")
        else:
            self.label_map = None

    def __len__(self):
        return len(self.intervals)

    def __getitem__(self, i):
        iv = self.intervals[i]
        start, end = iv.start, iv.end
        if self.length is not None:
            mid = (start + end) // 2
            start, end = mid - self.length // 2, mid - self.length // 2 + self.length
        ids = self.fasta.fetch_ids(iv.contig, start, end, pad=True)
        if iv.strand == "-":
            ids = tokenizer.reverse_complement(ids).copy()
        item = {"input_ids": torch.from_numpy(ids), "contig": iv.contig, "start": start, "end": end}
        if self.label_map is not None:
            item["label"] = self.label_map[iv.label]
        return item


class BamReadDataset(Dataset):
    """Read sequences (original orientation) from a BAM/CRAM, filtered by flags and MAPQ."""

    def __init__(self, path, region=None, *, reference=None, min_mapq: int = 0, lenient: bool = True):
        self.reads = list(iter_reads(path, region, reference=reference, min_mapq=min_mapq))
        self.lenient = lenient

    def __len__(self):
        return len(self.reads)

    def __getitem__(self, i):
        r = self.reads[i]
        return {"input_ids": torch.from_numpy(tokenizer.encode(r.sequence, lenient=self.lenient, record=r.name)),
                "name": r.name}


def collate(items):
    """Right-pad `input_ids` with [PAD]; add `attention_mask` (1 = real token); stack labels.

    attention_mask is None when no item was padded: the model then runs without sequence ids
    (an all-zeros seq_idx costs the scan 37% on an H100), and deciding here, on the CPU, costs no
    device synchronisation."""
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), tokenizer.PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.bool)
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        ids[i, :k] = it["input_ids"]
        mask[i, :k] = True
    mask &= ids != tokenizer.PAD_ID
    batch = {"input_ids": ids, "attention_mask": None if bool(mask.all()) else mask}
    if "label" in items[0]:
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    if "token_labels" in items[0]:  # per-position labels, -100 (ignored) on padding
        labels = torch.full((len(items), n), -100, dtype=torch.long)
        for i, it in enumerate(items):
            labels[i, : len(it["token_labels"])] = it["token_labels"]
        batch["token_labels"] = labels
    for key in ("contig", "start", "end", "name"):
        if key in items[0]:
            batch[key] = [it[key] for it in items]
    return batch
