"""Prediction split over several processes (torchrun) and resumed after a kill: the output equals
a one-process run bit for bit (blending included), and the downsampled level equals numpy's
2× block mean of it; integer outputs downsample by the most frequent value."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellmap_data import CellMapDatasetWriter, ImageWriter
from cellmap_data.exceptions import ConfigError
from conftest import write_ome_image

JOB = Path(__file__).with_name("rank_writer_job.py")
CLASSES = ("mito", "er")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    rng = np.random.default_rng(5)
    data = rng.uniform(0, 255, size=(48, 52, 56)).astype(np.float32)
    root = tmp_path_factory.mktemp("ranks") / "in.zarr"
    write_ome_image(root / "raw", [data], [(4.0, 4.0, 4.0)], [(2.0, 2.0, 2.0)], chunks=(16, 16, 16))
    return str(root / "raw")


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.pop("RANK", None)
    out.pop("WORLD_SIZE", None)
    out.update(extra)
    return out


def run_job(raw: str, out: Path, overlap: int, procs: int, *args: str) -> str:
    if procs == 1:
        command = [sys.executable, str(JOB), raw, str(out), str(overlap), "0", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                   str(JOB), raw, str(out), str(overlap), "0", *args]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def completion_marks(folder: Path) -> dict[str, str]:
    """Chunk mark name → the rank that wrote it (temporary files of marks being written skipped)."""
    out = {}
    for path in folder.glob("*") if folder.is_dir() else []:
        if re.fullmatch(r"\d+\.\d+\.\d+", path.name):
            try:
                out[path.name] = path.read_text()
            except FileNotFoundError:  # replaced while we looked
                continue
    return out


def levels(out: Path) -> dict[str, list[np.ndarray]]:
    return {c: [np.asarray(zarr.open_array(str(out / c / s), mode="r")) for s in ("s0", "s1")] for c in CLASSES}


@pytest.fixture(scope="module")
def one_process(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out.zarr" / "pred"
    run_job(raw, out, 4, 1)
    return levels(out)


def assert_identical(got, expected):
    for c in CLASSES:
        for level, (a, b) in enumerate(zip(got[c], expected[c])):
            assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), f"{c} s{level} differs"


@pytest.mark.parametrize("procs", [2, 3])
def test_ranks_write_what_one_process_writes_bit_for_bit(raw, one_process, tmp_path, procs):
    out = tmp_path / "out.zarr" / "pred"
    log = run_job(raw, out, 4, procs)
    # Found anywhere: the ranks share one output stream, and one rank's line can run into another's.
    shares = re.findall(r"rank \d+/\d+: \d+ of \d+ tiles", log)
    assert len(shares) == procs, log
    assert "chunks; by rank:" in log, "rank 0 prints a summary of all ranks"
    assert_identical(levels(out), one_process)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    status = CellMapDatasetWriter(raw, str(out), list(CLASSES), {"raw": {"shape": (12,) * 3, "scale": (4,) * 3}},
                                  {"pred": {"shape": (12,) * 3, "scale": (4,) * 3}},
                                  target_bounds={"pred": {"z": [8.0, 156.0], "y": [4.0, 168.0], "x": [0.0, 180.0]}},
                                  overlap=4, chunks=(8, 8, 8), downsample_levels=1, exist_ok=True).status()
    assert status["done"] == status["total"] and sorted(status["by_rank"]) == list(range(procs))
    # Each rank built the second level's chunks over its own chunks.
    n = sum(len(completion_marks(out / c / ".cellmap-progress" / "s1")) for c in CLASSES)
    assert status["levels"] == {"s1": {"done": n, "total": n}} and n == 2 * 3 * 3 * 3
    assert {r for c in CLASSES for r in completion_marks(out / c / ".cellmap-progress" / "s1").values()} == {
        str(r) for r in range(procs)}
    gc.collect()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written, \
        "a writer opened only to read the status leaves the output alone when dropped"


def test_blending_is_exercised(one_process):
    """The model's tiles disagree where they overlap: a plain tiling would give other values."""
    s0 = one_process["mito"][0]
    assert np.isfinite(s0).all() and s0.std() > 0


def test_a_killed_job_resumes_to_the_same_output(raw, one_process, tmp_path):
    out = tmp_path / "out.zarr" / "pred"
    slow = subprocess.Popen([sys.executable, str(JOB), raw, str(out), "4", "0.15"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks = [out / c / ".cellmap-progress" for c in CLASSES]
    deadline = time.monotonic() + 120
    # Half the chunks (180 per class) complete: the first tiles touch only complete chunks.
    while time.monotonic() < deadline and min(len(completion_marks(m)) for m in marks) < 90:
        time.sleep(0.05)
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=30)
    assert slow.returncode == -signal.SIGKILL
    assert min(len(completion_marks(m)) for m in marks) >= 90
    log = run_job(raw, out, 4, 1, "exist_ok")
    todo, total = (int(w) for w in log.split("rank 0/1: ")[1].split(" tiles")[0].split(" of "))
    assert todo < total, "the resumed job skips the tiles of complete chunks"
    assert_identical(levels(out), one_process)


def test_a_killed_rank_restarted_alone_completes_the_job(raw, one_process, tmp_path):
    """Rank 1 of two is killed mid-way; rank 0 finishes its chunks and waits in close(); rank 1
    restarted alone resumes its chunks; rank 0 then builds the downsampled level."""
    out = tmp_path / "out.zarr" / "pred"

    def rank(r: int, delay: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(JOB), raw, str(out), "4", delay], env=env(RANK=str(r), WORLD_SIZE="2"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first, second = rank(0, "0.05"), rank(1, "0.15")
    marks = out / "er" / ".cellmap-progress"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and list(completion_marks(marks).values()).count("1") < 10:
        time.sleep(0.05)
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=30)
    assert second.returncode == -signal.SIGKILL
    assert first.poll() is None, "rank 0 waits for rank 1's chunks"
    restarted = rank(1, "0")
    log, _ = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, log
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    assert "chunks; by rank:" in log
    assert_identical(levels(out), one_process)


def test_downsampled_level_is_the_numpy_block_mean(one_process):
    s0, s1 = one_process["mito"]
    z, y, x = (n // 2 * 2 for n in s0.shape)
    expected = s0[:z, :y, :x].astype(np.float64).reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(s1[: z // 2, : y // 2, : x // 2], expected, rtol=1e-6)


def test_integer_outputs_downsample_by_the_most_frequent_value(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=(16, 16, 16)).astype(np.float32)
    box = {a: (0.0, 16 * 4.0) for a in "zyx"}
    with ImageWriter(tmp_path / "l.zarr" / "labels", "labels", (4.0,) * 3, box, (16,) * 3, dtype="uint8",
                     downsample_levels=1) as writer:
        writer[{a: 32.0 for a in "zyx"}] = labels
    s1 = np.asarray(zarr.open_array(str(tmp_path / "l.zarr" / "labels" / "s1"), mode="r"))
    blocks = labels.reshape(8, 2, 8, 2, 8, 2).transpose(0, 2, 4, 1, 3, 5).reshape(8, 8, 8, 8).astype(int)
    counts = np.stack([(blocks == v).sum(axis=-1) for v in range(4)], axis=-1)
    assert np.array_equal(s1, counts.argmax(axis=-1).astype(np.uint8))  # argmax: the smallest on a tie


def test_rank_arguments_are_checked(raw, tmp_path):
    arrays = ({"raw": {"shape": (12,) * 3, "scale": (4,) * 3}}, {"pred": {"shape": (12,) * 3, "scale": (4,) * 3}})
    with pytest.raises(ConfigError, match="rank"):
        CellMapDatasetWriter(raw, str(tmp_path / "o.zarr" / "p"), ["mito"], *arrays, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="both rank and world_size"):
        CellMapDatasetWriter(raw, str(tmp_path / "o.zarr" / "p"), ["mito"], *arrays, rank=1)
    with pytest.raises(ConfigError, match="overwrite=True with 2 ranks"):
        CellMapDatasetWriter(raw, str(tmp_path / "o.zarr" / "p"), ["mito"], *arrays, rank=0, world_size=2, overwrite=True)


def test_resuming_with_another_plan_is_refused(raw, tmp_path):
    arrays = ({"raw": {"shape": (12,) * 3, "scale": (4,) * 3}}, {"pred": {"shape": (12,) * 3, "scale": (4,) * 3}})
    out = str(tmp_path / "o.zarr" / "p")
    CellMapDatasetWriter(raw, out, ["mito"], *arrays, overlap=2).close()
    with pytest.raises(ConfigError, match="another plan"):
        CellMapDatasetWriter(raw, out, ["mito"], *arrays, overlap=4, exist_ok=True)


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_a_close_timeout_that_is_not_a_number_of_seconds_is_refused(raw, tmp_path, timeout):
    arrays = ({"raw": {"shape": (12,) * 3, "scale": (4,) * 3}}, {"pred": {"shape": (12,) * 3, "scale": (4,) * 3}})
    writer = CellMapDatasetWriter(raw, str(tmp_path / "o.zarr" / "p"), ["mito"], *arrays, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="timeout must be a non-negative number of seconds"):
        writer.close(timeout=timeout)


def test_rank_0_waiting_for_a_dead_rank_times_out_naming_the_missing_chunks(raw, tmp_path):
    arrays = ({"raw": {"shape": (12,) * 3, "scale": (4,) * 3}}, {"pred": {"shape": (12,) * 3, "scale": (4,) * 3}})
    writer = CellMapDatasetWriter(raw, str(tmp_path / "o.zarr" / "p"), ["mito"], *arrays, rank=0, world_size=2,
                                  downsample_levels=1)
    for batch in writer.loader(batch_size=4, progress=False):
        writer[batch["idx"]] = {"pred": batch["raw"]}
    status = writer.status()
    assert 0 < status["done"] < status["total"] and list(status["by_rank"]) == [0]
    assert status["levels"]["s1"]["done"] == 0
    with pytest.raises(TimeoutError, match=f"{status['total'] - status['done']} of {status['total']} chunks") as e:
        writer.close(timeout=0.3)
    built = writer.status()["levels"]["s1"]  # rank 0 built its own share before waiting
    assert 0 < built["done"] < built["total"] and f"s1: {built['done']} of {built['total']} chunks built" in str(e.value)
