"""Elastic deformation: the field (an interpolating cubic spline through keyed control points),
reads through it against scipy's map_coordinates, and the dataset's draws (recorded, re-readable,
the same for raw and labels, the same at any thread count)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapImage, _engine
from cellmap_data.exceptions import ConfigError
from conftest import rotation, write_ome_image

AXES = "zyx"


def field(seed, spacing, sigma, shape, voxel):
    return torch.from_dlpack(_engine.elastic_field(seed, list(spacing), list(sigma), list(shape), list(voxel))).numpy()


def catmull_rom_weights(f):
    """Weights of the points at cells -1, 0, 1, 2 (an independent statement of the spline)."""
    return np.stack([(-f**3 + 2 * f**2 - f) / 2, (3 * f**3 - 5 * f**2 + 2) / 2,
                     (-3 * f**3 + 4 * f**2 + f) / 2, (f**3 - f**2) / 2])


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A smooth random raw field and labels thresholded from it."""
    rng = np.random.default_rng(1)
    raw = ndimage.gaussian_filter(rng.normal(size=(40, 48, 56)), 2.5) * 500 + 128
    raw = np.clip(raw, 0, 255).astype(np.float32)
    labels = (raw > 131).astype(np.uint8)
    root = tmp_path_factory.mktemp("elastic") / "d.zarr"
    voxel, origin = (4.0, 4.0, 4.0), (2.0, 2.0, 2.0)
    write_ome_image(root / "raw", [raw], [voxel], [origin], chunks=(16, 16, 16))
    write_ome_image(root / "crop" / "mito", [labels], [voxel], [origin], chunks=(16, 16, 16))
    return {"root": root, "raw": raw, "labels": labels, "voxel": np.asarray(voxel), "origin": np.asarray(origin),
            "raw_vol": _engine.Volume(str(root / "raw")), "label_vol": _engine.Volume(str(root / "crop" / "mito"))}


def source_positions(v, centre, shape, out_voxel, orient, displacement):
    """Source voxel index of every output voxel: world = centre + orient · ((o - half) · voxel + d)."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    half = (np.asarray(shape, dtype=np.float64) - 1) / 2
    offset = (grid - half[:, None, None, None]) * np.asarray(out_voxel, dtype=np.float64)[:, None, None, None]
    offset = offset + displacement
    world = np.einsum("jk,k...->j...", orient, offset) + np.asarray(centre, dtype=np.float64)[:, None, None, None]
    return (world - v["origin"][:, None, None, None]) / v["voxel"][:, None, None, None]


def test_field_passes_through_keyed_control_points_and_is_their_catmull_rom_spline():
    """Control values are read off where voxel centres fall on control points; the field
    between them equals an independent Catmull-Rom interpolation of those values, and does not
    depend on the patch's size or voxel size."""
    seed, spacing, sigma = 12, (24.0, 24.0, 24.0), (3.0, 5.0, 7.0)
    # Voxels of 8 nm, odd shape: voxel 3k from the centre sits on control point k.
    coarse = field(seed, spacing, sigma, (13, 13, 13), (8.0, 8.0, 8.0))
    controls = coarse[:, ::3, ::3, ::3]  # control points -2..2 on each axis
    # Control displacements are independent draws of the stated sigma.
    assert np.allclose(controls.reshape(3, -1).std(axis=1) / np.asarray(sigma), 1.0, atol=0.45)
    fine = field(seed, spacing, sigma, (49, 49, 49), (2.0, 2.0, 2.0))  # same centre, 2 nm voxels
    # Fine voxel i (from the centre) lies at 2i nm = control coordinate 2i / 24.
    rng = np.random.default_rng(0)
    for _ in range(40):
        o = rng.integers(12, 36, size=3)  # t in [-1, 1): cells -1 and 0, whose neighbours are -2..2
        t = (o - 24) * 2.0 / 24.0
        cell = np.floor(t).astype(int)
        w = [catmull_rom_weights(t[k] - cell[k]) for k in range(3)]
        idx = [cell[k] - 1 + np.arange(4) + 2 for k in range(3)]  # +2: index of control -2 is 0
        block = controls[:, idx[0]][:, :, idx[1]][:, :, :, idx[2]]
        expected = np.einsum("i,j,k,cijk->c", w[0], w[1], w[2], block)
        np.testing.assert_allclose(fine[:, o[0], o[1], o[2]], expected, atol=1e-4)
    # The same points of a patch of another size.
    np.testing.assert_allclose(coarse[:, 6, 6, 6], fine[:, 24, 24, 24], atol=1e-5)
    assert not np.allclose(field(seed + 1, spacing, sigma, (13, 13, 13), (8.0,) * 3), coarse)
    assert np.array_equal(field(seed, spacing, (0.0, 0.0, 0.0), (5, 6, 7), (8.0,) * 3), np.zeros((3, 5, 6, 7)))


@pytest.mark.parametrize("angles, seed", [((0.0, 0.0, 0.0), 3), ((25.0, -10.0, 40.0), 4), ((0.0, 0.0, 90.0), 5)])
def test_deformed_linear_read_matches_scipy_map_coordinates(volume, angles, seed):
    v = volume
    shape, out_voxel, centre = (12, 14, 16), (4.0, 4.0, 4.0), (80.0, 96.0, 110.0)
    spacing, sigma = (40.0, 32.0, 32.0), (4.0, 6.0, 6.0)
    d = field(seed, spacing, sigma, shape, out_voxel)
    assert np.abs(d).max() > 4.0, "the field moves voxels by more than a voxel"
    got = torch.from_dlpack(v["raw_vol"].read(list(centre), list(shape), list(out_voxel), interpolation="linear",
                                              rotation_deg=list(angles), elastic=(seed, list(spacing), list(sigma)))).numpy()
    positions = source_positions(v, centre, shape, out_voxel, rotation(angles), d)
    expected = ndimage.map_coordinates(v["raw"].astype(np.float64), positions, order=1, mode="nearest")
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-5)


def test_deformed_label_read_matches_scipy_nearest(volume):
    v = volume
    shape, out_voxel, centre = (10, 12, 14), (4.0, 4.0, 4.0), (80.0, 90.0, 100.0)
    spacing, sigma, angles = (40.0, 40.0, 40.0), (5.0, 5.0, 5.0), (15.0, 0.0, 30.0)
    d = field(7, spacing, sigma, shape, out_voxel)
    got = torch.from_dlpack(v["label_vol"].read(list(centre), list(shape), list(out_voxel), foreground=True,
                                                rotation_deg=list(angles), elastic=(7, list(spacing), list(sigma)))).numpy()
    positions = source_positions(v, centre, shape, out_voxel, rotation(angles), d)
    # Nearest voxel: floor(p + 0.5), as scipy's order 0 does away from exact halves.
    expected = v["labels"][tuple(np.floor(positions + 0.5).astype(int))]
    assert set(np.unique(got)) <= {0.0, 1.0}
    assert np.array_equal(got, expected.astype(np.float32))


def test_zero_amplitude_field_reads_exactly_as_no_deformation(volume):
    v = volume
    for angles in [(0.0, 0.0, 0.0), (20.0, 5.0, -35.0)]:
        for interpolation in ["linear", "nearest"]:
            kw = dict(interpolation=interpolation, rotation_deg=list(angles))
            plain = v["raw_vol"].read([70.0, 81.0, 95.0], [6, 7, 8], [4.0] * 3, **kw)
            deformed = v["raw_vol"].read([70.0, 81.0, 95.0], [6, 7, 8], [4.0] * 3, elastic=(9, [30.0] * 3, [0.0] * 3), **kw)
            assert np.array_equal(torch.from_dlpack(plain).numpy(), torch.from_dlpack(deformed).numpy())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**63 - 1), sigma=st.floats(0.5, 12.0), spacing=st.floats(12.0, 80.0),
       angle=st.floats(-180, 180))
def test_property_deformed_reads_match_scipy(volume, seed, sigma, spacing, angle):
    """Any field, including ones that fold space (sigma near the spacing), reads what scipy reads:
    the gathered block covers every displaced position (a gap would show as NaN in debug builds
    or as a wrong value)."""
    v = volume
    shape, out_voxel, centre = (8, 9, 10), (4.0, 4.0, 4.0), (80.0, 96.0, 110.0)
    angles = (angle, 0.0, angle / 2)
    d = field(seed, (spacing,) * 3, (sigma,) * 3, shape, out_voxel)
    got = torch.from_dlpack(v["raw_vol"].read(list(centre), list(shape), list(out_voxel), interpolation="linear",
                                              rotation_deg=list(angles), elastic=(seed, [spacing] * 3, [sigma] * 3))).numpy()
    expected = ndimage.map_coordinates(v["raw"].astype(np.float64), source_positions(v, centre, shape, out_voxel, rotation(angles), d),
                                       order=1, mode="nearest")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-5)


def elastic_dataset(v, shape=(8, 10, 12), transforms=None, seed=3):
    transforms = transforms or {"rotate": {"z": [-30, 30]},
                                "elastic": {"control_point_spacing": [40, 32, 32], "jitter_sigma": [3, 5, 5], "prob": 0.75}}
    return CellMapDataset(str(v["root"] / "raw"), f"{v['root'] / 'crop'}/[mito]", ["mito"],
                          {"raw": {"shape": shape, "scale": (4.0, 4.0, 4.0)}},
                          {"gt": {"shape": shape, "scale": (4.0, 4.0, 4.0)}}, pad=True, seed=seed,
                          spatial_transforms=transforms)


def test_dataset_records_elastic_draws_and_a_sample_is_re_read_from_them(volume):
    """The loader's patches are re-read through CellMapImage from ``current_spatial_transforms``;
    raw and labels share the field (labels equal the threshold of a nearest raw read)."""
    v = volume
    shape = (8, 10, 12)
    loader = CellMapDataLoader(elastic_dataset(v, shape), batch_size=4, iterations_per_epoch=3, return_metadata=True, seed=3)
    raw_image = CellMapImage(str(v["root"] / "raw"), "raw", (4.0,) * 3, shape, pad=True, interpolation="linear")
    nearest_raw = CellMapImage(str(v["root"] / "raw"), "raw", (4.0,) * 3, shape, pad=True, interpolation="nearest")
    deformed = 0
    for batch in loader:
        for row, raw, gt in zip(batch["__metadata__"], batch["raw"], batch["gt"]):
            drawn = row["current_spatial_transforms"]
            sigma = [row[f"elastic_sigma_{a}"] for a in AXES]
            assert ("elastic" in drawn) == any(sigma)
            if "elastic" not in drawn:
                assert row["elastic_seed"] == 0 and [row[f"elastic_spacing_{a}"] for a in AXES] == [0.0] * 3
                continue
            deformed += 1
            assert drawn["elastic"]["jitter_sigma"] == [3.0, 5.0, 5.0]
            assert drawn["elastic"]["control_point_spacing"] == [40.0, 32.0, 32.0]
            raw_image.set_spatial_transforms(drawn)
            again = raw_image[row["current_center"]].numpy().reshape(shape)
            np.testing.assert_allclose(again, raw[0].numpy(), atol=1e-4, equal_nan=True)
            nearest_raw.set_spatial_transforms(drawn)
            thresholded = nearest_raw[row["current_center"]].numpy().reshape(shape)
            known = np.isfinite(gt[0].numpy())
            assert np.array_equal(gt[0].numpy()[known], (thresholded[known] > 131).astype(np.float32))
    assert 3 <= deformed < 12, f"prob 0.75 deformed {deformed} of 12"


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_same_seed_same_deformed_batches_at_any_thread_count(volume, threads):
    def collect(workers):
        loader = CellMapDataLoader(elastic_dataset(volume), batch_size=4, iterations_per_epoch=2, num_workers=workers, seed=21)
        return [(b["raw"].clone(), b["gt"].clone()) for b in loader]

    reference, got = collect(1), collect(threads)
    for (r_raw, r_gt), (g_raw, g_gt) in zip(reference, got):
        assert torch.equal(r_raw.nan_to_num(-1), g_raw.nan_to_num(-1)) and torch.equal(r_gt.nan_to_num(-1), g_gt.nan_to_num(-1))


def test_2d_patches_deform_in_plane(volume):
    v = volume
    ds = elastic_dataset(v, shape=(1, 16, 16),
                         transforms={"elastic": {"control_point_spacing": {"y": 24, "x": 24}, "jitter_sigma": {"y": 4, "x": 4}}})
    batch = next(iter(CellMapDataLoader(ds, batch_size=3, iterations_per_epoch=1, return_metadata=True, seed=2)))
    for row in batch["__metadata__"]:
        assert row["elastic_sigma_z"] == 0.0 and row["elastic_sigma_y"] == 4.0 and row["elastic_seed"] != 0
        assert row["elastic_spacing_y"] == 24.0


@pytest.mark.parametrize("bad, words", [
    ({"elastic": {"control_point_spacing": 0, "jitter_sigma": 2}}, "control_point_spacing"),
    ({"elastic": {"control_point_spacing": 10, "jitter_sigma": [1, 2]}}, "number or a list"),
    ({"elastic": {"control_point_spacing": 10, "jitter_sigma": 1, "prob": 1.5}}, "prob"),
    ({"elastic": {"control_point_spacing": 10, "jitter": 1}}, "jitter"),
    ({"elastic": {"control_point_spacing": {"x": 10}, "jitter_sigma": {"y": 1, "x": 1}}}, "axes ['y']"),
])
def test_bad_elastic_config_is_refused_naming_the_key(volume, bad, words):
    with pytest.raises(ConfigError, match="elastic") as info:
        elastic_dataset(volume, transforms=bad)
    assert words in str(info.value)


def test_bad_elastic_re_read_is_refused(volume):
    image = CellMapImage(str(volume["root"] / "raw"), "raw", (4.0,) * 3, (4, 4, 4))
    with pytest.raises(ConfigError, match="elastic"):
        image.set_spatial_transforms({"elastic": {"seed": 1, "control_point_spacing": 10}})
    with pytest.raises(ConfigError, match="jitter_sigma"):
        image.set_spatial_transforms({"elastic": {"seed": 1, "control_point_spacing": 10, "jitter_sigma": -1}})
        image[{"z": 40.0, "y": 40.0, "x": 40.0}]
