"""The `genomamba` command. Exit codes: 0 success, 2 bad input (message names file/record/position),
1 anything else. Subcommands map one-to-one onto Snakemake rules.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import __version__

log = logging.getLogger("genomamba")


def _cmd_windows(args) -> int:
    """Tile a FASTA (or BED regions of it) into windows, drop N-rich ones, write a BED, print a summary."""
    import numpy as np

    from . import tokenizer
    from .atomic import atomic_open
    from .io import Fasta, read_bed
    from .windows import filter_by_n, tile

    fasta = Fasta(args.fasta, lenient=args.lenient)
    regions = read_bed(args.bed) if args.bed else None
    if regions is not None:
        for r in regions:
            name = fasta.resolve(r.contig)
            if r.end > fasta.lengths[name]:
                from .errors import InputError
                raise InputError(f"BED interval ends at {r.end:,}, past the contig end ({fasta.lengths[name]:,})",
                                 path=args.bed, record=r.contig, position=r.start)
    contigs = set(args.contigs.split(",")) if args.contigs else None
    windows = tile(fasta.lengths, args.window, args.stride, regions=regions, contigs=contigs)
    t0 = time.perf_counter()
    total_tokens = 0
    kept, dropped = filter_by_n(fasta, windows, args.max_n)
    # Tokenize everything once more on its own to report throughput honestly.
    t1 = time.perf_counter()
    for w in kept:
        total_tokens += len(fasta.fetch_ids(w.contig, w.start, w.end, pad=True))
    t2 = time.perf_counter()
    if args.out:
        with atomic_open(args.out) as fh:
            for w in kept:
                fh.write(f"{w.contig}\t{w.start}\t{w.end}\n")
    bases = sum(fasta.lengths[fasta.resolve(c)] for c in (contigs or fasta.lengths))
    first = kept[0] if kept else None
    print(f"FASTA        {args.fasta}: {len(fasta.lengths)} contig(s), {bases:,} bp")
    print(f"windows      {len(windows):,} of {args.window:,} bp, stride {args.stride or args.window:,} bp; "
          f"kept {len(kept):,}, dropped {dropped:,} with N fraction > {args.max_n}")
    print(f"tokens       {total_tokens:,} read and tokenized in {t2 - t1:.3f} s "
          f"({total_tokens / max(t2 - t1, 1e-9) / 1e6:.1f} M tokens/s; filtering pass {t1 - t0:.3f} s)")
    if first is not None:
        ids = fasta.fetch_ids(first.contig, first.start, first.end, pad=True)
        counts = np.bincount(ids, minlength=tokenizer.VOCAB_SIZE)
        comp = ", ".join(f"{b}={counts[i] / len(ids):.3f}" for b, i in zip("ACGTN", range(7, 12)))
        print(f"first window {first.contig}:{first.start}-{first.end} composition {comp}; "
              f"starts {tokenizer.decode(ids[:24])}...")
    if args.out:
        print(f"wrote        {args.out}")
    return 0


def _cmd_model_info(args) -> int:
    """Parameter counts of model configs (and of their RC-equivariant variant)."""
    import dataclasses

    from .model import BiMambaForMaskedLM, load_model_config

    print("| config | d_model | layers | RCPS | parameters (masked LM) | same with rc_equivariant toggled |")
    print("|---|---|---|---|---|---|")
    for path in args.configs:
        cfg = load_model_config(path)
        count = lambda c: sum(p.numel() for p in BiMambaForMaskedLM(c).parameters())  # noqa: E731
        other = dataclasses.replace(cfg, rc_equivariant=not cfg.rc_equivariant)
        print(f"| {path} | {cfg.d_model} | {cfg.n_layer} | {'yes' if cfg.rc_equivariant else 'no'} | "
              f"{count(cfg):,} | {count(other):,} |")
    return 0


def _cmd_embed(args) -> int:
    from .embed import run_embed

    return run_embed(_default_device(args))


def _default_device(args):
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda:"):
        # Triton launches (and CUDA-graph capture) use the current device, not the tensors' one.
        torch.cuda.set_device(torch.device(args.device))
    return args


def _cmd_predict(args, overrides) -> int:
    if args.config:  # LightningCLI style: the config's test split through its trained model
        return _cmd_train(args, overrides)
    if overrides:
        raise SystemExit(f"genomamba predict: unrecognized arguments: {' '.join(overrides)}")
    if not args.model or not args.out:
        raise SystemExit("genomamba predict: give --model DIR and --out (or -c CONFIG for a classification run)")
    from .predict import run_predict

    return run_predict(_default_device(args))


def _cmd_score_variants(args) -> int:
    from .score_variants import run_score_variants

    return run_score_variants(_default_device(args))


def _cmd_train_variant_classifier(args) -> int:
    from .variant_classifier import run_train_variant_classifier

    return run_train_variant_classifier(_default_device(args))


def _variant_options(parser, *, window_default: int):
    parser.add_argument("--model", required=True, help="model directory (a masked LM gives the zero-shot LLR too)")
    parser.add_argument("--fasta", required=True, help="reference FASTA the VCF was called against")
    parser.add_argument("--vcf", required=True, help="VCF/BCF, plain or bgzipped")
    parser.add_argument("--window", type=int, default=window_default,
                        help=f"bp of sequence around each variant, 128..1048576 (default {window_default})")
    parser.add_argument("--context", type=int, default=8, help="bp either side of the variant that are pooled")
    parser.add_argument("--max-n", type=float, default=0.1, help="skip variants whose window has more N than this")
    parser.add_argument("--max-indel", type=int, default=50, help="longest indel to score (bp)")
    parser.add_argument("--batch-size", type=int, default=8, help="variants per batch (6 windows each)")
    _add_device(parser)


def _cmd_index(args) -> int:
    """Build (or check) the FASTA index and print the contigs."""
    from .io import Fasta

    fa = Fasta(args.fasta)
    total = sum(fa.lengths.values())
    shown = ", ".join(f"{c} ({n:,} bp)" for c, n in list(fa.lengths.items())[:10])
    more = f" and {len(fa.lengths) - 10} more" if len(fa.lengths) > 10 else ""
    print(f"{args.fasta}: {len(fa.lengths)} contig(s), {total:,} bp: {shown}{more}")
    return 0


def _cmd_report(args) -> int:
    from .report import run_report

    return run_report(args)


def _cmd_benchmark(args) -> int:
    from .benchmark import run_benchmark

    return run_benchmark(_default_device(args))


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_train(args, overrides) -> int:
    """fit / validate / test from a YAML config with --section.key=value overrides."""
    import yaml

    from .training import load_config

    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    from .training import run

    metrics = run(args.command, cfg, ckpt_path=args.ckpt_path)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # with DDP, only the first process reports
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        print(f"{args.command}: {shown}")
        print(f"outputs in {cfg['output_dir']}")
    return 128 + metrics["stopped_by_signal"] if "stopped_by_signal" in metrics else 0


def _add_device(parser):
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genomamba",
        description="Long-context DNA models (bidirectional Mamba) from FASTA/BED/VCF/BAM files.",
        epilog="Exit codes: 0 success, 2 bad input (the message names the file, record and position), "
               "1 other errors. BED files and output tables are 0-based half-open; --region uses "
               "samtools notation (1-based, inclusive).")
    p.add_argument("--version", action="version", version=f"genomamba {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("windows", help="tile a genome into model windows and summarise them",
                       description="Tile a FASTA (plain or bgzip) into windows of --window bp every --stride bp, "
                                   "drop windows with too many N, tokenize them, print a summary and optionally "
                                   "write the windows as BED.")
    w.add_argument("fasta", help="reference FASTA (plain or bgzip; a .fai is built when missing)")
    w.add_argument("--bed", help="only tile these regions (BED, 0-based half-open)")
    w.add_argument("--window", type=int, default=1024, help="window length in bp, 128..1048576 (default 1024)")
    w.add_argument("--stride", type=int, default=None, help="step between window starts (default: --window)")
    w.add_argument("--max-n", type=float, default=0.5, help="drop windows with a larger N fraction (default 0.5)")
    w.add_argument("--contigs", help="comma-separated contigs to tile (default: all)")
    w.add_argument("--lenient", action="store_true", help="map non-IUPAC characters to [UNK] instead of failing")
    w.add_argument("--out", help="write the kept windows here as BED (atomically)")
    w.set_defaults(func=_cmd_windows)

    mi = sub.add_parser("model-info", help="parameter counts of model configs",
                        description="Print the parameter count of each YAML config's `model:` section, "
                                    "and of its reverse-complement-equivariant (RCPS) variant.")
    mi.add_argument("configs", nargs="+", help="YAML files with a `model:` section (see configs/)")
    mi.set_defaults(func=_cmd_model_info)

    e = sub.add_parser("embed", help="embeddings of intervals or sequences -> .h5 / .npy",
                       description="Embed BED intervals or one region of a FASTA, or a table/FASTA of sequences, "
                                   "with a trained model directory. Rows keep the input order; the interval "
                                   "table is stored alongside.")
    e.add_argument("--model", required=True, help="model directory (from `genomamba fit` / save_pretrained)")
    e.add_argument("--fasta", help="reference FASTA (for --bed / --region)")
    e.add_argument("--bed", help="intervals to embed (0-based half-open)")
    e.add_argument("--region", help="one region, samtools notation chr:start-end (1-based, inclusive)")
    e.add_argument("--sequences", help="CSV/TSV with a `sequence` column, or a FASTA of sequences")
    e.add_argument("--out", required=True, help="OUT.h5 (any shape) or OUT.npy (+ OUT.intervals.tsv)")
    e.add_argument("--pool", choices=("mean", "max", "first", "last", "none"), default="mean")
    e.add_argument("--window", type=int, help="tile each interval into windows of this length")
    e.add_argument("--stride", type=int, help="step between windows (default: --window)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--chunk-len", type=int, default=None, help="run long inputs in chunks of this length")
    _add_device(e)
    e.set_defaults(func=_cmd_embed)

    pr = sub.add_parser("predict", help="model outputs per interval (TSV) or per base along the genome (bedGraph/HDF5)",
                        description="With a sequence classifier: class probabilities for each BED interval, region "
                                    "or sequence (TSV). With a token classifier or masked LM: a per-base track over "
                                    "--region / --bed / --contigs / the whole FASTA, scored in windows with overlap "
                                    "(only each window's central part is kept), written as bedGraph or HDF5.")
    pr.add_argument("--model", help="model directory (from `genomamba fit`)")
    pr.add_argument("-c", "--config", help="instead of --model: a classification config; writes class probabilities "
                                           "for its data.test to output_dir/predictions.tsv (--ckpt_path best|last)")
    pr.add_argument("--ckpt_path", default=None, help="with -c: 'best', 'last' or a .ckpt file")
    pr.add_argument("--print_config", action="store_true", help=argparse.SUPPRESS)
    pr.add_argument("--fasta", help="reference FASTA (plain or bgzip)")
    pr.add_argument("--bed", help="intervals (0-based half-open)")
    pr.add_argument("--region", help="one region, samtools notation chr:start-end (1-based, inclusive)")
    pr.add_argument("--contigs", help="per-base models: comma-separated contigs to score whole (default: all)")
    pr.add_argument("--sequences", help="sequence classifiers: CSV/TSV with a `sequence` column, or a FASTA")
    pr.add_argument("--out", help="OUT.tsv (sequence classifier) or OUT.bedGraph / OUT.h5 (per base)")
    pr.add_argument("--window", type=int, help="window length in bp, 128..1048576 (per-base default 1024; "
                                                "for classifiers: tile intervals into rows of this length)")
    pr.add_argument("--stride", type=int, help="classifiers with --window: step between windows")
    pr.add_argument("--overlap", type=int, help="per-base: bp shared by consecutive windows (default window/4)")
    pr.add_argument("--class", dest="target_class", type=int, default=1,
                    help="token classifiers: which class's probability to write (default 1)")
    pr.add_argument("--bin", type=int, default=1, help="bedGraph: average scores in bins of this many bp")
    pr.add_argument("--compress", action="store_true", help="HDF5 track: gzip (smaller, much slower to write)")
    pr.add_argument("--no-rc-average", action="store_true", help="score the forward strand only (2x faster)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--no-cuda-graphs", action="store_true",
                    help="per-base tracks on a GPU: launch every kernel instead of replaying CUDA graphs "
                         "(used by default when batch size x window <= 262,144)")
    pr.add_argument("--workers", type=int, default=0, help="background FASTA-reading processes")
    pr.add_argument("--devices", type=int, default=1,
                    help="per-base tracks: share the windows among this many GPUs (or CPU processes) via Lightning DDP")
    _add_device(pr)
    pr.set_defaults(func=_cmd_predict, takes_overrides=True)

    sv = sub.add_parser("score-variants", help="score SNVs and small indels of a VCF -> bgzipped VCF (+ TSV)",
                        description="For every SNV and small indel: the zero-shot masked-LM log-likelihood ratio "
                                    "(GM_LLR), the ref/alt embedding distance (GM_EMB_DIST) and, with --classifier, "
                                    "the classifier's probability (GM_PROB), as INFO fields. Every record is kept in "
                                    "order; those that cannot be scored get a FILTER reason. Output is bgzipped "
                                    "and tabix-indexed; a count summary goes to stderr.")
    _variant_options(sv, window_default=1024)
    sv.add_argument("--out", required=True, help="OUT.vcf.gz (a .tbi index is written next to it)")
    sv.add_argument("--tsv", help="also write one row per allele here")
    sv.add_argument("--classifier", help="directory from `genomamba train-variant-classifier`")
    sv.set_defaults(func=_cmd_score_variants)

    tv = sub.add_parser("train-variant-classifier", help="pathogenic/benign classifier on ref/alt embeddings",
                        description="Logistic regression and RBF-SVM on strand-averaged ref/alt embeddings of "
                                    "labelled variants, chosen and evaluated by nested cross-validation with "
                                    "folds of position blocks; writes the classifier, its metrics, the "
                                    "out-of-fold predictions and a ROC plot.")
    _variant_options(tv, window_default=1024)
    tv.add_argument("--labels", required=True, help="TSV with columns chrom, pos (1-based), ref, alt, label (0/1)")
    tv.add_argument("--out", required=True, help="output directory")
    tv.add_argument("--block-size", type=int, default=1_000_000, help="bp per position block (CV groups)")
    tv.add_argument("--folds", type=int, default=5)
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--finetune-steps", type=int, default=0,
                    help="also fine-tune the backbone with a variant head (Lightning) for this many steps on the "
                         "first outer fold, and compare with scikit-learn on the same fold")
    tv.add_argument("--finetune-lr", type=float, default=1e-3)
    tv.set_defaults(func=_cmd_train_variant_classifier)

    ix = sub.add_parser("index", help="index a FASTA (.fai, and .gzi for bgzip) and list its contigs",
                        description="Build the FASTA index if it is missing (checking line lengths) and print the "
                                    "contigs. Plain gzip is refused with a bgzip hint.")
    ix.add_argument("fasta")
    ix.set_defaults(func=_cmd_index)

    rp = sub.add_parser("report", help="Markdown report of a workflow's metrics and plots",
                        description="Collect metrics.json and plots of run directories, a score-variants TSV "
                                    "and a variant-classifier directory into one Markdown page.")
    rp.add_argument("--pretrain", help="pretraining run directory")
    rp.add_argument("--finetune", help="fine-tuning run directory")
    rp.add_argument("--variants", help="TSV from score-variants --tsv")
    rp.add_argument("--classifier", help="directory from train-variant-classifier")
    rp.add_argument("--out", required=True, help="report.md")
    rp.set_defaults(func=_cmd_report)

    b = sub.add_parser("benchmark", help="training/inference speed and memory of a model on this machine",
                       description="Training step time, inference time, tokens/s and peak memory at each window "
                                   "length, optionally against a same-width, same-depth SDPA Transformer. Prints "
                                   "a Markdown table; --out writes OUT.md and OUT.json.")
    b.add_argument("--config", help="YAML with a `model:` section (default: --d-model/--n-layer)")
    b.add_argument("--d-model", type=int, default=256)
    b.add_argument("--n-layer", type=int, default=16)
    b.add_argument("--lengths", default="1024,8192,131072", help="comma-separated window lengths")
    b.add_argument("--modes", default="train,infer", help="train, infer or both")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--checkpointing", action="store_true", help="per-layer gradient checkpointing")
    b.add_argument("--cuda-graphs", action="store_true", help="inference: replay a CUDA graph per shape "
                   "(what `predict` does for short windows)")
    b.add_argument("--transformer", action="store_true", help="also time a same-size SDPA Transformer")
    b.add_argument("--transformer-max-length", type=int, default=131072)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--profile", type=int, default=0,
                   help="instead: per-kernel time of a step at this L, for each of --modes (torch.profiler)")
    b.add_argument("--out", help="write OUT.md and OUT.json")
    _add_device(b)
    b.set_defaults(func=_cmd_benchmark)

    d = sub.add_parser("demo", help="run every main command once on the shipped example data (minutes, CPU)",
                       description="Pretrain a tiny model on phage lambda, fine-tune it on Oct4 vs MafK ChIP-seq "
                                   "peaks, embed and predict the held-out peaks, write a per-base bedGraph and "
                                   "score the ClinVar mitochondrial variants; prints each command and where "
                                   "every output went.")
    d.add_argument("--out", default="results/demo", help="output directory (default results/demo)")
    d.add_argument("--data", default=None, help="folder with the example data (default: the checkout's data/)")
    d.add_argument("--pretrain-steps", type=int, default=40)
    d.add_argument("--finetune-steps", type=int, default=60)
    d.add_argument("--train-rows", type=int, default=400, help="training peaks per class")
    d.add_argument("--variants", type=int, default=60, help="ClinVar MT records to score")
    _add_device(d)
    d.set_defaults(func=_cmd_demo)

    for name, text in (("fit", "train (pretrain or fine-tune) from a YAML config"),
                       ("validate", "evaluate on the validation split"), ("test", "evaluate on the test split")):
        t = sub.add_parser(name, help=text,
                           description=f"{text[0].upper() + text[1:]}. Any config key can be overridden as "
                                       "--section.key=value (e.g. --trainer.max_steps=200 --data.batch_size=16).")
        t.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
        t.add_argument("--ckpt_path", default=None, help="'last' to resume the run in output_dir (fit) or test its last step; "
                                                      "'best' for the checkpoint selected on the validation split; or a .ckpt file")
        t.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
        t.set_defaults(func=_cmd_train, takes_overrides=True)
    return p


def main(argv=None) -> int:
    from .errors import InputError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="genomamba: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args, extra) if getattr(args, "takes_overrides", False) else args.func(args)
    except InputError as exc:
        print(f"genomamba: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genomamba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
