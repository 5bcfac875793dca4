"""Contig-name aliases (`chr20` <-> `20`, `chrM` <-> `MT`): resolved explicitly, never guessed."""

from __future__ import annotations

import logging

log = logging.getLogger("genomamba")

_MITO = ("chrM", "MT", "chrMT", "M")


def candidate_names(name: str) -> list[str]:
    """Other spellings of the same contig in the UCSC and Ensembl/b37 styles."""
    if name in _MITO:
        return [n for n in _MITO if n != name]
    if name.startswith("chr"):
        return [name[3:]]
    return ["chr" + name]


class ContigResolver:
    """Maps a requested contig name onto the names a file has, reporting every alias it uses."""

    def __init__(self, available, *, source: str, allow_alias: bool = True):
        self.available = list(available)
        self._set = set(self.available)
        self.source = source
        self.allow_alias = allow_alias
        self.used_aliases: dict[str, str] = {}

    def resolve(self, name: str) -> str | None:
        """The file's name for `name`, or None if it has no such contig (in either style)."""
        if name in self._set:
            return name
        if not self.allow_alias:
            return None
        for alt in candidate_names(name):
            if alt in self._set:
                if name not in self.used_aliases:
                    self.used_aliases[name] = alt
                    log.warning("%s: contig %r read as %r (naming-style alias)", self.source, name, alt)
                return alt
        return None
