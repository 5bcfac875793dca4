"""`genomamba score-variants` and `train-variant-classifier` on the shipped ClinVar MT subset."""

import gzip
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pysam
import pytest
import torch

from genomamba import tokenizer
from genomamba.cli import main
from genomamba.io import Fasta
from genomamba.model import BiMambaConfig, BiMambaForMaskedLM, save_pretrained
from genomamba.variant_features import variant_windows


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    m = BiMambaForMaskedLM(BiMambaConfig(d_model=16, n_layer=1))
    return save_pretrained(m, tmp_path_factory.mktemp("lm") / "model"), m.eval()


@pytest.fixture
def small_vcf(tmp_path, data):
    """The first 30 ClinVar MT records, with REF of record 5 changed (planted mismatch) and one
    record on a contig the FASTA lacks."""
    lines, n = [], 0
    with gzip.open(data / "clinvar_b37_MT.vcf.gz", "rt") as fh:
        for line in fh:
            if line.startswith("#"):
                lines.append(line)
                continue
            if n == 30:
                break
            cols = line.split("\t")
            if n == 5:
                cols[3] = {"A": "C", "C": "G", "G": "T", "T": "A"}[cols[3][0]] + cols[3][1:]
            lines.append("\t".join(cols))
            n += 1
    cols = lines[-1].split("\t")
    cols[0] = "chrUn_test"
    lines.append("\t".join(cols))
    path = tmp_path / "small.vcf"
    path.write_text("".join(lines))
    return path


def _records(path):
    with pysam.VariantFile(str(path)) as vf:
        return list(vf.fetch())


def test_score_variants_keeps_every_record_and_flags_problems(tmp_path, data, lm, small_vcf, capsys):
    out, tsv = tmp_path / "s.vcf.gz", tmp_path / "s.tsv"
    assert main(["score-variants", "--model", str(lm[0]), "--fasta", str(data / "human_chrM_rCRS_GRCh38.fa"),
                 "--vcf", str(small_vcf), "--window", "128", "--out", str(out), "--tsv", str(tsv),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "REF_MISMATCH 1" in err and "CONTIG_MISSING 1" in err and "scored 29" in err
    recs_in, recs_out = _records(small_vcf), _records(out)
    assert len(recs_out) == len(recs_in) == 31
    assert [(r.chrom, r.pos, r.ref, r.alts) for r in recs_out] == [(r.chrom, r.pos, r.ref, r.alts) for r in recs_in]
    assert set(recs_out[5].filter.keys()) == {"REF_MISMATCH"} and "GM_LLR" not in recs_out[5].info
    assert set(recs_out[-1].filter.keys()) == {"CONTIG_MISSING"}
    assert recs_out[0].info["CLINICAL_SIGNIFICANCE"] == recs_in[0].info["CLINICAL_SIGNIFICANCE"]
    assert (tmp_path / "s.vcf.gz.tbi").exists() and len(list(pysam.VariantFile(str(out)).fetch("MT", 0, 700))) > 0
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    assert len(rows) == 31 and rows[5][5] == "REF_MISMATCH" and rows[5][6] == "."
    assert all(float(r[7]) >= 0 for r in rows if r[5] == "PASS")  # a distance


def test_snv_llr_is_the_masked_marginal_averaged_over_strands(tmp_path, data, lm, small_vcf):
    out = tmp_path / "s.vcf.gz"
    fasta = data / "human_chrM_rCRS_GRCh38.fa"
    assert main(["score-variants", "--model", str(lm[0]), "--fasta", str(fasta), "--vcf", str(small_vcf),
                 "--window", "128", "--out", str(out), "--device", "cpu"]) == 0
    rec = _records(out)[0]
    ref, alt = variant_windows(Fasta(fasta), "chrM", rec.pos - 1, rec.ref, rec.alts[0], 128)
    masked = torch.as_tensor(ref).clone()
    masked[64] = tokenizer.MASK_ID
    with torch.no_grad():
        lp_f = lm[1](masked[None])[0, 64].log_softmax(-1)
        lp_r = lm[1](tokenizer.reverse_complement(masked)[None])[0, 127 - 64].log_softmax(-1)
    a, r = tokenizer.encode(rec.alts[0])[0], tokenizer.encode(rec.ref)[0]
    ca, cr = tokenizer.reverse_complement(np.array([a]))[0], tokenizer.reverse_complement(np.array([r]))[0]
    expected = ((lp_f[a] - lp_f[r]) + (lp_r[ca] - lp_r[cr])) / 2
    assert rec.info["GM_LLR"][0] == pytest.approx(float(expected), abs=1e-4)


def test_rerun_is_deterministic(tmp_path, data, lm, small_vcf):
    tsvs = []
    for k in range(2):
        tsvs.append(tmp_path / f"{k}.tsv")
        assert main(["score-variants", "--model", str(lm[0]), "--fasta", str(data / "human_chrM_rCRS_GRCh38.fa"),
                     "--vcf", str(small_vcf), "--window", "128", "--out", str(tmp_path / f"{k}.vcf.gz"),
                     "--tsv", str(tsvs[-1]), "--device", "cpu"]) == 0
    assert tsvs[0].read_text() == tsvs[1].read_text()


def test_killed_run_leaves_no_output(tmp_path, data, lm):
    out = tmp_path / "killed.vcf.gz"
    proc = subprocess.Popen([sys.executable, "-m", "genomamba", "score-variants", "--model", str(lm[0]),
                             "--fasta", str(data / "human_chrM_rCRS_GRCh38.fa"), "--vcf",
                             str(data / "clinvar_b37_MT.vcf.gz"), "--window", "4096", "--batch-size", "1",
                             "--out", str(out), "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (tmp_path / "killed.vcf.gz.tbi").exists()


def test_variant_classifier_end_to_end(tmp_path, data, lm, capsys):
    fasta, vcf = data / "human_chrM_rCRS_GRCh38.fa", data / "clinvar_b37_MT.vcf.gz"
    clf = tmp_path / "clf"
    assert main(["train-variant-classifier", "--model", str(lm[0]), "--fasta", str(fasta), "--vcf", str(vcf),
                 "--labels", str(data / "clinvar_b37_MT_binary_labels.tsv"), "--window", "128",
                 "--block-size", "1000", "--out", str(clf), "--device", "cpu", "--batch-size", "64",
                 "--finetune-steps", "4"]) == 0
    meta = json.loads((clf / "classifier.json").read_text())
    # the Lightning path: backbone fine-tuned with a variant head on the first outer fold
    assert 0 <= meta["metrics"]["finetune_fold0_auroc"] <= 1 and meta["metrics"]["fold0_test_variants"] > 0
    from genomamba.model import BiMambaForVariantClassification, from_pretrained

    assert isinstance(from_pretrained(clf / "finetuned_model"), BiMambaForVariantClassification)
    assert meta["n_variants"] == 371 and meta["n_pathogenic"] == 264 and meta["n_benign"] == 107
    assert 0 <= meta["metrics"]["cv_auroc"] <= 1 and len(meta["metrics"]["cv_auroc_per_fold"]) == 5
    assert (clf / "roc.png").stat().st_size > 1000
    cv = (clf / "cv_predictions.tsv").read_text().splitlines()
    assert len(cv) == 372
    out = tmp_path / "p.vcf.gz"
    assert main(["score-variants", "--model", str(lm[0]), "--fasta", str(fasta), "--vcf", str(vcf),
                 "--window", "128", "--classifier", str(clf), "--out", str(out), "--device", "cpu",
                 "--batch-size", "64"]) == 0
    probs = [r.info["GM_PROB"][0] for r in _records(out)]
    assert len(probs) == 436 and all(0 <= p <= 1 for p in probs)
    # a classifier refuses embeddings of another model, and other window settings
    torch.manual_seed(1)
    other = save_pretrained(BiMambaForMaskedLM(BiMambaConfig(d_model=16, n_layer=1)), tmp_path / "other")
    capsys.readouterr()
    assert main(["score-variants", "--model", str(other), "--fasta", str(fasta), "--vcf", str(vcf),
                 "--classifier", str(clf), "--window", "128", "--out", str(tmp_path / "x.vcf.gz")]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["score-variants", "--model", str(lm[0]), "--fasta", str(fasta), "--vcf", str(vcf),
                 "--classifier", str(clf), "--window", "256", "--out", str(tmp_path / "x.vcf.gz")]) == 2
    assert not (tmp_path / "x.vcf.gz").exists()


def test_clinvar_chr20_records_score_against_hs37_chr20(tmp_path, data, lm, chr20, capsys):
    """The shipped ClinVar chr20 subset on the real chr20 (read from ../shared/data): no REF mismatch."""
    lines, n = [], 0
    with gzip.open(data / "clinvar_b37_chr20.vcf.gz", "rt") as fh:
        for line in fh:
            if not line.startswith("#"):
                n += 1
                if n > 40:
                    break
            lines.append(line)
    (tmp_path / "c20.vcf").write_text("".join(lines))
    out = tmp_path / "c20.vcf.gz"
    assert main(["score-variants", "--model", str(lm[0]), "--fasta", str(chr20), "--vcf", str(tmp_path / "c20.vcf"),
                 "--window", "256", "--out", str(out), "--device", "cpu", "--batch-size", "40"]) == 0
    assert "not scored: none" in capsys.readouterr().err
    recs = _records(out)
    assert len(recs) == 40 and all("GM_EMB_DIST" in r.info and "GM_LLR" in r.info for r in recs)


def test_bcf_input_is_scored_like_vcf(tmp_path, data, lm):
    """BCF in (decoded by pysam), the same scores out as from the equivalent VCF."""
    hdr = pysam.VariantHeader()
    hdr.contigs.add("MT", length=16569)
    hdr.info.add("SYMBOL", 1, "String", "gene")
    records = []
    with gzip.open(data / "clinvar_b37_MT.vcf.gz", "rt") as fh:
        for line in fh:
            if not line.startswith("#") and len(records) < 12:
                c = line.split("\t")
                records.append((int(c[1]), c[3], c[4].split(",")))
    for path, mode in ((tmp_path / "v.bcf", "wb"), (tmp_path / "v.vcf", "w")):
        with pysam.VariantFile(str(path), mode, header=hdr) as out:
            for pos, ref, alts in records:
                out.write(out.new_record(contig="MT", start=pos - 1, alleles=(ref, *alts), info={"SYMBOL": "g"}))
    tsvs = []
    for name in ("v.bcf", "v.vcf"):
        tsvs.append(tmp_path / f"{name}.tsv")
        assert main(["score-variants", "--model", str(lm[0]), "--fasta", str(data / "human_chrM_rCRS_GRCh38.fa"),
                     "--vcf", str(tmp_path / name), "--window", "128", "--out", str(tmp_path / f"{name}.out.vcf.gz"),
                     "--tsv", str(tsvs[-1]), "--device", "cpu"]) == 0
    assert tsvs[0].read_text() == tsvs[1].read_text()
    recs = _records(tmp_path / "v.bcf.out.vcf.gz")
    assert len(recs) == 12 and all(r.info["SYMBOL"] == "g" and "GM_LLR" in r.info for r in recs)
