"""Readers for FASTA, BED, BAM/CRAM and VCF/BCF. Internal coordinates are 0-based half-open."""

from .bam import Read, iter_reads, open_alignments
from .bed import Interval, read_bed
from .contigs import ContigResolver, candidate_names
from .fasta import Fasta, compression, iter_records
from .vcf import Variant, VariantReport, read_variants

__all__ = ["Fasta", "compression", "iter_records", "Interval", "read_bed", "Read", "iter_reads",
           "open_alignments", "Variant", "VariantReport", "read_variants", "ContigResolver", "candidate_names"]
