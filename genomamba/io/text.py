"""Open a text file that may be gzip-compressed (detected by its magic bytes, not its name)."""

from __future__ import annotations

import gzip
import os


def open_text(path: str | os.PathLike):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rt", newline="") if magic == b"\x1f\x8b" else open(path, newline="")
