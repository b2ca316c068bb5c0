"""Behaviours of the reference library (cellmap-data 2026.3) that scripts rely on: the coordinate
frame (OME-NGFF translation = corner of voxel 0) for images and writers, the reference's concrete
spatial-transform forms, mirror probabilities written as booleans, input/target sources and
get_indices, EmptyImage with 2D specs, reads entirely outside an image, large loader seeds,
MultiDataset ``idx``, an empty CellMapDataSplit, class weights, the iterations_per_epoch warning
and target paths without a separator before the class list.

Every expectation is computed independently: by hand, with numpy slicing of the arrays written
here, or from the zarr metadata read with zarr-python."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import cellmap_data
from cellmap_data import (
    CellMapDataLoader,
    CellMapDataset,
    CellMapDatasetWriter,
    CellMapDataSplit,
    CellMapImage,
    CellMapMultiDataset,
    EmptyImage,
)
from conftest import reference_patch, write_ome_image

AXES = "zyx"


# -- helpers and fixtures ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def corner_frame():
    """Every test starts in the default "corner" frame; the process-wide setting is put back
    whatever the test does."""
    before = cellmap_data.get_coordinate_frame()
    cellmap_data.set_coordinate_frame("corner")
    try:
        yield
    finally:
        cellmap_data.set_coordinate_frame(before)


def write_image(path: Path, data: np.ndarray, voxel, translation) -> Path:
    """An OME-NGFF image whose metadata translation is exactly ``translation``."""
    centre = [t + v / 2 for t, v in zip(translation, voxel)]  # write_ome_image takes voxel-0 centres
    path = write_ome_image(path, [data], [voxel], [centre])
    written = zarr.open_group(str(path), mode="r").attrs["multiscales"][0]["datasets"][0]
    assert written["coordinateTransformations"][1]["translation"] == pytest.approx(list(translation))
    return path


@pytest.fixture(scope="module")
def grid_image(tmp_path_factory):
    """(path, data) of a 20×24×28 float image at 8 nm with translation 0 on every axis."""
    data = np.random.default_rng(1).integers(1, 250, (20, 24, 28)).astype(np.float32)
    path = write_image(tmp_path_factory.mktemp("grid") / "img.zarr" / "raw", data, (8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
    return str(path), data


@pytest.fixture(scope="module")
def shifted_image(tmp_path_factory):
    """(path, data, voxel, translation) of an image with an uneven translation."""
    data = np.random.default_rng(2).integers(1, 250, (18, 22, 26)).astype(np.float32)
    voxel, translation = (8.0, 8.0, 8.0), (-24.0, 40.0, 3.5)
    path = write_image(tmp_path_factory.mktemp("shifted") / "img.zarr" / "raw", data, voxel, translation)
    return str(path), data, voxel, translation


def crop_bounds_from_metadata(class_path: Path) -> tuple[dict, list[float], list[float], tuple[int, ...]]:
    """CSC's writer bounds of a ground-truth class: translation .. translation + voxel * shape,
    read from its OME-NGFF metadata with zarr-python."""
    group = zarr.open_group(str(class_path), mode="r")
    transforms = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    scale = [float(v) for v in transforms[0]["scale"]]
    translation = [float(v) for v in transforms[1]["translation"]]
    shape = group["s0"].shape
    bounds = {a: [translation[k], translation[k] + scale[k] * shape[k]] for k, a in enumerate(AXES)}
    return bounds, scale, translation, shape


def written_metadata(path: Path) -> tuple[list[float], list[float], tuple[int, ...]]:
    """(scale, translation, s0 shape) of a written output image, read with zarr-python."""
    group = zarr.open_group(str(path), mode="r")
    transforms = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    return transforms[0]["scale"], transforms[1]["translation"], group["s0"].shape


# -- 1. coordinate frame -----------------------------------------------------------------------


def test_bounding_box_spans_translation_to_translation_plus_extent(grid_image):
    path, data = grid_image
    img = CellMapImage(path, "raw", (8, 8, 8), (4, 4, 4))
    assert cellmap_data.get_coordinate_frame() == "corner"
    assert img.bounding_box == {"z": (0.0, 160.0), "y": (0.0, 192.0), "x": (0.0, 224.0)}
    # the patch is 32 nm wide: the box of centres shrinks by 16 nm on each side
    assert img.sampling_box == {"z": (16.0, 144.0), "y": (16.0, 176.0), "x": (16.0, 208.0)}


def test_centre_frame_shifts_boxes_of_newly_opened_images_by_half_a_voxel(grid_image):
    path, _ = grid_image
    before = CellMapImage(path, "raw", (8, 8, 8), (4, 4, 4))
    cellmap_data.set_coordinate_frame("centre")
    assert cellmap_data.get_coordinate_frame() == "centre"
    img = CellMapImage(path, "raw", (8, 8, 8), (4, 4, 4))
    assert img.bounding_box == {"z": (-4.0, 156.0), "y": (-4.0, 188.0), "x": (-4.0, 220.0)}
    assert img.sampling_box == {"z": (12.0, 140.0), "y": (12.0, 172.0), "x": (12.0, 204.0)}
    assert before.bounding_box["z"] == (0.0, 160.0), "an image opened earlier keeps its frame"


def test_default_coordinate_frame_is_corner():
    """In a fresh process, without CELLMAP_COORDINATE_FRAME, the frame is "corner"."""
    env = {k: v for k, v in os.environ.items() if k != "CELLMAP_COORDINATE_FRAME"}
    code = "import cellmap_data; print(cellmap_data.get_coordinate_frame())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "corner"


def test_unknown_coordinate_frame_is_rejected():
    with pytest.raises(ValueError, match="corner"):
        cellmap_data.set_coordinate_frame("edge")
    assert cellmap_data.get_coordinate_frame() == "corner"


@pytest.mark.parametrize("start, shape", [((0, 0, 0), (4, 4, 4)), ((3, 7, 11), (5, 4, 6)), ((13, 17, 19), (5, 5, 7))])
def test_read_at_centre_of_voxels_equals_numpy_slice(shifted_image, start, shape):
    path, data, voxel, t = shifted_image
    img = CellMapImage(path, "raw", voxel, shape)
    centre = {a: t[k] + (start[k] + shape[k] / 2) * voxel[k] for k, a in enumerate(AXES)}
    expected = data[tuple(slice(s, s + n) for s, n in zip(start, shape))]
    np.testing.assert_array_equal(img[centre].numpy(), expected)


def test_read_in_centre_frame_puts_voxel_centres_at_translation_plus_index(shifted_image):
    path, data, voxel, t = shifted_image
    cellmap_data.set_coordinate_frame("centre")
    start, shape = (4, 6, 8), (5, 4, 6)
    img = CellMapImage(path, "raw", voxel, shape)
    centre = {a: t[k] + (start[k] + (shape[k] - 1) / 2) * voxel[k] for k, a in enumerate(AXES)}
    expected = data[tuple(slice(s, s + n) for s, n in zip(start, shape))]
    np.testing.assert_array_equal(img[centre].numpy(), expected)


@pytest.fixture(scope="module")
def writer_raw(tmp_path_factory):
    """(path, data) of a 32³ uint8 raw at 8 nm, translation 0 (extent [0, 256] nm); no voxel is 0."""
    data = np.random.default_rng(3).integers(1, 255, (32, 32, 32)).astype(np.uint8)
    path = write_image(tmp_path_factory.mktemp("wraw") / "raw.zarr" / "raw", data, (8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
    return str(path), data


def test_writer_accepts_bounds_equal_to_the_raw_extent(tmp_path, writer_raw):
    raw, _ = writer_raw
    bounds = {a: [0.0, 256.0] for a in AXES}
    target = tmp_path / "out.zarr" / "pred"
    writer = CellMapDatasetWriter(
        raw, str(target), ["mito"],
        {"input": {"shape": (24, 24, 24), "scale": (8, 8, 8)}},
        {"output": {"shape": (16, 16, 16), "scale": (8, 8, 8)}},
        {"output": bounds},
    )
    assert writer.bounding_box == {a: (0.0, 256.0) for a in AXES}
    assert len(writer) == 2 * 2 * 2  # 32 voxels per axis in tiles of 16
    writer.close()
    scale, translation, shape = written_metadata(target / "mito")
    assert scale == [8.0, 8.0, 8.0] and translation == [0.0, 0.0, 0.0] and shape == (32, 32, 32)


def test_writer_covers_a_crop_flush_with_the_raw_far_edge_with_padded_inputs(tmp_path, writer_raw):
    raw, data = writer_raw
    tile, inp, lo = (4, 3, 5), (10, 9, 11), 192.0
    bounds = {a: [lo, 256.0] for a in AXES}  # the last 8 voxels of every axis
    target = tmp_path / "out.zarr" / "pred"
    writer = CellMapDatasetWriter(
        raw, str(target), ["a", "b"],
        {"input": {"shape": inp, "scale": (8, 8, 8)}},
        {"output": {"shape": tile, "scale": (8, 8, 8)}},
        {"output": bounds},
    )
    truth = np.random.default_rng(4).uniform(1.0, 2.0, (2, 8, 8, 8)).astype(np.float32)  # never the fill value
    reached_past_raw = False
    for batch in writer.loader(batch_size=3):
        predictions = []
        for b, i in enumerate(batch["idx"].tolist()):
            centre = writer.get_center(i)
            out_start = [round((centre[a] - n * 8 / 2 - lo) / 8) for a, n in zip(AXES, tile)]
            assert all(0 <= s and s + n <= 8 for s, n in zip(out_start, tile)), "tiles stay inside the bounds"
            predictions.append(truth[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(out_start, tile))])
            in_start = [round((centre[a] - n * 8 / 2) / 8) for a, n in zip(AXES, inp)]
            reached_past_raw |= any(s + n > 32 for s, n in zip(in_start, inp))
            # the input reaching past the raw is padded with 0
            np.testing.assert_array_equal(batch["input"][b, 0].numpy(), reference_patch(data, in_start, inp, pad_value=0))
        writer[batch["idx"]] = {"output": torch.from_numpy(np.stack(predictions))}
    writer.close()
    assert reached_past_raw
    for k, cls in enumerate(["a", "b"]):
        values = zarr.open_group(str(target / cls), mode="r")["s0"][...]
        assert values.shape == (8, 8, 8)
        assert np.count_nonzero(values == 0) == 0, "every output voxel was written"
        np.testing.assert_array_equal(values, truth[k])


@pytest.mark.parametrize("source", ["metadata", "image"])
def test_writer_metadata_reproduces_the_ground_truth_grid(tmp_path, tiny_data, source):
    ds = tiny_data.datasets[0]
    for crop in ds.crops:
        cls = crop.classes[0]
        meta_bounds, voxel, translation, shape = crop_bounds_from_metadata(crop.path / cls)
        if source == "metadata":
            bounds = meta_bounds
        else:
            img = CellMapImage(str(crop.path / cls), cls, crop.voxel_size, crop.shape)
            bounds = {a: list(img.bounding_box[a]) for a in AXES}
        target = tmp_path / source / "out.zarr" / crop.name
        writer = CellMapDatasetWriter(
            str(ds.raw_path), str(target), ["mito"],
            {"input": {"shape": (12, 12, 12), "scale": voxel}},
            {"output": {"shape": (8, 8, 8), "scale": voxel}},
            {"output": bounds},
        )
        writer.close()
        w_scale, w_translation, w_shape = written_metadata(target / "mito")
        assert w_translation == pytest.approx([bounds[a][0] for a in AXES])
        assert w_translation == pytest.approx(translation), crop.name
        assert w_translation == pytest.approx(list(crop.translation))
        assert w_scale == pytest.approx(voxel)
        assert w_shape == tuple(round((bounds[a][1] - bounds[a][0]) / voxel[k]) for k, a in enumerate(AXES)) == tuple(shape)


def test_writer_in_centre_frame_writes_lower_bound_plus_half_a_voxel(tmp_path, tiny_data):
    ds = tiny_data.datasets[0]
    crop = ds.crops[1]  # lies inside the raw in both frames
    bounds, voxel, translation, shape = crop_bounds_from_metadata(crop.path / crop.classes[0])
    cellmap_data.set_coordinate_frame("centre")
    target = tmp_path / "out.zarr" / "centre"
    writer = CellMapDatasetWriter(
        str(ds.raw_path), str(target), ["mito"],
        {"input": {"shape": (12, 12, 12), "scale": voxel}},
        {"output": {"shape": (8, 8, 8), "scale": voxel}},
        {"output": bounds},
    )
    writer.close()
    w_scale, w_translation, w_shape = written_metadata(target / "mito")
    assert w_translation == pytest.approx([t + v / 2 for t, v in zip(translation, voxel)])
    assert w_scale == pytest.approx(voxel) and w_shape == tuple(shape)


# -- 2. CellMapImage concrete spatial transforms --------------------------------------------


@pytest.fixture
def cube(shifted_image):
    """(image reading a 4³ patch, its numpy patch, its centre)."""
    path, data, voxel, t = shifted_image
    start, n = (5, 7, 9), 4
    img = CellMapImage(path, "raw", voxel, (n, n, n))
    centre = {a: t[k] + (start[k] + n / 2) * voxel[k] for k, a in enumerate(AXES)}
    patch = data[tuple(slice(s, s + n) for s in start)]
    return img, patch, centre


@pytest.mark.parametrize("mirror", [{"x": True}, {"x": True, "y": False}, [False, False, True]])
def test_mirror_in_x_flips_the_patch_along_x(cube, mirror):
    img, patch, centre = cube
    img.set_spatial_transforms({"mirror": mirror})
    expected = patch[:, :, ::-1]
    assert not np.array_equal(expected, patch)
    np.testing.assert_array_equal(img[centre].numpy(), expected)


def test_positional_transpose_permutes_axes_like_numpy(cube):
    img, patch, centre = cube
    img.set_spatial_transforms({"transpose": [0, 2, 1]})
    expected = np.transpose(patch, (0, 2, 1))
    assert not np.array_equal(expected, patch)
    np.testing.assert_array_equal(img[centre].numpy(), expected)


def test_rotation_matrix_about_z_turns_the_yx_plane(cube):
    img, patch, centre = cube
    # world offset = R · output offset, in (z, y, x): (oz, oy, ox) -> (oz, -ox, oy), so output
    # voxel (k, j, i) samples patch[k, n-1-i, j], which is np.rot90 by -90° in the (y, x) plane
    # (by hand: out[k, 0, 0] = patch[k, 3, 0]).
    img.set_spatial_transforms({"rotation_matrix": [[1, 0, 0], [0, 0, -1], [0, 1, 0]]})
    out = img[centre].numpy()
    expected = np.rot90(patch, k=-1, axes=(1, 2))
    assert out[0, 0, 0] == patch[0, 3, 0]
    np.testing.assert_array_equal(out, expected)


def test_identity_rotation_matrix_is_the_plain_read(cube):
    img, patch, centre = cube
    img.set_spatial_transforms({"rotation_matrix": np.eye(3)})
    np.testing.assert_array_equal(img[centre].numpy(), patch)


def test_non_orthonormal_rotation_matrix_raises_value_error(cube):
    img, _, centre = cube
    with pytest.raises(ValueError, match="rotation_matrix"):
        img.set_spatial_transforms({"rotation_matrix": [[1, 0, 0], [0, 2, 0], [0, 0, 1]]})
        img[centre]


def test_2x2_rotation_matrix_for_yx_axis_order(shifted_image):
    path, data, voxel, t = shifted_image
    z, start, n = 6, (7, 9), 4
    img = CellMapImage(path, "raw", (8, 8), (n, n), axis_order="yx")
    centre = {"z": t[0] + (z + 0.5) * voxel[0], "y": t[1] + (start[0] + n / 2) * voxel[1], "x": t[2] + (start[1] + n / 2) * voxel[2]}
    patch = data[z, start[0]:start[0] + n, start[1]:start[1] + n]
    img.set_spatial_transforms({"rotation_matrix": [[0, -1], [1, 0]]})
    np.testing.assert_array_equal(img[centre].numpy().reshape(n, n), np.rot90(patch, k=-1))


# -- 3. dataset mirror probabilities as booleans ---------------------------------------------

INPUT_4NM = {"input": {"shape": (8, 8, 8), "scale": (4, 4, 4)}}
TARGET_4NM = {"output": {"shape": (6, 6, 6), "scale": (4, 4, 4)}}


def crop1_dataset(tiny_data, **kwargs):
    ds = tiny_data.datasets[0]
    kwargs.setdefault("classes", ["mito", "pm", "er"])
    kwargs.setdefault("target_path", ds.crops[0].target_path)
    return CellMapDataset(
        raw_path=str(ds.raw_path), input_arrays=INPUT_4NM, target_arrays=TARGET_4NM, **kwargs,
    )


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN at the same places."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))


@pytest.mark.parametrize("flag", [True, False])
def test_mirror_probability_given_as_bool(tiny_data, flag):
    plain = crop1_dataset(tiny_data)
    augmented = crop1_dataset(tiny_data, spatial_transforms={"mirror": {"axes": {"x": flag}}})
    differs = False
    for i in (0, 17, 301, 5003, len(plain) - 1):
        p, a = plain[i], augmented[i]
        for key in ("input", "output"):
            expected = torch.flip(p[key], dims=[-1]) if flag else p[key]
            assert same(a[key], expected), (i, key)
        differs |= not torch.equal(a["input"], p["input"])
    assert differs == flag


# -- 4. input/target sources and get_indices ------------------------------------------------


def test_input_and_target_sources_are_images_per_array_and_class(tiny_data):
    ds = crop1_dataset(tiny_data)
    assert list(ds.input_sources) == ["input"]
    assert isinstance(ds.input_sources["input"], CellMapImage)
    assert list(ds.target_sources) == ["mito", "pm", "er"]
    assert isinstance(ds.target_sources["mito"], CellMapImage)
    assert isinstance(ds.target_sources["er"], CellMapImage)
    assert isinstance(ds.target_sources["pm"], EmptyImage)  # crop1 does not annotate pm


def test_input_source_read_at_sample_centre_equals_the_sample(tiny_data):
    ds = crop1_dataset(tiny_data)
    raw = zarr.open_group(str(tiny_data.datasets[0].raw_path), mode="r")["s0"][...]  # 4 nm, translation 0
    for i in (0, 5, 1234, len(ds) - 1):
        centre = ds.get_center(i)
        read = ds.input_sources["input"][centre]
        sample = ds[i]["input"][0]
        start = [round(centre[a] / 4 - 4) for a in AXES]
        np.testing.assert_array_equal(read.numpy(), raw[tuple(slice(s, s + 8) for s in start)].astype(np.float32))
        assert torch.equal(read, sample)
    empty = ds.target_sources["pm"][ds.get_center(0)]
    assert empty.shape == (6, 6, 6) and torch.isnan(empty).all()


def test_get_indices_tiles_the_sampling_grid_with_the_last_tile_flush(tiny_data):
    ds = crop1_dataset(tiny_data)
    # crop1: box z [44, 172], y [0, 144], x [160, 320] nm; 32 nm inputs -> centres z 60..156,
    # y 16..128, x 176..304 on a 4 nm grid. Steps of 40, 24 and 32 nm, the last one flush.
    assert ds.sampling_box == {"z": (60.0, 156.0), "y": (16.0, 128.0), "x": (176.0, 304.0)}
    expected = {"z": [60, 100, 140, 156], "y": [16, 40, 64, 88, 112, 128], "x": [176, 208, 240, 272, 304]}
    indices = ds.get_indices({"z": 40.0, "y": 24.0, "x": 32.0})
    assert len(indices) == len(set(indices)) == 4 * 6 * 5
    centres = [ds.get_center(i) for i in indices]
    for a in AXES:
        assert sorted({c[a] for c in centres}) == pytest.approx(expected[a])
    assert {tuple(c[a] for a in AXES) for c in centres} == {
        (z, y, x) for z in expected["z"] for y in expected["y"] for x in expected["x"]
    }


def test_validation_indices_are_get_indices_of_the_target_size(tiny_data):
    ds = crop1_dataset(tiny_data)
    assert ds.validation_indices == ds.get_indices({"z": 24.0, "y": 24.0, "x": 24.0})
    # 24 nm = 6 voxels: 25 centres in z -> 0, 6, 12, 18, 24; 29 in y -> ... 24, 28; 33 in x -> ... 30, 32
    assert len(ds.validation_indices) == 5 * 6 * 7


# -- 5. EmptyImage with a 2D spec --------------------------------------------------------------


def test_empty_image_2d_spec_reports_three_axes(tmp_path):
    img = EmptyImage(str(tmp_path / "missing"), "mito", (8, 8), (16, 16))
    assert img.scale == {"z": 8.0, "y": 8.0, "x": 8.0}
    assert img.output_shape == {"z": 1, "y": 16, "x": 16}
    out = img[{"z": 0.0, "y": 0.0, "x": 0.0}]
    assert tuple(out.shape) == (1, 16, 16) and torch.isnan(out).all()


# -- 6. reads entirely outside an image -------------------------------------------------------


@pytest.mark.parametrize("pad, pad_value, expected", [(False, np.nan, np.nan), (True, 3.0, 3.0)])
def test_read_entirely_outside_is_pad_everywhere_with_a_warning(grid_image, pad, pad_value, expected):
    path, _ = grid_image
    img = CellMapImage(path, "raw", (8, 8, 8), (4, 5, 6), pad=pad, pad_value=pad_value)
    # x extent [0, 224]; a 48 nm patch centred at 248 starts exactly at the far edge
    with pytest.warns(RuntimeWarning, match=re.escape(path)):
        out = img[{"z": 80.0, "y": 96.0, "x": 248.0}]
    assert tuple(out.shape) == (4, 5, 6)
    np.testing.assert_array_equal(out.numpy(), np.full((4, 5, 6), expected, dtype=np.float32))
    with pytest.warns(RuntimeWarning, match=re.escape(path)):
        out = img[{"z": -1000.0, "y": 96.0, "x": 100.0}]
    np.testing.assert_array_equal(out.numpy(), np.full((4, 5, 6), expected, dtype=np.float32))


# -- 7. large seeds on the validation-loader path ---------------------------------------------

ARRAYS_8NM = {"shape": (8, 8, 8), "scale": (8, 8, 8)}


@pytest.fixture(scope="module")
def seeded_split(tiny_data):
    """A split built under torch.manual_seed(2**64 - 1) (the datasets take that seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(2**64 - 1)
        return CellMapDataSplit(
            {"input": ARRAYS_8NM}, {"output": ARRAYS_8NM}, ["mito", "er"], csv_path=str(tiny_data.csv_path), pad=True,
        )


def epoch_of(loader) -> list[dict]:
    return [dict(batch) for batch in loader]


@pytest.mark.parametrize("seed", [2**62 + 12345, None], ids=["seed_argument", "torch_seed_2**64-1"])
def test_shuffled_validation_blocks_with_a_large_seed(seeded_split, seed):
    blocks = seeded_split.validation_blocks
    kwargs = {} if seed is None else {"seed": seed}
    with torch.random.fork_rng():
        torch.manual_seed(2**64 - 1)
        first = epoch_of(CellMapDataLoader(blocks, batch_size=4, is_train=True, **kwargs))
        second = epoch_of(CellMapDataLoader(blocks, batch_size=4, is_train=True, **kwargs))
    order = [i for batch in first for i in batch["idx"].tolist()]
    assert sorted(order) == sorted(blocks.indices), "one epoch visits every block once"
    assert order != sorted(order), "is_train shuffles"
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a["idx"], b["idx"])
        assert same(a["input"], b["input"]) and same(a["output"], b["output"])


# -- 8. MultiDataset idx ----------------------------------------------------------------------


def test_multidataset_idx_is_the_index_inside_the_owning_dataset(tiny_data):
    ds = tiny_data.datasets[0]
    parts = [
        CellMapDataset(str(ds.raw_path), crop.target_path, ["mito", "er"], INPUT_4NM, TARGET_4NM, pad=True)
        for crop in ds.crops[:2]
    ]
    multi = CellMapMultiDataset(parts, ["mito", "er"], INPUT_4NM, TARGET_4NM)
    n0 = len(parts[0])
    for global_index, (owner, local) in [(0, (0, 0)), (n0 - 1, (0, n0 - 1)), (n0 + 3, (1, 3)), (len(multi) - 1, (1, len(parts[1]) - 1))]:
        item = multi[global_index]
        assert int(item["idx"]) == local == multi.locate(global_index)[1]
        assert multi.locate(global_index)[0] == owner
        assert torch.equal(item["input"], parts[owner][local]["input"])


# -- 9. CellMapDataSplit without sources ------------------------------------------------------


def test_datasplit_without_arguments_is_empty():
    split = CellMapDataSplit()
    assert split.train_datasets == [] and split.validation_datasets == []


def test_datasplit_whose_csv_rows_all_fail_raises_value_error(tmp_path):
    csv = tmp_path / "bad.csv"
    missing = tmp_path / "missing.zarr"
    csv.write_text(
        f'"train","{missing}","recon-1/em/fibsem-uint8","{missing}","recon-1/labels/groundtruth/crop1/[mito]"\n'
        f'"validate","{missing}","recon-1/em/fibsem-uint8","{missing}","recon-1/labels/groundtruth/crop2/[mito]"\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            CellMapDataSplit({"input": ARRAYS_8NM}, {"output": ARRAYS_8NM}, ["mito"], csv_path=str(csv))


# -- 10. class weights ------------------------------------------------------------------------

WEIGHT_CLASSES = ["nuc", "ves", "er", "pm"]  # pm is annotated by neither crop below


def numpy_counts(crops, classes, train_voxel=4.0):
    """(foreground, total) per class at the training voxel size, counted with numpy."""
    fg = {c: 0.0 for c in classes}
    total = {c: 0.0 for c in classes}
    for crop in crops:
        factor = float(np.prod(crop.voxel_size)) / train_voxel**3
        for c in classes:
            if c in crop.classes:
                labels = zarr.open_group(str(crop.path / c), mode="r")["s0"][...]
                fg[c] += np.count_nonzero(labels) * factor
                total[c] += labels.size * factor
    return fg, total


def reference_weights(fg, total):
    return {c: max(total[c] - fg[c], 0.0) / max(fg[c], 1.0) for c in fg}


@pytest.fixture(scope="module")
def weight_datasets(tiny_data):
    ds = tiny_data.datasets[0]
    crops = [ds.crops[0], ds.crops[2]]  # 4 nm crop; 8 nm crop whose ves has no foreground
    parts = [
        CellMapDataset(str(ds.raw_path), crop.target_path, WEIGHT_CLASSES, INPUT_4NM, INPUT_4NM, pad=True)
        for crop in crops
    ]
    return crops, parts


def test_dataset_class_weights_are_background_over_foreground(weight_datasets):
    crops, parts = weight_datasets
    for crop, dataset in zip(crops, parts):
        fg, total = numpy_counts([crop], WEIGHT_CLASSES)
        counts = dataset.class_counts
        assert counts["totals"] == pytest.approx(fg) and counts["totals_total"] == pytest.approx(total)
        assert dataset.class_weights == pytest.approx(reference_weights(fg, total))
        assert dataset.class_weights["pm"] == 0.0
    # crop3's ves is annotated but empty: its whole background (24³ voxels of 8 nm = 110592 of 4 nm)
    assert parts[1].class_weights["ves"] == pytest.approx(24**3 * 8)


def test_multidataset_class_weights_sum_counts_over_crops(weight_datasets):
    crops, parts = weight_datasets
    multi = CellMapMultiDataset(parts, WEIGHT_CLASSES, INPUT_4NM, INPUT_4NM)
    fg, total = numpy_counts(crops, WEIGHT_CLASSES)
    assert multi.class_weights == pytest.approx(reference_weights(fg, total))
    counts = multi.class_counts
    assert multi.class_weights == pytest.approx(reference_weights(counts["totals"], counts["totals_total"]))
    assert multi.class_weights["pm"] == 0.0


def test_capped_class_weights_stop_at_the_cap(weight_datasets):
    from cellmap_data._stats import CLASS_WEIGHT_CAP

    _, parts = weight_datasets
    empty_crop = parts[1]
    uncapped = empty_crop.class_weights
    capped = empty_crop.get_class_weights(capped=True)
    assert uncapped["ves"] > CLASS_WEIGHT_CAP
    assert capped["ves"] == CLASS_WEIGHT_CAP
    assert capped["nuc"] == pytest.approx(min(uncapped["nuc"], CLASS_WEIGHT_CAP))
    assert capped["pm"] == 1.0  # never annotated
    full = parts[0]
    assert full.get_class_weights(capped=True)["er"] == pytest.approx(min(full.class_weights["er"], CLASS_WEIGHT_CAP))


# -- 11. iterations_per_epoch warning -------------------------------------------------------


def test_iterations_per_epoch_with_weighted_sampler_warns_once_per_process(tiny_data):
    from cellmap_data import exceptions
    from cellmap_data.exceptions import ReferenceDifferenceWarning

    ds = crop1_dataset(tiny_data, classes=["mito", "er"])
    exceptions._WARNED.discard("iterations_per_epoch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            CellMapDataLoader(ds, batch_size=8, weighted_sampler=True, iterations_per_epoch=5)
    relevant = [w for w in caught if issubclass(w.category, ReferenceDifferenceWarning)]
    assert len(relevant) == 1
    assert "iterations_per_epoch" in str(relevant[0].message)


# -- 12. target path without a separator before the bracket ----------------------------------


def test_target_path_without_separator_before_bracket_names_children_of_the_crop(tiny_data):
    crop = tiny_data.datasets[0].crops[0]
    classes = ["er", "mito", "pm"]
    glued = crop1_dataset(tiny_data, classes=classes, target_path=str(crop.path) + "[mito,er]")
    separated = crop1_dataset(tiny_data, classes=classes, target_path=str(crop.path) + "/[mito,er]")
    assert glued.annotated_classes == separated.annotated_classes == ["mito", "er"]
    assert len(glued) == len(separated)
    for i in (0, len(glued) // 2):
        a, b = glued[i], separated[i]
        assert torch.equal(a["input"], b["input"])
        assert same(a["output"], b["output"])
        assert not torch.isnan(a["output"][:2]).any(), "er and mito are read from the crop"
        assert torch.isnan(a["output"][2]).all(), "pm is not annotated"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "Scalar writes are not supported"),
        (np.float32(2.0), "Scalar writes are not supported"),
        (np.array(3.0), "Zero-dimensional NumPy arrays are not supported for writes"),
        (torch.tensor(4.0), "Zero-dimensional torch.Tensors are not supported for writes"),
    ],
    ids=["python", "numpy-scalar", "numpy-0d", "torch-0d"],
)
def test_image_writer_rejects_scalars_with_the_reference_messages(tmp_path, value, message):
    from cellmap_data import ImageWriter

    box = {"z": (0.0, 32.0), "y": (0.0, 32.0), "x": (0.0, 32.0)}
    with ImageWriter(str(tmp_path / "w.zarr" / "mito"), "mito", {"z": 4, "y": 4, "x": 4}, box, {"z": 4, "y": 4, "x": 4}) as writer:
        with pytest.raises(TypeError, match=message):
            writer[{"z": 8.0, "y": 8.0, "x": 8.0}] = value
