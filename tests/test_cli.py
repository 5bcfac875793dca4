import subprocess
import sys

from genomamba.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "genomamba", *args], capture_output=True, text=True)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("genomamba ")
    r = run("--help")
    assert r.returncode == 0 and "windows" in r.stdout and "Exit codes" in r.stdout


def test_windows_on_lambda_writes_bed(tmp_path, data, capsys):
    out = tmp_path / "w.bed"
    assert main(["windows", str(data / "lambda_phage_NC_001416.fa.gz"), "--window", "4096", "--stride", "2048",
                 "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 23 and lines[0].split("\t")[1:] == ["0", "4096"]
    assert "48,502 bp" in capsys.readouterr().out


def test_bad_input_exit_code_and_no_partial_output(tmp_path, data):
    (tmp_path / "bad.bed").write_text("chr1\t10\t5\n")
    out = tmp_path / "w.bed"
    r = run("windows", str(data / "ex1.fa"), "--bed", str(tmp_path / "bad.bed"), "--window", "128",
            "--out", str(out))
    assert r.returncode == 2 and "bad.bed" in r.stderr and "line 1" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".w.bed*"))
    (tmp_path / "past.bed").write_text("chr1\t1000\t2000\n")
    r = run("windows", str(data / "ex1.fa"), "--bed", str(tmp_path / "past.bed"), "--window", "128",
            "--out", str(out))
    assert r.returncode == 2 and "past the contig end" in r.stderr and not out.exists()
    r = run("windows", str(data / "oct4_chipseq_peaks_200bp_test.fa.gz"), "--out", str(out))
    assert r.returncode == 2 and "bgzip" in r.stderr and not out.exists()


def test_model_info_prints_parameter_counts(capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "caduceus_1k.yaml"
    assert main(["model-info", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "470,702" in out and "| 118 | 4 |" in out


def test_bad_fasta_through_the_cli(tmp_path, data):
    lines = (data / "ex1.fa").read_text().splitlines()
    lines[2] = lines[2][:5] + "!" + lines[2][6:]
    (tmp_path / "x.fa").write_text("\n".join(lines) + "\n")
    out = tmp_path / "w.bed"
    r = run("windows", str(tmp_path / "x.fa"), "--window", "128", "--out", str(out))
    assert r.returncode == 2 and "x.fa" in r.stderr and "'chr1'" in r.stderr and "position" in r.stderr
    assert "--lenient" in r.stderr and not out.exists()
    raw = (data / "lambda_phage_NC_001416.fa.gz").read_bytes()
    (tmp_path / "t.fa.gz").write_bytes(raw[: len(raw) // 2])
    r = run("windows", str(tmp_path / "t.fa.gz"), "--window", "128", "--out", str(out))
    assert r.returncode == 2 and "t.fa.gz" in r.stderr and not out.exists()


def test_benchmark_on_cpu_writes_tables_and_profiles_both_modes(tmp_path, capsys):
    """`genomamba benchmark` on a CPU: one row per (mode, length) in the Markdown and JSON it
    writes; --profile prints a per-kernel table for a training step and for an inference."""
    import json

    out = tmp_path / "bench"
    assert main(["benchmark", "--d-model", "16", "--n-layer", "2", "--lengths", "128,256", "--warmup", "0",
                 "--repeat", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["mode"], r["length"]) for r in rows] == [("train", 128), ("train", 256), ("infer", 128), ("infer", 256)]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_gib"] > 0 for r in rows)
    assert out.with_suffix(".md").read_text().count("| genomamba BiMamba |") == 4
    capsys.readouterr()
    assert main(["benchmark", "--d-model", "16", "--n-layer", "2", "--profile", "128", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "# training step at L=128:" in text and "# inference at L=128:" in text
    assert "Self CPU" in text
