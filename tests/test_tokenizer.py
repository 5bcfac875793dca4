import numpy as np
import pytest
import torch

from genomamba import tokenizer as tk
from genomamba.errors import InputError


def test_ids_match_caduceus_hyenadna_vocab():
    assert tk.SPECIAL_TOKENS == ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
    assert list(tk.encode("ACGTN")) == [7, 8, 9, 10, 11]
    assert tk.VOCAB_SIZE == 16


def test_lower_case_and_iupac():
    assert list(tk.encode("acgtn")) == [7, 8, 9, 10, 11]
    assert set(tk.encode("RYKMSWBDHVrykmswbdhv")) == {tk.N_ID}


def test_strict_error_names_record_and_offset():
    with pytest.raises(InputError) as e:
        tk.encode("ACGTACGX", record="chr7", offset=1000, source="x.fa")
    msg = str(e.value)
    assert "x.fa" in msg and "chr7" in msg and "position 1007" in msg and "'X'" in msg


def test_rna_u_is_not_silently_dna():
    with pytest.raises(InputError):
        tk.encode("ACGU")


def test_lenient_maps_to_unk():
    assert list(tk.encode("AC*T", lenient=True)) == [7, 8, tk.UNK_ID, 10]


def test_reverse_complement_on_ids_numpy_and_torch():
    ids = tk.encode("AACGTNG")
    rc = tk.reverse_complement(ids)
    assert tk.decode(rc) == "CNACGTT"
    assert np.array_equal(tk.reverse_complement(rc), ids)
    specials = np.array([tk.PAD_ID, tk.MASK_ID, tk.CLS_ID])
    assert list(tk.reverse_complement(specials)) == [tk.CLS_ID, tk.MASK_ID, tk.PAD_ID]
    t = torch.from_numpy(np.stack([ids, ids]))
    assert torch.equal(tk.reverse_complement(t), torch.from_numpy(np.stack([rc, rc])))


def test_decode_round_trip_and_n_fraction():
    s = "ACGTTGCAN" * 3
    assert tk.decode(tk.encode(s)) == s
    assert tk.n_fraction(tk.encode("ANNA")) == 0.5
