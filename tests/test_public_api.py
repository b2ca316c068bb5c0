"""Everything users import from the reference ``cellmap-data`` library, called the way its
users (README-era scripts, the current release, the segmentation-challenge toolbox) call it,
on generated data.

Each test names the reference form it exercises; see docs and REFERENCE_API sections 1-14, 17.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T

import cellmap_data
from cellmap_data import (
    CellMapDataLoader,
    CellMapDataset,
    CellMapDataSplit,
    CellMapImage,
    CellMapMultiDataset,
    CellMapSubset,
    ClassBalancedSampler,
    EmptyImage,
)
from cellmap_data.transforms.augment import Binarize, NaNtoNum
from cellmap_data.utils import (
    array_has_singleton_dim,
    get_fig_dict,
    get_sliced_shape,
    is_array_2D,
    longest_common_substring,
    min_redundant_inds,
    permute_singleton_dimension,
    split_target_path,
    torch_max_value,
)

REFERENCE_NAMES = [
    "CellMapDataset", "CellMapMultiDataset", "CellMapDataLoader", "CellMapDataSplit", "CellMapDatasetWriter",
    "CellMapImage", "EmptyImage", "ImageWriter", "CellMapSubset", "ClassBalancedSampler",
]
UTILS_NAMES = [
    "split_target_path", "is_array_2D", "array_has_singleton_dim", "permute_singleton_dimension", "get_sliced_shape",
    "longest_common_substring", "get_fig_dict", "min_redundant_inds", "torch_max_value",
]
# The augmentation config of the README and the challenge toolbox.
SPATIAL = {"mirror": {"axes": {"x": 0.5, "y": 0.5}}, "transpose": {"axes": ["x", "y"]},
           "rotate": {"axes": {"x": [-180, 180], "y": [-180, 180]}}}


def _writer_classes():
    """(CellMapDatasetWriter, ImageWriter), or a skip while the writer is not importable."""
    try:
        from cellmap_data import CellMapDatasetWriter, ImageWriter
    except ImportError as error:  # the writer is developed separately
        pytest.skip(f"cellmap_data.CellMapDatasetWriter is not importable yet: {error}")
    return CellMapDatasetWriter, ImageWriter


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crop(tiny_data):
    """The first training crop (4 nm, annotates mito, er, nuc, ves; not ecs, pm)."""
    ds = tiny_data.datasets[0]
    return ds, ds.crops[0]


@pytest.fixture(scope="module")
def arrays(crop):
    _, c = crop
    scale = list(c.voxel_size)
    return {"input": {"shape": (8, 8, 8), "scale": scale}}, {"output": {"shape": (8, 8, 8), "scale": scale}}


@pytest.fixture(scope="module")
def arrays_2d(crop):
    _, c = crop
    scale = list(c.voxel_size)
    return {"input": {"shape": (1, 16, 16), "scale": scale}}, {"output": {"shape": (1, 16, 16), "scale": scale}}


def raw_transforms():
    return T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])


def target_transforms():
    return T.Compose([T.ToDtype(torch.float), Binarize()])


def head_dataset(tiny_data, crop, arrays, **kwargs):
    ds, c = crop
    inputs, targets = arrays
    return CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets, pad=True, **kwargs)


# -- 1. package surface -----------------------------------------------------------------------
def test_all_exports_every_reference_name_and_version():
    for name in REFERENCE_NAMES + ["__version__"]:
        assert name in cellmap_data.__all__, f"{name} missing from cellmap_data.__all__"
    for name in cellmap_data.__all__:
        assert getattr(cellmap_data, name) is not None
    assert isinstance(cellmap_data.__version__, str) and cellmap_data.__version__
    namespace: dict = {}
    exec("from cellmap_data import *", namespace)
    assert {n for n in REFERENCE_NAMES if n not in ("CellMapDatasetWriter", "ImageWriter")} <= set(namespace)


def test_transforms_and_utils_import_paths():
    from cellmap_data.transforms import Binarize as B2, GaussianBlur, GaussianNoise, NaNtoNum as N2, RandomContrast, RandomGamma
    from cellmap_data.transforms.augment import GaussianBlur as GB2  # noqa: F401

    assert B2 is Binarize and N2 is NaNtoNum
    # the challenge toolbox's import line
    from cellmap_data.utils import (  # noqa: F401
        array_has_singleton_dim as a, get_fig_dict as g, is_array_2D as i, longest_common_substring as lcs,
        permute_singleton_dimension as p,
    )
    import cellmap_data.utils as utils

    for name in UTILS_NAMES:
        assert name in utils.__all__ and callable(getattr(utils, name))
    x = torch.rand(2, 1, 8, 8)
    pipeline = T.Compose([T.ToDtype(torch.float, scale=True), GaussianNoise(std=0.0), RandomContrast((1.0, 1.0)),
                          RandomGamma((1.0, 1.0)), GaussianBlur(3, 0.1, dim=2)])
    assert pipeline(x).shape == x.shape


# -- 3./4. images -----------------------------------------------------------------------------
def test_cellmap_image_positional_and_challenge_forms(crop):
    ds, c = crop
    scale, shape = list(c.voxel_size), (4, 6, 8)
    label_path = c.target_path.split("[")[0] + "mito"
    # every parameter positionally, in the (shared) reference order
    img = CellMapImage(label_path, "mito", scale, shape, True, 0.0, "nearest", "zyx", None, None, "cpu")
    # the toolbox's call form
    raw = CellMapImage(str(ds.raw_path), "raw", scale, shape, pad=True, pad_value=0, interpolation="linear")
    center = {a: (lo + hi) / 2 for a, (lo, hi) in img.bounding_box.items()}
    patch = img[center]
    assert isinstance(patch, torch.Tensor) and tuple(patch.shape) == shape and patch.dtype == torch.float32
    assert tuple(raw[center].shape) == shape
    assert isinstance(img.scale_level, int) and img._level_info[img.scale_level][0] == "s0"
    assert set(img.bounding_box) == set("zyx") and set(img.sampling_box) == set("zyx")
    assert img.scale == dict(zip("zyx", map(float, scale))) and img.output_shape == dict(zip("zyx", shape))
    assert img.get_center(0).keys() == {"z", "y", "x"}
    img.set_spatial_transforms({"mirror": ["x"]})
    assert torch.equal(img[center], patch.flip(-1))
    img.set_spatial_transforms(None)
    assert img.to("cpu") is img and img[center].device.type == "cpu"
    counts = img.class_counts
    assert set(counts) == {"mito"} and 0 < counts["mito"] <= img.total_voxels
    assert math.isclose(img.bg_count, img.total_voxels - counts["mito"])
    # centre values may be arrays (their mean is used)
    assert torch.equal(img[{a: [v - 4, v + 4] for a, v in center.items()}], patch)


def test_cellmap_image_short_axis_order_left_pads(crop):
    ds, c = crop
    img = CellMapImage(str(ds.raw_path), "raw", list(c.voxel_size)[1:], (16, 16), axis_order="yx")
    center = {a: (lo + hi) / 2 for a, (lo, hi) in img.bounding_box.items()}
    assert tuple(img[center].shape) == (16, 16)


def test_empty_image_both_signatures():
    center = {"z": 0.0, "y": 0.0, "x": 0.0}
    # current: (path, target_class, target_scale, target_voxel_shape, pad, pad_value, ...)
    new = EmptyImage("/nowhere/crop1/mito", "mito", (8, 8, 8), (2, 3, 4))
    new_kw = EmptyImage(path=None, target_class="mito", target_scale=(8, 8, 8), target_voxel_shape=(2, 3, 4))
    # older: (label_class, scale, voxel_shape, store=None, axis_order="zyx", empty_value=-100)
    old = EmptyImage("mito", (8, 8, 8), (2, 3, 4), None, "zyx", -100)
    old_kw = EmptyImage(label_class="mito", scale={"z": 8, "y": 8, "x": 8}, voxel_shape={"z": 2, "y": 3, "x": 4}, empty_value=0)
    for img in (new, new_kw):
        assert torch.isnan(img[center]).all() and tuple(img[center].shape) == (2, 3, 4)
    assert old[center].eq(-100).all() and old_kw[center].eq(0).all()
    for img in (new, new_kw, old, old_kw):
        assert img.bounding_box is None and img.sampling_box is None
        assert img.class_counts == {"mito": 0} and img.total_voxels == 0
        img.set_spatial_transforms({"mirror": ["x"]})
        assert img.to("cpu") is img


# -- 5. CellMapDataset ------------------------------------------------------------------------
def test_dataset_current_dialect_keywords_and_positional(tiny_data, crop, arrays):
    ds, c = crop
    inputs, targets = arrays
    kw = CellMapDataset(
        raw_path=str(ds.raw_path), target_path=c.target_path, classes=tiny_data.classes, input_arrays=inputs,
        target_arrays=targets, pad=True, spatial_transforms=SPATIAL, raw_value_transforms=raw_transforms(),
        target_value_transforms=target_transforms(), class_relation_dict=None, force_has_data=False, device="cpu",
        seed=3,
    )
    pos = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets, True, None,
                         raw_transforms(), target_transforms(), None, False, "cpu", 3)
    for dataset in (kw, pos):
        assert len(dataset) > 0 and dataset.verify()
        item = dataset[0]
        assert set(item) == {"idx", "input", "output"}
        assert item["input"].shape == (1, 8, 8, 8) and item["output"].shape == (len(tiny_data.classes), 8, 8, 8)
        assert 1.0 < float(item["input"].max()) <= 255.0  # raw stays in the uint8 range (ToDtype is a no-op)
    assert pos.pad and pos.spatial_transforms is None
    unannotated = [i for i, k in enumerate(tiny_data.classes) if k not in c.classes]
    assert unannotated and torch.isnan(pos[0]["output"][unannotated]).all()


def test_dataset_older_dialect_keywords(tiny_data, crop, arrays):
    ds, c = crop
    inputs, targets = arrays
    generator = torch.Generator().manual_seed(11)
    old = CellMapDataset(
        raw_path=str(ds.raw_path), target_path=c.target_path, classes=tiny_data.classes, input_arrays=inputs,
        target_arrays=targets, spatial_transforms=SPATIAL, raw_value_transforms=raw_transforms(),
        target_value_transforms=None, class_relation_dict=None, is_train=True, axis_order="zyx",
        context=object(), rng=generator, force_has_data=False, empty_value=-100, pad=True, device="cpu", max_workers=4,
    )
    assert old.is_train and old.seed == generator.initial_seed() and old.verify()
    target = old[5]["output"]
    unannotated = [i for i, k in enumerate(tiny_data.classes) if k not in c.classes]
    assert target[unannotated].eq(-100).all() and not torch.isnan(target).any()
    # rng seeds the draws: the same generator seed gives the same augmented samples
    again = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets,
                           spatial_transforms=SPATIAL, is_train=True, rng=torch.Generator().manual_seed(11),
                           pad=True, empty_value=-100, raw_value_transforms=raw_transforms())
    assert torch.equal(again[5]["input"], old[5]["input"])
    # is_train=False: the configured augmentation is not applied
    plain = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets, pad=True)
    frozen = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets,
                            spatial_transforms=SPATIAL, is_train=False, pad=True)
    assert torch.equal(frozen[7]["input"], plain[7]["input"])


def test_dataset_older_positional_order(tiny_data, crop, arrays):
    ds, c = crop
    inputs, targets = arrays
    # (raw_path, target_path, classes, input_arrays, target_arrays, spatial_transforms,
    #  raw_value_transforms, target_value_transforms, class_relation_dict, is_train, axis_order,
    #  context, rng, force_has_data, empty_value, pad, device, max_workers)
    old = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets, None,
                         raw_transforms(), target_transforms(), None, True, "zyx", None, None, False, math.nan,
                         True, "cpu", 2)
    assert old.pad and old.spatial_transforms is None and old.raw_value_transforms is not None
    assert old[0]["output"].shape[0] == len(tiny_data.classes)
    with_spatial = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets, SPATIAL,
                                  pad=True)
    assert with_spatial.spatial_transforms is not None and with_spatial.pad
    with pytest.raises(TypeError):
        CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, inputs, targets, None, pad=True,
                       spatial_transforms=SPATIAL, raw_value_transforms=None, target_value_transforms=None,
                       class_relation_dict=None, is_train=True, axis_order="zyx", context=None, rng=None,
                       force_has_data=False, empty_value=0.0, device=None, max_workers=None, seed=1,
                       extra_unknown=1)


def test_dataset_raw_only_without_classes(tiny_data, crop):
    # older dialect: classes=None means raw only; each target array is a raw read (self-supervision)
    ds, c = crop
    scale = list(c.voxel_size)
    dataset = CellMapDataset(str(ds.raw_path), c.target_path, None, {"input": {"shape": (4, 8, 8), "scale": scale}},
                             {"output": {"shape": (4, 8, 8), "scale": scale}}, pad=True,
                             target_value_transforms=lambda x: x + 1000)
    item = dataset[2]
    assert item["input"].shape == item["output"].shape == (1, 4, 8, 8)
    assert torch.equal(item["output"], item["input"] + 1000)
    batch = next(iter(CellMapDataLoader(dataset, batch_size=2, iterations_per_epoch=1)))
    assert batch["output"].shape == (2, 1, 4, 8, 8)


def test_dataset_axis_order_reorders_specs_and_outputs(tiny_data, crop):
    ds, c = crop
    scale = list(c.voxel_size)
    zyx = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes,
                         {"input": {"shape": (4, 6, 8), "scale": scale}}, {"output": {"shape": (4, 6, 8), "scale": scale}},
                         pad=True)
    xyz = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes,
                         {"input": {"shape": (8, 6, 4), "scale": scale[::-1]}},
                         {"output": {"shape": (8, 6, 4), "scale": scale[::-1]}}, pad=True, axis_order="xyz")
    a, b = zyx[3], xyz[3]
    assert b["input"].shape == (1, 8, 6, 4)
    assert torch.equal(b["input"], a["input"].permute(0, 3, 2, 1))
    assert torch.equal(b["output"].nan_to_num(-1), a["output"].permute(0, 3, 2, 1).nan_to_num(-1))
    batch = next(iter(CellMapDataLoader(xyz, batch_size=2, is_train=False)))
    assert batch["input"].shape == (2, 1, 8, 6, 4)


def test_dataset_members_setters_and_to(tiny_data, crop, arrays):
    dataset = head_dataset(tiny_data, crop, arrays)
    assert set(dataset.bounding_box) == set("zyx") and set(dataset.sampling_box) == set("zyx")
    assert dataset.get_center(0).keys() == {"z", "y", "x"}
    assert dataset.get_crop_class_matrix().shape == (1, len(tiny_data.classes))
    assert set(dataset.class_counts) >= {"totals"} and set(dataset.class_weights) == set(tiny_data.classes)
    assert dataset.validation_indices and all(0 <= i < len(dataset) for i in dataset.validation_indices)
    dataset.set_raw_value_transforms(lambda x: x * 0 + 7)
    dataset.set_target_value_transforms(target_transforms())
    assert dataset[0]["input"].eq(7).all()
    dataset.set_target_value_transforms({"mito": lambda x: x * 0 + 3})  # one transform per class
    mito = tiny_data.classes.index("mito")
    assert dataset[0]["output"][mito].eq(3).all()
    dataset.set_spatial_transforms({"mirror": {"axes": {"x": 1.0}}})
    dataset.set_raw_value_transforms(None)
    dataset.set_target_value_transforms(None)
    mirrored = dataset.get_batch([4], augment=True)["input"]
    dataset.set_spatial_transforms(None)
    assert torch.equal(mirrored, dataset.get_batch([4])["input"].flip(-1))
    assert dataset.to("cpu") is dataset and dataset[0]["input"].device.type == "cpu"


def test_dataset_force_has_data_and_verify(tiny_data, crop):
    ds, c = crop
    big = {"input": {"shape": (64, 64, 64), "scale": list(c.voxel_size)}}
    target = {"output": {"shape": (64, 64, 64), "scale": list(c.voxel_size)}}
    with pytest.raises(ValueError):  # no patch fits and pad=False
        CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, big, target, pad=False)
    forced = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, big, target, pad=False,
                            force_has_data=True)
    assert len(forced) == 0 and forced.verify() and forced.force_has_data


def test_dataset_item_metadata(tiny_data, crop, arrays):
    ds, c = crop
    dataset = head_dataset(tiny_data, crop, arrays, return_metadata=True, spatial_transforms={"mirror": {"axes": {"x": 1.0}}})
    item = dataset[6]
    meta = item["__metadata__"]
    assert isinstance(meta, dict) and meta["idx"] == meta["current_idx"] == 6
    assert meta["raw_path"] == str(ds.raw_path) and meta["target_path_str"] == c.target_path
    assert meta["current_center"] == pytest.approx(dataset.get_center(6))
    assert meta["current_spatial_transforms"] == {"mirror": ["x"]}
    # the drawn transform re-reads the same raw patch through CellMapImage
    img = CellMapImage(str(ds.raw_path), "raw", list(c.voxel_size), (8, 8, 8), pad=True, interpolation="linear")
    img.set_spatial_transforms(meta["current_spatial_transforms"])
    assert torch.allclose(img[meta["current_center"]], item["input"][0], equal_nan=True)
    batch = dataset.get_batch([1, 2])
    assert len(batch["__metadata__"]) == 2
    assert "__metadata__" not in head_dataset(tiny_data, crop, arrays)[0]
    assert "__metadata__" not in dataset.get_batch([1], return_metadata=False)


# -- 6./7. multi-dataset and subsets ---------------------------------------------------------
def _datasets(tiny_data, arrays, **kwargs):
    inputs, targets = arrays
    out = []
    for d in tiny_data.datasets:
        for c in d.crops:
            out.append(CellMapDataset(str(d.raw_path), c.target_path, tiny_data.classes,
                                      {"input": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
                                      {"output": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, pad=True, **kwargs))
    return out


def test_multidataset_both_positional_orders_and_keywords(tiny_data, arrays):
    datasets = _datasets(tiny_data, arrays)
    inputs = {"input": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}
    targets = {"output": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}
    head = CellMapMultiDataset(datasets, tiny_data.classes, inputs, targets)
    old = CellMapMultiDataset(tiny_data.classes, inputs, targets, datasets)
    kw = CellMapMultiDataset(classes=tiny_data.classes, input_arrays=inputs, target_arrays=targets, datasets=datasets)
    for multi in (head, old, kw):
        assert multi.classes == list(tiny_data.classes) and multi.input_arrays == inputs
        assert multi.target_arrays == targets and len(multi.datasets) == len(datasets)
        assert len(multi) == sum(len(d) for d in datasets) == multi.cumulative_sizes[-1]
        assert multi.verify()
    last = head[len(head) - 1]
    # "idx" is the index inside the dataset that owns the sample, as in the reference
    assert last["idx"].item() == len(datasets[-1]) - 1 and last["output"].shape[0] == len(tiny_data.classes)
    d, i = head.locate(len(head) - 1)
    assert (d, i) == (len(datasets) - 1, len(datasets[-1]) - 1)
    assert head.get_crop_class_matrix().shape == (len(datasets), len(tiny_data.classes))
    weights = head.class_weights
    assert set(weights) == set(tiny_data.classes) and all(w > 0 for w in weights.values())
    assert set(head.class_counts["totals"]) == set(tiny_data.classes)
    assert head.validation_indices
    head.set_raw_value_transforms(raw_transforms())
    head.set_target_value_transforms(target_transforms())
    head.set_spatial_transforms(SPATIAL)
    assert all(d.spatial_transforms is not None for d in head.datasets)
    assert head.to("cpu") is head


def test_cellmap_subset_forwards_dataset_members(tiny_data, arrays):
    multi = CellMapMultiDataset(_datasets(tiny_data, arrays), tiny_data.classes, None, None)
    subset = CellMapSubset(multi, [0, 5, 9])
    assert isinstance(subset, torch.utils.data.Subset) and len(subset) == 3
    assert subset.classes == multi.classes and subset.input_arrays == multi.input_arrays
    assert subset.target_arrays == multi.target_arrays
    assert subset.class_weights == multi.class_weights
    assert subset[1]["idx"].item() == 5
    assert subset.to("cpu") is subset
    subset.set_raw_value_transforms(None)  # forwarded setter
    loader = CellMapDataLoader(subset, batch_size=2, is_train=False)
    assert sorted(torch.cat([b["idx"] for b in loader]).tolist()) == [0, 5, 9]


# -- 8./9. loader and sampler ----------------------------------------------------------------
def test_loader_training_and_validation_call_forms(tiny_data, arrays):
    multi = CellMapMultiDataset(_datasets(tiny_data, arrays, spatial_transforms=SPATIAL), tiny_data.classes, None, None)
    # the toolbox's training loader (with torch DataLoader keywords passed through)
    train = CellMapDataLoader(multi.to("cpu"), classes=tiny_data.classes, batch_size=3, iterations_per_epoch=4,
                              weighted_sampler=True, device="cpu", is_train=True, num_workers=2, pin_memory=False,
                              persistent_workers=True, prefetch_factor=2, rng=torch.Generator().manual_seed(1))
    assert len(train) == 4
    batches = list(train.loader)
    assert len(batches) == 4 and batches[0]["input"].shape == (3, 1, 8, 8, 8)
    assert batches[0]["output"].shape == (3, len(tiny_data.classes), 8, 8, 8)
    assert set(train.dataset.class_weights) == set(tiny_data.classes)
    train.refresh()
    assert len(list(iter(train))) == 4
    assert train.to("cpu") is train and train.to("cpu", non_blocking=True) is train
    # positional form: (dataset, classes, batch_size, num_workers, weighted_sampler, sampler,
    #                   is_train, rng, device, iterations_per_epoch)
    positional = CellMapDataLoader(multi, tiny_data.classes, 2, 0, False, None, False, None, "cpu", 3)
    assert len(positional) == 3 and len(list(positional)) == 3
    # validation over tiles, unshuffled
    blocks = CellMapSubset(multi, multi.validation_indices[:5])
    val = CellMapDataLoader(blocks, classes=tiny_data.classes, batch_size=2, is_train=False, device="cpu")
    assert sorted(torch.cat([b["idx"] for b in val]).tolist()) == sorted(multi.validation_indices[:5])


def test_loader_metadata_indexing_and_collate(tiny_data, arrays):
    multi = CellMapMultiDataset(_datasets(tiny_data, arrays), tiny_data.classes, None, None)
    loader = CellMapDataLoader(multi, batch_size=4, iterations_per_epoch=2, return_metadata=True,
                               tensorstore_cache_bytes=256 << 20)
    try:
        batch = next(iter(loader))
        meta = batch["__metadata__"]
        assert isinstance(meta, list) and len(meta) == 4 and all(isinstance(m, dict) for m in meta)
        for m, g in zip(meta, batch["idx"].tolist()):
            d, i = multi.locate(g)
            assert m["current_idx"] == i and m["raw_path"] == multi.datasets[d].raw_path
            assert m["current_center"] == pytest.approx(multi.datasets[d].get_center(i))
        assert "__metadata__" not in next(iter(CellMapDataLoader(multi, batch_size=2, iterations_per_epoch=1)))
        # the older library's loader[indices]
        picked = loader[[0, len(multi) - 1]]
        assert picked["idx"].tolist() == [0, len(multi) - 1] and picked["input"].shape == (2, 1, 8, 8, 8)
        assert len(picked["__metadata__"]) == 2
        single = loader[3]
        assert single["idx"].tolist() == [3]
        # collate_fn stacks items and keeps metadata as a list
        items = [{"a": torch.zeros(2), "__metadata__": {"k": i}} for i in range(3)]
        collated = CellMapDataLoader.collate_fn(items)
        assert collated["a"].shape == (3, 2) and collated["__metadata__"] == [{"k": 0}, {"k": 1}, {"k": 2}]
        torch_loader = torch.utils.data.DataLoader(multi, batch_size=2, collate_fn=loader.collate_fn)
        assert next(iter(torch_loader))["input"].shape == (2, 1, 8, 8, 8)
    finally:
        cellmap_data._engine.set_cache_budget(2 << 30)


def test_class_balanced_sampler_with_torch_dataloader(tiny_data, arrays):
    multi = CellMapMultiDataset(_datasets(tiny_data, arrays), tiny_data.classes, None, None)
    sampler = ClassBalancedSampler(multi, samples_per_epoch=12)
    assert len(sampler) == 12
    first = list(sampler)
    assert len(first) == 12 and all(0 <= i < len(multi) for i in first)
    assert list(ClassBalancedSampler(multi, 12, seed=42)) == first  # positional, default seed 42
    loader = torch.utils.data.DataLoader(multi, batch_size=4, sampler=ClassBalancedSampler(multi, 8),
                                         collate_fn=CellMapDataLoader.collate_fn)
    assert [b["input"].shape[0] for b in loader] == [4, 4]
    via_loader = CellMapDataLoader(multi, batch_size=3, sampler=ClassBalancedSampler(multi, 6), is_train=True)
    assert len(list(via_loader)) == 2


# -- 10. datasplit ----------------------------------------------------------------------------
def _check_split(split, tiny_data):
    assert split.train_datasets and split.validation_datasets
    assert isinstance(split.train_datasets_combined, CellMapMultiDataset)
    assert isinstance(split.validation_datasets_combined, CellMapMultiDataset)
    blocks = split.validation_blocks
    assert isinstance(blocks, CellMapSubset) and len(blocks) > 0
    assert set(split.class_counts) == {"train", "validate"}
    item = split.train_datasets_combined[0]
    assert item["output"].shape[0] == len(tiny_data.classes)


def test_datasplit_from_csv_dict_and_datasets(tiny_data):
    inputs = {"input": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}
    targets = {"output": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}
    # the toolbox's call
    from_csv = CellMapDataSplit(
        input_arrays=inputs, target_arrays=targets, classes=tiny_data.classes, pad=True, csv_path=str(tiny_data.csv_path),
        train_raw_value_transforms=raw_transforms(), val_raw_value_transforms=raw_transforms(),
        target_value_transforms=target_transforms(), spatial_transforms=SPATIAL, device="cpu", class_relation_dict=None,
    )
    _check_split(from_csv, tiny_data)
    assert all(d.spatial_transforms is not None for d in from_csv.train_datasets)
    assert all(d.spatial_transforms is None for d in from_csv.validation_datasets)
    dataset_dict = CellMapDataSplit.from_csv(tiny_data.csv_path)
    assert set(dataset_dict) == {"train", "validate"} and {"raw", "gt"} <= set(dataset_dict["train"][0])
    from_dict = CellMapDataSplit(inputs, targets, tiny_data.classes, True, dataset_dict=dataset_dict)
    _check_split(from_dict, tiny_data)
    from_datasets = CellMapDataSplit(inputs, targets, tiny_data.classes,
                                     datasets={"train": from_dict.train_datasets, "validate": from_dict.validation_datasets})
    _check_split(from_datasets, tiny_data)
    assert from_datasets.datasets["train"] == from_dict.train_datasets
    # nothing to build from: an empty split, as the reference builds, filled later by construct()
    empty = CellMapDataSplit(inputs, targets, tiny_data.classes)
    assert empty.train_datasets == [] and empty.validation_datasets == [] and len(empty.train_datasets_combined) == 0
    assert CellMapDataSplit().classes == [] and CellMapDataSplit().datasets == {"train": [], "validate": []}
    empty.construct(from_dict.dataset_dict)
    assert len(empty.train_datasets) == len(from_dict.train_datasets)


def test_datasplit_older_dialect_and_setters(tiny_data):
    inputs = {"input": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}
    targets = {"output": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}
    # older positional order: (input_arrays, target_arrays, classes, empty_value, pad, ...)
    old = CellMapDataSplit(inputs, targets, tiny_data.classes, -1.0, True, None, None, str(tiny_data.csv_path))
    assert old.pad is True and all(d.empty_value == -1.0 for d in old.train_datasets)
    old_kw = CellMapDataSplit(input_arrays=inputs, target_arrays=targets, classes=tiny_data.classes, empty_value=math.nan,
                              pad="train", csv_path=tiny_data.csv_path, context=None, force_has_data=True)
    assert all(d.pad for d in old_kw.train_datasets) and not any(d.pad for d in old_kw.validation_datasets)
    split = old
    marker_train, marker_val = (lambda x: x * 0 + 1), (lambda x: x * 0 + 2)
    split.set_raw_value_transforms(marker_train, marker_val)
    assert split.train_datasets_combined[0]["input"].eq(1).all()
    assert split.validation_datasets_combined[0]["input"].eq(2).all()
    split.set_target_value_transforms(target_transforms())
    split.set_spatial_transforms(SPATIAL)
    assert all(d.spatial_transforms is not None for d in split.train_datasets)
    split.set_spatial_transforms(SPATIAL, SPATIAL)  # (train_transforms, val_transforms)
    assert all(d.spatial_transforms is not None for d in split.validation_datasets)
    split.set_arrays({"output": {"shape": (4, 4, 4), "scale": (8, 8, 8)}}, "target", "validate")
    assert split.validation_datasets_combined[0]["output"].shape[1:] == (4, 4, 4)
    split.verify_datasets()
    assert split.to("cpu") is split
    split.construct(CellMapDataSplit.from_csv(tiny_data.csv_path))
    assert split.train_datasets


# -- 11./12. writer ---------------------------------------------------------------------------
def test_dataset_writer_challenge_call_form(tiny_data, tmp_path):
    CellMapDatasetWriter, _ = _writer_classes()
    ds = tiny_data.datasets[0]
    inputs = {"input": {"shape": (8, 16, 16), "scale": (8, 8, 8)}}
    targets = {"output": {"shape": (8, 16, 16), "scale": (8, 8, 8)}}
    lo = [t - v / 2 for t, v in zip(ds.raw_translation, ds.raw_voxel_size)]
    bounds = {"output": {a: [lo[k] + 64, lo[k] + 64 + 160] for k, a in enumerate("zyx")}}
    target_path = str(tmp_path / "pred.zarr" / "recon-1" / "predictions")
    classes = ["mito", "er"]
    writer = CellMapDatasetWriter(str(ds.raw_path), target_path, classes, inputs, targets, bounds, True, "cpu",
                                  raw_transforms(), ["er", "mito", "nuc"])
    assert len(writer) > 0 and writer.verify()
    assert writer.get_center(0).keys() == {"z", "y", "x"}
    for batch in writer.loader(batch_size=2):
        assert batch["input"].shape[1:] == (1, 8, 16, 16)
        n = batch["idx"].shape[0]
        writer[batch["idx"]] = {"output": torch.ones(n, 3, 8, 16, 16)}
    writer.close()
    assert os.path.isdir(os.path.join(target_path, "mito")) and os.path.isdir(os.path.join(target_path, "er"))
    # the current keywords, the older ones (swallowed or used) and to()
    older = CellMapDatasetWriter(
        raw_path=str(ds.raw_path), target_path=str(tmp_path / "old.zarr" / "pred"), classes=classes,
        input_arrays=inputs, target_arrays=targets, target_bounds=bounds, raw_value_transforms=None, axis_order="zyx",
        context=None, rng=None, empty_value=0, overwrite=False, device=None,
    )
    assert older.to("cpu") is older
    older.close()


def test_dataset_writer_older_positional_order(tiny_data, tmp_path):
    CellMapDatasetWriter, _ = _writer_classes()
    ds = tiny_data.datasets[0]
    inputs = {"input": {"shape": (8, 16, 16), "scale": (8, 8, 8)}}
    targets = {"output": {"shape": (8, 16, 16), "scale": (8, 8, 8)}}
    lo = [t - v / 2 for t, v in zip(ds.raw_translation, ds.raw_voxel_size)]
    bounds = {"output": {a: [lo[k] + 64, lo[k] + 64 + 160] for k, a in enumerate("zyx")}}
    marker = lambda x: x * 0 + 3  # noqa: E731
    writer = CellMapDatasetWriter(str(ds.raw_path), str(tmp_path / "old.zarr" / "pred"), ["mito"], inputs, targets,
                                  bounds, marker, "zyx", None, None, 0, False, None)
    assert writer.raw_value_transforms is marker and writer.overwrite is False
    assert writer[0]["input"].eq(3).all()


def test_image_writer_reference_signature(tmp_path):
    _, ImageWriter = _writer_classes()
    bbox = {"z": (0.0, 64.0), "y": (0.0, 64.0), "x": (0.0, 64.0)}
    # (path, target_class, scale, bounding_box, write_voxel_shape, scale_level, axis_order, context,
    #  overwrite, dtype, fill_value)
    writer = ImageWriter(str(tmp_path / "out.zarr" / "mito"), "mito", {"z": 8, "y": 8, "x": 8}, bbox,
                         {"z": 4, "y": 4, "x": 4}, 0, "zyx", None, True, torch.float32, 0)
    center = {"z": 16.0, "y": 16.0, "x": 16.0}
    writer[center] = torch.full((4, 4, 4), 5.0)
    assert torch.equal(writer[center], torch.full((4, 4, 4), 5.0))
    writer.close()


# -- 14. utilities ----------------------------------------------------------------------------
def test_utils_reference_call_forms():
    template, classes = split_target_path("/d/x.zarr/recon-1/labels/groundtruth/crop234/[ecs,mito]")
    assert template.format(label="mito").endswith("crop234/mito") and classes == ["ecs", "mito"]
    assert is_array_2D({"shape": (128, 128), "scale": (8, 8)}) is True
    nested = {"a": {"shape": (1, 128, 128), "scale": (8, 8, 8)}, "b": {"shape": (128, 128), "scale": (8, 8)}}
    assert is_array_2D(nested) == {"a": False, "b": True} and is_array_2D(nested, summary=any) is True
    assert array_has_singleton_dim(nested) is True
    assert array_has_singleton_dim(nested, summary=False) == {"a": True, "b": False}
    assert array_has_singleton_dim({"shape": (1, 8, 8), "scale": (8, 8, 8)})
    assert get_sliced_shape((128, 128), 0) == [1, 128, 128] and get_sliced_shape((1, 128, 128), 2) == [128, 128, 1]
    specs = {"input": {"shape": (1, 64, 64), "scale": (8, 8, 8)}}
    permute_singleton_dimension(specs, 1)
    assert list(specs["input"]["shape"]) == [64, 1, 64]
    assert longest_common_substring("train_mito_loss", "val_mito_loss") == "_mito_loss"
    assert torch_max_value(torch.uint8) == 255 and torch_max_value(torch.float32) == 1
    # current form (n, k, replacement=False, rng=None) and older form (size, num_samples, rng)
    current = min_redundant_inds(5, 12, False, torch.Generator().manual_seed(0))
    older = min_redundant_inds(5, 12, torch.Generator().manual_seed(0))
    assert torch.equal(current, older) and sorted(current[:5].tolist()) == list(range(5))
    assert len(min_redundant_inds(5, 7, replacement=True)) == 7


def test_get_fig_dict_on_a_loader_batch(tiny_data, arrays_2d, crop):
    pytest.importorskip("matplotlib")
    ds, c = crop
    dataset = CellMapDataset(str(ds.raw_path), c.target_path, tiny_data.classes, *arrays_2d, pad=True)
    batch = next(iter(CellMapDataLoader(dataset, batch_size=2, iterations_per_epoch=1)))
    assert batch["input"].shape == (2, 1, 16, 16) and batch["output"].shape == (2, len(tiny_data.classes), 16, 16)
    figures = get_fig_dict(batch["input"], batch["output"], torch.sigmoid(torch.randn_like(batch["output"])),
                           tiny_data.classes)
    assert set(figures) == set(tiny_data.classes)
    assert all(hasattr(f, "savefig") for f in figures.values())
