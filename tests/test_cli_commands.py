"""The demo and bench commands run end to end on tiny data; bad input exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "cellmap_data", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_prints_batches_and_speed(tmp_path):
    result = run("demo", "--out", str(tmp_path / "demo"), "--size", "tiny", "--batches", "3", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert "'input': (2, 1, 32, 32, 32)" in result.stdout
    assert "samples/s" in result.stdout


def test_bench_reports_figures_against_bounds(tmp_path):
    result = run("bench", "--data", str(tmp_path / "bench"), "--size", "tiny", "--batches", "2", "--threads", "1",
                 "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert "efficiency" in result.stdout and "bound" in result.stdout
    assert "batches/s" in result.stdout and "peak RSS" in result.stdout
    assert (tmp_path / "report.json").exists()


def test_bad_input_exits_2_with_one_line(tmp_path):
    result = run("demo", "--size", "nonsense")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
