"""CellMapImage and CellMapDataset on generated CellMap-layout data; batches reach torch zero copy."""

from __future__ import annotations

import gc
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr

from cellmap_data import CellMapDataset, CellMapImage, EmptyImage, _engine
from cellmap_data.utils import split_target_path
from conftest import reference_patch, write_ome_image


def first_crop(data):
    ds = data.datasets[0]
    return ds, ds.crops[0]


def test_image_reads_match_zarr(tiny_data):
    ds, _ = first_crop(tiny_data)
    group = zarr.open_group(str(ds.raw_path), mode="r")
    s0 = group["s0"][...]
    attrs = group.attrs.asdict()
    transforms = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    scale = transforms[0]["scale"]
    origin = transforms[1]["translation"]
    shape = (8, 12, 16)
    start = (3, 5, 7)
    img = CellMapImage(str(ds.raw_path), "raw", scale, shape, pad=True)
    # translation = corner of voxel 0 (the default frame): the patch's centre is n/2 voxels in
    centre = {a: o + (s + n / 2) * v for a, o, s, n, v in zip("zyx", origin, start, shape, scale)}
    got = img[centre]
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    np.testing.assert_array_equal(got.numpy(), reference_patch(s0, start, shape))
    assert img.scale_level == 0
    assert img._level_info[0][0] == "s0"
    lo = {a: img.bounding_box[a][0] for a in "zyx"}
    assert all(math.isclose(lo[a], origin[k]) for k, a in enumerate("zyx"))


def test_image_pad_value_and_value_transform(tmp_path):
    data = np.ones((8, 8, 8), dtype=np.uint8)
    path = write_ome_image(tmp_path / "img", [data], [(1, 1, 1)], [(0, 0, 0)])
    img = CellMapImage(str(path), "x", (1, 1, 1), (4, 4, 4), pad=True, pad_value=0, value_transform=lambda t: t * 2)
    patch = img[{"z": -0.5, "y": 3.5, "x": 3.5}]  # voxel centres z = -2..1: two before the array
    assert patch[:2].eq(0).all() and patch[2:].eq(2).all()


def test_empty_image_both_signatures():
    new = EmptyImage("/nowhere", "mito", (8, 8, 8), (4, 4, 4))
    old = EmptyImage("mito", (8, 8, 8), (4, 4, 4), None, "zyx", 0.0)
    assert torch.isnan(new[{"z": 0, "y": 0, "x": 0}]).all()
    assert old[{"z": 0, "y": 0, "x": 0}].eq(0).all()


def make_dataset(data, crop_index=0, **kwargs):
    ds = data.datasets[0]
    crop = ds.crops[crop_index]
    scale = list(crop.voxel_size)
    defaults = dict(
        raw_path=str(ds.raw_path),
        target_path=crop.target_path,
        classes=list(data.classes),
        input_arrays={"raw": {"shape": (8, 8, 8), "scale": scale}},
        target_arrays={"gt": {"shape": (8, 8, 8), "scale": scale}},
        pad=True,
    )
    defaults.update(kwargs)
    return CellMapDataset(**defaults), crop


def test_dataset_item_shapes_and_unannotated_classes(tiny_data):
    dataset, crop = make_dataset(tiny_data)
    assert len(dataset) > 0
    item = dataset[0]
    assert set(item) == {"idx", "raw", "gt"}
    assert item["raw"].shape == (1, 8, 8, 8) and item["raw"].dtype == torch.float32
    assert item["gt"].shape == (len(tiny_data.classes), 8, 8, 8)
    for i, cls in enumerate(tiny_data.classes):
        channel = item["gt"][i]
        if cls in crop.classes:
            assert not torch.isnan(channel).all()
            assert set(torch.unique(channel[~torch.isnan(channel)]).tolist()) <= {0.0, 1.0}
        else:
            assert torch.isnan(channel).all(), cls


def test_dataset_labels_match_zarr_at_label_resolution(tiny_data):
    dataset, crop = make_dataset(tiny_data)
    template, classes = split_target_path(crop.target_path)
    cls = classes[0]
    label_group = zarr.open_group(template.format(label=cls), mode="r")
    s0 = label_group["s0"][...]
    t = label_group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    scale, origin = t[0]["scale"], t[1]["translation"]
    channel = tiny_data.classes.index(cls)
    for idx in [0, len(dataset) // 2, len(dataset) - 1]:
        centre = dataset.get_center(idx)
        start = [round((centre[a] - origin[k]) / scale[k] - 4) for k, a in enumerate("zyx")]
        expected = (reference_patch(s0, start, (8, 8, 8)) != 0).astype(np.float32)
        got = dataset[idx]["gt"][channel].numpy()
        np.testing.assert_array_equal(got, expected)


def test_2d_request_is_squeezed(tiny_data):
    crop = tiny_data.datasets[0].crops[0]
    scale = list(crop.voxel_size)
    dataset, _ = make_dataset(
        tiny_data,
        input_arrays={"raw": {"shape": (1, 16, 16), "scale": scale}},
        target_arrays={"gt": {"shape": (1, 16, 16), "scale": scale}},
    )
    item = dataset[0]
    assert item["raw"].shape == (1, 16, 16)
    assert item["gt"].shape == (len(tiny_data.classes), 16, 16)


def test_batch_is_arrow_with_tensor_columns_and_zero_copy(tiny_data):
    dataset, _ = make_dataset(tiny_data)
    batch = dataset.read_batch_raw([0, 1, 2])
    record = pa.record_batch(batch.record_batch())
    assert record.num_rows == 3
    raw_type = record.schema.field("raw").type
    assert isinstance(raw_type, pa.FixedShapeTensorType)
    assert raw_type.shape == [1, 8, 8, 8]
    assert record.schema.field("gt").type.shape == [len(tiny_data.classes), 8, 8, 8]
    assert record.column("idx").to_pylist() == [0, 1, 2]
    exported = batch.tensor("raw")
    tensor = torch.from_dlpack(exported)
    assert tensor.shape == (3, 1, 8, 8, 8)
    arrow_address = record.column("raw").storage.values.buffers()[1].address
    assert tensor.data_ptr() == exported.data_ptr == arrow_address
    np.testing.assert_array_equal(record.column("raw").to_numpy_ndarray(), tensor.numpy())


def test_tensor_memory_is_released_when_dropped(tiny_data):
    dataset, _ = make_dataset(tiny_data)
    gc.collect()
    before = _engine.live_batch_bytes()
    batch = dataset.read_batch_raw(list(range(4)))
    tensor = torch.from_dlpack(batch.tensor("gt"))
    size = tensor.numel() * 4
    assert _engine.live_batch_bytes() >= before + size
    del batch
    gc.collect()
    # The torch tensor alone keeps its memory alive...
    assert _engine.live_batch_bytes() >= before + size
    assert torch.nansum(tensor).item() >= 0  # still readable
    del tensor
    gc.collect()
    assert _engine.live_batch_bytes() == before


def test_missing_class_folder_names_the_class(tiny_data, tmp_path):
    ds = tiny_data.datasets[0]
    crop = ds.crops[0]
    template, classes = split_target_path(crop.target_path)
    bogus = template.format(label="[" + ",".join(classes + ["nosuchclass"]) + "]")
    with pytest.raises(FileNotFoundError, match="nosuchclass"):
        CellMapDataset(
            str(ds.raw_path), bogus, classes + ["nosuchclass"],
            {"raw": {"shape": (8, 8, 8), "scale": list(crop.voxel_size)}},
            {"gt": {"shape": (8, 8, 8), "scale": list(crop.voxel_size)}},
        )


def test_same_seed_same_batch_any_thread_count(tiny_data):
    aug = {"mirror": {"axes": {"x": 0.5, "y": 0.5}}, "transpose": {"axes": ["x", "y"]}, "rotate": {"axes": {"z": [-180, 180]}}}
    dataset, _ = make_dataset(tiny_data, spatial_transforms=aug, seed=123)
    a = dataset.get_batch(range(6))
    b = dataset.get_batch(range(6))
    for k in a:
        torch.testing.assert_close(a[k], b[k], equal_nan=True, rtol=0, atol=0)
