"""BAM/CRAM reads through pysam: region or whole-file iteration, flag/MAPQ filters, original orientation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pysam

from ..errors import InputError

# SAM flags
UNMAPPED, REVERSE, SECONDARY, QCFAIL, DUPLICATE, SUPPLEMENTARY = 0x4, 0x10, 0x100, 0x200, 0x400, 0x800
DEFAULT_EXCLUDE = SECONDARY | SUPPLEMENTARY | QCFAIL | DUPLICATE

_COMP = str.maketrans("ACGTNacgtn", "TGCANtgcan")


@dataclass(frozen=True)
class Read:
    name: str
    sequence: str          # as sequenced (reverse-strand reads reverse-complemented back)
    contig: str | None
    start: int             # 0-based alignment start (-1 when unmapped)
    end: int
    is_reverse: bool
    mapq: int


def _is_cram(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"CRAM"


def open_alignments(path: str | os.PathLike, reference: str | os.PathLike | None = None) -> pysam.AlignmentFile:
    """Open a BAM or CRAM. CRAM needs its reference FASTA: we never let htslib fetch one from the web."""
    path = Path(path)
    if not path.exists():
        raise InputError("alignment file not found", path=path)
    if _is_cram(path):
        if reference is None:
            raise InputError("CRAM stores reads as differences to a reference, which was not given",
                             path=path, hint="pass the reference FASTA (--reference / reference=)")
        os.environ.setdefault("REF_PATH", ":")  # no EBI download fallback
        return pysam.AlignmentFile(str(path), "rc", reference_filename=str(reference))
    try:
        return pysam.AlignmentFile(str(path), "rb")
    except ValueError as exc:
        raise InputError(f"not a readable BAM: {exc}", path=path) from exc


def iter_reads(path, region: str | tuple | None = None, *, reference=None, min_mapq: int = 0,
               exclude_flags: int = DEFAULT_EXCLUDE, include_unmapped: bool = False):
    """Yield `Read`s from the whole file or a region ('chr:start-end' 1-based, or (contig, start, end) 0-based).

    Secondary, supplementary, QC-fail and duplicate reads are skipped by default, and reads below
    `min_mapq`. Sequences come back in the orientation they were sequenced.
    """
    path = Path(path)
    with open_alignments(path, reference) as bam:
        if region is not None:
            if not bam.has_index():
                raise InputError("a region was asked for but the file has no index", path=path,
                                 hint=f"run `samtools index {path}`")
            try:
                it = bam.fetch(region=region) if isinstance(region, str) else bam.fetch(*region)
            except ValueError as exc:
                raise InputError(f"cannot fetch region {region!r}: {exc}", path=path) from exc
        else:
            it = bam.fetch(until_eof=True)
        for rec in it:
            if rec.flag & exclude_flags:
                continue
            if rec.is_unmapped and not include_unmapped:
                continue
            if not rec.is_unmapped and rec.mapping_quality < min_mapq:
                continue
            seq = rec.query_sequence
            if seq is None:
                continue
            if rec.is_reverse:
                seq = seq.translate(_COMP)[::-1]
            yield Read(rec.query_name, seq, rec.reference_name, rec.reference_start,
                       rec.reference_end if rec.reference_end is not None else -1, rec.is_reverse,
                       rec.mapping_quality)
