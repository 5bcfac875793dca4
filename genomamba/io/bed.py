"""BED intervals (0-based half-open): 3+ columns, optional name, score, strand and a label column."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .text import open_text


@dataclass(frozen=True)
class Interval:
    contig: str
    start: int
    end: int
    name: str | None = None
    score: float | None = None
    strand: str = "."
    label: str | None = None

    def __len__(self) -> int:
        return self.end - self.start


def read_bed(path: str | os.PathLike, *, label_column: int | None = None) -> list[Interval]:
    """Read a BED file. `label_column` (0-based) picks a column as the label (e.g. 3 or 6).

    Comment, `track` and `browser` lines are skipped. Errors name the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("BED file not found", path=path)
    out = []
    with open_text(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) < 3:
                cols = line.split()
            where = dict(path=path, position=f"line {line_no}")
            if len(cols) < 3:
                raise InputError(f"BED needs at least 3 columns, found {len(cols)}", **where)
            try:
                start, end = int(cols[1]), int(cols[2])
            except ValueError:
                raise InputError(f"start/end must be integers, got {cols[1]!r}, {cols[2]!r}", **where) from None
            if start < 0 or start > end:
                raise InputError(f"invalid interval {cols[0]}:{start}-{end} (BED is 0-based half-open, "
                                 "start <= end)", record=cols[0], **where)
            score = None
            if len(cols) > 4 and cols[4] not in (".", ""):
                try:
                    score = float(cols[4])
                except ValueError:
                    raise InputError(f"score column must be numeric, got {cols[4]!r}", **where) from None
            strand = cols[5] if len(cols) > 5 and cols[5] in "+-." else "."
            label = None
            if label_column is not None:
                if label_column >= len(cols):
                    raise InputError(f"no label column {label_column} (line has {len(cols)} columns)", **where)
                label = cols[label_column]
            out.append(Interval(cols[0], start, end, cols[3] if len(cols) > 3 else None, score, strand, label))
    return out
