"""The Snakemake workflow on the tiny config: a dry run, then a real run on 2 cores."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pysam
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"  # installed by the test extra, next to python


def _config(tmp_path) -> Path:
    """pipelines/config.yaml with absolute paths, and a FASTA copy without its index (the index rule
    must build it)."""
    cfg = yaml.safe_load((REPO / "pipelines/config.yaml").read_text())
    for key in ("pretrain_config", "finetune_config", "embed_sequences", "variant_fasta", "variants",
                "variant_labels"):
        cfg[key] = str(REPO / cfg[key])
    for key in ("finetune_train", "finetune_test"):
        cfg[key] = [str(REPO / p) for p in cfg[key]]
    shutil.copy(REPO / cfg["fasta"], tmp_path / "lambda.fa.gz")
    cfg["fasta"] = str(tmp_path / "lambda.fa.gz")
    cfg["outdir"] = str(tmp_path / "out")
    cfg["variant_model"] = str(tmp_path / "out/pretrain/model")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_snakemake_dry_run_and_real_run(tmp_path):
    base = [str(SNAKEMAKE if SNAKEMAKE.exists() else shutil.which("snakemake")), "-s",
            str(REPO / "pipelines/Snakefile"), "--configfile", str(_config(tmp_path)), "--directory", str(tmp_path)]
    dry = subprocess.run([*base, "-n"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    for rule in ("index", "windows", "pretrain", "finetune", "embed", "score_variants", "train_variant_classifier",
                 "report"):
        assert rule in dry.stdout + dry.stderr
    env_bin = str(Path(sys.executable).parent)
    real = subprocess.run([*base, "--cores", "2"], capture_output=True, text=True,
                          env={"PATH": f"{env_bin}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert real.returncode == 0, real.stderr[-3000:]
    out = tmp_path / "out"
    assert (tmp_path / "lambda.fa.gz.fai").exists()
    assert len((out / "windows.bed").read_text().splitlines()) == 95  # 48,502 bp in 512 bp windows
    assert json.loads((out / "finetune/metrics.json").read_text())["command"] == "test"
    with pysam.VariantFile(str(out / "variants.scored.vcf.gz")) as vf:
        assert sum(1 for _ in vf.fetch()) == 436
    report = (out / "report.md").read_text()
    assert "## Variant classifier" in report and "test_auroc" in report
    for log in ("pretrain", "finetune", "embed", "score_variants", "report"):
        assert (out / "logs" / f"{log}.log").exists()
