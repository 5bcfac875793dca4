"""FASTA reading: plain, gzip and bgzip, through pyfaidx (random access needs a .fai index).

Coordinates are 0-based half-open throughout: `fetch("20", 0, 10)` is the first ten bases.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pyfaidx

from .. import tokenizer
from ..errors import InputError
from .contigs import ContigResolver

BGZF_MAGIC = b"\x1f\x8b\x08\x04"


def compression(path: str | os.PathLike) -> str:
    """'plain', 'bgzip' or 'gzip' (plain gzip cannot be random-accessed)."""
    with open(path, "rb") as fh:
        head = fh.read(18)
    if head[:2] != b"\x1f\x8b":
        return "plain"
    # BGZF: gzip with FEXTRA and an extra subfield 'BC'.
    if head[:4] == BGZF_MAGIC and head[12:14] == b"BC":
        return "bgzip"
    return "gzip"


def iter_records(path: str | os.PathLike):
    """Stream (name, sequence) from any FASTA, gzip included, without an index."""
    path = Path(path)
    opener = gzip.open if compression(path) != "plain" else open
    name, chunks, line_no = None, [], 0
    try:
        with opener(path, "rt") as fh:
            for line_no, line in enumerate(fh, 1):
                line = line.rstrip("\r\n")
                if line.startswith(">"):
                    if name is not None:
                        yield name, "".join(chunks)
                    name, chunks = line[1:].split()[0] if line[1:].strip() else "", []
                    if not name:
                        raise InputError("FASTA header without a name", path=path, position=f"line {line_no}")
                elif line:
                    if name is None:
                        raise InputError("sequence before the first '>' header: not FASTA", path=path,
                                         position=f"line {line_no}")
                    chunks.append(line.strip())
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read compressed FASTA ({exc}); the file looks truncated or corrupt",
                         path=path, position=f"line {line_no}") from exc
    if name is not None:
        yield name, "".join(chunks)


class Fasta:
    """Random access to a FASTA file by (contig, start, end), 0-based half-open.

    Builds the `.fai` (and `.gzi` for bgzip) when missing and the folder is writable. A plain-gzip
    file gets an error saying how to recompress it with bgzip; use `iter_records` to stream it.
    """

    def __init__(self, path: str | os.PathLike, *, allow_alias: bool = True, lenient: bool = False):
        self.path = Path(path)
        self.lenient = lenient
        if not self.path.exists():
            raise InputError("FASTA file not found", path=self.path)
        kind = compression(self.path)
        if kind == "gzip":
            raise InputError(
                "plain-gzip FASTA cannot be read by position", path=self.path,
                hint=f"recompress with bgzip: `zcat {self.path} | bgzip > {self.path.with_suffix('.bgz')}`, "
                     "or decompress it")
        fai = Path(str(self.path) + ".fai")
        if not fai.exists() and not os.access(self.path.parent, os.W_OK):
            raise InputError("no .fai index next to the FASTA and its folder is not writable", path=self.path,
                             hint=f"run `samtools faidx {self.path}` where you can write")
        try:
            self._fa = self._open()
        except Exception as exc:  # pyfaidx, Bio.bgzf, zlib and struct all signal a bad file differently
            if "BioPython" in str(exc):  # not the file's fault: pyfaidx reads bgzip through Biopython
                raise InputError(f"cannot read bgzip FASTA: {exc}", path=self.path,
                                 hint="pip install biopython (a genomamba dependency)") from exc
            raise InputError(f"malformed or truncated FASTA: {exc}", path=self.path,
                             hint="check that every record has a '>' header and equal-length lines; "
                                  "`samtools faidx` reports the same problem") from exc
        self._pid = os.getpid()
        self.lengths = {name: len(rec) for name, rec in self._fa.records.items()}
        self.contigs = ContigResolver(self.lengths, source=str(self.path), allow_alias=allow_alias)

    def _open(self):
        return pyfaidx.Fasta(str(self.path), as_raw=True, sequence_always_upper=False, rebuild=False,
                             build_index=True)

    def _handle(self):
        """This process's file handle. Data-loader workers fork with the parent's open file, whose
        read offset they would share (interleaved seeks corrupt bgzip reads): each reopens it."""
        if self._fa is None or self._pid != os.getpid():
            self._fa, self._pid = self._open(), os.getpid()
        return self._fa

    def __getstate__(self):  # pickled for spawned workers: the handle is reopened there
        return {**self.__dict__, "_fa": None, "_pid": None}

    def close(self):
        if self._fa is not None and self._pid == os.getpid():
            self._fa.close()
        self._fa = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, contig: str) -> bool:
        return self.contigs.resolve(contig) is not None

    def names(self) -> list[str]:
        return list(self.lengths)

    def length(self, contig: str) -> int:
        return self.lengths[self.resolve(contig)]

    def resolve(self, contig: str) -> str:
        """The file's own name for `contig` (aliases allowed), or an error listing what exists."""
        name = self.contigs.resolve(contig)
        if name is None:
            shown = ", ".join(list(self.lengths)[:8]) + (" ..." if len(self.lengths) > 8 else "")
            raise InputError(f"contig {contig!r} is not in this FASTA (it has: {shown})", path=self.path,
                             record=contig, hint="check the reference build and contig naming")
        return name

    def fetch(self, contig: str, start: int, end: int, *, pad: bool = False) -> str:
        """Bases [start, end) of `contig`; out-of-range is an error, or N-padded with pad=True.

        Padding uses 'N' here; `fetch_ids(..., pad=True)` pads with [PAD] instead.
        """
        name = self.resolve(contig)
        length = self.lengths[name]
        if start > end:
            raise InputError(f"interval start {start} > end {end}", path=self.path, record=contig)
        if (start < 0 or end > length) and not pad:
            raise InputError(f"interval [{start}, {end}) is outside the contig (length {length:,})",
                             path=self.path, record=contig, position=start,
                             hint="coordinates are 0-based half-open; ask for padding to read past the ends")
        lo, hi = max(start, 0), min(end, length)
        try:
            seq = self._handle()[name][lo:hi] if hi > lo else ""
        except Exception as exc:  # a corrupt compressed block surfaces here, not at open
            raise InputError(f"cannot read bases: {exc}; the file looks truncated or corrupt", path=self.path,
                             record=contig, position=lo) from exc
        if len(seq) != hi - lo:
            raise InputError(f"read {len(seq)} bases where {hi - lo} were expected: the file is truncated "
                             "or its .fai index is stale", path=self.path, record=contig, position=lo,
                             hint=f"delete {self.path}.fai to rebuild it")
        if pad:
            seq = "N" * (lo - start) + seq + "N" * (end - hi)
        return seq

    def fetch_ids(self, contig: str, start: int, end: int, *, pad: bool = False) -> np.ndarray:
        """Token ids of [start, end); positions beyond the contig ends are [PAD] when pad=True."""
        name = self.resolve(contig)
        length = self.lengths[name]
        lo, hi = max(start, 0), min(end, length)
        if not pad and (lo != start or hi != end):
            self.fetch(contig, start, end)  # raises the out-of-range error
        core = tokenizer.encode(self.fetch(name, lo, hi) if hi > lo else "", lenient=self.lenient,
                                record=name, offset=lo, source=str(self.path))
        if lo == start and hi == end:
            return core
        ids = np.full(end - start, tokenizer.PAD_ID, dtype=np.int64)
        ids[lo - start: lo - start + len(core)] = core
        return ids
