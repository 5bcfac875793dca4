import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


SNAKEMAKE = Path(sys.executable).parent / "snakemake"  # installed by the test extra, next to python


def test_snakemake_dry_run_and_real_run(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"fasta: {REPO}/data/lambda_phage_NC_001416.fa.gz\noutdir: {tmp_path}/out\n"
                   "window: 4096\nstride: 2048\nmax_n: 0.5\n")
    base = [str(SNAKEMAKE if SNAKEMAKE.exists() else shutil.which("snakemake")), "-s", str(REPO / "pipelines/Snakefile"), "--configfile", str(cfg),
            "--directory", str(tmp_path)]
    dry = subprocess.run(base + ["-n"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "windows" in dry.stdout + dry.stderr
    env_bin = str(Path(sys.executable).parent)
    real = subprocess.run(base + ["--cores", "2"], capture_output=True, text=True,
                          env={"PATH": f"{env_bin}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert real.returncode == 0, real.stderr
    assert len((tmp_path / "out/windows.bed").read_text().splitlines()) == 23
