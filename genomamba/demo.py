"""`genomamba demo`: every main command once, on the shipped example data, in a few minutes on a CPU.

1. pretrain a tiny masked-LM on the phage lambda genome (`genomamba fit`);
2. fine-tune it to tell Oct4 from MafK ChIP-seq peaks, test on held-out peaks (`fit`, `test`);
3. embed the test peaks (`embed`), predict their class (`predict`, TSV);
4. a per-base track of the pretrained model along lambda (`predict`, bedGraph);
5. score the first ClinVar mitochondrial variants against the rCRS chrM (`score-variants`, VCF.gz).
Each step runs the same code as the command it names, and prints that command. The models are tiny
and trained for seconds: the numbers show that the pipeline works, not what a real model reaches.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

from .atomic import atomic_open
from .errors import InputError
from .io import iter_records

DATA = Path(__file__).resolve().parents[1] / "data"
PEAKS = {"oct4": 1, "mafk": 0}  # label 1 = Oct4, as in the janggu tutorial


def _peaks_tables(data: Path, out: Path, n_train: int, n_val: int) -> dict[str, Path]:
    """train/val from the large peak files, test from the held-out ones; CSV name,sequence,label."""
    rows = {"train": [], "val": [], "test": []}
    for tf, label in PEAKS.items():
        full = list(iter_records(data / f"{tf}_chipseq_peaks_200bp.fa.gz"))
        rows["train"] += [(n, s, label) for n, s in full[:n_train]]
        rows["val"] += [(n, s, label) for n, s in full[n_train: n_train + n_val]]
        rows["test"] += [(n, s, label) for n, s in iter_records(data / f"{tf}_chipseq_peaks_200bp_test.fa.gz")]
    paths = {}
    for split, table in rows.items():
        paths[split] = out / f"peaks_{split}.csv"
        with atomic_open(paths[split]) as fh:
            w = csv.writer(fh)
            w.writerow(["name", "sequence", "label"])
            w.writerows(table)
    return paths


def _first_records(vcf: Path, out: Path, n: int) -> Path:
    """The header and the first n records of a VCF (a handful of variants to score quickly)."""
    with gzip.open(vcf, "rt") as fh, atomic_open(out) as dst:
        kept = 0
        for line in fh:
            if not line.startswith("#"):
                if kept == n:
                    break
                kept += 1
            dst.write(line)
    return out


def run_demo(args) -> int:
    from .cli import main as cli

    data = Path(args.data) if args.data else DATA
    needed = ["lambda_phage_NC_001416.fa.gz", "oct4_chipseq_peaks_200bp.fa.gz", "mafk_chipseq_peaks_200bp.fa.gz",
              "human_chrM_rCRS_GRCh38.fa", "clinvar_b37_MT.vcf.gz"]
    for name in needed:
        if not (data / name).exists():
            raise InputError(f"demo data file {name} not found (run the demo from a checkout, or pass --data)",
                             path=data / name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = ["--device", args.device] if args.device else []
    accel = [f"--trainer.accelerator={'cpu' if args.device == 'cpu' else 'auto'}"] if args.device else []
    t_all = time.perf_counter()
    done = []

    def step(title, argv):
        print(f"\n== {title}\n$ genomamba {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = cli(argv)
        if rc != 0:
            raise SystemExit(rc)
        done.append((title, time.perf_counter() - t0))

    pre, ft = out / "pretrain", out / "finetune"
    step("1/6 pretrain a tiny masked LM on phage lambda",
         ["fit", "-c", str(Path(__file__).resolve().parents[1] / "configs/lambda_tiny.yaml"),
          f"--output_dir={pre}", f"--data.fasta=[{data / 'lambda_phage_NC_001416.fa.gz'}]",
          f"--trainer.max_steps={args.pretrain_steps}", "--trainer.val_check_interval=20",
          "--trainer.checkpoint_every_n_steps=20", *accel])
    tables = _peaks_tables(data, out, n_train=args.train_rows, n_val=100)
    ft_args = ["-c", str(Path(__file__).resolve().parents[1] / "configs/chipseq_oct4_mafk.yaml"),
               f"--output_dir={ft}", f"--pretrained={pre / 'model'}", f"--data.train={tables['train']}",
               f"--data.val={tables['val']}", f"--data.test={tables['test']}",
               f"--trainer.max_steps={args.finetune_steps}", *accel]
    step("2/6 fine-tune it: Oct4 vs MafK ChIP-seq peaks (200 bp)", ["fit", *ft_args])
    step("3/6 test once on the held-out peaks", ["test", *ft_args, "--ckpt_path", "last"])
    step("4/6 embed the test peaks and predict their class",
         ["embed", "--model", str(ft / "model"), "--sequences", str(tables["test"]), "--out",
          str(out / "peaks_test_embeddings.h5"), *device])
    cli(["predict", "--model", str(ft / "model"), "--sequences", str(tables["test"]), "--out",
         str(out / "peaks_test_predictions.tsv"), *device])
    step("5/6 per-base track: probability the pretrained model gives each lambda base",
         ["predict", "--model", str(pre / "model"), "--fasta", str(data / "lambda_phage_NC_001416.fa.gz"),
          "--region", "NC_001416.1_Enterobacteria_phage_lambda:1-20000", "--window", "2048",
          "--out", str(out / "lambda_ref_prob.bedGraph"), *device])
    vcf = _first_records(data / "clinvar_b37_MT.vcf.gz", out / "clinvar_MT_first.vcf", args.variants)
    step(f"6/6 score {args.variants} ClinVar mitochondrial variants (zero-shot LLR, embedding distance)",
         ["score-variants", "--model", str(pre / "model"), "--fasta", str(data / "human_chrM_rCRS_GRCh38.fa"),
          "--vcf", str(vcf), "--window", "256", "--batch-size", "32",
          "--out", str(out / "clinvar_MT_scored.vcf.gz"), "--tsv", str(out / "clinvar_MT_scored.tsv"), *device])
    test = json.loads((ft / "metrics.json").read_text())
    with gzip.open(out / "clinvar_MT_scored.vcf.gz", "rt") as fh:
        scored = sum(1 for line in fh if not line.startswith("#") and "GM_EMB_DIST=" in line)
    print("\n== outputs")
    for what, path in [
        ("pretrained model (from_pretrained dir)", pre / "model"),
        ("pretraining curves", pre / "training_curves.png"),
        ("fine-tuned classifier", ft / "model"),
        ("test metrics (JSON) / ROC / PR", ft / "metrics.json"),
        ("test peak embeddings (HDF5)", out / "peaks_test_embeddings.h5"),
        ("test peak predictions (TSV)", out / "peaks_test_predictions.tsv"),
        ("lambda per-base track (bedGraph)", out / "lambda_ref_prob.bedGraph"),
        ("ClinVar MT scored (VCF.gz + .tbi, TSV)", out / "clinvar_MT_scored.vcf.gz"),
    ]:
        print(f"  {what:42s} {path}")
    auc = test.get("test_auroc")
    print(f"\nOct4 vs MafK test AUROC {auc:.3f} after {args.finetune_steps} fine-tuning steps; "
          f"{scored} ClinVar MT records scored. Step times: "
          + ", ".join(f"{t.split()[0]} {s:.0f} s" for t, s in done)
          + f"; total {time.perf_counter() - t_all:.0f} s")
    return 0
