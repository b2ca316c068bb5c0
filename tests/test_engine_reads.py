"""Engine reads of axis-aligned patches match zarr-python + numpy slicing exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from cellmap_data import _engine
from conftest import reference_patch, write_ome_image

VOXEL = (4.0, 4.0, 4.0)
ORIGIN = (2.0, 6.0, 10.0)  # world centre of voxel 0


def make_array(dtype, shape=(40, 50, 60), seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.normal(100, 30, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def centre_of(start, shape):
    return [o + (s + (n - 1) / 2) * v for o, s, n, v in zip(ORIGIN, start, shape, VOXEL)]


WINDOWS = [
    ((0, 0, 0), (16, 16, 16)),        # one chunk
    ((5, 7, 9), (20, 20, 20)),        # crosses chunk borders
    ((30, 40, 50), (16, 16, 16)),     # runs past the far edge
    ((-6, -3, 10), (12, 12, 12)),     # starts before the array
    ((10, 10, 10), (1, 24, 24)),      # a 2D slice
    ((-50, 0, 0), (8, 8, 8)),         # entirely outside
]


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_padded_read_matches_numpy_slicing(tmp_path, zarr_format, dtype):
    data = make_array(dtype)
    path = write_ome_image(tmp_path / "img", [data], [VOXEL], [ORIGIN], zarr_format=zarr_format)
    # The file really holds what zarr-python reads back.
    np.testing.assert_array_equal(zarr.open_array(str(path / "s0"), mode="r")[...], data)
    volume = _engine.Volume(str(path))
    for start, shape in WINDOWS:
        got = torch.from_dlpack(volume.read(centre_of(start, shape), list(shape), list(VOXEL))).numpy()
        np.testing.assert_array_equal(got, reference_patch(data, start, shape), err_msg=f"window {start} {shape}")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_unpadded_read_is_moved_inside(tmp_path, zarr_format):
    data = make_array(np.uint8)
    path = write_ome_image(tmp_path / "img", [data], [VOXEL], [ORIGIN], zarr_format=zarr_format)
    volume = _engine.Volume(str(path))
    shape = (16, 16, 16)
    got = torch.from_dlpack(volume.read(centre_of((30, -4, 50), shape), list(shape), list(VOXEL), pad=False)).numpy()
    np.testing.assert_array_equal(got, data[24:40, 0:16, 44:60].astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_sharded_reads_match_numpy_slicing(tmp_path, dtype):
    # Shards of 2x2x2 inner chunks that do not divide the array: edge shards are partly empty.
    data = make_array(dtype)
    path = write_ome_image(tmp_path / "img", [data], [VOXEL], [ORIGIN], zarr_format=3, chunks=(8, 8, 8), shards=(16, 16, 16))
    array = zarr.open_array(str(path / "s0"), mode="r")
    assert array.shards == (16, 16, 16) and array.chunks == (8, 8, 8)
    np.testing.assert_array_equal(array[...], data)
    volume = _engine.Volume(str(path))
    for start, shape in WINDOWS:
        got = torch.from_dlpack(volume.read(centre_of(start, shape), list(shape), list(VOXEL))).numpy()
        np.testing.assert_array_equal(got, reference_patch(data, start, shape), err_msg=f"window {start} {shape}")


def test_a_shard_larger_than_a_whole_chunk_read_is_read_by_inner_chunk(tmp_path):
    # One 512³ shard (128 MiB of uint8) over a 40x50x60 array: read whole, the shard would be
    # refused (at most 64 MiB for an array this small); its 16³ inner chunks are read instead.
    data = make_array(np.uint8)
    path = write_ome_image(tmp_path / "img", [data], [VOXEL], [ORIGIN], zarr_format=3, chunks=(16, 16, 16), shards=(512, 512, 512))
    assert zarr.open_array(str(path / "s0"), mode="r").shards == (512, 512, 512)
    volume = _engine.Volume(str(path))
    for start, shape in WINDOWS[:3]:
        got = torch.from_dlpack(volume.read(centre_of(start, shape), list(shape), list(VOXEL))).numpy()
        np.testing.assert_array_equal(got, reference_patch(data, start, shape), err_msg=f"window {start} {shape}")


def test_empty_inner_chunks_and_absent_shards_read_as_fill_value(tmp_path):
    group = zarr.open_group(str(tmp_path / "img"), mode="w", zarr_format=3)
    array = group.create_array("s0", shape=(32, 32, 48), chunks=(8, 8, 8), shards=(16, 16, 16), dtype="uint16", fill_value=7)
    array[2:12, 3:9, 20:30] = 1  # part of one shard: its other inner chunks are stored empty
    array[20:22, 20:22, 40:42] = 9
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": a, "type": "space"} for a in "zyx"], "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    assert not (tmp_path / "img" / "s0" / "c" / "1" / "0" / "0").exists()  # an absent shard
    volume = _engine.Volume(str(tmp_path / "img"))
    got = torch.from_dlpack(volume.read([16.0, 16.0, 24.0], [32, 32, 48], [1.0, 1.0, 1.0])).numpy()
    np.testing.assert_array_equal(got, zarr.open_array(str(tmp_path / "img" / "s0"))[...].astype(np.float32))


def test_missing_chunks_read_as_fill_value(tmp_path):
    group = zarr.open_group(str(tmp_path / "img"), mode="w", zarr_format=2)
    array = group.create_array("s0", shape=(32, 32, 32), chunks=(16, 16, 16), dtype="uint8", fill_value=7)
    array[:16, :16, :16] = 1  # only one chunk written
    group.attrs["multiscales"] = [{"version": "0.4", "axes": ["z", "y", "x"], "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    volume = _engine.Volume(str(tmp_path / "img"))
    # No translation: voxel 0 spans [0, 1] in the default (corner) frame, so 32 voxels centre on 16.
    got = torch.from_dlpack(volume.read([16.0, 16.0, 16.0], [32, 32, 32], [1.0, 1.0, 1.0])).numpy()
    np.testing.assert_array_equal(got, zarr.open_array(str(tmp_path / "img" / "s0"))[...].astype(np.float32))


def test_levels_and_level_choice(tmp_path):
    s0 = make_array(np.uint8, (32, 32, 32))
    s1 = s0[::2, ::2, ::2].copy()
    path = write_ome_image(tmp_path / "img", [s0, s1], [(4, 4, 4), (8, 8, 8)], [(0, 0, 0), (2, 2, 2)])
    volume = _engine.Volume(str(path))
    assert [lv["voxel_size"] for lv in volume.levels] == [[4, 4, 4], [8, 8, 8]]
    # Written as the corner of voxel 0 (centre − half a voxel); the box starts there.
    assert volume.levels[1]["translation"] == [-2, -2, -2]
    assert volume.levels[1]["voxel0_centre"] == [2, 2, 2]
    assert volume.levels[0]["world_box"] == ([-2, -2, -2], [126, 126, 126])
    assert volume.pick_level([4, 4, 4]) == 0
    assert volume.pick_level([8, 8, 8]) == 1
    assert volume.pick_level([6, 6, 6]) == 0  # equidistant: finer wins
    assert volume.pick_level([7, 7, 7]) == 1
    assert volume.pick_level([100, 100, 100]) == 1


def test_anisotropic_level_choice_uses_relative_distance(tmp_path):
    s0 = make_array(np.uint8, (16, 16, 16))
    path = write_ome_image(tmp_path / "img", [s0, s0], [(5.24, 4, 4), (10.48, 8, 8)], [(0, 0, 0), (0, 0, 0)])
    volume = _engine.Volume(str(path))
    assert volume.pick_level([8, 8, 8]) == 1
    assert volume.pick_level([4, 4, 4]) == 0


def test_cache_counts_hits_and_misses(tmp_path):
    data = make_array(np.uint8)
    path = write_ome_image(tmp_path / "img", [data], [VOXEL], [ORIGIN])
    _engine.clear_cache()
    volume = _engine.Volume(str(path))
    shape = [16, 16, 16]
    volume.read(centre_of((0, 0, 0), shape), shape, list(VOXEL))
    first = _engine.cache_stats()
    volume.read(centre_of((0, 0, 0), shape), shape, list(VOXEL))
    second = _engine.cache_stats()
    assert first["misses"] == 1 and first["hits"] == 0
    assert second["misses"] == 1 and second["hits"] == 1
    assert second["bytes"] >= 16 ** 3


def test_a_level_the_image_lacks_is_refused_naming_it(tmp_path):
    from cellmap_data.exceptions import ConfigError

    path = write_ome_image(tmp_path / "img", [make_array(np.uint8)], [VOXEL], [ORIGIN])
    volume = _engine.Volume(str(path))
    with pytest.raises(ConfigError, match=r"level 3 does not exist \(1 levels\)"):
        volume.read(centre_of((0, 0, 0), (4, 4, 4)), [4, 4, 4], list(VOXEL), level=3)
