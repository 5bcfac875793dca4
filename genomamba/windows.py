"""Tiling a genome (or BED regions) into fixed-length windows, and chromosome splits.

Windows are 0-based half-open and may run past a contig's end: the reader pads those positions
with [PAD], so every window has exactly `length` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .io.contigs import candidate_names
from .tokenizer import n_fraction

MIN_WINDOW, MAX_WINDOW = 128, 1_048_576


@dataclass(frozen=True)
class Window:
    contig: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def check_window(length: int, stride: int | None = None) -> None:
    if not MIN_WINDOW <= length <= MAX_WINDOW:
        raise InputError(f"window length {length:,} is outside {MIN_WINDOW:,}..{MAX_WINDOW:,} bp")
    if stride is not None and stride <= 0:
        raise InputError(f"stride must be positive, got {stride}")


def tile(lengths: dict[str, int], length: int, stride: int | None = None, *, regions=None,
         contigs=None) -> list[Window]:
    """Windows of `length` every `stride` bp over each contig (or over each BED region).

    The last window of a contig (or region) starts at the last stride step before its end and is
    padded; a contig shorter than the window gives one padded window.
    """
    stride = stride or length
    check_window(length, stride)
    spans = [(r.contig, r.start, r.end) for r in regions] if regions is not None else \
        [(c, 0, n) for c, n in lengths.items() if contigs is None or c in contigs]
    out = []
    for contig, lo, hi in spans:
        if hi <= lo:
            continue
        for s in range(lo, max(hi - length, lo) + 1, stride):
            out.append(Window(contig, s, s + length))
        last = out[-1].start if out and out[-1].contig == contig else None
        if last is not None and last + length < hi:  # cover the tail
            out.append(Window(contig, last + stride, last + stride + length))
    return out


def filter_by_n(fasta, windows, max_n_fraction: float):
    """Keep windows whose N (or padding-free unknown) fraction is at most `max_n_fraction`."""
    kept, dropped = [], 0
    for w in windows:
        ids = fasta.fetch_ids(w.contig, w.start, w.end, pad=True)
        if n_fraction(ids) <= max_n_fraction:
            kept.append(w)
        else:
            dropped += 1
    return kept, dropped


def _canonical(name: str) -> str:
    return min([name] + candidate_names(name), key=len)


def check_disjoint_splits(**splits) -> None:
    """Refuse train/val/test chromosome lists that share a chromosome (either naming style)."""
    seen: dict[str, tuple[str, str]] = {}
    for split, names in splits.items():
        for name in names or ():
            key = _canonical(name)
            if key in seen and seen[key][0] != split:
                other_split, other_name = seen[key]
                spelled = f"{other_name!r} in {other_split}, {name!r} in {split}"
                raise InputError(f"chromosome {other_name!r} is in both the {other_split} and {split} lists "
                                 f"({spelled}): training and evaluating on the same chromosome leaks information")
            seen[key] = (split, name)


def split_windows(windows, *, train=None, val=None, test=None) -> dict[str, list[Window]]:
    """Assign windows to splits by chromosome (after checking the lists are disjoint)."""
    check_disjoint_splits(train=train, val=val, test=test)
    out = {"train": [], "val": [], "test": []}
    lookup = {}
    for split, names in (("train", train), ("val", val), ("test", test)):
        for n in names or ():
            lookup[_canonical(n)] = split
    for w in windows:
        split = lookup.get(_canonical(w.contig))
        if split is not None:
            out[split].append(w)
    return out


def windows_to_array(windows) -> np.ndarray:
    """(n, 2) int64 starts/ends (for storing next to embeddings)."""
    return np.array([(w.start, w.end) for w in windows], dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class CentredTile:
    """A model window [start, end) whose central part [keep_start, keep_end) is kept."""

    contig: str
    start: int
    end: int
    keep_start: int
    keep_end: int


def centred_tiles(contig: str, start: int, end: int, length: int, overlap: int) -> list[CentredTile]:
    """Cover [start, end) exactly with kept pieces of `length - overlap` bp, each at the centre of a
    `length`-bp window, so every scored base sees at least overlap/2 bp of context on both sides
    (except at contig ends, where the reader pads). Outputs of consecutive windows never overlap."""
    check_window(length)
    if not 0 <= overlap < length:
        raise InputError(f"overlap must be in 0..{length - 1} for {length:,} bp windows, got {overlap:,}")
    keep = length - overlap
    out = []
    for ks in range(start, end, keep):
        ke = min(ks + keep, end)
        ws = ks - (length - (ke - ks)) // 2
        out.append(CentredTile(contig, ws, ws + length, ks, ke))
    return out
