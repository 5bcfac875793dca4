"""`genomamba report`: one Markdown page with the metrics and plots of a workflow's outputs.

Reads what the other commands wrote (run directories' metrics.json and PNGs, a score-variants
TSV, a variant-classifier directory) and links the plots by relative path, so the report can be
opened next to the results or converted to HTML with any Markdown tool.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from pathlib import Path

from . import __version__
from .atomic import atomic_open


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _metrics_table(metrics: dict) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "command"]
    if not rows:
        return []
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                   for k, v in rows]


def _run_section(title: str, run: Path, base: Path) -> list[str]:
    lines = [f"## {title}", "", f"Run directory: `{run}`", ""]
    m = run / "metrics.json"
    if m.exists():
        metrics = json.loads(m.read_text())
        lines += [f"Last command: `{metrics.get('command', '?')}`", ""] + _metrics_table(metrics) + [""]
    for png in ("training_curves.png", "roc.png", "pr.png"):
        if (run / png).exists():
            lines.append(f"![{png[:-4]}]({_rel(run / png, base)})")
    return [*lines, ""]


def _variants_section(tsv: Path) -> list[str]:
    with open(tsv) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    status = Counter(r["status"] for r in rows)
    lines = ["## Variant scores", "", f"`{tsv}`: {len(rows):,} alleles; " +
             ", ".join(f"{k} {v:,}" for k, v in sorted(status.items())), ""]
    scored = [r for r in rows if r["status"] == "PASS"]
    for col in ("gm_llr", "gm_emb_dist", "gm_prob"):
        vals = sorted(float(r[col]) for r in scored if r.get(col) not in (None, ".", ""))
        if vals:
            q = [vals[min(len(vals) - 1, math.floor(p * len(vals)))] for p in (0.05, 0.5, 0.95)]
            lines.append(f"- `{col}`: n={len(vals):,}, 5% {q[0]:.4g}, median {q[1]:.4g}, 95% {q[2]:.4g}")
    return [*lines, ""]


def _classifier_section(clf: Path, base: Path) -> list[str]:
    meta = json.loads((clf / "classifier.json").read_text())
    m = meta["metrics"]
    lines = ["## Variant classifier", "",
             f"{meta['n_variants']:,} labelled variants ({meta['n_pathogenic']} pathogenic, {meta['n_benign']} benign), "
             f"window {meta['window']:,} bp, nested {meta['folds']}-fold CV over {meta['block_size']:,} bp blocks.", "",
             "| score | AUROC |", "|---|---|", f"| classifier ({m['final_model']}), out-of-fold | {m['cv_auroc']:.3f} |",
             f"| zero-shot embedding distance | {m['zero_shot_emb_dist_auroc']:.3f} |"]
    if "zero_shot_llr_auroc" in m:
        lines.append(f"| zero-shot -LLR | {m['zero_shot_llr_auroc']:.3f} |")
    lines += ["", f"![roc]({_rel(clf / 'roc.png', base)})", ""]
    return lines


def run_report(args) -> int:
    out = Path(args.out)
    base = out.parent.resolve()
    lines = ["# genomamba report", "", f"genomamba {__version__}.", ""]
    for title, run in (("Pretraining", args.pretrain), ("Fine-tuning", args.finetune)):
        if run:
            lines += _run_section(title, Path(run).resolve(), base)
    if args.variants:
        lines += _variants_section(Path(args.variants))
    if args.classifier:
        lines += _classifier_section(Path(args.classifier).resolve(), base)
    with atomic_open(out) as fh:
        fh.write("\n".join(lines))
    print(f"wrote {out}")
    return 0
