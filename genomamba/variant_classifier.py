"""`genomamba train-variant-classifier`: pathogenic vs benign from ref/alt window embeddings.

The Caduceus recipe: embeddings around the variant from the ref and alt windows, each averaged
over both strands (`variant_features`), fed to scikit-learn (logistic regression and RBF-SVM,
standardised features). Evaluated by nested cross-validation with folds made of position blocks
(--block-size bp of one contig never straddle train and test, so neighbouring variants in the
same gene/exon cannot leak): the inner folds pick the model and C, the outer folds give the
reported AUROC. The zero-shot scores (masked-LM LLR, embedding distance) are evaluated on the same
variants for comparison. The final classifier is refit on all labelled variants.

With --finetune-steps N, the Lightning path also runs: the backbone itself is fine-tuned with a
variant head (`training/variant_finetune.py`) on the first outer fold's training blocks and scored
on its test blocks, next to the scikit-learn pipeline on the same blocks.

Output directory: classifier.joblib, classifier.json (settings, model digest, metrics),
cv_predictions.tsv (out-of-fold scores), roc.png; finetuned_model/ with --finetune-steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from . import __version__
from .atomic import atomic_open, atomic_path
from .errors import InputError
from .io import Fasta, read_variants
from .io.contigs import candidate_names
from .io.text import open_text
from .io.vcf import OK
from .model import BiMambaForMaskedLM, from_pretrained
from .score_variants import check_window, model_digest, scorable
from .variant_features import score_variants_in_batches

CANDIDATES = {
    **{f"logreg C={c}": LogisticRegression(C=c, max_iter=5000) for c in (0.01, 0.1, 1.0)},
    **{f"svm-rbf C={c}": SVC(C=c, kernel="rbf", gamma="scale") for c in (0.1, 1.0, 10.0)},
}


def _pipeline(estimator):
    return make_pipeline(StandardScaler(), clone(estimator))


def _ranking_score(fitted, X):
    return fitted.decision_function(X) if hasattr(fitted, "decision_function") else fitted.predict_proba(X)[:, 1]


def read_labels(path) -> dict[tuple, int]:
    """{(contig, pos1, ref, alt): 0/1} from a TSV with columns chrom, pos (1-based), ref, alt, label."""
    out = {}
    with open_text(path) as fh:
        header = fh.readline().rstrip("\n").split("\t")
        need = ("chrom", "pos", "ref", "alt", "label")
        missing = [c for c in need if c not in header]
        if missing:
            raise InputError(f"labels table needs columns {need}; missing {missing}", path=path, position="line 1")
        col = {c: header.index(c) for c in need}
        for line_no, line in enumerate(fh, 2):
            if not line.strip():
                continue
            f = line.rstrip("\n").split("\t")
            try:
                key = (f[col["chrom"]], int(f[col["pos"]]), f[col["ref"]].upper(), f[col["alt"]].upper())
                label = int(f[col["label"]])
            except (IndexError, ValueError) as exc:
                raise InputError(f"bad row: {exc}", path=path, position=f"line {line_no}") from exc
            if label not in (0, 1):
                raise InputError(f"label must be 0 or 1, got {label}", path=path, position=f"line {line_no}")
            out[key] = label
    if len(set(out.values())) < 2:
        raise InputError("labels need both classes (0 = benign, 1 = pathogenic)", path=path)
    return out


def _lookup(labels, v):
    for contig in [v.contig, *candidate_names(v.contig)]:
        key = (contig, v.pos + 1, v.ref.upper(), v.alt.upper())
        if key in labels:
            return key
    return None


def select(X, y, groups, folds: int) -> tuple[str, dict]:
    """The candidate with the best mean AUROC over grouped folds, and every candidate's AUROC."""
    cv = GroupKFold(n_splits=min(folds, len(np.unique(groups))))
    aucs = {}
    for name, est in CANDIDATES.items():
        per_fold = []
        for tr, te in cv.split(X, y, groups):
            if len(np.unique(y[te])) < 2 or len(np.unique(y[tr])) < 2:
                continue
            per_fold.append(roc_auc_score(y[te], _ranking_score(_pipeline(est).fit(X[tr], y[tr]), X[te])))
        aucs[name] = float(np.mean(per_fold)) if per_fold else float("nan")
    return max(aucs, key=lambda k: -np.inf if np.isnan(aucs[k]) else aucs[k]), aucs


def nested_cv(X, y, groups, folds: int = 5):
    """Out-of-fold ranking scores from nested grouped CV, the outer folds' AUROCs and chosen models."""
    oof = np.full(len(y), np.nan)
    per_fold, chosen = [], []
    for tr, te in GroupKFold(n_splits=folds).split(X, y, groups):
        name, _ = select(X[tr], y[tr], groups[tr], folds - 1)
        fitted = _pipeline(CANDIDATES[name]).fit(X[tr], y[tr])
        oof[te] = _ranking_score(fitted, X[te])
        chosen.append(name)
        if len(np.unique(y[te])) == 2:
            per_fold.append(float(roc_auc_score(y[te], oof[te])))
    return oof, per_fold, chosen


def load_classifier(directory):
    directory = Path(directory)
    meta_path, model_path = directory / "classifier.json", directory / "classifier.joblib"
    for p in (meta_path, model_path):
        if not p.exists():
            raise InputError("not a variant-classifier directory (from `genomamba train-variant-classifier`)",
                             path=p)
    return joblib.load(model_path), json.loads(meta_path.read_text())


def _roc_png(path, curves: dict):
    from sklearn.metrics import roc_curve

    from .training.plots import plt, _save

    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    for label, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{label} (AUROC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, path)


def _finetune_first_fold(args, model, fasta, labelled, y, groups, X, out: Path) -> dict:
    """The Lightning path: fine-tune the backbone with a variant head on the first outer fold's
    training blocks, score its test blocks; the scikit-learn pipeline chosen the same way is scored
    on the same blocks for comparison. The fine-tuned model is saved as finetuned_model/."""
    from .model import save_pretrained
    from .training.variant_finetune import finetune_and_score
    from .variant_features import variant_windows

    tr, te = next(GroupKFold(n_splits=args.folds).split(X, y, groups))
    pairs = [variant_windows(fasta, v.fasta_contig, v.pos, v.ref, v.alt, args.window) for v in labelled]
    ref, alt = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    probs, tuned = finetune_and_score(model.cpu(), (ref[tr], alt[tr], y[tr]), (ref[te], alt[te], y[te]),
                                      context=args.context, steps=args.finetune_steps, batch_size=args.batch_size,
                                      lr=args.finetune_lr, seed=args.seed, device=args.device)
    save_pretrained(tuned, out / "finetuned_model")
    name, _ = select(X[tr], y[tr], groups[tr], args.folds - 1)
    baseline = _ranking_score(_pipeline(CANDIDATES[name]).fit(X[tr], y[tr]), X[te])
    return {"finetune_steps": args.finetune_steps, "finetune_fold0_auroc": float(roc_auc_score(y[te], probs)),
            "sklearn_fold0_auroc": float(roc_auc_score(y[te], baseline)), "fold0_test_variants": len(te)}


def run_train_variant_classifier(args) -> int:
    t0 = time.perf_counter()
    check_window(args.window)
    model = from_pretrained(args.model).to(args.device).eval()
    fasta = Fasta(args.fasta)
    labels = read_labels(args.labels)
    variants, report = read_variants(args.vcf, fasta, max_indel=args.max_indel)
    variants, todo = scorable(variants, fasta, args.window, args.max_n)
    keys = {id(v): _lookup(labels, v) for v in variants}
    labelled = [v for v in todo if keys[id(v)] is not None]
    unscorable = sum(1 for v in variants if v.status != OK and keys[id(v)] is not None)
    found = {keys[id(v)] for v in variants if keys[id(v)] is not None}
    if not labelled:
        raise InputError("no labelled variant could be scored (do the labels and the VCF share contig names "
                         "and positions?)", path=args.labels)
    y = np.array([labels[keys[id(v)]] for v in labelled])
    blocks = [(v.fasta_contig, v.pos // args.block_size) for v in labelled]
    block_index = {b: i for i, b in enumerate(sorted(set(blocks)))}
    groups = np.array([block_index[b] for b in blocks])
    n_groups = len(np.unique(groups))
    if n_groups < args.folds:
        raise InputError(f"only {n_groups} position block(s) of {args.block_size:,} bp hold labelled variants; "
                         f"need at least --folds {args.folds} (lower --block-size)", path=args.labels)
    scores = score_variants_in_batches(model, fasta, labelled, window=args.window, context=args.context,
                                       batch_size=args.batch_size, device=args.device)
    t1 = time.perf_counter()
    X = scores.features
    oof, per_fold, chosen = nested_cv(X, y, groups, args.folds)
    best, inner = select(X, y, groups, args.folds)
    final = _pipeline(CANDIDATES[best])
    if isinstance(final[-1], SVC):
        final.set_params(svc__probability=True, svc__random_state=args.seed)
    final.fit(X, y)
    metrics = {"cv_auroc": float(roc_auc_score(y, oof)), "cv_auroc_per_fold": per_fold,
               "cv_models_chosen": chosen, "final_model": best, "final_selection_auroc": inner,
               "zero_shot_emb_dist_auroc": float(roc_auc_score(y, scores.emb_dist))}
    if isinstance(model, BiMambaForMaskedLM):  # a low LLR (alt unlikely) should mean pathogenic
        metrics["zero_shot_llr_auroc"] = float(roc_auc_score(y, -scores.llr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.finetune_steps:
        metrics.update(_finetune_first_fold(args, model, fasta, labelled, y, groups, X, out))
    meta = {"genomamba_version": __version__, "model": str(args.model), "model_sha256": model_digest(args.model),
            "window": args.window, "context": args.context, "features": "[ref, alt - ref] strand-averaged embeddings",
            "vcf": str(args.vcf), "labels": str(args.labels), "fasta": str(args.fasta),
            "block_size": args.block_size, "folds": args.folds,
            "n_variants": len(labelled), "n_pathogenic": int(y.sum()), "n_benign": int((1 - y).sum()),
            "labels_not_in_vcf": len(set(labels) - found), "labelled_but_not_scorable": unscorable,
            "metrics": metrics, "seconds_embedding": round(t1 - t0, 1),
            "seconds_total": round(time.perf_counter() - t0, 1)}
    with atomic_path(out / "classifier.joblib") as tmp:
        joblib.dump(final, tmp)
    with atomic_open(out / "cv_predictions.tsv") as fh:
        fh.write("chrom\tpos\tref\talt\tlabel\tblock\tcv_score\tllr\temb_dist\n")
        for v, lab, s, llr, d in zip(labelled, y, oof, scores.llr, scores.emb_dist):
            fh.write(f"{v.contig}\t{v.pos + 1}\t{v.ref}\t{v.alt}\t{lab}\t{v.pos // args.block_size}\t{s:.6g}\t"
                     f"{llr:.6g}\t{d:.6g}\n")
    curves = {"classifier, nested CV": (y, oof), "zero-shot emb. distance": (y, scores.emb_dist)}
    if "zero_shot_llr_auroc" in metrics:
        curves["zero-shot -LLR"] = (y, -scores.llr)
    _roc_png(out / "roc.png", curves)
    with atomic_open(out / "classifier.json") as fh:
        json.dump(meta, fh, indent=2)
    print(f"train-variant-classifier: {len(labelled):,} labelled variants ({int(y.sum())} pathogenic, "
          f"{int((1 - y).sum())} benign) in {n_groups} blocks of {args.block_size:,} bp; "
          f"{meta['labels_not_in_vcf']} label rows not in the VCF, {unscorable} labelled but not scorable")
    print(f"nested {args.folds}-fold CV AUROC {metrics['cv_auroc']:.3f} (folds: "
          f"{', '.join(f'{a:.3f}' for a in per_fold)}); zero-shot: embedding distance "
          f"{metrics['zero_shot_emb_dist_auroc']:.3f}" + (f", -LLR {metrics['zero_shot_llr_auroc']:.3f}"
                                                          if "zero_shot_llr_auroc" in metrics else ""))
    if args.finetune_steps:
        print(f"fine-tuned backbone + variant head ({args.finetune_steps} steps) on outer fold 1: test AUROC "
              f"{metrics['finetune_fold0_auroc']:.3f} vs scikit-learn on the same fold "
              f"{metrics['sklearn_fold0_auroc']:.3f}; saved {out}/finetuned_model")
    print(f"final model: {best}, refit on all; wrote {out}/classifier.joblib, classifier.json, roc.png, "
          f"cv_predictions.tsv ({meta['seconds_total']} s)")
    return 0
