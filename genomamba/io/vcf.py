"""VCF/BCF variants through pysam: SNVs and small indels, 0-based positions, REF checked against the FASTA.

Positions are converted once, here: VCF POS is 1-based, `Variant.pos` is 0-based. Multi-allelic
records are split into one `Variant` per ALT allele; `record_index` keeps the input order so that
writers can put every record back where it was.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pysam

from ..errors import InputError

log = logging.getLogger("genomamba")

OK, REF_MISMATCH, CONTIG_MISSING, UNSUPPORTED = "PASS", "REF_MISMATCH", "CONTIG_MISSING", "UNSUPPORTED_ALLELE"
_BASES = set("ACGTNacgtn")


@dataclass(frozen=True)
class Variant:
    contig: str            # as written in the VCF
    pos: int               # 0-based start of REF
    ref: str
    alt: str
    id: str | None
    record_index: int      # index of the VCF record (0-based, input order)
    allele_index: int      # 1 for the first ALT
    status: str = OK       # PASS or the reason it cannot be scored
    fasta_contig: str | None = None  # the FASTA's name for the contig (after aliasing)

    @property
    def kind(self) -> str:
        if len(self.ref) == 1 and len(self.alt) == 1:
            return "snv"
        if len(self.ref) == len(self.alt):
            return "mnv"
        return "insertion" if len(self.alt) > len(self.ref) else "deletion"


@dataclass
class VariantReport:
    records: int = 0
    alleles: int = 0
    status: Counter = field(default_factory=Counter)
    aliases: dict = field(default_factory=dict)
    first_mismatch: str | None = None

    def summary(self) -> str:
        parts = [f"{self.records} records, {self.alleles} alleles"]
        parts += [f"{k}: {v}" for k, v in sorted(self.status.items())]
        if self.aliases:
            parts.append("contig aliases used: " + ", ".join(f"{a}->{b}" for a, b in self.aliases.items()))
        return "; ".join(parts)


def read_variants(path: str | os.PathLike, fasta=None, *, max_indel: int = 50,
                  strict_ref: bool = False) -> tuple[list[Variant], VariantReport]:
    """All ALT alleles of a VCF/BCF as `Variant`s with a status, and a report of the counts.

    With `fasta`, REF is compared with the reference; a mismatch is counted and reported (and
    raised with strict_ref=True), never scored silently. Symbolic/breakend alleles and indels
    longer than `max_indel` are marked UNSUPPORTED_ALLELE.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("VCF file not found", path=path)
    try:
        vf = pysam.VariantFile(str(path))
    except (ValueError, OSError) as exc:
        raise InputError(f"not a readable VCF/BCF: {exc}", path=path) from exc
    out, rep = [], VariantReport()
    with vf:
        try:
            for i, rec in enumerate(vf.fetch()):
                rep.records += 1
                fa_contig, ref_ok = None, True
                if fasta is not None:
                    fa_contig = fasta.contigs.resolve(rec.chrom)
                    if fa_contig is not None and fa_contig != rec.chrom:
                        rep.aliases[rec.chrom] = fa_contig
                for k, alt in enumerate(rec.alts or (), 1):
                    rep.alleles += 1
                    status = OK
                    if not set(rec.ref) <= _BASES or not set(alt) <= _BASES:
                        status = UNSUPPORTED
                    elif abs(len(alt) - len(rec.ref)) > max_indel or max(len(alt), len(rec.ref)) > max_indel + 1:
                        status = UNSUPPORTED
                    elif fasta is not None and fa_contig is None:
                        status = CONTIG_MISSING
                    elif fasta is not None:
                        if k == 1:
                            end = rec.pos - 1 + len(rec.ref)
                            length = fasta.lengths[fa_contig]
                            ref_ok = end <= length and \
                                fasta.fetch(fa_contig, rec.pos - 1, end).upper() == rec.ref.upper()
                        if not ref_ok:
                            status = REF_MISMATCH
                            if rep.first_mismatch is None:
                                rep.first_mismatch = f"{rec.chrom}:{rec.pos} REF={rec.ref}"
                            if strict_ref:
                                raise InputError(f"REF {rec.ref!r} does not match the reference FASTA",
                                                 path=path, record=f"{rec.chrom}:{rec.pos}",
                                                 hint="is the VCF on the same genome build as the FASTA?")
                    rep.status[status] += 1
                    out.append(Variant(rec.chrom, rec.pos - 1, rec.ref, alt, rec.id, i, k, status, fa_contig))
        except (ValueError, OSError) as exc:
            raise InputError(f"malformed VCF record after record {rep.records}: {exc}", path=path) from exc
    if rep.aliases:
        log.warning("%s: contig names read through aliases: %s", path, rep.aliases)
    if rep.status[REF_MISMATCH]:
        log.warning("%s: %d allele(s) with REF not matching the FASTA (first: %s)", path,
                    rep.status[REF_MISMATCH], rep.first_mismatch)
    return out, rep
