"""Frozen-embedding probe: mean-pooled embeddings + logistic regression, test AUROC.

    python -m genomamba.probe --model runs/caduceus_1k/model --train train.csv.gz --test test.csv.gz

The protocol of "Benchmarking DNA foundation models" (Nat. Commun. 2025) quoted in DESIGN.md §4,
so the number compares with its table. `--random-init` probes an untrained backbone of the same
shape (the baseline that says what pretraining added).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from .atomic import atomic_open
from .datasets import LabelledSequenceDataset, collate
from .model import BiMambaModel, from_pretrained


@torch.no_grad()
def embed_table(backbone, path, *, max_rows=None, batch_size=256, device="cpu"):
    ds = LabelledSequenceDataset(path, max_rows=max_rows)
    feats = []
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"]
        mask = mask.to(device) if mask is not None else None
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            feats.append(backbone.embed(ids, mask, pool="mean").float().cpu())
    return torch.cat(feats).numpy(), np.array(ds.labels)


def probe(backbone, train, test, *, max_train=None, device="cpu", seed=0) -> dict:
    Xtr, ytr = embed_table(backbone, train, max_rows=max_train, device=device)
    Xte, yte = embed_table(backbone, test, device=device)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(Xtr, ytr)
    scores = clf.predict_proba(Xte)
    auc = roc_auc_score(yte, scores[:, 1]) if scores.shape[1] == 2 else roc_auc_score(yte, scores, multi_class="ovr")
    return {"test_auroc": float(auc), "test_acc": float((scores.argmax(1) == yte).mean()),
            "n_train": int(len(ytr)), "n_test": int(len(yte))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a from_pretrained directory")
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    model = from_pretrained(args.model)
    backbone = model if isinstance(model, BiMambaModel) else model.backbone
    if args.random_init:
        torch.manual_seed(0)
        backbone = BiMambaModel(backbone.config)
    backbone = backbone.to(args.device).eval()
    result = {"model": args.model, "random_init": args.random_init,
              **probe(backbone, args.train, args.test, max_train=args.max_train, device=args.device)}
    print(json.dumps(result))
    if args.out:
        with atomic_open(args.out) as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
