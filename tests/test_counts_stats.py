"""Class counts, class weights and Polars statistics, checked against numpy on arrays that
zarr-python wrote and reads back (the independent reference)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr

from cellmap_data import CellMapDataset, _engine
from cellmap_data import _stats
from cellmap_data.exceptions import ChunkDecodeError
from conftest import write_ome_image

CLASSES = ["mito", "nuc", "empty", "ves"]  # ves is requested but not annotated
ANNOTATED = ["mito", "nuc", "empty"]
S0_SHAPE = (40, 36, 44)  # not a multiple of the 16^3 chunks: edge chunks are partial


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own default count cache (never the user's ~/.cache)."""
    root = tmp_path / "cellmap-cache"
    monkeypatch.setenv("CELLMAP_CACHE_DIR", str(root))
    return root / "counts"


def _label_levels(s0: np.ndarray) -> list[np.ndarray]:
    return [s0, s0[::2, ::2, ::2].copy()]


def _make_labels(rng: np.random.Generator) -> dict[str, np.ndarray]:
    mito = (rng.random(S0_SHAPE) < 0.2).astype(np.uint8)
    # Instance ids (uint16, values up to 700): any non-zero id is foreground.
    nuc = np.zeros(S0_SHAPE, np.uint16)
    nuc[5:30, 4:20, 10:40] = rng.integers(1, 700, size=(25, 16, 30), dtype=np.uint16)
    nuc[10:12] = 0
    empty = np.zeros(S0_SHAPE, np.uint8)
    return {"mito": mito, "nuc": nuc, "empty": empty}


@pytest.fixture
def crop_data(tmp_path):
    """A raw image and one crop (mito mask, nuc instance ids, an annotated-but-empty class),
    two levels each (4 nm, 8 nm), written with zarr-python."""
    rng = np.random.default_rng(7)
    root = tmp_path / "data.zarr"
    raw = rng.integers(0, 255, size=(48, 48, 48), dtype=np.uint8)
    raw_path = write_ome_image(root / "recon-1/em/fibsem-uint8", [raw], [(4, 4, 4)], [(0, 0, 0)])
    crop = root / "recon-1/labels/groundtruth/crop1"
    labels = _make_labels(rng)
    for cls, s0 in labels.items():
        write_ome_image(crop / cls, _label_levels(s0), [(4, 4, 4), (8, 8, 8)], [(0, 0, 0), (2, 2, 2)])
    return {"root": root, "raw": raw_path, "crop": crop, "labels": labels}


def make_dataset(crop_data, scale=(8, 8, 8), classes=CLASSES, crop=None):
    crop = crop or crop_data["crop"]
    return CellMapDataset(
        str(crop_data["raw"]),
        f"{crop}/[{','.join(ANNOTATED)}]",
        classes,
        {"in": {"shape": (8, 8, 8), "scale": (4, 4, 4)}},
        {"out": {"shape": (8, 8, 8), "scale": scale}},
        pad=True,
    )


def zarr_level(group: Path, level: int) -> np.ndarray:
    return zarr.open_group(str(group), mode="r")[f"s{level}"][...]


def expected_counts(crop: Path, cls: str, level: int, ratio: float) -> tuple[float, float]:
    data = zarr_level(crop / cls, level)
    return np.count_nonzero(data) * ratio, data.size * ratio


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def write_complement_counts(array_dir: Path, absent: int, unknown: int = 0) -> None:
    attrs_file = array_dir / ".zattrs"
    attrs = json.loads(attrs_file.read_text()) if attrs_file.exists() else {}
    attrs["cellmap"] = {"annotation": {"complement_counts": {"absent": absent, "unknown": unknown}}}
    attrs_file.write_text(json.dumps(attrs))


def corrupt_chunks(array_dir: Path) -> None:
    for chunk in array_dir.iterdir():
        if not chunk.name.startswith("."):
            chunk.write_bytes(b"definitely not zstd")


# -- counts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scale", "level", "ratio"),
    [((4, 4, 4), 0, 1.0), ((8, 8, 8), 1, 1.0), ((16, 16, 16), 1, 1 / 8), ((4, 8, 8), 0, 0.25)],
)
def test_class_counts_match_numpy_at_training_resolution(crop_data, scale, level, ratio):
    ds = make_dataset(crop_data, scale=scale)
    counts = _stats.class_counts(ds, progress=False)
    for cls in ANNOTATED:
        fg, total = expected_counts(crop_data["crop"], cls, level, ratio)
        assert counts["totals"][cls] == pytest.approx(fg), cls
        assert counts["totals_total"][cls] == pytest.approx(total), cls
    assert counts["totals"]["empty"] == 0
    assert counts["totals_total"]["empty"] > 0
    assert counts["totals"]["ves"] == 0 and counts["totals_total"]["ves"] == 0
    assert list(counts["totals"]) == CLASSES


def test_instance_ids_count_as_foreground(crop_data):
    nuc = crop_data["labels"]["nuc"]
    assert nuc.max() > 255  # real ids, not a 0/1 mask
    c = _stats.label_counts(crop_data["crop"] / "nuc", (4, 4, 4), progress=False)
    assert c["foreground"] == np.count_nonzero(zarr_level(crop_data["crop"] / "nuc", 0))
    assert (c["source"], c["level"]) == ("scan", 0)


def test_zarr_v3_labels_are_counted(tmp_path):
    data = (np.arange(30 * 20 * 25).reshape(30, 20, 25) % 7 == 0).astype(np.uint8)
    group = write_ome_image(tmp_path / "v3/mito", [data], [(4, 4, 4)], [(0, 0, 0)], zarr_format=3)
    c = _stats.label_counts(group, (4, 4, 4), progress=False)
    assert c["foreground"] == np.count_nonzero(zarr_level(group, 0))
    assert c["total"] == data.size


def test_progress_reports_every_scanned_chunk(crop_data):
    handle = _engine.CountProgress()
    _engine.label_counts(str(crop_data["crop"] / "mito"), [4.0, 4.0, 4.0], use_cache=False, progress=handle)
    n_chunks = math.prod(math.ceil(n / 16) for n in S0_SHAPE)
    assert (handle.done, handle.total) == (n_chunks, n_chunks)


def test_progress_bar_is_drawn_for_slow_scans(crop_data, monkeypatch, capsys):
    monkeypatch.setattr(_stats, "PROGRESS_DELAY_S", 0.0)

    def slow(*args, progress, **kwargs):
        result = _engine.label_counts(*args, progress=progress, **kwargs)
        time.sleep(0.5)  # the scan has announced its chunks; keep the job running a while
        return result

    result = _stats._run_counting(
        slow, str(crop_data["crop"] / "mito"), [4.0] * 3, progress=True, desc="counting-test", use_cache=False
    )
    assert result["source"] == "scan"
    err = capsys.readouterr().err
    n_chunks = math.prod(math.ceil(n / 16) for n in S0_SHAPE)
    assert "counting-test" in err and f"{n_chunks}/{n_chunks}" in err


def test_cancelled_count_raises_keyboard_interrupt(crop_data):
    handle = _engine.CountProgress()
    handle.cancel()
    with pytest.raises(KeyboardInterrupt):
        _engine.label_counts(str(crop_data["crop"] / "mito"), [4.0] * 3, use_cache=False, progress=handle)


# -- metadata-provided counts ---------------------------------------------------------------------
def test_metadata_counts_are_used_without_scanning(crop_data):
    mito = crop_data["crop"] / "mito"
    size = math.prod(S0_SHAPE)
    # Deliberately wrong counts, and chunks nobody could decode: only metadata can answer.
    write_complement_counts(mito / "s0", absent=size - 1234, unknown=66)
    corrupt_chunks(mito / "s0")
    c = _stats.label_counts(mito, (4, 4, 4), progress=False)
    assert (c["source"], c["foreground"], c["total"]) == ("metadata", 1234 - 66, size)
    with pytest.raises(ChunkDecodeError):  # the same request without metadata must scan
        _stats.label_counts(mito, (4, 4, 4), use_metadata=False, cache_dir=False, progress=False)


def test_finest_level_metadata_is_scaled_when_the_chosen_level_has_none(crop_data):
    mito = crop_data["crop"] / "mito"
    size = math.prod(S0_SHAPE)
    write_complement_counts(mito / "s0", absent=size - 800)
    corrupt_chunks(mito / "s1")
    c = _stats.label_counts(mito, (8, 8, 8), progress=False)
    assert (c["source"], c["level"]) == ("metadata_s0", 0)
    assert c["foreground"] == pytest.approx(800 / 8) and c["total"] == pytest.approx(size / 8)


def test_metadata_counts_of_synthetic_data_agree_with_a_scan(tiny_data):
    crop = tiny_data.datasets[0].crops[0]
    for cls in crop.classes:
        meta = _stats.label_counts(crop.path / cls, crop.voxel_size, progress=False)
        scan = _stats.label_counts(crop.path / cls, crop.voxel_size, use_metadata=False, cache_dir=False, progress=False)
        assert meta["source"] == "metadata" and scan["source"] == "scan"
        assert meta["foreground"] == scan["foreground"], cls


def test_sharded_zarr_v3_scan_agrees_with_metadata(tmp_path):
    from cellmap_data.tools.synthetic import make_synthetic_data

    data = make_synthetic_data(tmp_path / "v3", size="tiny", n_datasets=1, zarr_format=3, sharded=True)
    for crop in data.datasets[0].crops:
        for cls in crop.classes:
            scan = _stats.label_counts(crop.path / cls, crop.voxel_size, use_metadata=False, cache_dir=False, progress=False)
            meta = _stats.label_counts(crop.path / cls, crop.voxel_size, progress=False)
            reference = np.count_nonzero(zarr_level(crop.path / cls, 0))
            assert scan["foreground"] == meta["foreground"] == reference, (crop.name, cls)
            assert meta["source"] == "metadata"


# -- the count cache ------------------------------------------------------------------------------
def test_cache_hit_after_first_computation(crop_data, isolated_cache):
    mito = crop_data["crop"] / "mito"
    first = _stats.label_counts(mito, (4, 4, 4), progress=False)
    assert first["source"] == "scan"
    files = list(isolated_cache.glob("*.json"))
    assert len(files) == 1
    entry = json.loads(files[0].read_text())
    assert entry["foreground"] == np.count_nonzero(zarr_level(mito, 0))
    assert entry["array"] == os.path.realpath(mito / "s0")
    corrupt_chunks(mito / "s0")  # a second scan would now fail
    second = _stats.label_counts(mito, (4, 4, 4), progress=False)
    assert second["source"] == "cache"
    assert second["foreground"] == first["foreground"]


def test_cache_is_invalidated_when_the_array_metadata_changes(crop_data):
    mito = crop_data["crop"] / "mito"
    assert _stats.label_counts(mito, (4, 4, 4), progress=False)["source"] == "scan"
    # Rewrite the level with different data (zarr-python rewrites .zarray: new mtime).
    new = np.ones(S0_SHAPE, np.uint8)
    new[0] = 0
    arr = zarr.open_array(str(mito / "s0"), mode="w", shape=S0_SHAPE, chunks=(16, 16, 16), dtype="uint8", zarr_format=2)
    arr[...] = new
    c = _stats.label_counts(mito, (4, 4, 4), progress=False)
    assert (c["source"], c["foreground"]) == ("scan", np.count_nonzero(new))
    # A touched metadata file alone invalidates too.
    later = time.time() + 5
    os.utime(mito / "s0" / ".zarray", (later, later))
    assert _stats.label_counts(mito, (4, 4, 4), progress=False)["source"] == "scan"
    assert _stats.label_counts(mito, (4, 4, 4), progress=False)["source"] == "cache"


def test_cache_location_parameter_env_and_opt_out(crop_data, tmp_path, monkeypatch, isolated_cache):
    assert _stats.default_cache_dir() == str(isolated_cache)
    monkeypatch.delenv("CELLMAP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _stats.default_cache_dir() == str(tmp_path / "xdg" / "cellmap-data" / "counts")
    mito = crop_data["crop"] / "mito"
    explicit = tmp_path / "explicit"
    _stats.label_counts(mito, (4, 4, 4), cache_dir=explicit, progress=False)
    assert len(list(explicit.glob("*.json"))) == 1
    assert _stats.label_counts(mito, (4, 4, 4), cache_dir=explicit, progress=False)["source"] == "cache"
    assert _stats.label_counts(mito, (4, 4, 4), cache_dir=False, progress=False)["source"] == "scan"
    assert not (tmp_path / "xdg").exists()


def test_user_files_are_never_written(crop_data, isolated_cache):
    before = tree_digest(crop_data["root"])
    ds = make_dataset(crop_data)
    _stats.stats(ds, progress=False)
    _stats.class_counts(ds, progress=False)  # cached path
    _stats.stats(ds, use_metadata=False, cache_dir=False, progress=False)
    assert tree_digest(crop_data["root"]) == before
    assert list(isolated_cache.glob("*.json"))  # counts went to the cache instead


# -- weights and the crop/class matrix ------------------------------------------------------------
def test_class_weights_are_background_over_foreground_and_finite(crop_data):
    counts = _stats.class_counts(make_dataset(crop_data), progress=False)
    weights = _stats.class_weights(counts)
    assert list(weights) == CLASSES
    assert all(math.isfinite(w) for w in weights.values())
    fg, total = counts["totals"]["mito"], counts["totals_total"]["mito"]
    assert weights["mito"] == pytest.approx((total - fg) / fg)
    # the reference's numbers: background / max(foreground, 1)
    assert weights["empty"] == pytest.approx(counts["totals_total"]["empty"])  # annotated, never present
    assert weights["ves"] == 0.0  # never annotated: no background either
    # the capped form
    capped = _stats.class_weights(counts, capped=True)
    assert capped["mito"] == pytest.approx(weights["mito"])
    assert capped["empty"] == _stats.CLASS_WEIGHT_CAP and capped["ves"] == 1.0
    assert _stats.class_weights({"totals": {"a": 1.0}, "totals_total": {"a": 1e12}}, capped=True)["a"] == _stats.CLASS_WEIGHT_CAP
    assert _stats.class_weights({"totals": {"a": 0.25}, "totals_total": {"a": 10.0}})["a"] == pytest.approx(9.75)


def test_crop_class_matrix_marks_annotated_classes(crop_data):
    ds = make_dataset(crop_data)
    m = _stats.crop_class_matrix(ds)
    assert m.dtype == np.bool_ and m.shape == (1, len(CLASSES))
    assert m.tolist() == [[True, True, True, False]]
    assert _stats.crop_class_matrix([ds, ds]).shape == (2, len(CLASSES))


# -- Polars statistics ----------------------------------------------------------------------------
def test_stats_dataframe_columns_dtypes_and_values(crop_data):
    ds = make_dataset(crop_data, scale=(8, 8, 8))
    df = _stats.stats(ds, progress=False)
    assert isinstance(df, pl.DataFrame) and df.height == len(CLASSES)
    expected_schema = {
        "dataset": pl.String, "crop": pl.String, "class": pl.String, "annotated": pl.Boolean,
        "label_path": pl.String, "level": pl.Int32, "count_source": pl.String,
        **{f"voxel_size_{a}": pl.Float64 for a in "zyx"},
        **{f"shape_{a}": pl.UInt64 for a in "zyx"},
        **{f"box_lo_{a}": pl.Float64 for a in "zyx"},
        **{f"box_hi_{a}": pl.Float64 for a in "zyx"},
        **{f"train_voxel_size_{a}": pl.Float64 for a in "zyx"},
        "foreground_voxels": pl.Float64, "total_voxels": pl.Float64, "fraction": pl.Float64, "weight": pl.Float64,
    }
    assert dict(df.schema) == expected_schema
    assert df["class"].to_list() == CLASSES
    assert df["annotated"].to_list() == [True, True, True, False]
    assert set(df["dataset"]) == {str(crop_data["raw"])}
    assert set(df["crop"]) == {str(crop_data["crop"])}
    s1_shape = tuple(-(-n // 2) for n in S0_SHAPE)
    for row in df.filter(pl.col("annotated")).iter_rows(named=True):
        data = zarr_level(crop_data["crop"] / row["class"], 1)
        assert data.shape == s1_shape
        fg = np.count_nonzero(data)
        assert row["label_path"] == str(crop_data["crop"] / row["class"])
        assert (row["level"], row["count_source"]) == (1, "scan")
        assert (row["shape_z"], row["shape_y"], row["shape_x"]) == s1_shape
        assert (row["voxel_size_z"], row["voxel_size_y"], row["voxel_size_x"]) == (8.0, 8.0, 8.0)
        # level 1: voxel centres from 2 nm, 8 nm apart → edges from -2 nm.
        assert (row["box_lo_z"], row["box_hi_z"]) == (-2.0, -2.0 + 8 * s1_shape[0])
        assert row["foreground_voxels"] == fg and row["total_voxels"] == data.size
        assert row["fraction"] == pytest.approx(fg / data.size)
        expected_weight = (data.size - fg) / fg if fg else _stats.CLASS_WEIGHT_CAP
        assert row["weight"] == pytest.approx(min(expected_weight, _stats.CLASS_WEIGHT_CAP))
    ves = df.filter(pl.col("class") == "ves").row(0, named=True)
    assert ves["foreground_voxels"] == 0 and ves["total_voxels"] == 0
    assert ves["weight"] is None and ves["fraction"] is None and ves["shape_z"] is None


def test_stats_for_concatenates_datasets(crop_data, tmp_path):
    rng = np.random.default_rng(3)
    crop2 = crop_data["root"] / "recon-1/labels/groundtruth/crop2"
    for cls, s0 in _make_labels(rng).items():
        write_ome_image(crop2 / cls, _label_levels(s0), [(4, 4, 4), (8, 8, 8)], [(0, 0, 0), (2, 2, 2)])
    a, b = make_dataset(crop_data), make_dataset(crop_data, crop=crop2)
    df = _stats.stats_for([a, b], progress=False)
    assert df.height == 2 * len(CLASSES)
    assert df["crop"].unique(maintain_order=True).to_list() == [str(crop_data["crop"]), str(crop2)]
    both = _stats.class_counts([a, b], progress=False)
    for cls in ANNOTATED:
        fg = sum(np.count_nonzero(zarr_level(c / cls, 1)) for c in (crop_data["crop"], crop2))
        assert both["totals"][cls] == fg


def test_stats_of_synthetic_split_use_metadata(tiny_data):
    datasets = []
    for d in tiny_data.datasets:
        for crop in d.crops:
            datasets.append(CellMapDataset(
                str(d.raw_path), crop.target_path, tiny_data.classes,
                {"in": {"shape": (8, 8, 8), "scale": crop.voxel_size}},
                {"out": {"shape": (8, 8, 8), "scale": crop.voxel_size}}, pad=True,
            ))
    df = _stats.stats_for(datasets, progress=False)
    assert df.height == len(datasets) * len(tiny_data.classes)
    annotated = df.filter(pl.col("annotated"))
    assert set(annotated["count_source"]) == {"metadata"}
    assert annotated.height == sum(len(c.classes) for d in tiny_data.datasets for c in d.crops)


def test_bench_stats_timing(tmp_path_factory):
    """Stats of generated data without count metadata: cold scans, then cached scans (the
    figure for the benchmark-size data comes from `python -m cellmap_data stats` on it)."""
    from cellmap_data.tools.synthetic import make_synthetic_data

    data = make_synthetic_data(tmp_path_factory.mktemp("bench"), size="small", seed=0, write_counts=False)
    datasets = [
        CellMapDataset(str(d.raw_path), crop.target_path, data.classes,
                       {"in": {"shape": (64, 64, 64), "scale": (8, 8, 8)}},
                       {"out": {"shape": (64, 64, 64), "scale": (8, 8, 8)}}, pad=True)
        for d in data.datasets for crop in d.crops
    ]
    cache = tmp_path_factory.mktemp("bench-cache")
    t0 = time.perf_counter()
    cold = _stats.stats_for(datasets, cache_dir=cache, progress=False)
    t1 = time.perf_counter()
    cached = _stats.stats_for(datasets, cache_dir=cache, progress=False)
    t2 = time.perf_counter()
    print(f"\nbench stats: {cold.height} rows, cold {t1 - t0:.2f} s, cached {t2 - t1:.3f} s")
    assert set(cached.filter(pl.col("annotated"))["count_source"]) == {"cache"}
    assert cold["foreground_voxels"].to_list() == cached["foreground_voxels"].to_list()
