"""The spatial sampling engine against independent references: scipy.ndimage.affine_transform
for resampled reads (order=1 raw, order=0 labels), numpy flips/transposes for the fast path."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from cellmap_data import _engine
from conftest import rotation, write_ome_image

AXES = "zyx"


def orientation(mirror=(False,) * 3, permutation=(0, 1, 2), angles=(0.0,) * 3):
    m = np.diag([-1.0 if f else 1.0 for f in mirror])
    p = np.zeros((3, 3))
    for k in range(3):
        p[permutation[k], k] = 1
    return rotation(angles) @ p @ m


def scipy_reference(data, src_voxel, origin, shape, out_voxel, centre, orient, order):
    matrix = np.diag(1 / np.asarray(src_voxel)) @ orient @ np.diag(out_voxel)
    half = (np.asarray(shape) - 1) / 2
    offset = (np.asarray(centre) - origin) / np.asarray(src_voxel) - matrix @ half
    return ndimage.affine_transform(data.astype(np.float64), matrix, offset=offset, output_shape=shape,
                                    order=order, mode="nearest", prefilter=False)


@pytest.fixture(scope="module")
def smooth_volume(tmp_path_factory):
    """A smooth random field (so interpolation differences stay small) and a label volume."""
    rng = np.random.default_rng(0)
    raw = ndimage.gaussian_filter(rng.normal(size=(48, 56, 64)), 2) * 400 + 128
    raw = np.clip(raw, 0, 255).astype(np.float32)
    labels = (raw > 130).astype(np.uint8) * 3  # instance-like ids, foreground = non-zero
    root = tmp_path_factory.mktemp("vol")
    voxel, origin = (5.24, 4.0, 4.0), (100.0, 50.0, 20.0)
    raw_path = write_ome_image(root / "raw", [raw], [voxel], [origin], chunks=(16, 16, 16))
    label_path = write_ome_image(root / "labels", [labels], [voxel], [origin], chunks=(16, 16, 16))
    raw_u8 = np.round(raw).astype(np.uint8)
    u8_path = write_ome_image(root / "raw_u8", [raw_u8], [voxel], [origin], chunks=(16, 16, 16))
    return {"raw": raw, "labels": labels, "voxel": voxel, "origin": np.asarray(origin), "raw_u8": raw_u8,
            "raw_vol": _engine.Volume(str(raw_path)), "label_vol": _engine.Volume(str(label_path)),
            "u8_vol": _engine.Volume(str(u8_path))}


def world_centre(v, index_centre):
    return list(v["origin"] + np.asarray(index_centre) * np.asarray(v["voxel"]))


def read(vol, centre, shape, voxel, **kw):
    return torch.from_dlpack(vol.read(centre, list(shape), list(voxel), **kw)).numpy()


@pytest.mark.parametrize("angles", [(30.0, 0.0, 0.0), (0.0, 12.0, 0.0), (-70.0, 10.0, 25.0)])
def test_rotated_linear_read_matches_scipy(smooth_volume, angles):
    v = smooth_volume
    shape, out_voxel = (12, 14, 16), (4.0, 4.0, 4.0)
    centre = world_centre(v, (24, 28, 32))
    got = read(v["raw_vol"], centre, shape, out_voxel, interpolation="linear", rotation_deg=list(angles))
    expected = scipy_reference(v["raw"], v["voxel"], v["origin"], shape, out_voxel, centre, orientation(angles=angles), 1)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("angles", [(30.0, 0.0, 0.0), (-70.0, 10.0, 25.0)])
def test_rotated_linear_read_of_integer_data_matches_scipy(smooth_volume, angles):
    """Integer data read from inside the array takes the branch-free trilinear kernel."""
    v = smooth_volume
    shape, out_voxel = (12, 14, 16), (4.0, 4.0, 4.0)
    centre = world_centre(v, (24, 28, 32))
    got = read(v["u8_vol"], centre, shape, out_voxel, interpolation="linear", rotation_deg=list(angles))
    expected = scipy_reference(v["raw_u8"], v["voxel"], v["origin"], shape, out_voxel, centre, orientation(angles=angles), 1)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-5)


def test_rescaled_read_matches_scipy(smooth_volume):
    v = smooth_volume
    shape, out_voxel = (10, 10, 10), (8.0, 6.0, 7.0)
    centre = world_centre(v, (23.3, 27.1, 31.7))
    got = read(v["raw_vol"], centre, shape, out_voxel, interpolation="linear")
    expected = scipy_reference(v["raw"], v["voxel"], v["origin"], shape, out_voxel, centre, np.eye(3), 1)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-5)


def test_rotated_nearest_labels_match_scipy(smooth_volume):
    v = smooth_volume
    shape, out_voxel, angles = (10, 12, 12), (5.24, 4.0, 4.0), (33.0, 7.0, -11.0)
    centre = world_centre(v, (24.2, 28.3, 32.1))
    got = read(v["label_vol"], centre, shape, out_voxel, interpolation="nearest", foreground=True, rotation_deg=list(angles))
    expected = scipy_reference(v["labels"], v["voxel"], v["origin"], shape, out_voxel, centre, orientation(angles=angles), 0)
    assert set(np.unique(got)) <= {0.0, 1.0}
    # Nearest sampling may differ only where a sample point sits on a voxel boundary.
    assert np.mean(got != (expected > 0)) < 0.01


@pytest.mark.parametrize("mirror", [(True, False, False), (False, True, True), (True, True, True)])
@pytest.mark.parametrize("permutation", [(0, 1, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0)])
def test_mirror_and_transpose_are_exact_numpy_flips(tmp_path, smooth_volume, mirror, permutation):
    # An isotropic copy, so that any axis permutation stays at the level's resolution.
    raw = smooth_volume["raw"]
    volume = _engine.Volume(str(write_ome_image(tmp_path / "iso", [raw], [(4, 4, 4)], [(0, 0, 0)])))
    n = 12
    start = np.array([10, 13, 17])
    centre = list((start + (n - 1) / 2) * 4.0)
    got = read(volume, centre, (n, n, n), (4, 4, 4), interpolation="linear",
               mirror=list(mirror), permutation=list(permutation))
    block = raw[start[0]:start[0] + n, start[1]:start[1] + n, start[2]:start[2] + n]
    # output axis k walks world axis permutation[k]; mirroring is in the output frame.
    expected = np.transpose(block, permutation)
    for k in range(3):
        if mirror[k]:
            expected = np.flip(expected, axis=k)
    np.testing.assert_array_equal(got, expected)


def test_rotation_about_z_keeps_z_planes(smooth_volume):
    """Rotating about z turns the y-x plane: every output z-plane comes from one source plane."""
    v = smooth_volume
    start = np.array([10, 10, 10])
    n = 16
    centre = world_centre(v, start + (n - 1) / 2)
    got = read(v["raw_vol"], centre, (n, n, n), v["voxel"], interpolation="linear", rotation_deg=[90.0, 0.0, 0.0])
    block = v["raw"][10:26, 10:26, 10:26]
    np.testing.assert_allclose(got, np.rot90(block, k=-1, axes=(1, 2)), atol=1e-3)


def test_out_of_volume_voxels_get_the_pad_value(smooth_volume):
    v = smooth_volume
    centre = world_centre(v, (0, 28, 32))  # half the patch lies before z = 0
    got = read(v["raw_vol"], centre, (8, 8, 8), (4.0, 4.0, 4.0), interpolation="linear", rotation_deg=[20.0, 0, 0])
    assert np.isnan(got[0]).all()
    assert np.isfinite(got[-1]).all()
    padded = read(v["raw_vol"], centre, (8, 8, 8), (4.0, 4.0, 4.0), interpolation="linear",
                  rotation_deg=[20.0, 0, 0], pad_value=-1.0)
    assert (padded[0] == -1).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(2, 9), st.integers(2, 9)),
    idx_centre=st.tuples(st.floats(12, 36), st.floats(14, 42), st.floats(14, 50)),
    angles=st.tuples(st.floats(-180, 180), st.floats(-20, 20), st.floats(-20, 20)),
    out_voxel=st.tuples(st.floats(3, 9), st.floats(3, 9), st.floats(3, 9)),
)
def test_property_linear_reads_match_scipy(smooth_volume, shape, idx_centre, angles, out_voxel):
    v = smooth_volume
    centre = world_centre(v, idx_centre)
    got = read(v["raw_vol"], centre, shape, out_voxel, interpolation="linear", rotation_deg=list(angles))
    expected = scipy_reference(v["raw"], v["voxel"], v["origin"], shape, out_voxel, centre, orientation(angles=angles), 1)
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-5)


def test_several_inputs_at_different_scales_share_the_centre(tmp_path):
    """raw_4nm and raw_8nm come from their own levels and agree where they overlap."""
    from cellmap_data import CellMapDataset

    rng = np.random.default_rng(1)
    s0 = ndimage.gaussian_filter(rng.normal(size=(64, 64, 64)), 3).astype(np.float32) * 1000
    s1 = s0.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    root = tmp_path / "d.zarr"
    raw = write_ome_image(root / "raw", [s0, s1], [(4, 4, 4), (8, 8, 8)], [(2, 2, 2), (4, 4, 4)])
    labels = write_ome_image(root / "crop" / "a", [np.ones((64, 64, 64), np.uint8)], [(4, 4, 4)], [(2, 2, 2)])
    ds = CellMapDataset(str(raw), str(labels.parent / "[a]"), ["a"],
                        {"raw_4nm": {"shape": (16, 16, 16), "scale": (4, 4, 4)}, "raw_8nm": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
                        {"gt": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, pad=True)
    assert ds.engine.input_levels == [0, 1]
    idx = len(ds) // 2
    item = ds[idx]
    assert item["raw_4nm"].shape == (1, 16, 16, 16) and item["raw_8nm"].shape == (1, 8, 8, 8)
    centre = ds.get_center(idx)
    start0 = [round((centre[a] - 2) / 4 - 7.5) for a in "zyx"]
    start1 = [round((centre[a] - 4) / 8 - 3.5) for a in "zyx"]
    np.testing.assert_array_equal(item["raw_4nm"][0].numpy(), s0[tuple(slice(s, s + 16) for s in start0)])
    np.testing.assert_allclose(item["raw_8nm"][0].numpy(), s1[tuple(slice(s, s + 8) for s in start1)], rtol=1e-6)


def test_2d_patches_rotate_in_plane_and_transpose_listed_axes(tmp_path):
    from cellmap_data import CellMapDataset

    data = (np.arange(24 * 40 * 40) % 251).astype(np.uint8).reshape(24, 40, 40)
    root = tmp_path / "d.zarr"
    raw = write_ome_image(root / "raw", [data], [(4, 4, 4)], [(0, 0, 0)])
    labels = write_ome_image(root / "crop" / "a", [np.ones_like(data)], [(4, 4, 4)], [(0, 0, 0)])
    aug = {"rotate": {"axes": {"z": [-180, 180], "x": [-30, 30]}}, "transpose": {"axes": ["z", "y", "x"]}}
    ds = CellMapDataset(str(raw), str(labels.parent / "[a]"), ["a"], {"raw": {"shape": (1, 16, 16), "scale": (4, 4, 4)}},
                        {"gt": {"shape": (1, 16, 16), "scale": (4, 4, 4)}}, pad=True, spatial_transforms=aug, seed=3)
    import pyarrow as pa

    record = pa.record_batch(ds.read_batch_raw(list(range(0, len(ds), max(1, len(ds) // 20)))).record_batch())
    assert all(v == 0 for v in record.column("rotate_x").to_pylist())        # out-of-plane rotation dropped
    assert any(v != 0 for v in record.column("rotate_z").to_pylist())        # in-plane rotation drawn
    assert all(v == 0 for v in record.column("transpose_z").to_pylist())     # singleton axis stays put
    item = ds[0]
    assert item["raw"].shape == (1, 16, 16)
    # Every voxel of an in-plane rotated slice comes from the slice's own z plane.
    plane = round(ds.get_center(0)["z"] / 4 - 0.0)
    values = item["raw"][torch.isfinite(item["raw"])].numpy()
    assert np.all((values >= data[plane].min()) & (values <= data[plane].max()))


def zoom_shear(zoom=(1.0, 1.0, 1.0), shear=(0.0,) * 6):
    """diag(zoom) · (I + shear terms zy, zx, yz, yx, xz, xy)."""
    s = np.eye(3)
    for value, (row, column) in zip(shear, [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]):
        s[row, column] = value
    return np.diag(zoom) @ s


@pytest.mark.parametrize("zoom, shear, angles", [
    ((1.25, 1.25, 1.25), (0.0,) * 6, (0.0, 0.0, 0.0)),
    ((0.8, 1.1, 1.3), (0.1, -0.05, 0.0, 0.2, -0.15, 0.08), (0.0, 0.0, 0.0)),
    ((1.1, 0.9, 1.0), (0.0, 0.1, -0.1, 0.0, 0.05, 0.0), (25.0, -10.0, 5.0)),
])
def test_zoomed_and_sheared_linear_read_matches_scipy(smooth_volume, zoom, shear, angles):
    v = smooth_volume
    shape, out_voxel = (10, 12, 14), (4.0, 4.0, 4.0)
    centre = world_centre(v, (24, 28, 32))
    got = read(v["raw_vol"], centre, shape, out_voxel, interpolation="linear", rotation_deg=list(angles),
               zoom=list(zoom), shear=list(shear))
    orient = rotation(angles) @ zoom_shear(zoom, shear)
    expected = scipy_reference(v["raw"], v["voxel"], v["origin"], shape, out_voxel, centre, orient, 1)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-5)


def test_dataset_draws_zoom_and_shear_records_them_and_reads_what_they_say(tmp_path, smooth_volume):
    """Samples of a dataset configured with scale and shear: the recorded draws are in range and
    the patch is the scipy resample of the raw under the recorded transform."""
    from cellmap_data import CellMapDataLoader, CellMapDataset

    v = smooth_volume
    root = tmp_path / "d.zarr"
    write_ome_image(root / "raw", [v["raw"]], [v["voxel"]], [list(v["origin"])], chunks=(16, 16, 16))
    write_ome_image(root / "crop" / "mito", [v["labels"]], [v["voxel"]], [list(v["origin"])], chunks=(16, 16, 16))
    arrays = {"raw": {"shape": (8, 10, 12), "scale": (4.0, 4.0, 4.0)}}
    ds = CellMapDataset(str(root / "raw"), f"{root / 'crop'}/[mito]", ["mito"], arrays,
                        {"gt": {"shape": (8, 10, 12), "scale": (4.0, 4.0, 4.0)}}, pad=True, seed=3,
                        spatial_transforms={"scale": {"range": [0.8, 1.25], "per_axis": True}, "shear": 0.15,
                                            "rotate": {"z": [-20, 20]}})
    loader = CellMapDataLoader(ds, batch_size=4, iterations_per_epoch=2, return_metadata=True, seed=3)
    checked = 0
    for batch in loader:
        for row, patch in zip(batch["__metadata__"], batch["raw"]):
            zoom = [row[f"scale_{a}"] for a in AXES]
            shear = [row[f"shear_{p}"] for p in ("zy", "zx", "yz", "yx", "xz", "xy")]
            assert all(0.8 <= z <= 1.25 for z in zoom) and all(abs(h) <= 0.15 for h in shear)
            assert len(set(zoom)) == 3 and any(h != 0.0 for h in shear)
            flips = orientation(mirror=[row[f"mirror_{a}"] for a in AXES],
                                permutation=[row[f"transpose_{a}"] for a in AXES])  # transpose · mirror
            orient = rotation([row[f"rotate_{a}"] for a in AXES]) @ zoom_shear(zoom, shear) @ flips
            centre = [row[f"centre_{a}"] for a in AXES]
            expected = scipy_reference(v["raw"], v["voxel"], v["origin"], (8, 10, 12), (4.0, 4.0, 4.0), centre, orient, 1)
            inside = np.isfinite(patch[0].numpy())
            np.testing.assert_allclose(patch[0].numpy()[inside], expected[inside], atol=1e-3, rtol=1e-5)
            checked += 1
    assert checked == 8


def test_a_zoomed_and_sheared_sample_is_re_read_from_its_recorded_transform(tmp_path, smooth_volume):
    """``current_spatial_transforms`` (with scale and shear) given to CellMapImage reads the
    same patch the loader delivered."""
    from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapImage

    v = smooth_volume
    root = tmp_path / "d.zarr"
    write_ome_image(root / "raw", [v["raw"]], [v["voxel"]], [list(v["origin"])], chunks=(16, 16, 16))
    write_ome_image(root / "crop" / "mito", [v["labels"]], [v["voxel"]], [list(v["origin"])], chunks=(16, 16, 16))
    shape = (8, 10, 12)
    ds = CellMapDataset(str(root / "raw"), f"{root / 'crop'}/[mito]", ["mito"],
                        {"raw": {"shape": shape, "scale": (4.0, 4.0, 4.0)}},
                        {"gt": {"shape": shape, "scale": (4.0, 4.0, 4.0)}}, pad=True, seed=5,
                        spatial_transforms={"scale": [0.85, 1.2], "shear": 0.1, "mirror": {"x": 0.5}})
    batch = next(iter(CellMapDataLoader(ds, batch_size=3, iterations_per_epoch=1, return_metadata=True, seed=5)))
    image = CellMapImage(str(root / "raw"), "raw", (4.0, 4.0, 4.0), shape, pad=True, interpolation="linear")
    for row, patch in zip(batch["__metadata__"], batch["raw"]):
        drawn = row["current_spatial_transforms"]
        assert set(drawn["scale"]) == {"z", "y", "x"} and drawn["shear"]
        image.set_spatial_transforms(drawn)
        again = image[row["current_center"]]
        np.testing.assert_allclose(again.numpy().reshape(shape), patch[0].numpy(), atol=1e-4, equal_nan=True)
