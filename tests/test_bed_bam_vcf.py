import gzip

import pysam
import pytest

from genomamba.errors import InputError
from genomamba.io import Fasta, iter_reads, read_bed, read_variants
from genomamba.io.vcf import CONTIG_MISSING, OK, REF_MISMATCH


def test_bed_reads_real_file(data):
    ivs = read_bed(data / "giab_NA12878_b37_chr20_10.0-10.1Mb.named20.bed")
    assert len(ivs) == 11 and ivs[0].contig == "20" and ivs[0].start == 10000846 and ivs[0].end == 10002407


def test_bed_skips_track_and_comments_and_reads_label(tmp_path):
    p = tmp_path / "x.bed"
    p.write_text("track name=x\n# comment\nbrowser position chr1\nchr1\t10\t20\tpeak1\t5\t-\tpos\n")
    (iv,) = read_bed(p, label_column=6)
    assert (iv.contig, iv.start, iv.end, iv.name, iv.score, iv.strand, iv.label) == \
        ("chr1", 10, 20, "peak1", 5.0, "-", "pos")


def test_bed_start_after_end_names_line(tmp_path):
    p = tmp_path / "bad.bed"
    p.write_text("chr1\t10\t20\nchr1\t50\t40\n")
    with pytest.raises(InputError, match=r"bad.bed.*line 2.*start <= end"):
        read_bed(p)


def test_bam_region_reads_and_orientation(data):
    reads = list(iter_reads(data / "ex1.bam", "chr1:100-200"))
    assert reads and all(r.contig == "chr1" for r in reads)
    with pysam.AlignmentFile(str(data / "ex1.bam")) as bam:
        fwd = {(r.query_name, r.flag): r.get_forward_sequence() for r in bam.fetch("chr1", 99, 200)}
    assert any(r.is_reverse for r in reads)
    for r in reads:
        assert r.sequence in fwd.values()


def test_bam_filters_mapq_and_flags(data):
    everything = list(iter_reads(data / "mpileup.1.bam", exclude_flags=0, include_unmapped=True))
    default = list(iter_reads(data / "mpileup.1.bam"))
    strict = list(iter_reads(data / "mpileup.1.bam", min_mapq=30))
    assert len(everything) >= len(default) > len(strict) > 0
    assert all(r.mapq >= 30 for r in strict)


def test_cram_needs_reference(data):
    with pytest.raises(InputError, match="reference"):
        list(iter_reads(data / "ce_5b.cram"))
    cram = [r.sequence for r in iter_reads(data / "ce_5b.cram", reference=data / "ce.fa")]
    bam = [r.sequence for r in iter_reads(data / "ce_5b.bam")]
    assert cram == bam and len(bam) > 0


def test_bam_without_index_for_region(tmp_path, data):
    (tmp_path / "x.bam").write_bytes((data / "ex1.bam").read_bytes())
    with pytest.raises(InputError, match="samtools index"):
        list(iter_reads(tmp_path / "x.bam", "chr1:1-100"))
    assert len(list(iter_reads(tmp_path / "x.bam"))) > 3000  # whole-file iteration needs no index


def _write_vcf(path, lines, contig="MT", length=16569):
    header = ["##fileformat=VCFv4.2", f"##contig=<ID={contig},length={length}>",
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    path.write_text("\n".join(header + lines) + "\n")


def test_clinvar_mt_against_rcrs_with_alias(data):
    with Fasta(data / "human_chrM_rCRS_GRCh38.fa") as fa:
        variants, rep = read_variants(data / "clinvar_b37_MT.vcf.gz", fa)
    assert rep.aliases == {"MT": "chrM"}
    assert rep.status[REF_MISMATCH] == 0 and rep.status[OK] > 400
    v = variants[0]
    assert (v.contig, v.pos, v.ref, v.alt) == ("MT", 582, "G", "A")  # VCF POS 583 -> 0-based 582


def test_planted_ref_mismatch_is_counted_not_scored(tmp_path, data):
    with gzip.open(data / "clinvar_b37_MT.vcf.gz", "rt") as fh:
        lines = fh.read().splitlines()
    body = [ln for ln in lines if not ln.startswith("#")][:20]
    head = [ln for ln in lines if ln.startswith("#")]
    cols = body[3].split("\t")
    cols[3] = {"A": "C", "C": "G", "G": "T", "T": "A"}[cols[3][0]] + cols[3][1:]
    body[3] = "\t".join(cols)
    (tmp_path / "x.vcf").write_text("\n".join(head + body) + "\n")
    with Fasta(data / "human_chrM_rCRS_GRCh38.fa") as fa:
        variants, rep = read_variants(tmp_path / "x.vcf", fa)
        assert rep.status[REF_MISMATCH] == 1 and variants[3].status == REF_MISMATCH
        assert "REF_MISMATCH: 1" in rep.summary()
        with pytest.raises(InputError, match="does not match"):
            read_variants(tmp_path / "x.vcf", fa, strict_ref=True)


def test_multiallelic_split_and_indels(tmp_path, data):
    with Fasta(data / "human_chrM_rCRS_GRCh38.fa") as fa:
        ref = fa.fetch("chrM", 99, 103)
        _write_vcf(tmp_path / "m.vcf", [f"MT\t100\tv1\t{ref[0]}\tA,C,T\t.\t.\t.",
                                        f"MT\t100\tv2\t{ref[:3]}\t{ref[0]}\t.\t.\t.",
                                        f"MT\t100\tv3\t{ref[0]}\t<DEL>\t.\t.\t."])
        variants, rep = read_variants(tmp_path / "m.vcf", fa)
    assert [v.allele_index for v in variants[:3]] == [1, 2, 3]
    assert {v.record_index for v in variants[:3]} == {0}
    assert variants[3].kind == "deletion" and variants[3].status == OK
    assert variants[4].status == "UNSUPPORTED_ALLELE"
    assert rep.records == 3 and rep.alleles == 5


def test_vcf_contig_missing(tmp_path, data):
    _write_vcf(tmp_path / "x.vcf", ["22\t100\t.\tA\tG\t.\t.\t."], contig="22", length=1000)
    with Fasta(data / "human_chrM_rCRS_GRCh38.fa") as fa:
        variants, rep = read_variants(tmp_path / "x.vcf", fa)
    assert variants[0].status == CONTIG_MISSING and rep.status[CONTIG_MISSING] == 1


def test_vt_chr20_vcf_all_refs_match(chr20):
    shared = chr20.parent
    with Fasta(chr20) as fa:
        variants, rep = read_variants(shared / "vt_normalize_chr20_b37.vcf.gz", fa)
    assert rep.records == 194 and rep.status[REF_MISMATCH] == 0


def test_other_naming_style_vcf_is_aliased_and_reported(chr20):
    giab = chr20.parents[1] / "github-google-nucleus" / "test_nist.b37_chr20_100kbp_at_10mb.vcf.gz"
    with Fasta(chr20) as fa:
        variants, rep = read_variants(giab, fa)
    assert rep.aliases == {"chr20": "20"} and rep.status[REF_MISMATCH] == 0 and rep.records == 221
    with Fasta(chr20, allow_alias=False) as fa:
        _, rep = read_variants(giab, fa)
    assert rep.status[CONTIG_MISSING] == rep.alleles
