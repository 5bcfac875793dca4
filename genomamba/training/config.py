"""Training configuration: YAML -> validated dict, with `--section.key=value` overrides.

Every problem (unknown key, missing file, overlapping chromosome lists, window longer than the
model's maximum) is reported before training starts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..errors import InputError
from ..model.config import BiMambaConfig, read_yaml
from ..windows import MAX_WINDOW, MIN_WINDOW, check_disjoint_splits

DEFAULTS = {
    "task": "pretrain",            # pretrain | classify | token_classify
    "output_dir": "runs/run",
    "seed": 0,
    "model": {},                   # BiMambaConfig fields (ignored when `pretrained` is set)
    "pretrained": None,            # a from_pretrained directory to start from
    "max_length": 131072,          # longest window the run may use
    "data": {
        "fasta": [],               # pretrain: FASTA files
        "window": 1024, "stride": None, "max_n": 0.1, "rc_augment": True,
        "train_contigs": None, "val_contigs": None, "test_contigs": None,
        "holdout_fraction": 0.0,   # pretrain with one contig: the last fraction of each contig is validation
        "warmup": [],              # [[window, epochs], ...] sequence-length warmup, constant tokens/step
        "batch_size": 8, "num_workers": 0,
        "train": None, "val": None, "test": None,   # classify: CSV/TSV (sequence,label), lists of FASTA (one
                                                    # per class), or BED intervals over data.fasta (label in a column)
        "bed_label_column": 3,     # classify from BED: 0-based column holding the class (0..num_classes-1)
        "max_rows": None,
        "regions": None,           # pretrain / token_classify: only tile these BED regions
        "labels_bed": None,        # token_classify: positions inside these intervals are class 1
    },
    "classify": {"num_classes": 2, "pooling": "mean", "freeze_backbone": False, "conjoin_eval": True},
    "optim": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 10,
              "schedule_steps": None},  # cosine horizon; default trainer.max_steps
    "trainer": {"max_steps": 100, "max_epochs": None, "precision": "auto", "accelerator": "auto", "devices": 1,
                "strategy": "auto", "gradient_clip_val": 1.0, "accumulate_grad_batches": 1,
                "log_every_n_steps": 1, "val_check_interval": None, "limit_val_batches": None,
                "checkpoint_every_n_steps": 50, "max_time": None},  # max_time "DD:HH:MM:SS" caps wall time
}


def _merge(base: dict, new: dict, where: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in new.items():
        if key not in base:
            raise InputError(f"unknown key {where}{key!r}; known: {sorted(base)}", path=source)
        if isinstance(base[key], dict) and key != "model":
            if not isinstance(value, dict):
                raise InputError(f"{where}{key} must be a mapping", path=source)
            out[key] = _merge(base[key], value, f"{where}{key}.", source)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """'--trainer.max_steps=10' -> (['trainer', 'max_steps'], 10); values parsed as YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise InputError(f"override {text!r} must look like --section.key=value")
    key, value = body.split("=", 1)
    return key.split("."), yaml.safe_load(value)


def load_config(path=None, overrides=()) -> dict:
    """Defaults <- YAML file <- overrides, then validation."""
    source = str(path) if path else "<defaults>"
    raw = read_yaml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    cfg = _merge(DEFAULTS, raw, "", source)
    validate(cfg, source)
    return cfg


def is_bed(path: str) -> bool:
    return path.endswith((".bed", ".bed.gz"))


def validate(cfg: dict, source: str) -> None:
    if cfg["task"] not in ("pretrain", "classify", "token_classify"):
        raise InputError(f"task must be pretrain, classify or token_classify, got {cfg['task']!r}", path=source)
    if cfg["pretrained"] is None:
        BiMambaConfig.from_dict(cfg["model"], source=f"{source} (model:)")
    elif not Path(cfg["pretrained"]).is_dir():
        raise InputError(f"pretrained model directory {cfg['pretrained']!r} not found", path=source)
    d = cfg["data"]
    for key in ("train_contigs", "val_contigs", "test_contigs"):
        if d[key] is not None:  # YAML reads `[20, 21]` as integers; contig names are strings
            d[key] = [str(c) for c in (d[key] if isinstance(d[key], list) else [d[key]])]
    windows = [d["window"]] + [w for w, _ in d["warmup"]]
    for w in windows:
        if w > cfg["max_length"]:
            raise InputError(f"window {w:,} is longer than max_length {cfg['max_length']:,}", path=source)
        if cfg["task"] != "classify" and not MIN_WINDOW <= w <= MAX_WINDOW:
            raise InputError(f"window {w:,} is outside {MIN_WINDOW}..{MAX_WINDOW:,}", path=source)
    check_disjoint_splits(train=d["train_contigs"], val=d["val_contigs"], test=d["test_contigs"])
    genomic = cfg["task"] != "classify"
    files = (d["fasta"] + [d["regions"], d["labels_bed"]]) if genomic else [d["train"], d["val"], d["test"], *d["fasta"]]
    if genomic and not d["fasta"]:
        raise InputError("data.fasta lists no FASTA file", path=source)
    if cfg["task"] == "token_classify" and d["labels_bed"] is None:
        raise InputError("token_classify needs data.labels_bed (BED of class-1 intervals)", path=source)
    for f in files:
        for p in (f if isinstance(f, list) else [f]):
            if p is not None and not Path(p).exists():
                raise InputError(f"data file {p!r} not found", path=source)
    beds = [x for x in (d["train"], d["val"], d["test"]) if isinstance(x, str) and is_bed(x)]
    if cfg["task"] == "classify" and beds and len(d["fasta"]) != 1:
        raise InputError(f"classification from BED ({beds[0]}) needs exactly one data.fasta to read the "
                         f"intervals from, got {len(d['fasta'])}", path=source)
    if cfg["task"] == "classify" and d["train"] is None:
        raise InputError("classify needs data.train (a sequence,label CSV or a list of FASTA files)", path=source)
    if not 0 <= d["holdout_fraction"] < 1:
        raise InputError(f"data.holdout_fraction must be in [0, 1), got {d['holdout_fraction']}", path=source)
