"""Run a config: build data, module and trainer; write everything into one output directory.

<output_dir>/config.yaml (resolved config), checkpoints/ (last.ckpt and periodic ones, written
atomically), logs/version_N/metrics.csv (one per invocation, so a resume keeps the history), metrics.json, training_curves.png, and for classification tests
roc.png / pr.png; after `fit`, model/ (a from_pretrained directory).
A SIGTERM or SIGINT mid-epoch saves a resumable last.ckpt before the process exits.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..atomic import atomic_open, atomic_path
from ..errors import InputError
from ..model import save_pretrained
from . import plots
from .data import ClassifyData, PretrainData, TokenClassifyData
from .modules import MaskedLMModule, SequenceClassificationModule, TokenClassificationModule


# What `best.ckpt` is selected on: MCC for classification (as GUE reports it), else the loss.
SELECTION = {"classify": ("val_mcc", "max"), "pretrain": ("val_loss", "min"), "token_classify": ("val_loss", "min")}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints appear only once complete (temporary file, then rename)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class StepTimer(Callback):
    """Median wall time between consecutive training batches, skipping the first 5 (compilation,
    warm-up): the steady-state time per batch a user sees, data loading and logging included.
    Reported in metrics.json as train_batch_ms (with DDP: one batch on every device)."""

    SKIP = 5

    def __init__(self):
        self.ends = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def median_ms(self) -> float | None:
        ends = self.ends[self.SKIP:]
        if len(ends) < 3:
            return None
        return 1e3 * statistics.median(b - a for a, b in zip(ends, ends[1:]))


class SaveOnSignal(Callback):
    """On SIGTERM/SIGINT: save last.ckpt at the next batch end (training or validation), stop cleanly.

    Lightning raises its SIGTERMException right after a validation batch and at an epoch's end,
    where no training-batch hook runs, so validation batches save too, and run() saves after the
    exception if neither hook got the chance (`saved` says whether one did).
    """

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir, self.received, self.saved = ckpt_dir, None, False

    def on_fit_start(self, trainer, pl_module):
        def handler(signum, _frame):
            self.received = signum
        self._old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _save_if_signalled(self, trainer):
        if self.received is None and getattr(trainer, "received_sigterm", False):
            self.received = signal.SIGTERM  # Lightning's own SIGTERM handler got it first
        if self.received is not None and not self.saved:
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt")
            self.saved = True
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, *args):
        self._save_if_signalled(trainer)

    def on_validation_batch_end(self, trainer, *args):
        if trainer.state.fn == "fit":
            self._save_if_signalled(trainer)

    def on_fit_end(self, trainer, pl_module):
        for s, h in self._old.items():
            signal.signal(s, h)


def _trainer(cfg: dict, out: Path, extra_callbacks=()):
    t = cfg["trainer"]
    precision = t["precision"]
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=-1,
                           every_n_train_steps=t["checkpoint_every_n_steps"], filename="step{step}",
                           auto_insert_metric_name=False)
    callbacks = [ckpt]
    d = cfg["data"]
    if d["val"] if cfg["task"] == "classify" else (d["holdout_fraction"] or d["val_contigs"]):
        # best.ckpt: the model selection on the validation split (`--ckpt_path best` tests it)
        monitor, mode = SELECTION[cfg["task"]]
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode,
                                         save_top_k=1, save_last=False, enable_version_counter=False))
    kwargs = dict(max_steps=t["max_steps"] or -1, max_epochs=t["max_epochs"] if t["max_epochs"] is not None else -1,
                  accelerator=t["accelerator"], devices=t["devices"], strategy=t["strategy"], precision=precision,
                  gradient_clip_val=t["gradient_clip_val"], accumulate_grad_batches=t["accumulate_grad_batches"],
                  log_every_n_steps=t["log_every_n_steps"], default_root_dir=out,
                  logger=CSVLogger(out, name="logs"), callbacks=[*callbacks, *extra_callbacks],
                  plugins=[AtomicCheckpointIO()], deterministic=False, enable_model_summary=False,
                  reload_dataloaders_every_n_epochs=1 if cfg["data"]["warmup"] else 0)
    if t["val_check_interval"] is not None:
        kwargs["val_check_interval"] = t["val_check_interval"]
        kwargs["check_val_every_n_epoch"] = None
    if t["max_time"] is not None:
        kwargs["max_time"] = t["max_time"]
    if t["limit_val_batches"] is not None:
        kwargs["limit_val_batches"] = t["limit_val_batches"]
    return L.Trainer(**kwargs)  # CSVLogger without a version: a new logs/version_N per invocation


def resolve_ckpt(ckpt_path, out: Path):
    if ckpt_path in (None, "none"):
        return None
    if ckpt_path in ("last", "best"):
        path = out / "checkpoints" / f"{ckpt_path}.ckpt"
        if not path.exists():
            raise InputError(f"--ckpt_path {ckpt_path}: no {ckpt_path}.ckpt in the run directory"
                             + (" (best.ckpt needs a validation split)" if ckpt_path == "best" else ""),
                             path=path.parent)
        return str(path)
    if not Path(ckpt_path).exists():
        raise InputError("checkpoint not found", path=ckpt_path)
    return ckpt_path


def run(command: str, cfg: dict, ckpt_path=None) -> dict:
    """command: fit | validate | test | predict. Returns the metrics it wrote to metrics.json (predict:
    where predictions.tsv went)."""
    if command == "predict" and (cfg["task"] != "classify" or cfg["data"]["test"] is None):
        raise InputError("`genomamba predict -c` writes class probabilities for a classification config's "
                         "data.test; for per-base tracks and other inputs use `genomamba predict --model DIR`")
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "config.yaml") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    pretrain = cfg["task"] == "pretrain"
    data, module = {"pretrain": (PretrainData, MaskedLMModule),
                    "classify": (ClassifyData, SequenceClassificationModule),
                    "token_classify": (TokenClassifyData, TokenClassificationModule)}[cfg["task"]]
    data, module = data(cfg), module(cfg)
    signals, timer = SaveOnSignal(out / "checkpoints"), StepTimer()
    trainer = _trainer(cfg, out, [signals, timer] if command == "fit" else [])
    ckpt = resolve_ckpt(ckpt_path, out)
    if command == "fit":
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        except SIGTERMException:  # raised by Lightning after a batch or at an epoch's end
            signals.received = signals.received or signal.SIGTERM
            if not signals.saved and trainer.is_global_zero:
                trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
        if trainer.is_global_zero and signals.received is None:
            save_pretrained(module.model, out / "model")
    elif command == "validate":
        trainer.validate(module, datamodule=data, ckpt_path=ckpt)
    elif command == "test":
        trainer.test(module, datamodule=data, ckpt_path=ckpt)
    elif command == "predict":
        batches = trainer.predict(module, dataloaders=data._loader("test"), ckpt_path=ckpt)
        probs = torch.cat([p for p, _ in batches]).numpy()
        labels = torch.cat([y for _, y in batches]).numpy()
        with atomic_open(out / "predictions.tsv") as fh:
            fh.write("row\tlabel\t" + "\t".join(f"prob_{k}" for k in range(probs.shape[1])) + "\tpredicted\n")
            for i, (p, y) in enumerate(zip(probs, labels)):
                fh.write(f"{i}\t{y if y >= 0 else '.'}\t" + "\t".join(f"{x:.6g}" for x in p) + f"\t{p.argmax()}\n")
        return {"predictions": str(out / "predictions.tsv"), "rows": len(probs)}
    else:
        raise InputError(f"unknown command {command!r}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["global_step"] = trainer.global_step
    if (batch_ms := timer.median_ms()) is not None:
        metrics["train_batch_ms"] = round(batch_ms, 2)
    if trainer.is_global_zero:
        with atomic_open(out / "metrics.json") as fh:
            json.dump({"command": command, **metrics}, fh, indent=2)
        plots.training_curves(sorted((out / "logs").glob("version_*/metrics.csv")), out / "training_curves.png")
        if command == "test" and not pretrain and getattr(module, "test_scores", None) \
                and cfg["classify"]["num_classes"] == 2:
            scores = torch.cat([s for s, _ in module.test_scores]).numpy()
            labels = torch.cat([y for _, y in module.test_scores]).numpy()
            plots.roc_pr(scores, labels, out)
    if signals.received is not None:
        metrics["stopped_by_signal"] = int(signals.received)
    return metrics
