"""PNG plots for a run: training curves from the CSV log, ROC and precision-recall for a binary test."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import auc, precision_recall_curve, roc_curve  # noqa: E402

from ..atomic import atomic_path  # noqa: E402


def _save(fig, path: Path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def read_log(metrics_csvs) -> dict[str, dict[int, float]]:
    """{'train_loss': {step: value}, 'val_loss': {...}} from one or more CSVLogger files (later files win)."""
    series: dict[str, dict[int, float]] = {}
    for path in metrics_csvs:
        with open(path) as fh:
            for row in csv.DictReader(fh):
                for key in ("train_loss", "val_loss"):
                    if row.get(key):
                        series.setdefault(key, {})[int(row["step"])] = float(row[key])
    return series


def training_curves(metrics_csvs, out: Path) -> Path | None:
    """Loss per logged step (train) and per validation, across every invocation of a run."""
    series = {k: sorted(v.items()) for k, v in read_log(metrics_csvs).items()}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, pts in series.items():
        ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    _save(fig, out)
    return out


def roc_pr(scores, labels, out_dir: Path) -> list[Path]:
    """ROC and precision-recall curves (binary tasks)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    prec, rec, _ = precision_recall_curve(labels, scores)
    paths = []
    for name, (x, y, xl, yl) in {"roc.png": (fpr, tpr, "false positive rate", "true positive rate"),
                                 "pr.png": (rec, prec, "recall", "precision")}.items():
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(x, y, label=f"AUC {auc(x, y):.3f}")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(loc="lower right" if name == "roc.png" else "lower left")
        _save(fig, out_dir / name)
        paths.append(out_dir / name)
    return paths
