import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from genomamba.cli import main
from genomamba.io import Fasta
from genomamba.model import BiMambaConfig, BiMambaForMaskedLM, save_pretrained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = BiMambaForMaskedLM(BiMambaConfig(d_model=16, n_layer=1))
    return save_pretrained(m, tmp_path_factory.mktemp("m") / "model"), m


def test_bed_intervals_to_h5_match_the_api(tmp_path, data, model_dir):
    path, model = model_dir
    (tmp_path / "r.bed").write_text("chr1\t10\t200\tfirst\nchr2\t300\t700\tsecond\nchr1\t0\t50\tthird\n")
    out = tmp_path / "e.h5"
    assert main(["embed", "--model", str(path), "--fasta", str(data / "ex1.fa"), "--bed", str(tmp_path / "r.bed"),
                 "--out", str(out), "--device", "cpu"]) == 0
    with h5py.File(out) as f:
        assert f["embeddings"].shape == (3, 16)
        assert [n.decode() for n in f["name"][:]] == ["first", "second", "third"]
        assert list(f["start"][:]) == [10, 300, 0] and list(f["end"][:]) == [200, 700, 50]
        row = f["embeddings"][1]
    ids = torch.from_numpy(Fasta(data / "ex1.fa").fetch_ids("chr2", 300, 700))[None]
    expected = model.eval().backbone.embed(ids, pool="mean")[0].numpy()
    assert np.allclose(row, expected, atol=1e-5)


def test_region_windows_are_zero_based_half_open(tmp_path, data, model_dir):
    out = tmp_path / "w.h5"
    assert main(["embed", "--model", str(model_dir[0]), "--fasta", str(data / "ex1.fa"), "--region", "chr1:101-600",
                 "--window", "128", "--out", str(out), "--device", "cpu"]) == 0
    with h5py.File(out) as f:
        assert list(f["start"][:]) == [100, 228, 356, 484] and list(f["end"][:]) == [228, 356, 484, 612]


def test_sequences_to_npy_with_interval_table(tmp_path, data, model_dir):
    out = tmp_path / "s.npy"
    assert main(["embed", "--model", str(model_dir[0]), "--sequences", str(data / "gue_mouse3_dev.csv.gz"),
                 "--out", str(out), "--device", "cpu", "--batch-size", "64"]) == 0
    assert np.load(out).shape == (239, 16)
    assert len((tmp_path / "s.intervals.tsv").read_text().splitlines()) == 240


def test_per_position_h5_and_fasta_sequences(tmp_path, data, model_dir):
    out = tmp_path / "p.h5"
    assert main(["embed", "--model", str(model_dir[0]), "--sequences",
                 str(data / "oct4_chipseq_peaks_200bp_test.fa.gz"), "--pool", "none", "--out", str(out),
                 "--device", "cpu"]) == 0
    with h5py.File(out) as f:
        assert f["embeddings"]["0"].shape == (200, 16) and len(f["name"]) == len(f["embeddings"])


def run(*args):
    return subprocess.run([sys.executable, "-m", "genomamba", *args], capture_output=True, text=True)


def test_bad_input_exits_2_without_output(tmp_path, data, model_dir):
    out = tmp_path / "x.h5"
    (tmp_path / "past.bed").write_text("chr1\t100\t5000\n")
    r = run("embed", "--model", str(model_dir[0]), "--fasta", str(data / "ex1.fa"), "--bed",
            str(tmp_path / "past.bed"), "--out", str(out), "--device", "cpu")
    assert r.returncode == 2 and "past the contig end" in r.stderr and not out.exists()
    r = run("embed", "--model", str(model_dir[0]), "--fasta", str(data / "ex1.fa"), "--region", "chr1:1-100",
            "--bed", str(tmp_path / "past.bed"), "--out", str(out))
    assert r.returncode == 2 and "exactly one of" in r.stderr
    r = run("embed", "--model", str(tmp_path / "nope"), "--sequences", str(data / "gue_mouse3_dev.csv.gz"),
            "--out", str(out))
    assert r.returncode == 2 and "model directory not found" in r.stderr and not out.exists()
