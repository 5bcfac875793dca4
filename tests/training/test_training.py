"""Training through the CLI on the shipped data, small and on CPU."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from genomamba.cli import main
from genomamba.model import BiMambaForSequenceClassification, from_pretrained
from genomamba.training import load_config, mask_tokens
from genomamba import tokenizer
from genomamba.errors import InputError

REPO = Path(__file__).resolve().parents[2]
LAMBDA = str(REPO / "data" / "lambda_phage_NC_001416.fa.gz")
GUE = str(REPO / "data" / "gue_mouse3_dev.csv.gz")


def pretrain_cfg(tmp_path, name="pre", **trainer):
    cfg = {"task": "pretrain", "output_dir": str(tmp_path / name), "seed": 3,
           "model": {"d_model": 32, "n_layer": 2},
           "data": {"fasta": [LAMBDA], "window": 256, "holdout_fraction": 0.1, "batch_size": 8},
           "optim": {"lr": 0.003, "warmup_steps": 5, "schedule_steps": 30},
           "trainer": {"max_steps": 30, "checkpoint_every_n_steps": 10, "val_check_interval": 10,
                       "limit_val_batches": 2, **trainer}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(run_dir):
    from genomamba.training.plots import read_log

    return read_log(sorted((Path(run_dir) / "logs").glob("version_*/metrics.csv")))["train_loss"]


def test_masking_rules():
    ids = torch.tensor([[7, 8, 9, 10, 11, 4, 3] * 400])
    g = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(ids, generator=g)
    chosen = labels != -100
    assert not chosen[(ids == tokenizer.N_ID) | (ids == tokenizer.PAD_ID) | (ids == tokenizer.MASK_ID)].any()
    frac = chosen.sum().item() / ((ids >= tokenizer.A_ID) & (ids <= tokenizer.T_ID)).sum().item()
    assert 0.12 < frac < 0.18
    masked = (inputs[chosen] == tokenizer.MASK_ID).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert 0.72 < masked < 0.88 and 0.05 < kept < 0.2


def test_pretrain_loss_falls_and_outputs_are_written(tmp_path, capsys):
    assert main(["fit", "-c", str(pretrain_cfg(tmp_path))]) == 0
    run = tmp_path / "pre"
    losses = train_losses(run)
    first, last = [losses[s] for s in sorted(losses)[:3]], [losses[s] for s in sorted(losses)[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.1, losses
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 30 and "val_loss" in metrics
    assert 0 < metrics["train_batch_ms"] < 60_000  # the StepTimer's median time per batch
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "config.yaml").exists()
    assert (run / "training_curves.png").stat().st_size > 1000
    assert from_pretrained(run / "model").config.d_model == 32


def test_resume_continues_exactly(tmp_path):
    """Stopped at step 10 and resumed with --ckpt_path last: steps 11-20 equal an uninterrupted run."""
    full = pretrain_cfg(tmp_path, "full", max_steps=20)
    assert main(["fit", "-c", str(full)]) == 0
    part = pretrain_cfg(tmp_path, "part", max_steps=10)
    assert main(["fit", "-c", str(part)]) == 0
    assert main(["fit", "-c", str(part), "--trainer.max_steps=20", "--ckpt_path", "last"]) == 0
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    later = [s for s in a if s >= 10]
    assert later and all(abs(a[s] - b[s]) < 1e-5 for s in later), (a, b)
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())["global_step"] == 20


def test_finetune_from_pretrained_writes_metrics_plots_and_model(tmp_path):
    assert main(["fit", "-c", str(pretrain_cfg(tmp_path, max_steps=5))]) == 0
    cfg = {"task": "classify", "output_dir": str(tmp_path / "ft"), "pretrained": str(tmp_path / "pre" / "model"),
           "data": {"train": GUE, "val": GUE, "test": GUE, "batch_size": 16, "max_rows": 200},
           "classify": {"num_classes": 2},
           "trainer": {"max_steps": 12, "val_check_interval": 6, "limit_val_batches": 2}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "-c", str(path)]) == 0
    out = tmp_path / "ft"
    assert (out / "checkpoints" / "best.ckpt").exists()  # selected on val_mcc
    assert main(["test", "-c", str(path), "--ckpt_path", "best"]) == 0
    assert main(["test", "-c", str(path), "--ckpt_path", "last"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("test_acc", "test_mcc", "test_auroc", "test_f1"):
        assert 0.0 <= metrics[k] <= 1.0 or k == "test_mcc"
    assert (out / "roc.png").exists() and (out / "pr.png").exists()
    model = from_pretrained(out / "model")
    assert isinstance(model, BiMambaForSequenceClassification)
    from genomamba.probe import main as probe_main

    probe_main(["--model", str(tmp_path / "pre" / "model"), "--train", GUE, "--test", GUE, "--max-train", "120",
                "--device", "cpu", "--out", str(tmp_path / "probe.json")])
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["n_train"] == 120 and result["n_test"] == 239 and 0.0 <= result["test_auroc"] <= 1.0


def test_print_config_applies_overrides(capsys):
    assert main(["fit", "-c", str(REPO / "configs" / "caduceus_1k.yaml"), "--print_config",
                 "--data.fasta=[" + LAMBDA + "]", "--trainer.max_steps=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] == 7 and cfg["model"]["d_model"] == 118


@pytest.mark.parametrize("override,message", [
    ("--trainer.max_stepz=3", "unknown key 'trainer.' 'max_stepz'|unknown key"),
    ("--data.fasta=[/no/such.fa]", "not found"),
    ("--data.train_contigs=[chr1] --data.val_contigs=[1]", "in both the train and val lists"),
    ("--data.window=262144", "longer than max_length"),
])
def test_bad_config_fails_before_training(tmp_path, override, message):
    path = pretrain_cfg(tmp_path)
    with pytest.raises(InputError, match=message):
        load_config(path, override.split())
    r = subprocess.run([sys.executable, "-m", "genomamba", "fit", "-c", str(path), *override.split()],
                       capture_output=True, text=True)
    assert r.returncode == 2 and not (tmp_path / "pre").exists()


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path):
    path = pretrain_cfg(tmp_path, max_steps=100000, checkpoint_every_n_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "genomamba", "fit", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_csv = tmp_path / "pre" / "logs" / "version_0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics_csv.exists() and metrics_csv.stat().st_size > 200):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] > 0
    assert not (tmp_path / "pre" / "model").exists()  # no final model from an interrupted run
    assert not list((tmp_path / "pre" / "checkpoints").glob(".*.tmp"))
    step = state["global_step"]
    assert main(["fit", "-c", str(path), f"--trainer.max_steps={step + 3}", "--ckpt_path", "last"]) == 0
    assert json.loads((tmp_path / "pre" / "metrics.json").read_text())["global_step"] == step + 3


def test_length_warmup_keeps_tokens_per_step():
    from genomamba.training.data import PretrainData

    cfg = load_config(REPO / "configs" / "lambda_tiny.yaml",
                      ["--data.fasta=[" + LAMBDA + "]", "--data.warmup=[[128, 1], [256, 2]]"])
    dm = PretrainData(cfg)
    assert [dm.stage(e) for e in range(5)] == [(128, 32), (256, 16), (256, 16), (512, 8), (512, 8)]


def test_shipped_training_configs_load():
    for name in ("lambda_tiny.yaml", "caduceus_1k.yaml", "caduceus_131k.yaml", "caduceus_131k_rcps.yaml",
                 "long_1m.yaml"):
        path = REPO / "configs" / name
        try:
            cfg = load_config(path)
        except InputError as exc:  # the chr20 FASTA lives in ../shared/data
            if "not found" in str(exc) and "shared" in str(exc):
                pytest.skip(f"../shared/data is absent: {exc}")
            raise
        assert cfg["task"] == "pretrain"


def test_token_classification_from_bed_labels(tmp_path):
    chr20 = REPO.parent / "shared" / "data" / "debian-vt-examples" / "hs37_chr20.fa.gz"
    if not chr20.exists():
        pytest.skip(f"human chr20 not found at {chr20}")
    (tmp_path / "region.bed").write_text("20\t10000000\t10100000\n")
    cfg = {"task": "token_classify", "output_dir": str(tmp_path / "tok"), "model": {"d_model": 16, "n_layer": 1},
           "max_length": 512,
           "data": {"fasta": [str(chr20)], "regions": str(tmp_path / "region.bed"), "window": 512,
                    "labels_bed": str(REPO / "data" / "giab_NA12878_b37_chr20_10.0-10.1Mb.named20.bed"),
                    "holdout_fraction": 0.2, "batch_size": 8},
           "trainer": {"max_steps": 6, "limit_val_batches": 2}}
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["test", "-c", str(path), "--ckpt_path", "last"]) == 0
    metrics = json.loads((tmp_path / "tok" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_auroc"] <= 1.0 and (tmp_path / "tok" / "roc.png").exists()
    from genomamba.model import BiMambaForTokenClassification
    assert isinstance(from_pretrained(tmp_path / "tok" / "model"), BiMambaForTokenClassification)


def test_token_labels_follow_the_strand(tmp_path):
    from genomamba.datasets import GenomeWindowDataset
    from genomamba.io import Fasta
    from genomamba.training.data import TokenLabelledWindows
    from genomamba.windows import Window

    (tmp_path / "l.bed").write_text("chr1\t100\t110\n")
    fa = Fasta(REPO / "data" / "ex1.fa")
    windows = [Window("chr1", 0, 256)] * 8
    ds = TokenLabelledWindows(GenomeWindowDataset(fa, windows, rc_augment=True, seed=0), tmp_path / "l.bed")
    flips = set()
    for i in range(8):
        item = ds[i]
        pos = item["token_labels"].nonzero().flatten().tolist()
        flips.add(item["rc"])
        assert pos == (list(range(146, 156)) if item["rc"] else list(range(100, 110)))
    assert flips == {True, False}


def test_ddp_two_cpu_processes_follow_the_single_process_curve(tmp_path):
    """Lightning DDP over gloo, 2 processes x batch 4, against 1 process x batch 8."""
    curves = {}
    for name, devices, batch in (("one", 1, 8), ("two", 2, 4)):
        path = pretrain_cfg(tmp_path, name, max_steps=12, checkpoint_every_n_steps=100, devices=devices,
                            strategy="ddp" if devices > 1 else "auto", accelerator="cpu")
        cfg = yaml.safe_load(path.read_text())
        cfg["data"]["batch_size"] = batch
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "genomamba", "fit", "-c", str(path)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        curves[name] = train_losses(tmp_path / name)
    for losses in curves.values():
        steps = sorted(losses)
        assert sum(losses[s] for s in steps[-3:]) / 3 < sum(losses[s] for s in steps[:3]) / 3 - 0.1
    last = max(curves["one"])
    assert abs(curves["one"][last] - curves["two"][last]) < 0.25, curves


def test_classify_from_bed_intervals_over_a_fasta(tmp_path, capsys):
    """BED + FASTA classification: class in the name column, '-' strand read as reverse complement."""
    rows = [f"NC_001416.1_Enterobacteria_phage_lambda\t{s}\t{s + 150}\t{k % 2}\t0\t{'+-'[k % 3 == 0]}"
            for k, s in enumerate(range(0, 30000, 500))]
    (tmp_path / "iv.bed").write_text("\n".join(rows) + "\n")
    cfg = {"task": "classify", "output_dir": str(tmp_path / "bedcls"), "model": {"d_model": 16, "n_layer": 1},
           "max_length": 1024, "data": {"fasta": [LAMBDA], "train": str(tmp_path / "iv.bed"),
                                        "val": str(tmp_path / "iv.bed"), "test": str(tmp_path / "iv.bed"),
                                        "batch_size": 8},
           "trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1}}
    path = tmp_path / "bed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["test", "-c", str(path), "--ckpt_path", "best"]) == 0
    metrics = json.loads((tmp_path / "bedcls" / "metrics.json").read_text())
    assert 0 <= metrics["test_auroc"] <= 1
    assert main(["predict", "-c", str(path), "--ckpt_path", "best"]) == 0  # LightningCLI-style predict
    pred = (tmp_path / "bedcls" / "predictions.tsv").read_text().splitlines()
    assert pred[0].split("\t") == ["row", "label", "prob_0", "prob_1", "predicted"] and len(pred) == 1 + len(rows)
    assert [line.split("\t")[1] for line in pred[1:]] == [str(k % 2) for k in range(len(rows))]
    (tmp_path / "bad.bed").write_text(rows[0].replace("\t0\t0\t", "\t7\t0\t") + "\n")
    capsys.readouterr()
    assert main(["fit", "-c", str(path), f"--data.train={tmp_path / 'bad.bed'}"]) == 2
    assert "bad.bed" in capsys.readouterr().err
    with pytest.raises(InputError, match="exactly one data.fasta"):
        load_config(path, [f"--data.fasta=[{LAMBDA},{LAMBDA}]"])


def test_sigterm_raised_by_lightning_at_epoch_end_still_leaves_last_ckpt(tmp_path, monkeypatch):
    """Lightning raises SIGTERMException where no training-batch hook runs (an epoch's end, between
    validation batches): run() must still write last.ckpt (a flaky CI failure before the fix)."""
    import sys as _sys

    from lightning.pytorch.callbacks import Callback

    run_module = _sys.modules["genomamba.training.run"]

    class SignalAtEpochEnd(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer._signal_connector.received_sigterm = True  # what Lightning's own handler sets

    make = run_module._trainer
    monkeypatch.setattr(run_module, "_trainer", lambda cfg, out, extra=(): make(cfg, out, [*extra, SignalAtEpochEnd()]))
    cfg = load_config(pretrain_cfg(tmp_path, max_steps=1000, checkpoint_every_n_steps=1000,
                                   val_check_interval=None, limit_val_batches=0))
    metrics = run_module.run("fit", cfg)
    assert metrics["stopped_by_signal"] == signal.SIGTERM
    state = torch.load(tmp_path / "pre" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == metrics["global_step"] > 0
    assert not (tmp_path / "pre" / "model").exists()
