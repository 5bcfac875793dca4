"""`genomamba predict`: what a trained model says about intervals, or base by base along the genome.

Two kinds of output, chosen by the model directory's head:
- a sequence classifier gives one row per interval or sequence (TSV: class probabilities and the
  predicted class);
- a per-base model (token classifier, or masked LM) gives a track: the probability of
  `--class` per base, or for a masked LM the probability it gives the reference base (low where
  the sequence surprises the model). Regions are scored in windows of `--window` bp; only the
  central `window - overlap` bp of each window are kept, so every base is scored with at least
  overlap/2 bp of context on each side and whole chromosomes can be scored in windows of up to
  1,048,576 bp. Written as bedGraph (genome browsers) or HDF5 (one float32 array per region).
Both strands are scored and averaged unless --no-rc-average. With --devices N the tiles are shared
among N processes by Lightning (DDP); the first one merges them and writes the same file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__, tokenizer
from .atomic import atomic_open, atomic_path
from .errors import InputError
from .inputs import items_from_args, pad_batch, parse_region
from .io import Fasta, read_bed
from .model import (
    BiMambaForMaskedLM,
    BiMambaForSequenceClassification,
    BiMambaForTokenClassification,
    from_pretrained,
)
from .model.graphs import CudaGraphed
from .windows import CentredTile, centred_tiles

TRACK_SUFFIXES = (".bedgraph", ".bg", ".h5", ".hdf5")


class TileDataset(Dataset):
    """Token ids of each tile's window; the FASTA is opened lazily in each loader worker."""

    def __init__(self, fasta_path, tiles: list[CentredTile]):
        self.fasta_path, self.tiles, self._fasta = fasta_path, tiles, None

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, i):
        if self._fasta is None:
            self._fasta = Fasta(self.fasta_path)
        t = self.tiles[i]
        return i, self._fasta.fetch_ids(t.contig, t.start, t.end, pad=True)


def _collate(batch):
    """(tile indices, ids, mask); mask None when nothing is padded, so the model runs without
    segment ids (an all-zeros seq_idx costs the scan ~37%)."""
    idx, arrays = zip(*batch)
    ids, mask = pad_batch(arrays)
    return list(idx), ids, (None if bool(mask.all()) else mask)


def per_base_scores(model, ids, mask, *, target_class: int, rc_average: bool) -> torch.Tensor:
    """(batch, L) float32 scores; NaN where there is no base to score (N, padding; mask None:
    no padding)."""
    probs = model(ids, mask, conjoin=rc_average).float().softmax(-1)  # strands averaged in logit space
    if isinstance(model, BiMambaForTokenClassification):
        out = probs[..., target_class]
    else:  # masked LM: probability of the reference base
        out = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    scorable = (ids >= tokenizer.A_ID) & (ids <= tokenizer.T_ID)
    if mask is not None:
        scorable &= mask
    return out.masked_fill(~scorable, float("nan"))


def _regions(args, fasta: Fasta) -> list[tuple[str, str, int, int]]:
    """(name, contig, start, end) to score: --region, --bed, --contigs, or every contig."""
    if args.sequences:
        raise InputError("a per-base model scores genomic regions: give --fasta with --region, --bed or "
                         "nothing (whole FASTA), not --sequences")
    if args.region:
        contig, s, e = parse_region(args.region)
        regions = [(args.region, contig, s, e)]
    elif args.bed:
        regions = [(iv.name or f"{iv.contig}:{iv.start}-{iv.end}", iv.contig, iv.start, iv.end)
                   for iv in read_bed(args.bed)]
    else:
        names = args.contigs.split(",") if args.contigs else fasta.names()
        regions = [(c, c, 0, fasta.length(fasta.resolve(c))) for c in names]
    for name, contig, s, e in regions:
        real = fasta.resolve(contig)
        if e > fasta.lengths[real]:
            raise InputError(f"interval ends at {e:,}, past the contig end ({fasta.lengths[real]:,})",
                             path=args.bed or args.fasta, record=name, position=s)
    return regions


GRAPH_MAX_TOKENS = 262_144  # CUDA graphs pay off where launches dominate; longer batches keep eager mode


@torch.no_grad()
def predict_track(model, fasta_path, regions, *, window: int, overlap: int, batch_size: int, device: str,
                  target_class: int = 1, rc_average: bool = True, workers: int = 0,
                  cuda_graphs: bool | None = None, stats: dict | None = None) -> list[np.ndarray]:
    """One float32 array per region (NaN where unscored), from centred tiles.

    stats: if given, receives "first_batch_s", the seconds until the second batch was read (the
    first carries the start-up: loader workers, CUDA and kernel loading).

    cuda_graphs: replay each batch shape from a CUDA graph (default: on CUDA when a batch is at
    most GRAPH_MAX_TOKENS tokens, where the launches of a forward cost more than its GPU work).
    """
    tiles, owner = _tiles(regions, window, overlap)
    tracks = [np.full(e - s, np.nan, dtype=np.float32) for _, _, s, e in regions]
    loader = DataLoader(TileDataset(fasta_path, tiles), batch_size=batch_size, collate_fn=_collate,
                        num_workers=workers, pin_memory=device.startswith("cuda"),
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    use_amp = device.startswith("cuda")
    if cuda_graphs is None:
        cuda_graphs = use_amp and batch_size * window <= GRAPH_MAX_TOKENS

    def score(ids, mask=None):
        return per_base_scores(model, ids, mask, target_class=target_class, rc_average=rc_average)

    scorer = CudaGraphed(score) if cuda_graphs and use_amp else score
    bases = sum(t.keep_end - t.keep_start for t in tiles)

    def finish(batch):  # wait for a batch's scores (copied to host memory) and place them
        idx, host, done = batch
        if done is not None:
            done.synchronize()
        _place(tracks, tiles, owner, regions, idx, host.numpy())
        bar.update(sum(tiles[i].keep_end - tiles[i].keep_start for i in idx))

    t_start = time.perf_counter()
    with tqdm(total=bases, desc="predict", unit="bp", unit_scale=True, disable=bases < 10 * window) as bar:
        pending = None
        for n_batch, (idx, ids, mask) in enumerate(loader):
            if n_batch == 1 and stats is not None:
                stats["first_batch_s"] = time.perf_counter() - t_start
            args = tuple(a.to(device, non_blocking=True) for a in ((ids,) if mask is None else (ids, mask)))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                scores = scorer(*args)
            if use_amp:  # copy back asynchronously; the host places the previous batch meanwhile
                host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
                host.copy_(scores, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            else:
                host, done = scores, None
            if pending is not None:
                finish(pending)
            pending = (idx, host, done)
        if pending is not None:
            finish(pending)
    return tracks


def _tiles(regions, window, overlap):
    """Centred tiles over every region, and the region each belongs to."""
    tiles, owner = [], []
    for k, (_, contig, s, e) in enumerate(regions):
        for t in centred_tiles(contig, s, e, window, overlap):
            tiles.append(t)
            owner.append(k)
    return tiles, owner


def _place(tracks, tiles, owner, regions, idx, scores):
    """Copy the kept part of each scored tile into its region's track."""
    for row, i in enumerate(idx):
        t, k = tiles[i], owner[i]
        region_start = regions[k][2]
        tracks[k][t.keep_start - region_start: t.keep_end - region_start] = \
            scores[row, t.keep_start - t.start: t.keep_end - t.start]


def write_bedgraph(path: Path, regions, tracks, *, bin_size: int = 1, digits: int = 4, name: str = "genomamba"):
    """bedGraph (0-based half-open), runs of equal rounded values merged, unscored bases left out."""
    with atomic_open(path) as fh:
        fh.write(f'track type=bedGraph name="{name}" description="genomamba {__version__}"\n')
        for (_, contig, s, _e), values in zip(regions, tracks):
            if bin_size > 1:
                pad = (-len(values)) % bin_size
                padded = np.concatenate([values, np.full(pad, np.nan, np.float32)]).reshape(-1, bin_size)
                with np.errstate(all="ignore"):
                    counts = (~np.isnan(padded)).sum(1)
                    binned = np.where(counts > 0, np.nansum(padded, 1) / np.maximum(counts, 1), np.nan)
                starts = s + np.arange(len(binned)) * bin_size
                ends = np.minimum(starts + bin_size, s + len(values))
                values = binned
            else:
                starts = s + np.arange(len(values))
                ends = starts + 1
            rounded = np.round(values.astype(np.float64), digits)
            nan = np.isnan(rounded)
            # a run starts where the value (or its NaN-ness) changes
            change = np.ones(len(rounded), dtype=bool)
            if len(rounded) > 1:
                same = (rounded[1:] == rounded[:-1]) | (nan[1:] & nan[:-1])
                change[1:] = ~same
            run_starts = np.flatnonzero(change)
            run_ends = np.append(run_starts[1:], len(rounded)) - 1
            keep = ~nan[run_starts]
            for a, b, v in zip(starts[run_starts[keep]], ends[run_ends[keep]], rounded[run_starts[keep]]):
                fh.write(f"{contig}\t{a}\t{b}\t{v:.{digits}g}\n")


def write_track_h5(path: Path, regions, tracks, attrs: dict, compress: bool = False):
    """One float32 dataset per region in 1 Mi-value chunks. compress: gzip level 1 with byte
    shuffling, 10-20% smaller for raw probabilities but ~20x slower to write (measured on the
    63 M values of chr20: 8 s against 0.35 s), so off by default."""
    import h5py

    filters = dict(compression="gzip", compression_opts=1, shuffle=True) if compress else {}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        grp = f.create_group("tracks")
        for k, values in enumerate(tracks):
            grp.create_dataset(str(k), data=values, chunks=(min(len(values), 1 << 20),) if len(values) else None,
                               **filters)
        for col, j in (("name", 0), ("contig", 1)):
            f.create_dataset(col, data=np.array([r[j] for r in regions], dtype=h5py.string_dtype()))
        f.create_dataset("start", data=np.array([r[2] for r in regions], dtype=np.int64))
        f.create_dataset("end", data=np.array([r[3] for r in regions], dtype=np.int64))
        f.attrs.update({**attrs, "genomamba_version": __version__,
                        "coordinates": "tracks/k[i] is the score of base start[k] + i (0-based); NaN = not scored"})


@torch.no_grad()
def predict_intervals(model, items, *, batch_size: int, device: str, rc_average: bool = True) -> np.ndarray:
    """(n, num_classes) class probabilities, in input order."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    out = np.zeros((len(items), model.head_config["num_classes"]), dtype=np.float32)
    use_amp = device.startswith("cuda")
    for b in tqdm(range(0, len(order), batch_size), desc="predict", unit="batch",
                  disable=len(order) <= 10 * batch_size):
        idx = order[b: b + batch_size]
        ids, mask = pad_batch([items[i].ids for i in idx])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            probs = model(ids.to(device), mask.to(device), conjoin=rc_average).float().softmax(-1).cpu().numpy()
        out[idx] = probs
    return out


def run_predict(args) -> int:
    model = from_pretrained(args.model).to(args.device).eval()
    out = Path(args.out)
    rc_average = not args.no_rc_average
    t0 = time.perf_counter()
    if isinstance(model, BiMambaForSequenceClassification):
        if args.devices > 1:
            raise InputError("--devices > 1 shards per-base tracks; a sequence classifier runs on one device")
        if out.suffix.lower() != ".tsv":
            raise InputError(f"a sequence classifier writes one row per interval: use OUT.tsv, got {out.name!r}")
        items = items_from_args(args)
        probs = predict_intervals(model, items, batch_size=args.batch_size, device=args.device,
                                  rc_average=rc_average)
        k = probs.shape[1]
        with atomic_open(out) as fh:
            fh.write("name\tcontig\tstart\tend\t" + "\t".join(f"prob_{c}" for c in range(k)) + "\tpredicted\n")
            for it, p in zip(items, probs):
                fh.write(f"{it.name}\t{it.contig}\t{it.start}\t{it.end}\t" +
                         "\t".join(f"{x:.6g}" for x in p) + f"\t{int(p.argmax())}\n")
        print(f"predicted {len(items):,} rows in {time.perf_counter() - t0:.1f} s -> {out}")
        return 0
    if not isinstance(model, (BiMambaForTokenClassification, BiMambaForMaskedLM)):
        raise InputError(f"model {args.model} ({type(model).__name__}) has no prediction head; "
                         "use `genomamba embed` for its embeddings", path=args.model)
    if out.suffix.lower() not in TRACK_SUFFIXES:
        raise InputError(f"a per-base model writes a track: use OUT.bedGraph or OUT.h5, got {out.name!r}")
    if args.fasta is None:
        raise InputError("a per-base model needs --fasta")
    fasta = Fasta(args.fasta)
    regions = [(n, fasta.resolve(c), s, e) for n, c, s, e in _regions(args, fasta)]
    window = args.window or 1024
    overlap = args.overlap if args.overlap is not None else window // 4
    is_lm = isinstance(model, BiMambaForMaskedLM)
    if not is_lm and not 0 <= args.target_class < model.head_config["num_classes"]:
        raise InputError(f"--class {args.target_class} is not a class of this model "
                         f"(0..{model.head_config['num_classes'] - 1})")
    stats = {}
    if args.devices > 1:
        accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
        # Imported here: Lightning takes seconds to import, and one device does not need it.
        from .predict_sharded import predict_track_sharded

        tracks = predict_track_sharded(model.cpu(), args.fasta, regions, window=window, overlap=overlap,
                                       batch_size=args.batch_size, devices=args.devices, accelerator=accelerator,
                                       shard_dir=out.parent / f".{out.name}.shards", target_class=args.target_class,
                                       rc_average=rc_average, workers=args.workers)
        if tracks is None:  # not the first process: it only scored its share
            return 0
    else:
        tracks = predict_track(model, args.fasta, regions, window=window, overlap=overlap,
                               batch_size=args.batch_size, device=args.device, target_class=args.target_class,
                               rc_average=rc_average, workers=args.workers,
                               cuda_graphs=False if args.no_cuda_graphs else None, stats=stats)
    t1 = time.perf_counter()
    score = "probability of the reference base (masked-LM head, unmasked input)" if is_lm else \
        f"probability of class {args.target_class}"
    if out.suffix.lower() in (".h5", ".hdf5"):
        write_track_h5(out, regions, tracks, {"model": str(args.model), "score": score, "window": window,
                                              "overlap": overlap, "rc_average": rc_average},
                       compress=args.compress)
    else:
        write_bedgraph(out, regions, tracks, bin_size=args.bin, name=Path(args.model).name)
    t2 = time.perf_counter()
    bases = sum(e - s for _, _, s, e in regions)
    first = stats.get("first_batch_s")
    print(f"scored {bases:,} bp in {len(regions):,} region(s) ({score}; windows {window:,} bp, overlap "
          f"{overlap:,}) in {t1 - t0:.1f} s ({bases / max(t1 - t0, 1e-9) / 1e6:.2f} M bp/s"
          + (f"; first batch {first:.1f} s" if first is not None else "") + f"), wrote {out} in {t2 - t1:.1f} s")
    return 0
