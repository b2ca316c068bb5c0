"""Target semantics on crafted crops: unannotated classes, true negatives from mutual exclusion,
instance ids, several target arrays at different scales, compact uint8 targets, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr

from cellmap_data import CellMapDataset
from conftest import reference_patch, write_ome_image


@pytest.fixture()
def crafted(tmp_path):
    """Raw 32³ at 4 nm; a crop (same grid) annotating 'er' (a slab) and 'mito' (instance ids)."""
    raw = np.arange(32 ** 3, dtype=np.uint16).reshape(32, 32, 32)
    root = tmp_path / "d.zarr"
    raw_path = write_ome_image(root / "raw", [raw, raw[::2, ::2, ::2]], [(4, 4, 4), (8, 8, 8)], [(2, 2, 2), (4, 4, 4)])
    er = np.zeros((32, 32, 32), np.uint8)
    er[:, :, :10] = 1
    mito = np.zeros((32, 32, 32), np.uint16)
    mito[5:12, 12:20, 20:30] = 7
    mito[20:28, 20:30, 14:20] = 9
    crop = root / "crop1"
    for name, data in (("er", er), ("mito", mito)):
        write_ome_image(crop / name, [data, data[::2, ::2, ::2]], [(4, 4, 4), (8, 8, 8)], [(2, 2, 2), (4, 4, 4)])
    return {"raw_path": str(raw_path), "crop": crop, "er": er, "mito": mito, "raw": raw}


def dataset(crafted, classes, template="[er,mito]", **kwargs):
    defaults = dict(
        input_arrays={"raw": {"shape": (8, 8, 8), "scale": (4, 4, 4)}},
        target_arrays={"gt": {"shape": (8, 8, 8), "scale": (4, 4, 4)}},
        pad=False,
    )
    defaults.update(kwargs)
    return CellMapDataset(crafted["raw_path"], str(crafted["crop"] / template), classes, **defaults)


def patch_at(ds, idx, data, shape=(8, 8, 8), voxel=4.0, origin=2.0):
    centre = ds.get_center(idx)
    start = [round((centre[a] - origin) / voxel - (n - 1) / 2) for a, n in zip("zyx", shape)]
    return reference_patch(data, start, shape)


def test_unannotated_class_is_all_nan_without_relations(crafted):
    ds = dataset(crafted, ["er", "nuc"], template="[er]")
    gt = ds[0]["gt"]
    assert torch.isnan(gt[1]).all()
    assert not torch.isnan(gt[0]).any()


@pytest.mark.parametrize("relations", [{"nuc": ["er"]}, {"er": ["nuc"]}])
def test_true_negatives_where_an_exclusive_class_is_present(crafted, relations):
    ds = dataset(crafted, ["er", "nuc"], template="[er]", class_relation_dict=relations)
    for idx in range(0, len(ds), max(1, len(ds) // 7)):
        gt = ds[idx]["gt"].numpy()
        er = patch_at(ds, idx, crafted["er"])
        expected = np.where(er == 1, 0.0, np.nan)
        np.testing.assert_array_equal(gt[1], expected)


def test_relation_with_unannotated_partner_stays_nan(crafted):
    ds = dataset(crafted, ["er", "nuc", "ves"], template="[er]", class_relation_dict={"nuc": ["ves"]})
    gt = ds[0]["gt"]
    assert torch.isnan(gt[1]).all() and torch.isnan(gt[2]).all()


def test_instance_ids_are_foreground(crafted):
    ds = dataset(crafted, ["mito"], template="[mito]")
    for idx in range(0, len(ds), max(1, len(ds) // 9)):
        expected = (patch_at(ds, idx, crafted["mito"]) != 0).astype(np.float32)
        np.testing.assert_array_equal(ds[idx]["gt"][0].numpy(), expected)


def test_each_target_array_has_its_own_shape_and_scale(crafted):
    ds = dataset(
        crafted, ["er", "mito"],
        target_arrays={"fine": {"shape": (8, 8, 8), "scale": (4, 4, 4)}, "coarse": {"shape": (4, 6, 6), "scale": (8, 8, 8)}},
    )
    item = ds[len(ds) // 2]
    assert item["fine"].shape == (2, 8, 8, 8)
    assert item["coarse"].shape == (2, 4, 6, 6)
    centre = ds.get_center(len(ds) // 2)
    er_s1 = zarr.open_array(str(crafted["crop"] / "er" / "s1"))[...]
    start = [round((centre[a] - 4.0) / 8.0 - (n - 1) / 2) for a, n in zip("zyx", (4, 6, 6))]
    np.testing.assert_array_equal(item["coarse"][0].numpy(), reference_patch(er_s1, start, (4, 6, 6)))
    np.testing.assert_array_equal(item["fine"][0].numpy(), patch_at(ds, len(ds) // 2, crafted["er"]))


def test_compact_targets_ship_uint8_and_expand_to_nan(crafted):
    kwargs = dict(class_relation_dict={"nuc": ["er"]}, pad=True)
    full = dataset(crafted, ["er", "nuc", "mito"], template="[er,mito]", **kwargs)
    compact = dataset(crafted, ["er", "nuc", "mito"], template="[er,mito]", compact_targets=True, **kwargs)
    batch = compact.read_batch_raw([0, 3, 5])
    record = pa.record_batch(batch.record_batch())
    assert record.schema.field("gt").type.value_type == pa.uint8()
    assert record.schema.field("raw").type.value_type == pa.float32()
    raw_bytes = torch.from_dlpack(batch.tensor("gt"))
    assert raw_bytes.dtype == torch.uint8 and set(torch.unique(raw_bytes).tolist()) <= {0, 1, 255}
    expected = full.get_batch([0, 3, 5])["gt"]
    got = compact.get_batch([0, 3, 5])["gt"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)


def test_unbalanced_brackets_raise(crafted):
    with pytest.raises(ValueError, match="crop1"):
        dataset(crafted, ["er"], template="[er,mito")


def test_labels_outside_raw_raise_naming_the_class(crafted, tmp_path):
    far = np.ones((8, 8, 8), np.uint8)
    write_ome_image(crafted["crop"] / "far", [far], [(4, 4, 4)], [(10_000, 10_000, 10_000)])
    with pytest.raises(ValueError, match="'far'"):
        dataset(crafted, ["far"], template="[far]")


def test_float_labels_raise_naming_the_class(crafted):
    write_ome_image(crafted["crop"] / "soft", [np.full((32, 32, 32), np.nan, np.float32)], [(4, 4, 4)], [(2, 2, 2)])
    with pytest.raises(ValueError, match="'soft'"):
        dataset(crafted, ["soft"], template="[soft]")


def test_patch_larger_than_crop_without_pad_raises_naming_array_and_axis(crafted):
    with pytest.raises(ValueError, match=r"'raw'.* along z"):
        dataset(crafted, ["er"], template="[er]", input_arrays={"raw": {"shape": (64, 8, 8), "scale": (4, 4, 4)}})
    forced = dataset(crafted, ["er"], template="[er]", input_arrays={"raw": {"shape": (64, 8, 8), "scale": (4, 4, 4)}}, force_has_data=True)
    assert len(forced) == 0 and forced.verify()


def test_rotated_classes_read_together_match_single_class_reads(crafted):
    """Classes sharing a voxel grid are resampled with one index computation; each channel must
    equal an independent single-volume read with the sample's recorded draw."""
    from cellmap_data import _engine

    aug = {"rotate": {"axes": {"z": [-180, 180], "y": [-20, 20]}}, "mirror": {"axes": {"x": 0.5}}, "transpose": {"axes": ["y", "x"]}}
    ds = dataset(crafted, ["er", "mito"], template="[er,mito]", spatial_transforms=aug, pad=True, seed=4)
    indices = list(range(0, len(ds), max(1, len(ds) // 6)))
    batch = ds.read_batch_raw(indices)
    meta = pa.record_batch(batch.record_batch())
    gt = torch.from_dlpack(batch.tensor("gt")).numpy()
    volumes = {c: _engine.Volume(str(crafted["crop"] / c)) for c in ("er", "mito")}
    for row in range(len(indices)):
        m = {k: meta.column(k)[row].as_py() for k in meta.schema.names if k not in ("raw", "gt")}
        for channel, cls in enumerate(("er", "mito")):
            expected = torch.from_dlpack(volumes[cls].read(
                [m["centre_z"], m["centre_y"], m["centre_x"]], [8, 8, 8], [4, 4, 4], interpolation="nearest", foreground=True,
                mirror=[m["mirror_z"], m["mirror_y"], m["mirror_x"]], permutation=[m["transpose_z"], m["transpose_y"], m["transpose_x"]],
                rotation_deg=[m["rotate_z"], m["rotate_y"], m["rotate_x"]])).numpy()
            np.testing.assert_array_equal(gt[row, channel], expected)
