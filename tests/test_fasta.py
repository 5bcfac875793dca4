import gzip
import shutil

import pytest

from genomamba import tokenizer
from genomamba.errors import InputError
from genomamba.io import Fasta, compression, iter_records


def test_compression_detection(data):
    assert compression(data / "lambda_phage_NC_001416.fa.gz") == "bgzip"
    assert compression(data / "ex1.fa") == "plain"
    assert compression(data / "oct4_chipseq_peaks_200bp_test.fa.gz") == "gzip"


def test_bgzip_and_plain_fetch_agree_with_streaming(data):
    for path in (data / "lambda_phage_NC_001416.fa.gz", data / "ex1.fa", data / "human_chrM_rCRS_GRCh38.fa"):
        with Fasta(path) as fa:
            for name, seq in iter_records(path):
                assert fa.length(name) == len(seq)
                assert fa.fetch(name, 0, len(seq)) == seq
                assert fa.fetch(name, 100, 250) == seq[100:250]


def test_lambda_genome_length(data):
    with Fasta(data / "lambda_phage_NC_001416.fa.gz") as fa:
        assert list(fa.lengths.values()) == [48502]


def test_builds_missing_index(tmp_path, data):
    shutil.copy(data / "ex1.fa", tmp_path / "ex1.fa")
    with Fasta(tmp_path / "ex1.fa") as fa:
        assert fa.lengths == {"chr1": 1575, "chr2": 1584}
    assert (tmp_path / "ex1.fa.fai").exists()


def test_plain_gzip_is_refused_with_bgzip_hint_but_streams(data):
    path = data / "oct4_chipseq_peaks_200bp_test.fa.gz"
    with pytest.raises(InputError, match="bgzip"):
        Fasta(path)
    recs = list(iter_records(path))
    assert len(recs) > 10 and all(len(s) == 200 for _, s in recs)


def test_out_of_range_names_contig_and_length(data):
    with Fasta(data / "ex1.fa") as fa:
        with pytest.raises(InputError, match=r"chr1.*length 1,575"):
            fa.fetch("chr1", 1500, 1600)
        with pytest.raises(InputError, match="start 10 > end 5"):
            fa.fetch("chr1", 10, 5)
        padded = fa.fetch("chr1", 1570, 1580, pad=True)
        assert padded.endswith("NNNNN") and len(padded) == 10
        ids = fa.fetch_ids("chr1", -3, 2, pad=True)
        assert list(ids[:3]) == [tokenizer.PAD_ID] * 3


def test_missing_contig_lists_available(data):
    with Fasta(data / "ex1.fa") as fa:
        with pytest.raises(InputError, match=r"'chr9'.*chr1, chr2"):
            fa.fetch("chr9", 0, 10)


def test_mito_alias_is_resolved_and_reported(data, caplog):
    with Fasta(data / "human_chrM_rCRS_GRCh38.fa") as fa:
        assert "MT" in fa
        assert fa.fetch("MT", 0, 10) == fa.fetch("chrM", 0, 10)
        assert fa.contigs.used_aliases == {"MT": "chrM"}
    assert "read as 'chrM'" in caplog.text
    with Fasta(data / "human_chrM_rCRS_GRCh38.fa", allow_alias=False) as fa:
        assert "MT" not in fa


def test_truncated_bgzip_fasta(tmp_path, data):
    raw = (data / "lambda_phage_NC_001416.fa.gz").read_bytes()
    bad = tmp_path / "lambda.fa.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="lambda.fa.gz"):
        fa = Fasta(bad)
        fa.fetch(fa.names()[0], 0, 48000)


def test_truncated_plain_fasta_with_stale_index(tmp_path, data):
    text = (data / "ex1.fa").read_text()
    (tmp_path / "ex1.fa").write_text(text[: len(text) - 400])
    shutil.copy(data / "ex1.fa.fai", tmp_path / "ex1.fa.fai")
    with pytest.raises(InputError, match=r"truncated|stale"):
        Fasta(tmp_path / "ex1.fa").fetch("chr2", 0, 1584)


def test_malformed_fasta_line_lengths(tmp_path, data):
    lines = (data / "ex1.fa").read_text().splitlines()
    lines[3] = lines[3][:-7]  # a short line in the middle of a record
    (tmp_path / "bad.fa").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="bad.fa"):
        Fasta(tmp_path / "bad.fa")


def test_sequence_before_header(tmp_path):
    (tmp_path / "x.fa").write_text("ACGT\n>chr1\nACGT\n")
    with pytest.raises(InputError, match="before the first"):
        list(iter_records(tmp_path / "x.fa"))


def test_non_iupac_character_names_record_and_position(tmp_path, data):
    lines = (data / "ex1.fa").read_text().splitlines()
    lines[2] = lines[2][:5] + "!" + lines[2][6:]  # chr1, second sequence line, column 5
    (tmp_path / "x.fa").write_text("\n".join(lines) + "\n")
    width = len(lines[1])
    with Fasta(tmp_path / "x.fa") as fa:
        with pytest.raises(InputError) as e:
            fa.fetch_ids("chr1", 0, 1575)
        assert "chr1" in str(e.value) and f"position {width + 5}" in str(e.value)
        lenient = Fasta(tmp_path / "x.fa", lenient=True)
        assert lenient.fetch_ids("chr1", 0, 1575)[width + 5] == tokenizer.UNK_ID


def test_empty_record(tmp_path):
    (tmp_path / "e.fa").write_text(">empty\n>full\nACGTACGT\n")
    with Fasta(tmp_path / "e.fa") as fa:
        assert fa.lengths["empty"] == 0
        with pytest.raises(InputError, match="outside the contig"):
            fa.fetch("empty", 0, 1)


def test_missing_file():
    with pytest.raises(InputError, match="not found"):
        Fasta("/nonexistent/genome.fa")


def test_gzip_fixture_is_really_gzip(data):
    with gzip.open(data / "oct4_chipseq_peaks_200bp_test.fa.gz", "rt") as fh:
        assert fh.readline().startswith(">")


def test_chr20_megabase_window(chr20):
    with Fasta(chr20) as fa:
        assert fa.length("20") == 63_025_520
        ids = fa.fetch_ids("chr20", 30_000_000, 30_000_000 + 1_048_576)  # alias chr20 -> 20
        assert ids.shape == (1_048_576,) and tokenizer.n_fraction(ids) < 0.01


@pytest.mark.parametrize("which", ["lambda", "chr20"])
def test_loader_workers_read_the_same_bases_as_one_process(which, data, request):
    """Forked data-loader workers must not share the parent's bgzip file offset (they did: reads
    from 6 workers on chr20 failed with 'Decompressed to 54196, not 2134937802')."""
    import numpy as np
    from torch.utils.data import DataLoader

    from genomamba.datasets import GenomeWindowDataset
    from genomamba.windows import tile

    path = data / "lambda_phage_NC_001416.fa.gz" if which == "lambda" else request.getfixturevalue("chr20")
    fa = Fasta(path)
    windows = tile(fa.lengths, 2048, 1999)[:: max(1, len(tile(fa.lengths, 2048, 1999)) // 400)]
    fa.fetch("20" if which == "chr20" else fa.names()[0], 0, 100)  # the parent has read: its handle is open
    ds = GenomeWindowDataset(fa, windows)
    one = [b["input_ids"].numpy() for b in DataLoader(ds, batch_size=8, num_workers=0, collate_fn=_stack)]
    many = [b["input_ids"].numpy() for b in DataLoader(ds, batch_size=8, num_workers=2, collate_fn=_stack)]
    assert len(one) == len(many) and all(np.array_equal(a, b) for a, b in zip(one, many))


def _stack(items):
    import torch

    return {"input_ids": torch.stack([i["input_ids"] for i in items])}
