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
    import json

    result = run("bench", "--data", str(tmp_path / "bench"), "--size", "tiny", "--batches", "2", "--threads", "1",
                 "--repeat", "2", "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert "efficiency" in result.stdout and "bound" in result.stdout
    assert "batches/s" in result.stdout and "peak RSS" in result.stdout
    engine = json.loads((tmp_path / "report.json").read_text())["engine"]
    assert engine and all(r["repeats"] == 2 and r["warm_samples_per_s"] > 0 for r in engine.values())


def test_bench_loader_only_with_device_and_soak(tmp_path):
    import json

    result = run("bench", "--data", str(tmp_path / "bench"), "--size", "tiny", "--batches", "2", "--no-engine",
                 "--loader-threads", "1", "--device", "cpu", "--soak", "600", "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert "efficiency" not in result.stdout, "--no-engine skips the engine configurations"
    assert "delivered to cpu" in result.stdout and "of CPU delivery" in result.stdout
    assert "RSS net of the chunk cache grew" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["engine"] == {}
    assert {"3d-64-4cls-plain@1", "3d-64-4cls-plain@1@cpu"} <= set(report["loader"])
    soak = report["soak"]
    assert soak["batches"] == 600 and soak["curve"][-1][0] == 599
    assert soak["live_batch_bytes_after"] >= 0 and soak["pooled_batch_mb"] >= 0


def test_bad_input_exits_2_with_one_line(tmp_path):
    result = run("demo", "--size", "nonsense")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
