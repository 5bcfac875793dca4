import pytest
import torch

from genomamba import tokenizer
from genomamba.datasets import (BamReadDataset, BedIntervalDataset, GenomeWindowDataset, LabelledFastaDataset,
                                LabelledSequenceDataset, collate)
from genomamba.errors import InputError
from genomamba.io import Fasta, Interval
from genomamba.windows import Window, check_disjoint_splits, filter_by_n, split_windows, tile


def test_tile_covers_contig_and_pads_the_end():
    ws = tile({"a": 1000, "b": 100}, 256, 200)
    a = [w for w in ws if w.contig == "a"]
    assert [w.start for w in a] == [0, 200, 400, 600, 800]
    assert a[-1].end >= 1000 and all(len(w) == 256 for w in ws)
    assert [w for w in ws if w.contig == "b"] == [Window("b", 0, 256)]


def test_tile_bed_regions_and_limits():
    ws = tile({}, 128, regions=[Interval("x", 1000, 1300)])
    assert ws == [Window("x", 1000, 1128), Window("x", 1128, 1256), Window("x", 1256, 1384)]
    with pytest.raises(InputError, match="outside 128"):
        tile({"a": 10}, 64)
    with pytest.raises(InputError, match="outside 128"):
        tile({"a": 10}, 2_000_000)


def test_n_filter_on_chr20_start(chr20):
    with Fasta(chr20) as fa:
        ws = tile({"20": 200_000}, 4096)
        kept, dropped = filter_by_n(fa, ws, 0.1)
    assert dropped > 0 and kept and kept[0].start >= 60_000  # chr20 begins with 60 kb of N


def test_split_refuses_overlap_in_either_naming_style():
    with pytest.raises(InputError, match="chr20.*train and test"):
        check_disjoint_splits(train=["chr1", "chr20"], val=["chr2"], test=["20"])
    ws = [Window("chr1", 0, 128), Window("2", 0, 128), Window("chrX", 0, 128)]
    s = split_windows(ws, train=["1"], val=["chr2"], test=["X"])
    assert [len(s[k]) for k in ("train", "val", "test")] == [1, 1, 1]


def test_genome_window_dataset_with_rc(data):
    fa = Fasta(data / "lambda_phage_NC_001416.fa.gz")
    ws = tile(fa.lengths, 4096, 4096)
    plain = GenomeWindowDataset(fa, ws)
    x = plain[len(ws) - 1]["input_ids"]
    assert x.shape == (4096,) and (x == tokenizer.PAD_ID).any()  # last window padded
    aug = GenomeWindowDataset(fa, ws, rc_augment=True, seed=1)
    items = []
    for epoch in range(16):
        aug.epoch = epoch
        items.append(aug[0]["input_ids"])
    assert torch.equal(aug[0]["input_ids"], items[-1])  # deterministic given (seed, epoch, index)
    fwd = plain[0]["input_ids"]
    rc = torch.from_numpy(tokenizer.reverse_complement(fwd.numpy()).copy())
    assert any(torch.equal(i, rc) for i in items) and any(torch.equal(i, fwd) for i in items)


def test_gue_csv_dataset_and_collate(data):
    ds = LabelledSequenceDataset(data / "gue_mouse3_dev.csv.gz")
    assert len(ds) == 239 and ds.num_classes == 2
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["input_ids"].shape[0] == 3 and batch["label"].tolist() == ds.labels[:3]


def test_collate_mask_only_when_padded():
    """attention_mask marks real tokens of a padded batch, and is None when nothing was padded
    (the model then runs without sequence ids)."""
    a, b = {"input_ids": torch.tensor([7, 8, 9])}, {"input_ids": torch.tensor([10, 7])}
    padded = collate([a, b])
    assert padded["attention_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert padded["input_ids"][1, 2] == tokenizer.PAD_ID
    assert collate([a, a])["attention_mask"] is None


def test_csv_without_label_column(tmp_path):
    (tmp_path / "x.csv").write_text("seq,y\nACGT,1\n")
    with pytest.raises(InputError, match="'sequence' and 'label'"):
        LabelledSequenceDataset(tmp_path / "x.csv")


def test_labelled_fasta_dataset(data):
    ds = LabelledFastaDataset([data / "oct4_chipseq_peaks_200bp_test.fa.gz",
                               data / "mafk_chipseq_peaks_200bp_test.fa.gz"])
    assert ds.num_classes == 2 and set(ds.labels) == {0, 1}
    assert ds[0]["input_ids"].shape == (200,)


def test_bed_dataset_labels_and_strand(tmp_path, data):
    (tmp_path / "r.bed").write_text("chr1\t100\t300\ta\t0\t+\tpos\nchr2\t100\t300\tb\t0\t-\tneg\n")
    ds = BedIntervalDataset(data / "ex1.fa", tmp_path / "r.bed", length=256, label_column=6)
    assert ds.label_map == {"neg": 0, "pos": 1}
    item = ds[1]
    fa = Fasta(data / "ex1.fa")
    fwd = fa.fetch_ids("chr2", item["start"], item["end"], pad=True)
    assert torch.equal(item["input_ids"], torch.from_numpy(tokenizer.reverse_complement(fwd).copy()))


def test_bam_read_dataset(data):
    ds = BamReadDataset(data / "ex1.bam", "chr2:1-500", min_mapq=10)
    assert len(ds) > 10 and ds[0]["input_ids"].dtype == torch.int64
