"""Character-level DNA tokenizer with Caduceus / HyenaDNA-compatible ids.

    [CLS]0 [SEP]1 [BOS]2 [MASK]3 [PAD]4 [RESERVED]5 [UNK]6 A7 C8 G9 T10 N11   (vocab padded to 16)

Why 16 and not 12: the embedding table is padded to a multiple of 8 (as Caduceus does) so the
ids above line up with their checkpoints; ids 12-15 are never produced.
Encoding is one numpy table lookup over the bytes, so a megabase takes about a millisecond.
Lower case (soft-masked repeats) is upper-cased; IUPAC ambiguity codes map to N; anything else
is an error naming the record and offset, or UNK when `lenient=True`.
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import InputError

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
CLS_ID, SEP_ID, BOS_ID, MASK_ID, PAD_ID, RESERVED_ID, UNK_ID = range(7)
A_ID, C_ID, G_ID, T_ID, N_ID = 7, 8, 9, 10, 11
BASES = "ACGTN"
VOCAB_SIZE = 16
IUPAC_AMBIGUOUS = "RYKMSWBDHV"
_INVALID = 255

# Byte -> id table. U is *not* silently turned into T: DNA models should not see RNA unnoticed.
_LUT = np.full(256, _INVALID, dtype=np.uint8)
for _base, _id in zip(BASES, (A_ID, C_ID, G_ID, T_ID, N_ID)):
    _LUT[ord(_base)] = _id
    _LUT[ord(_base.lower())] = _id
for _code in IUPAC_AMBIGUOUS:
    _LUT[ord(_code)] = N_ID
    _LUT[ord(_code.lower())] = N_ID

# Reverse complement on ids: A<->T, C<->G; N and the specials map to themselves.
_RC = np.arange(VOCAB_SIZE, dtype=np.int64)
_RC[A_ID], _RC[T_ID], _RC[C_ID], _RC[G_ID] = T_ID, A_ID, G_ID, C_ID

_DECODE = np.array([ord("?")] * VOCAB_SIZE, dtype=np.uint8)
for _base, _id in zip(BASES, (A_ID, C_ID, G_ID, T_ID, N_ID)):
    _DECODE[_id] = ord(_base)
_DECODE[PAD_ID] = ord("-")
_DECODE[MASK_ID] = ord("?")


def encode(seq: str | bytes, *, lenient: bool = False, record: str = "<sequence>", offset: int = 0,
           source: str | None = None) -> np.ndarray:
    """DNA string -> int64 ids. `record`, `offset` and `source` only serve error messages."""
    raw = np.frombuffer(seq.encode("ascii", errors="replace") if isinstance(seq, str) else bytes(seq),
                        dtype=np.uint8)
    ids = _LUT[raw]
    bad = ids == _INVALID
    if bad.any():
        if not lenient:
            pos = int(np.argmax(bad))
            ch = chr(raw[pos]) if 32 <= raw[pos] < 127 else f"byte 0x{raw[pos]:02x}"
            raise InputError(
                f"character {ch!r} is not a DNA base or IUPAC code",
                path=source, record=record, position=offset + pos,
                hint="clean the sequence, or pass lenient=True (--lenient) to map it to [UNK]")
        ids = ids.copy()
        ids[bad] = UNK_ID
    return ids.astype(np.int64)


def decode(ids) -> str:
    """Ids -> string (specials other than PAD/MASK print as '?')."""
    arr = np.asarray(ids, dtype=np.int64)
    return _DECODE[np.clip(arr, 0, VOCAB_SIZE - 1)].tobytes().decode("ascii")


def reverse_complement(ids):
    """Reverse complement of ids along the last axis; works on numpy arrays and torch tensors."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(ids, torch.Tensor):
        return _rc_table(ids.device)[ids.long()].flip(-1).to(ids.dtype)
    arr = np.asarray(ids)
    return _RC[arr][..., ::-1].astype(arr.dtype, copy=False)


@functools.cache
def _rc_table(device):
    """The complement table as a tensor on `device`, made once: no host-to-device copy per call
    (a copy would also break CUDA-graph capture of a forward that reverse-complements)."""
    import torch

    return torch.as_tensor(_RC, device=device)


def complement_table() -> np.ndarray:
    """The id -> complementary id table (length 16)."""
    return _RC.copy()


def n_fraction(ids: np.ndarray) -> float:
    """Fraction of positions that are N (or UNK) in an id array."""
    if ids.size == 0:
        return 0.0
    return float(np.count_nonzero((ids == N_ID) | (ids == UNK_ID)) / ids.size)
