"""`genomamba embed`: embeddings of genomic intervals or sequences, to HDF5 or .npy.

Inputs: BED intervals over a FASTA, one samtools-style region (1-based, inclusive: chr:start-end),
or a table/FASTA of sequences. With --window, each interval is tiled into windows of that length
(the last one padded) and each window is one row. Output rows keep the input order; the interval
table (name, contig, start, end; 0-based half-open) is stored alongside: in the .h5 file, or as
OUT.intervals.tsv next to a .npy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .atomic import atomic_open, atomic_path
from .errors import InputError
from .inputs import Item, items_from_args, pad_batch
from .model import BiMambaModel, from_pretrained


@torch.no_grad()
def embed_items(backbone: BiMambaModel, items: list[Item], *, pool: str, batch_size: int, device: str,
                chunk_len: int | None = None):
    """Embeddings in input order: (n, d) pooled, or a list of (L_i, d) arrays for pool='none'."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))  # similar lengths batch together
    out: list = [None] * len(items)
    use_amp = device.startswith("cuda")
    for b in tqdm(range(0, len(order), batch_size), desc="embed", unit="batch", disable=len(order) <= batch_size):
        idx = order[b: b + batch_size]
        ids, mask = pad_batch([items[i].ids for i in idx])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            e = backbone.embed(ids.to(device), mask.to(device), pool=pool, chunk_len=chunk_len).float().cpu()
        for row, i in enumerate(idx):
            out[i] = e[row].numpy() if pool != "none" else e[row, : len(items[i].ids)].numpy()
    return np.stack(out) if pool != "none" else out


def write(out: Path, items: list[Item], emb, *, pool: str, model_dir: str):
    table = "name\tcontig\tstart\tend\n" + "".join(f"{it.name}\t{it.contig}\t{it.start}\t{it.end}\n" for it in items)
    if out.suffix == ".npy":
        if pool == "none" and len({len(x) for x in emb}) > 1:
            raise InputError("per-position embeddings of different lengths do not fit one .npy; use .h5 or --window")
        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.stack(emb) if pool == "none" else emb)
        with atomic_open(out.with_suffix(".intervals.tsv")) as fh:
            fh.write(table)
        return
    if out.suffix not in (".h5", ".hdf5"):
        raise InputError(f"output must end in .h5, .hdf5 or .npy, got {out.name!r}")
    import h5py

    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        if pool == "none":
            grp = f.create_group("embeddings")
            for k, x in enumerate(emb):
                grp.create_dataset(str(k), data=x.astype(np.float32), compression="gzip")
        else:
            f.create_dataset("embeddings", data=emb.astype(np.float32))
        for col in ("name", "contig"):
            f.create_dataset(col, data=np.array([getattr(it, col) for it in items], dtype=h5py.string_dtype()))
        f.create_dataset("start", data=np.array([it.start for it in items], dtype=np.int64))
        f.create_dataset("end", data=np.array([it.end for it in items], dtype=np.int64))
        f.attrs.update({"pool": pool, "model": str(model_dir), "genomamba_version": __version__,
                        "coordinates": "0-based half-open; -1 for sequences without a genomic position"})


def run_embed(args) -> int:
    model = from_pretrained(args.model)
    backbone = (model if isinstance(model, BiMambaModel) else model.backbone).to(args.device).eval()
    items = items_from_args(args)
    emb = embed_items(backbone, items, pool=args.pool, batch_size=args.batch_size, device=args.device,
                      chunk_len=args.chunk_len)
    write(Path(args.out), items, emb, pool=args.pool, model_dir=args.model)
    width = emb.shape[-1] if args.pool != "none" else emb[0].shape[-1]
    print(f"embedded {len(items):,} {'windows' if args.window else 'rows'} (pool={args.pool}, width {width}) "
          f"-> {args.out}")
    return 0
