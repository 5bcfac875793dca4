"""What the inference commands read: BED intervals or one region over a FASTA, or a table/FASTA of
sequences, as `Item`s (name, 0-based half-open coordinates, token ids) in input order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import tokenizer
from .datasets import read_sequence_table
from .errors import InputError
from .io import Fasta, iter_records, read_bed
from .windows import tile


@dataclass
class Item:
    name: str
    contig: str
    start: int
    end: int
    ids: np.ndarray


def parse_region(text: str) -> tuple[str, int, int]:
    """samtools notation 'chr:start-end' (1-based, inclusive) -> (contig, start0, end) half-open."""
    m = re.fullmatch(r"(.+):([\d,]+)-([\d,]+)", text.strip())
    if not m:
        raise InputError(f"region {text!r} must look like chr:start-end (1-based, inclusive)")
    start, end = int(m.group(2).replace(",", "")), int(m.group(3).replace(",", ""))
    if start < 1 or end < start:
        raise InputError(f"region {text!r}: need 1 <= start <= end")
    return m.group(1), start - 1, end


def genomic_items(fasta: Fasta, intervals, window: int | None, stride: int | None) -> list[Item]:
    items = []
    for name, contig, start, end in intervals:
        real = fasta.resolve(contig)
        if end > fasta.lengths[real]:
            raise InputError(f"interval ends at {end:,}, past the contig end ({fasta.lengths[real]:,})",
                             path=fasta.path, record=contig, position=start)
        spans = [(start, end)] if window is None else [
            (w.start, w.end) for w in tile({contig: end - start}, window, stride)]
        for k, (s, e) in enumerate(spans):
            s, e = (s, e) if window is None else (start + s, start + e)
            label = name if window is None else f"{name}#{k}"
            items.append(Item(label, contig, s, e, fasta.fetch_ids(contig, s, e, pad=True)))
    return items


def sequence_items(path) -> list[Item]:
    path = Path(path)
    if path.suffix in (".csv", ".tsv") or path.name.endswith((".csv.gz", ".tsv.gz")):
        _, rows = read_sequence_table(path, need_label=False)
        return [Item(r.get("name") or f"row{line - 2}", ".", -1, -1,
                     tokenizer.encode(r["sequence"], record=f"line {line}", source=str(path)))
                for line, r in rows]
    return [Item(name, ".", -1, -1, tokenizer.encode(seq, record=name, source=str(path)))
            for name, seq in iter_records(path)]


def items_from_args(args) -> list[Item]:
    """The --bed / --region / --sequences choice shared by `embed` and `predict`."""
    sources = [args.bed is not None, args.region is not None, args.sequences is not None]
    if sum(sources) != 1:
        raise InputError("give exactly one of --bed, --region, --sequences")
    if args.sequences:
        items = sequence_items(args.sequences)
    else:
        if args.fasta is None:
            raise InputError("--bed and --region need --fasta")
        fasta = Fasta(args.fasta)
        if args.bed:
            intervals = [(iv.name or f"{iv.contig}:{iv.start}-{iv.end}", iv.contig, iv.start, iv.end)
                         for iv in read_bed(args.bed)]
        else:
            contig, s, e = parse_region(args.region)
            intervals = [(args.region, contig, s, e)]
        items = genomic_items(fasta, intervals, args.window, args.stride)
    if not items:
        raise InputError("nothing to do: the input has no intervals or sequences")
    return items


def pad_batch(arrays) -> tuple:
    """Right-pad token-id arrays with [PAD] -> (ids, mask) LongTensor/BoolTensor; PAD is masked."""
    import torch

    n = max(len(a) for a in arrays)
    ids = torch.full((len(arrays), n), tokenizer.PAD_ID, dtype=torch.long)
    for row, a in enumerate(arrays):
        ids[row, : len(a)] = torch.as_tensor(a)
    return ids, ids != tokenizer.PAD_ID
