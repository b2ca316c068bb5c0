"""Tests of the synthetic CellMap-style data generator and its ``synth`` command."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellmap_data.tools.synthetic import CLASS_NAMES, SyntheticData, make_synthetic_data

REPO_ROOT = Path(__file__).resolve().parents[1]
ZSTD_V2 = {"id": "zstd", "level": 6, "checksum": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SyntheticData:
    return make_synthetic_data(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


def _read(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(path), mode="r")[...])


def _label_arrays(data: SyntheticData):
    """(crop, class name, level, array path) for every label array."""
    for crop in data.crops:
        for class_name in crop.classes:
            for level in (0, 1):
                yield crop, class_name, level, crop.path / class_name / f"s{level}"


def _all_arrays(data: SyntheticData) -> dict[str, np.ndarray]:
    arrays = {}
    for dataset in data.datasets:
        for level in range(3):
            arrays[f"{dataset.name}/raw/s{level}"] = _read(dataset.raw_path / f"s{level}")
    for crop, class_name, level, path in _label_arrays(data):
        arrays[f"{crop.name}/{class_name}/s{level}"] = _read(path)
    return arrays


def _block_mean(volume: np.ndarray) -> np.ndarray:
    nz, ny, nx = (n // 2 for n in volume.shape)
    blocks = volume[: 2 * nz, : 2 * ny, : 2 * nx].reshape(nz, 2, ny, 2, nx, 2).astype(np.float64)
    return np.floor(blocks.mean(axis=(1, 3, 5)) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- layout


def test_layout_paths_exist(tiny):
    assert tiny.csv_path == tiny.root / "datasplit.csv" and tiny.csv_path.is_file()
    assert tiny.classes == list(CLASS_NAMES)
    assert [d.name for d in tiny.datasets] == ["ds0", "ds1"]
    for dataset in tiny.datasets:
        assert dataset.zarr_path == tiny.root / f"{dataset.name}.zarr"
        assert dataset.raw_path == dataset.zarr_path / "recon-1/em/fibsem-uint8"
        for group in ("", "recon-1", "recon-1/em", "recon-1/em/fibsem-uint8", "recon-1/labels/groundtruth"):
            assert (dataset.zarr_path / group / ".zgroup").is_file(), group
        for level in range(3):
            assert (dataset.raw_path / f"s{level}" / ".zarray").is_file()
        for crop in dataset.crops:
            assert crop.path == dataset.zarr_path / "recon-1/labels/groundtruth" / crop.name
            assert crop.target_path == f"{crop.path}/[{','.join(crop.classes)}]"
            for class_name in crop.classes:
                for level in range(2):
                    assert (crop.path / class_name / f"s{level}" / ".zarray").is_file()


def test_raw_is_uint8_pyramid_with_expected_shapes(tiny):
    for dataset in tiny.datasets:
        for level in range(3):
            array = zarr.open_array(str(dataset.raw_path / f"s{level}"), mode="r")
            assert array.dtype == np.uint8
            assert array.shape == tuple(n // 2**level for n in dataset.raw_shape)
            assert array.chunks == (32, 32, 32)
    assert tiny.datasets[0].raw_shape == (80, 80, 80)


def test_pyramid_levels_are_rounded_block_means(tiny):
    for dataset in tiny.datasets:
        s0, s1, s2 = (_read(dataset.raw_path / f"s{level}") for level in range(3))
        np.testing.assert_array_equal(s1, _block_mean(s0))
        np.testing.assert_array_equal(s2, _block_mean(s1))


def test_raw_looks_like_em(tiny):
    raw = _read(tiny.datasets[0].raw_path / "s0").astype(np.float64)
    assert 120 < raw.mean() < 180
    assert raw.std() > 10  # texture, not a constant
    assert raw.min() < 60  # dark membranes


# ----------------------------------------------------------------------------- metadata


def _check_multiscales(multiscale: dict, voxel_size, translation, levels: int, name: str):
    assert multiscale["name"] == name
    assert multiscale["axes"] == [{"name": axis, "type": "space", "unit": "nanometer"} for axis in "zyx"]
    assert [d["path"] for d in multiscale["datasets"]] == [f"s{level}" for level in range(levels)]
    v0, t0 = np.array(voxel_size), np.array(translation)
    for level, entry in enumerate(multiscale["datasets"]):
        scale, shift = entry["coordinateTransformations"]
        assert scale["type"] == "scale" and shift["type"] == "translation"
        np.testing.assert_allclose(scale["scale"], v0 * 2**level)
        # OME-NGFF: the translation is the centre of voxel 0, hence the half-voxel shift.
        np.testing.assert_allclose(shift["translation"], t0 + (2**level - 1) * v0 / 2)


def test_multiscales_metadata_v2(tiny):
    for dataset in tiny.datasets:
        attrs = zarr.open_group(str(dataset.raw_path), mode="r").attrs.asdict()
        (multiscale,) = attrs["multiscales"]
        assert multiscale["version"] == "0.4"
        _check_multiscales(multiscale, dataset.raw_voxel_size, dataset.raw_translation, 3, "fibsem-uint8")
        for crop in dataset.crops:
            crop_attrs = zarr.open_group(str(crop.path), mode="r").attrs.asdict()
            assert crop_attrs["cellmap"]["annotation"]["class_names"] == crop.classes
            for class_name in crop.classes:
                attrs = zarr.open_group(str(crop.path / class_name), mode="r").attrs.asdict()
                (multiscale,) = attrs["multiscales"]
                assert multiscale["version"] == "0.4"
                _check_multiscales(multiscale, crop.voxel_size, crop.translation, 2, class_name)
                annotation = attrs["cellmap"]["annotation"]
                assert annotation["class_name"] == class_name
                if class_name in crop.instance_classes:
                    assert annotation["annotation_type"]["type"] == "instance_segmentation"
                else:
                    assert annotation["annotation_type"] == {
                        "type": "semantic_segmentation",
                        "encoding": {"absent": 0, "present": 1},
                    }


def test_label_s0_shapes_match_dataclass(tiny):
    for crop in tiny.crops:
        for class_name in crop.classes:
            s0 = zarr.open_array(str(crop.path / class_name / "s0"), mode="r")
            s1 = zarr.open_array(str(crop.path / class_name / "s1"), mode="r")
            assert s0.shape == crop.shape
            assert s1.shape == tuple(n // 2 for n in crop.shape)


def test_zstd_compressor_spelled_like_cellmap(tiny):
    dataset = tiny.datasets[0]
    crop = dataset.crops[0]
    for path in (dataset.raw_path / "s0", dataset.raw_path / "s2", crop.path / crop.classes[0] / "s1"):
        meta = json.loads((path / ".zarray").read_text())
        assert meta["compressor"] == ZSTD_V2
        assert meta["zarr_format"] == 2
        assert meta["dimension_separator"] == "."


def test_blosc_and_slash_separator(tmp_path):
    data = make_synthetic_data(tmp_path, n_datasets=1, compressor="blosc", dimension_separator="/")
    meta = json.loads((data.datasets[0].raw_path / "s0" / ".zarray").read_text())
    assert meta["compressor"]["id"] == "blosc"
    assert meta["compressor"]["cname"] == "zstd"
    assert meta["compressor"]["clevel"] == 5
    assert meta["compressor"]["shuffle"] == 1
    assert meta["dimension_separator"] == "/"
    assert (data.datasets[0].raw_path / "s0" / "0" / "0" / "0").is_file()
    assert _read(data.datasets[0].raw_path / "s0").shape == data.datasets[0].raw_shape


def test_complement_counts_equal_zero_counts(tiny):
    for _, _, _, path in _label_arrays(tiny):
        array = zarr.open_array(str(path), mode="r")
        counts = array.attrs["cellmap"]["annotation"]["complement_counts"]
        assert counts == {"absent": int(np.count_nonzero(array[...] == 0)), "unknown": 0}


def test_counts_can_be_omitted(tmp_path):
    data = make_synthetic_data(tmp_path, n_datasets=1, write_counts=False)
    crop = data.crops[0]
    attrs = zarr.open_array(str(crop.path / crop.classes[0] / "s0"), mode="r").attrs.asdict()
    assert "cellmap" not in attrs


# ----------------------------------------------------------------------------- labels


def test_masks_are_binary_and_instance_class_holds_ids(tiny):
    instance_seen = False
    for crop, class_name, _, path in _label_arrays(tiny):
        values = np.unique(_read(path))
        if class_name in crop.instance_classes:
            instance_seen = True
            assert values[0] == 0 and len(values) >= 2
            # Consecutive ids 1..k for the instances present at this level.
            assert set(values[1:]) <= set(range(1, values.max() + 1))
        else:
            assert set(values.tolist()) <= {0, 1}
    assert instance_seen
    crop1 = tiny.datasets[0].crops[0]
    assert crop1.name == "crop1" and crop1.instance_classes == ["mito"]
    ids = _read(crop1.path / "mito" / "s0")
    assert ids.max() == len(np.unique(ids)) - 1


def test_class_coverage_and_an_absent_class(tiny):
    annotated = {name for crop in tiny.crops for name in crop.classes}
    assert annotated == set(CLASS_NAMES)
    assert all(len(crop.classes) >= 2 for crop in tiny.crops)
    assert all(crop.classes == [c for c in CLASS_NAMES if c in crop.classes] for crop in tiny.crops)
    absent = []
    for crop in tiny.crops:
        for class_name in crop.classes:
            empty = not np.any(_read(crop.path / class_name / "s0"))
            assert empty == (class_name in crop.empty_classes)
            if empty:
                absent.append((crop.name, class_name))
    assert absent, "some crop must annotate a class with no foreground"
    # Every class has foreground in some crop.
    present = {c for crop in tiny.crops for c in crop.classes if c not in crop.empty_classes}
    assert len(present) >= 4


def test_crop_geometry(tiny):
    ds0, ds1 = tiny.datasets
    assert ds0.raw_voxel_size == (4.0, 4.0, 4.0)
    assert sorted({crop.voxel_size for crop in ds0.crops}) == [(4.0, 4.0, 4.0), (8.0, 8.0, 8.0)]
    assert ds1.raw_voxel_size == (5.24, 4.0, 4.0)
    assert {crop.voxel_size for crop in ds1.crops} == {(5.24, 4.0, 4.0)}
    assert [crop.name for crop in tiny.crops] == [f"crop{i}" for i in range(1, 6)]
    for dataset in tiny.datasets:
        raw_v, raw_t = np.array(dataset.raw_voxel_size), np.array(dataset.raw_translation)
        raw_lo = raw_t - raw_v / 2
        raw_hi = raw_lo + raw_v * np.array(dataset.raw_shape)
        for crop in dataset.crops:
            v, t = np.array(crop.voxel_size), np.array(crop.translation)
            lo = t - v / 2
            assert np.all(lo >= raw_lo - 1e-6) and np.all(lo + v * np.array(crop.shape) <= raw_hi + 1e-6)
            assert all(24 <= n <= 40 for n in crop.shape)
    # Some crops sit off the raw voxel grid.
    offsets = [
        (np.array(c.translation) - np.array(c.voxel_size) / 2 - np.array(d.raw_translation) + np.array(d.raw_voxel_size) / 2)
        / np.array(d.raw_voxel_size)
        for d in tiny.datasets
        for c in d.crops
    ]
    assert any(not np.allclose(o, np.round(o)) for o in offsets)


def test_raw_correlates_with_labels(tiny):
    """crop1 is aligned with the raw grid at the raw voxel size: compare voxel by voxel."""
    dataset = tiny.datasets[0]
    crop = dataset.crops[0]
    assert crop.voxel_size == dataset.raw_voxel_size
    start = (np.array(crop.translation) - np.array(dataset.raw_translation)) / np.array(dataset.raw_voxel_size)
    assert np.allclose(start, np.round(start))
    z, y, x = np.round(start).astype(int)
    dz, dy, dx = crop.shape
    raw = _read(dataset.raw_path / "s0")[z : z + dz, y : y + dy, x : x + dx].astype(np.float64)
    mito = _read(crop.path / "mito" / "s0") > 0
    assert mito.any()
    assert raw[mito].mean() < raw[~mito].mean() - 15


def test_datasplit_csv(tiny):
    lines = tiny.csv_path.read_text().splitlines()
    field = r'"[^"]*"'
    assert all(re.fullmatch(",".join([field] * 5), line) for line in lines)
    with tiny.csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == len(tiny.crops)
    usages = [row[0] for row in rows]
    assert set(usages) == {"train", "validate"}
    for row, crop in zip(rows, tiny.crops):
        usage, raw_container, raw_dataset, gt_container, gt_dataset = row
        assert usage == crop.usage
        assert Path(raw_container).is_absolute() and raw_container.endswith(".zarr")
        assert raw_dataset == "recon-1/em/fibsem-uint8"
        assert (Path(raw_container) / raw_dataset / "s0").is_dir()
        assert gt_container == raw_container
        match = re.fullmatch(r"(recon-1/labels/groundtruth/crop\d+)/\[([a-z,]+)\]", gt_dataset)
        assert match, gt_dataset
        classes = match.group(2).split(",")
        assert classes == crop.classes
        for class_name in classes:
            assert (Path(gt_container) / match.group(1) / class_name / "s0").is_dir()
    for dataset in tiny.datasets:
        assert any(crop.usage == "validate" for crop in dataset.crops)


# ----------------------------------------------------------------------------- determinism and formats


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny):
    again = make_synthetic_data(tmp_path / "again", size="tiny", seed=0)
    first, second = _all_arrays(tiny), _all_arrays(again)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert first[key].tobytes() == second[key].tobytes(), key
    other = make_synthetic_data(tmp_path / "other", size="tiny", seed=1, n_datasets=1)
    assert not np.array_equal(_read(other.datasets[0].raw_path / "s0"), first["ds0/raw/s0"])


def test_zarr_v3_has_ome_05_metadata(tmp_path, tiny):
    data = make_synthetic_data(tmp_path, size="tiny", zarr_format=3)
    dataset = data.datasets[1]
    group = zarr.open_group(str(dataset.raw_path), mode="r")
    assert group.metadata.zarr_format == 3
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert "version" not in multiscale
    _check_multiscales(multiscale, dataset.raw_voxel_size, dataset.raw_translation, 3, "fibsem-uint8")
    meta = json.loads((dataset.raw_path / "s0" / "zarr.json").read_text())
    assert [codec["name"] for codec in meta["codecs"]] == ["bytes", "zstd"]
    assert meta["codecs"][1]["configuration"] == {"level": 6, "checksum": False}
    assert meta["dimension_names"] == ["z", "y", "x"]
    crop = dataset.crops[0]
    class_attrs = zarr.open_group(str(crop.path / crop.classes[0]), mode="r").attrs.asdict()
    assert class_attrs["ome"]["version"] == "0.5"
    assert class_attrs["cellmap"]["annotation"]["class_name"] == crop.classes[0]
    # Same seed: the same voxels as the v2 containers.
    np.testing.assert_array_equal(_read(dataset.raw_path / "s0"), _read(tiny.datasets[1].raw_path / "s0"))
    np.testing.assert_array_equal(
        _read(crop.path / crop.classes[0] / "s0"), _read(tiny.datasets[1].crops[0].path / crop.classes[0] / "s0")
    )


def test_sharded_v3_opens(tmp_path, tiny):
    data = make_synthetic_data(tmp_path, size="tiny", zarr_format=3, sharded=True, n_datasets=1)
    raw = zarr.open_array(str(data.datasets[0].raw_path / "s0"), mode="r")
    assert raw.shards == (64, 64, 64) and raw.chunks == (32, 32, 32)
    np.testing.assert_array_equal(raw[...], _read(tiny.datasets[0].raw_path / "s0"))
    crop = data.crops[0]
    labels = zarr.open_array(str(crop.path / "mito" / "s0"), mode="r")
    assert labels.shards == (64, 64, 64)
    np.testing.assert_array_equal(labels[...], _read(tiny.datasets[0].crops[0].path / "mito" / "s0"))


def test_chunks_per_shard_sets_the_shard_shape(tmp_path, tiny):
    data = make_synthetic_data(tmp_path, size="tiny", zarr_format=3, sharded=True, chunks_per_shard=3, n_datasets=1)
    raw = zarr.open_array(str(data.datasets[0].raw_path / "s0"), mode="r")
    assert raw.shards == (96, 96, 96) and raw.chunks == (32, 32, 32)
    np.testing.assert_array_equal(raw[...], _read(tiny.datasets[0].raw_path / "s0"))


def test_more_datasets_cycle_patterns_and_explicit_shape(tmp_path):
    data = make_synthetic_data(tmp_path, size=(32, 40, 48), n_datasets=3)
    assert [d.raw_voxel_size for d in data.datasets] == [(4.0, 4.0, 4.0), (5.24, 4.0, 4.0), (4.0, 4.0, 4.0)]
    assert all(d.raw_shape == (32, 40, 48) for d in data.datasets)
    assert [len(d.crops) for d in data.datasets] == [3, 2, 3]
    assert len({crop.name for crop in data.crops}) == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": "huge"},
        {"size": (8, 64, 64)},
        {"zarr_format": 4},
        {"sharded": True},
        {"zarr_format": 3, "sharded": True, "chunks_per_shard": 0},
        {"zarr_format": 3, "sharded": True, "chunks_per_shard": 2.5},
        {"compressor": "lz4"},
        {"n_datasets": 0},
        {"seed": -1},
        {"dimension_separator": "-"},
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_data(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- command line


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellmap_data", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_synth(tmp_path):
    result = _run_cli("synth", str(tmp_path / "out"), "--size", "tiny")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "datasplit.csv").is_file()
    assert "datasplit" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("synth", "OUT", "--size", "huge"),
        ("synth", "OUT", "--zarr-format", "5"),
        ("synth", "OUT", "--sharded"),  # sharding needs --zarr-format 3
        ("synth",),
        ("no-such-command",),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args):
    args = tuple(str(tmp_path / "out") if a == "OUT" else a for a in args)
    result = _run_cli(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
