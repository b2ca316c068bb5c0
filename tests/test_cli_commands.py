"""The command line end to end on tiny data: demo and bench (through ``python -m``), stats and
inspect (in-process through ``cellmap_data.cli.main``, once through ``python -m``); bad input
exits 2 with one line naming the path, ``--debug`` shows the traceback."""

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
                 "--repeat", "2", "--no-transforms", "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert "efficiency" in result.stdout and "bound" in result.stdout
    assert "batches/s" in result.stdout and "peak RSS" in result.stdout
    engine = json.loads((tmp_path / "report.json").read_text())["engine"]
    assert engine and all(r["repeats"] == 2 and r["warm_samples_per_s"] > 0 for r in engine.values())


def test_bench_loader_only_with_device_and_soak(tmp_path):
    import json

    result = run("bench", "--data", str(tmp_path / "bench"), "--size", "tiny", "--batches", "2", "--no-engine",
                 "--loader-threads", "1", "--device", "cpu", "--soak", "200", "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert "efficiency" not in result.stdout, "--no-engine skips the engine configurations"
    assert "delivered to cpu" in result.stdout and "of CPU delivery" in result.stdout
    assert "RSS net of the chunk cache grew" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["engine"] == {}
    assert {"3d-64-4cls-plain@1", "3d-64-4cls-plain@1@cpu"} <= set(report["loader"])
    soak = report["soak"]
    assert soak["batches"] == 200 and soak["curve"][-1][0] == 199
    assert soak["live_batch_bytes_after"] >= 0 and soak["pooled_batch_mb"] >= 0


def test_bench_against_another_build_interleaves_both(tmp_path):
    """``--against DIR`` runs the public-API workload in fresh interpreters, one finding the
    build in DIR first (here a link to this same package), and reports both with the ratio."""
    import json
    import os

    import cellmap_data

    other = tmp_path / "other-build"
    other.mkdir()
    os.symlink(os.path.dirname(cellmap_data.__file__), other / "cellmap_data")
    result = run("bench", "--data", str(tmp_path / "bench"), "--size", "tiny", "--batches", "2", "--repeat", "1",
                 "--loader-threads", "1", "--against", str(other), "--json", str(tmp_path / "compare.json"))
    assert result.returncode == 0, result.stderr
    assert "ratio" in result.stdout and "bound >= 0.9" in result.stdout
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["other"]["file"].startswith(str(other)) and not report["this"]["file"].startswith(str(other))
    assert report["other"]["loader_samples_per_s"] > 0 and report["this"]["writer_mvoxels_per_s"] > 0
    assert report["loader_samples_ratio"] > 0 and report["writer_mvoxels_ratio"] > 0
    result = run("bench", "--size", "tiny", "--against", str(tmp_path))
    assert result.returncode != 0 and "no cellmap_data package" in result.stderr


def test_bad_input_exits_2_with_one_line(tmp_path):
    result = run("demo", "--size", "nonsense")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- stats and inspect

import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402
import zarr  # noqa: E402

from cellmap_data.cli import main  # noqa: E402

#: Columns of the statistics table compared between the CLI's file and ``CellMapDataSplit.stats()``.
KEYS = ["split", "dataset", "crop", "class"]
COMPARED = ["annotated", "level", "count_source", "shape_z", "shape_y", "shape_x", "train_voxel_size_z",
            "foreground_voxels", "total_voxels", "fraction", "weight"]


def cli(capsys, *args):
    """Runs ``main(args)`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def split_stats(csv_path, classes, scale):
    from cellmap_data import CellMapDataSplit

    array = {"shape": (1, 1, 1), "scale": scale}
    split = CellMapDataSplit({"raw": array}, {"labels": array}, classes, pad=True, csv_path=csv_path)
    return split.stats()


def assert_same_stats(got: pl.DataFrame, expected: pl.DataFrame):
    got = got.sort(KEYS).select(KEYS + COMPARED)
    expected = expected.sort(KEYS).select(KEYS + COMPARED)
    assert got.height == expected.height
    for name in KEYS + ["annotated", "level", "count_source", "shape_z", "shape_y", "shape_x"]:
        assert got[name].cast(pl.Utf8).to_list() == expected[name].cast(pl.Utf8).to_list(), name
    for name in ["train_voxel_size_z", "foreground_voxels", "total_voxels", "fraction", "weight"]:
        a = got[name].cast(pl.Float64).fill_null(-1.0).to_numpy()
        b = expected[name].cast(pl.Float64).fill_null(-1.0).to_numpy()
        np.testing.assert_allclose(a, b, rtol=1e-9, err_msg=name)


def crop_path(tiny_data, name="crop1") -> Path:
    return next(c.path for c in tiny_data.crops if c.name == name)


def test_stats_of_the_datasplit_csv_to_parquet(tiny_data, tmp_path, capsys):
    out = tmp_path / "stats.parquet"
    code, stdout, stderr = cli(capsys, "stats", tiny_data.csv_path, "--out", out)
    assert code == 0, stderr
    got = pl.read_parquet(out)
    classes = list(dict.fromkeys(c for crop in tiny_data.crops for c in crop.classes))
    assert set(got["class"]) == set(classes), "default: every class the CSV lists"
    raw_s0 = tiny_data.datasets[0].raw_voxel_size
    assert got["train_voxel_size_z"].unique().to_list() == [raw_s0[0]], "default scale: the first raw's s0"
    expected = split_stats(tiny_data.csv_path, classes, raw_s0)
    assert_same_stats(got, expected)
    assert got.height == len(tiny_data.crops) * len(classes)
    # The printed tables: annotated rows and one summary row per (split, class).
    assert "per class:" in stdout and "crops_annotated" in stdout and "foreground_fraction" in stdout
    for crop in tiny_data.crops:
        assert f"| {crop.name} " in stdout
    train_mito = expected.filter((pl.col("split") == "train") & (pl.col("class") == "mito"))
    crops_annotated = int(train_mito["annotated"].sum())
    summary = [line for line in stdout.splitlines() if line.startswith("| train    | mito ")]
    assert summary and summary[-1].split("|")[3].strip() == str(crops_annotated)
    assert f"wrote {got.height} rows" in stdout


def test_stats_csv_out_with_classes_and_scale(tiny_data, tmp_path, capsys):
    out = tmp_path / "stats.csv"
    code, stdout, stderr = cli(capsys, "stats", tiny_data.csv_path, "--classes", "mito,ves", "--input-scale", "8",
                               "--out", out, "--all-rows")
    assert code == 0, stderr
    got = pl.read_csv(out)
    assert sorted(set(got["class"])) == ["mito", "ves"]
    assert_same_stats(got, split_stats(tiny_data.csv_path, ["mito", "ves"], (8, 8, 8)))
    assert "counts in training voxels of 8x8x8 nm" in stdout
    assert "| false " in stdout, "--all-rows prints the unannotated (crop, class) rows"


def test_stats_of_crop_group_template_and_container(tiny_data, tmp_path, capsys):
    crop1 = crop_path(tiny_data)
    reference = pl.read_parquet(_stats_file(capsys, tmp_path / "all.parquet", tiny_data.csv_path))

    def same_rows(got, crop_names, classes):
        rows = reference.filter(pl.col("class").is_in(classes) & pl.col("annotated"))
        rows = rows.filter(pl.col("crop").map_elements(lambda c: Path(c).name in crop_names, return_dtype=pl.Boolean))
        got = got.filter(pl.col("annotated")).with_columns(pl.lit(None, pl.Utf8).alias("split"))
        assert_same_stats(got, rows.with_columns(pl.lit(None, pl.Utf8).alias("split")))

    got = pl.read_parquet(_stats_file(capsys, tmp_path / "crop.parquet", crop1))
    assert sorted(got["class"]) == sorted(tiny_data.crops[0].classes)
    same_rows(got, {"crop1"}, tiny_data.crops[0].classes)

    got = pl.read_parquet(_stats_file(capsys, tmp_path / "template.parquet", f"{crop1}/[mito,er]"))
    assert got["class"].to_list() == ["mito", "er"]
    same_rows(got, {"crop1"}, ["mito", "er"])

    ds0 = tiny_data.datasets[0]
    got = pl.read_parquet(_stats_file(capsys, tmp_path / "container.parquet", ds0.zarr_path, "--classes", "nuc"))
    assert {Path(c).name for c in got["crop"]} == {c.name for c in ds0.crops}
    assert set(got["dataset"]) == {str(ds0.raw_path)}, "the raw image found next to the labels"
    same_rows(got, {c.name for c in ds0.crops}, ["nuc"])


def _stats_file(capsys, out, *args):
    code, _, stderr = cli(capsys, "stats", *args, "--out", out)
    assert code == 0, stderr
    return out


def test_inspect_raw_group(tiny_data, capsys):
    raw = tiny_data.datasets[0].raw_path
    code, stdout, stderr = cli(capsys, "inspect", raw)
    assert code == 0, stderr
    assert "OME-NGFF 0.4 image, zarr v2, 3 levels" in stdout
    assert "axes z, y, x (space, nanometer)" in stdout
    group = zarr.open_group(str(raw), mode="r")
    multiscale = group.attrs["multiscales"][0]
    for entry in multiscale["datasets"]:
        array = group[entry["path"]]
        scale, translation = (t[next(iter(set(t) - {"type"}))] for t in entry["coordinateTransformations"])
        line = next(line for line in stdout.splitlines() if line.split()[:1] == [entry["path"]])
        fields = line.split()
        assert fields[1] == "x".join(map(str, array.shape))
        assert fields[2] == "x".join(map(str, array.chunks))
        assert fields[3] == str(array.dtype)
        assert fields[4] == ",".join(f"{v:g}" for v in scale)
        assert fields[5] == ",".join(f"{v:g}" for v in translation)
        hi = [t + s * n for t, s, n in zip(translation, scale, array.shape)]
        assert fields[6] == f"({','.join(f'{v:g}' for v in translation)})-({','.join(f'{v:g}' for v in hi)})"
        assert "zstd(level=" in line


def test_inspect_zarr_v3_sharded_image(tmp_path, capsys):
    from conftest import write_ome_image

    path = write_ome_image(tmp_path / "v3.zarr" / "img", [np.zeros((20, 24, 28), np.uint16)], [(8, 4, 4)],
                           [(4, 2, 2)], zarr_format=3, chunks=(8, 8, 8), shards=(16, 16, 16))
    code, stdout, stderr = cli(capsys, "inspect", path)
    assert code == 0, stderr
    assert "OME-NGFF 0.5 image, zarr v3, 1 level" in stdout
    [sharding] = json.loads((path / "s0" / "zarr.json").read_text())["codecs"]
    line = next(line for line in stdout.splitlines() if line.split()[:1] == ["s0"])
    assert line.split()[1:4] == ["20x24x28", "16x16x16", "uint16"], "the chunks column shows the shards"
    assert "sharding_indexed(inner chunks 8x8x8: " in line
    assert all(codec["name"] in line for codec in sharding["configuration"]["codecs"])


def test_inspect_crop_group(tiny_data, capsys):
    crop = tiny_data.crops[0]
    code, stdout, stderr = cli(capsys, "inspect", crop.path)
    assert code == 0, stderr
    assert f"label crop group, {len(crop.classes)} classes: {', '.join(sorted(crop.classes))}" in stdout
    for cls in crop.classes:
        assert f"  {cls}:" in stdout
    assert stdout.count("OME-NGFF 0.4 image") == len(crop.classes)
    assert f"{'x'.join(map(str, crop.shape))}" in stdout
    assert "complement_counts" in stdout and "absent=" in stdout


def test_inspect_container(tiny_data, capsys):
    ds0 = tiny_data.datasets[0]
    code, stdout, stderr = cli(capsys, "inspect", ds0.zarr_path)
    assert code == 0, stderr
    assert f"1 image group, {len(ds0.crops)} label crops" in stdout
    assert os.path.relpath(ds0.raw_path, ds0.zarr_path) in stdout
    for crop in ds0.crops:
        line = next(line for line in stdout.splitlines() if line.strip().startswith(os.path.relpath(crop.path, ds0.zarr_path)))
        assert line.split()[1] == str(len(crop.classes))
        assert line.split()[3] == "x".join(map(str, crop.shape))


@pytest.fixture
def bad_inputs(tmp_path, tiny_data):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not zarr")
    malformed = tmp_path / "malformed.csv"
    malformed.write_text('"train","only","three","no"\n')
    return {"missing": tmp_path / "missing.zarr", "plain": plain, "malformed": malformed, "csv": tiny_data.csv_path}


@pytest.mark.parametrize(
    "args, named",
    [
        (("stats", "{missing}"), "{missing}"),
        (("stats", "{plain}"), "{plain}"),
        (("stats", "{malformed}"), "{malformed}"),
        (("stats", "{csv}", "--classes", "mito,bogus"), "{csv}"),
        (("inspect", "{missing}"), "{missing}"),
        (("inspect", "{plain}"), "{plain}"),
        (("inspect", "{malformed}"), "{malformed}"),
    ],
)
def test_bad_input_is_one_line_naming_the_path(bad_inputs, capsys, args, named):
    code, stdout, stderr = cli(capsys, *(a.format(**bad_inputs) for a in args))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"cellmap_data {args[0]}: error: ")
    assert named.format(**bad_inputs) in lines[0]
    assert "Traceback" not in stderr
    if "bogus" in args:
        assert "bogus" in lines[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(bad_inputs, capsys, where):
    args = ["inspect", str(bad_inputs["missing"])]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    code, _, stderr = cli(capsys, *args)
    assert code == 2
    assert "Traceback (most recent call last)" in stderr and "NotFoundError" in stderr
    assert stderr.strip().splitlines()[-1].startswith("cellmap_data inspect: error: ")


def test_inspect_through_python_m(tiny_data, bad_inputs):
    result = run("inspect", str(tiny_data.datasets[0].raw_path))
    assert result.returncode == 0, result.stderr
    assert "OME-NGFF 0.4 image" in result.stdout and "s2" in result.stdout
    result = run("inspect", str(bad_inputs["plain"]))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert str(bad_inputs["plain"]) in result.stderr and "Traceback" not in result.stderr
    result = run("inspect", str(bad_inputs["plain"]), "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_inspect_container_lists_past_a_broken_group(tmp_path, capsys):
    from conftest import write_ome_image

    root = tmp_path / "mixed.zarr"
    write_ome_image(root / "good", [np.zeros((8, 8, 8), np.uint8)], [(2, 2, 2)], [(1, 1, 1)], chunks=(8, 8, 8))
    (root / ".zgroup").write_text('{"zarr_format": 2}')
    (root / "broken").mkdir()
    (root / "broken" / ".zattrs").write_text("{not json")
    code, stdout, stderr = cli(capsys, "inspect", root)
    assert code == 0, stderr
    good = next(line for line in stdout.splitlines() if line.strip().startswith("good "))
    assert "8x8x8" in good and "uint8" in good
    broken = next(line for line in stdout.splitlines() if line.strip().startswith("broken "))
    assert "error" in broken and "malformed JSON" in broken
    code, _, stderr = cli(capsys, "inspect", root / "broken")
    assert code == 2 and "malformed JSON" in stderr and str(root / "broken") in stderr


def test_bench_elastic_compares_rotated_with_rotated_and_elastic(tmp_path):
    from cellmap_data.tools import bench

    r = bench.bench_elastic(bench.bench_data(tmp_path / "bench", "tiny"), threads=1, batches=1, repeat=1)
    assert r["rotated_samples_per_s"] > 0 and r["elastic_samples_per_s"] > 0
    assert r["cost_ratio"] == r["rotated_samples_per_s"] / r["elastic_samples_per_s"] and r["bound"] == 1.5


def test_bench_writer_ranks_reports_both_process_counts(tmp_path):
    import json

    result = run("bench", "--data", str(tmp_path / "bench"), "--size", "tiny", "--writer-ranks", "--repeat", "1",
                 "--json", str(tmp_path / "ranks.json"))
    assert result.returncode == 0, result.stderr
    assert "bound >= 1.6" in result.stdout and "2proc" in result.stdout
    runs = json.loads((tmp_path / "ranks.json").read_text())["runs"]
    two = [r for r in runs.values() if r["processes"] == 2]
    assert two and all(len(r["tiles_per_rank"]) == 2 and r["mb_per_s"] > 0 for r in two)
