"""`genomamba predict`: centred tiling, per-base tracks (bedGraph / HDF5) and per-interval TSV."""

import h5py
import numpy as np
import pytest
import torch

from genomamba import tokenizer
from genomamba.cli import main
from genomamba.errors import InputError
from genomamba.io import Fasta
from genomamba.model import (BiMambaConfig, BiMambaForMaskedLM, BiMambaForSequenceClassification,
                             BiMambaForTokenClassification, save_pretrained)
from genomamba.windows import centred_tiles


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = BiMambaConfig(d_model=16, n_layer=1)
    made = {"lm": BiMambaForMaskedLM(cfg), "tok": BiMambaForTokenClassification(cfg, num_classes=3),
            "seq": BiMambaForSequenceClassification(cfg, num_classes=2)}
    return {k: (save_pretrained(m, root / k), m.eval()) for k, m in made.items()}


@pytest.mark.parametrize("start,end,length,overlap", [(0, 1000, 256, 64), (17, 5000, 128, 0), (5, 50, 1024, 512),
                                                      (100, 1601, 512, 511)])
def test_centred_tiles_cover_the_region_once_with_context(start, end, length, overlap):
    tiles = centred_tiles("c", start, end, length, overlap)
    kept = np.concatenate([np.arange(t.keep_start, t.keep_end) for t in tiles])
    assert np.array_equal(kept, np.arange(start, end))  # every base once, in order
    for t in tiles:
        assert t.end - t.start == length and t.start <= t.keep_start < t.keep_end <= t.end
        if t.keep_end - t.keep_start == length - overlap:
            assert t.keep_start - t.start >= overlap // 2 and t.end - t.keep_end >= overlap // 2


def test_centred_tiles_refuse_bad_overlap():
    with pytest.raises(InputError, match="overlap"):
        centred_tiles("c", 0, 100, 256, 256)


def _direct(model, ids, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None], None, **kw)[0].float()


def test_lm_track_equals_the_model_on_the_centred_window(tmp_path, data, models):
    """A region shorter than window - overlap is one tile: the track is the model's own output there."""
    path, model = models["lm"]
    out = tmp_path / "t.h5"
    assert main(["predict", "--model", str(path), "--fasta", str(data / "ex1.fa"), "--region", "chr1:301-400",
                 "--window", "256", "--overlap", "128", "--out", str(out), "--device", "cpu"]) == 0
    with h5py.File(out) as f:
        track = f["tracks/0"][:]
        assert f["start"][0] == 300 and f["end"][0] == 400
    ws = 300 - (256 - 100) // 2
    ids = Fasta(data / "ex1.fa").fetch_ids("chr1", ws, ws + 256)
    probs = _direct(model, ids, conjoin=True).softmax(-1)
    expected = probs[torch.arange(256), torch.as_tensor(ids)].numpy()[300 - ws: 400 - ws]
    assert np.allclose(track, expected, atol=1e-5)


def test_bedgraph_matches_h5_track_and_skips_n(tmp_path, data, models):
    path, model = models["tok"]
    fa = data / "human_chrM_rCRS_GRCh38.fa"
    args = ["predict", "--model", str(path), "--fasta", str(fa), "--region", "chrM:3001-3400",
            "--window", "128", "--class", "2", "--device", "cpu", "--no-rc-average"]
    assert main([*args, "--out", str(tmp_path / "t.h5")]) == 0
    assert main([*args, "--out", str(tmp_path / "t.bedGraph")]) == 0
    assert main([*args, "--compress", "--out", str(tmp_path / "z.h5")]) == 0
    with h5py.File(tmp_path / "t.h5") as f, h5py.File(tmp_path / "z.h5") as z:
        track = f["tracks/0"][:]
        assert f["tracks/0"].compression is None and z["tracks/0"].compression == "gzip"
        np.testing.assert_array_equal(z["tracks/0"][:], track)
    lines = (tmp_path / "t.bedGraph").read_text().splitlines()
    assert lines[0].startswith("track type=bedGraph")
    rebuilt = np.full(400, np.nan)
    for line in lines[1:]:
        contig, s, e, v = line.split("\t")
        assert contig == "chrM"
        rebuilt[int(s) - 3000: int(e) - 3000] = float(v)
    assert np.allclose(rebuilt, np.round(track, 4), atol=1e-4, equal_nan=True)
    # chrM has one N (position 3107, 1-based): no bedGraph value there
    seq = Fasta(fa).fetch("chrM", 3000, 3400)
    n_at = [i for i, b in enumerate(seq) if b.upper() == "N"]
    assert n_at and all(np.isnan(rebuilt[i]) for i in n_at) and np.isnan(track[n_at]).all()


def test_sequence_classifier_tsv(tmp_path, data, models):
    path, model = models["seq"]
    out = tmp_path / "p.tsv"
    assert main(["predict", "--model", str(path), "--sequences", str(data / "gue_mouse3_dev.csv.gz"),
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["name", "contig", "start", "end", "prob_0", "prob_1", "predicted"]
    assert len(rows) == 240
    probs = np.array([[float(r[4]), float(r[5])] for r in rows[1:]])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    from genomamba.datasets import read_sequence_table

    _, table = read_sequence_table(data / "gue_mouse3_dev.csv.gz", need_label=False)
    ids = tokenizer.encode(table[7][1]["sequence"])
    direct = _direct(model, ids, conjoin=True).softmax(-1).numpy()
    assert np.allclose(probs[7], direct, atol=1e-4)


def test_wrong_output_kind_and_head_fail_clearly(tmp_path, data, models, capsys):
    assert main(["predict", "--model", str(models["seq"][0]), "--sequences", str(data / "gue_mouse3_dev.csv.gz"),
                 "--out", str(tmp_path / "x.bedGraph")]) == 2
    assert "use OUT.tsv" in capsys.readouterr().err
    assert main(["predict", "--model", str(models["lm"][0]), "--fasta", str(data / "ex1.fa"),
                 "--region", "chr1:1-2000", "--out", str(tmp_path / "x.bedGraph")]) == 2
    assert "past the contig end" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_sharded_prediction_writes_the_same_track(tmp_path, data, models):
    """--devices 2 (Lightning DDP, here 2 CPU processes over gloo) == one process."""
    import subprocess
    import sys

    path, _ = models["lm"]
    base = [sys.executable, "-m", "genomamba", "predict", "--model", str(path), "--fasta",
            str(data / "lambda_phage_NC_001416.fa.gz"), "--region", "NC_001416.1_Enterobacteria_phage_lambda:1-9000",
            "--window", "512", "--device", "cpu"]
    for name, extra in (("one", []), ("two", ["--devices", "2"])):
        r = subprocess.run([*base, "--out", str(tmp_path / f"{name}.h5"), *extra], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        assert np.allclose(a["tracks/0"][:], b["tracks/0"][:], atol=1e-6, equal_nan=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]  # shards cleaned up
