"""The CellMap segmentation challenge's pipeline, driven through ``tests/challenge_driver.py``.

The driver makes the challenge toolbox's calls in the toolbox's forms (datasplit CSV ->
``CellMapDataSplit`` -> validation and weighted training loaders -> a few steps of a
class-weighted, NaN-masked BCE loss -> tiled prediction with ``CellMapDatasetWriter``, 3D and
orthoplane 2D -> thresholding ``process``) on the tiny synthetic data.  What is checked is
what the challenge relies on: batch shapes, finite losses, the reference's class-weight
numbers, outputs on exactly the ground-truth crop's grid (OME-NGFF translation = corner of
voxel 0 = lower bound of the writer's bounds, same voxel size, same shape), and predictions
that read back (zarr-python and ``CellMapImage``) as what the model produced at those voxels.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import challenge_driver as csc
from cellmap_data import CellMapDataLoader, CellMapDataSplit, CellMapImage

# "lyso" is annotated in no crop: the challenge requests classes some crops (or all) lack.
CLASSES = ["mito", "er", "nuc", "lyso"]
# The toolbox builds mutual exclusions as sets of class names; these organelles never overlap.
RELATIONS = {c: {o for o in CLASSES if o != c} for c in CLASSES}
LOADER_KWARGS = {"num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 2}
SPATIAL_3D = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.5}},
    "transpose": {"axes": ["x", "y", "z"]},
    "rotate": {"axes": {"x": [-180, 180], "y": [-180, 180], "z": [-180, 180]}},
}
SPATIAL_2D = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5}},
    "transpose": {"axes": ["x", "y"]},
    "rotate": {"axes": {"x": [-180, 180], "y": [-180, 180]}},
}
SPEC_3D = {"shape": (16, 16, 16), "scale": (4, 4, 4)}
SPEC_2D = {"shape": (32, 32), "scale": (4, 4)}
BATCH = 2
ITERATIONS = 3


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def fresh_torch_seed():
    """torch's default seed path: a fresh random 64-bit seed, as at interpreter start (no
    small ``manual_seed``); the global state is restored afterwards."""
    state, initial = torch.get_rng_state(), torch.initial_seed()
    yield torch.seed()
    torch.manual_seed(initial)
    torch.set_rng_state(state)


def _usage_of(data):
    usage = {os.path.normpath(str(crop.path)): crop.usage for crop in data.crops}
    return lambda crop_path: usage[os.path.normpath(crop_path)]


def _write_csv(data, path, separator_before_bracket=True):
    return csc.make_datasplit_csv(
        CLASSES, csc.search_path_for(data.root), path, _usage_of(data), separator_before_bracket=separator_before_bracket
    )


def _crop(data, name):
    return next(c for c in data.crops if c.name == name)


def _dataset_of(data, crop):
    return next(d for d in data.datasets if crop in d.crops)


def _multiscale_level0(group_path):
    attrs = json.loads((Path(group_path) / ".zattrs").read_text())
    first = attrs["multiscales"][0]["datasets"][0]
    transforms = {t["type"]: t for t in first["coordinateTransformations"]}
    return first["path"], transforms["scale"]["scale"], transforms["translation"]["translation"]


def _assert_same_grid(written_group, gt_meta, what):
    """The written class group is on the ground-truth crop's grid (zarr-python + OME-NGFF attrs)."""
    level, scale, translation = _multiscale_level0(written_group)
    array = zarr.open_array(str(Path(written_group) / level), mode="r")
    assert list(map(float, scale)) == pytest.approx(gt_meta["voxel_size"]), f"{what}: voxel size"
    assert list(map(float, translation)) == pytest.approx(gt_meta["translation"], abs=1e-6), (
        f"{what}: OME-NGFF translation {translation} is not the ground truth's {gt_meta['translation']} "
        "(translation = corner of voxel 0 = lower bound of the writer bounds)"
    )
    assert list(array.shape) == gt_meta["shape"], f"{what}: array shape"
    return array[...]


def _raw_under_crop(dataset, gt_meta):
    """Raw s0 voxels under the crop (zarr-python), for a crop on the raw s0 grid."""
    level, scale, translation = _multiscale_level0(dataset.raw_path)
    assert list(map(float, scale)) == gt_meta["voxel_size"], "the crop chosen must share the raw s0 voxel size"
    offset = (np.array(gt_meta["translation"]) - np.array(translation, dtype=float)) / np.array(scale, dtype=float)
    assert np.allclose(offset, np.round(offset)), "the crop chosen must lie on the raw s0 grid"
    start = np.round(offset).astype(int)
    raw = zarr.open_array(str(Path(dataset.raw_path) / level), mode="r")
    region = tuple(slice(s, s + n) for s, n in zip(start, gt_meta["shape"]))
    return raw[region].astype(np.float32)


def _expected_class_weights(data, scale=(4.0, 4.0, 4.0)):
    """The reference's formula, computed from the zarr data: over training crops, per class,
    fg = non-zero s0 voxels and total = s0 voxels, both in training-resolution voxels
    (× s0 voxel volume / training voxel volume); weight = max(total - fg, 0) / max(fg, 1); a
    class no training crop annotates has total = fg = 0, so weight 0.

    The reference rounds each axis of the crop and truncates the scaled foreground when it
    converts to training-resolution voxels; this package scales exactly (docs/migrating.md),
    which moves weights of anisotropic crops by well under 1 %."""
    fg = dict.fromkeys(CLASSES, 0.0)
    total = dict.fromkeys(CLASSES, 0.0)
    for crop in data.crops:
        if crop.usage != "train":
            continue
        for c in CLASSES:
            if c not in crop.classes:
                continue
            s0 = zarr.open_array(str(crop.path / c / "s0"), mode="r")[...]
            factor = float(np.prod(crop.voxel_size) / np.prod(scale))
            fg[c] += np.count_nonzero(s0) * factor
            total[c] += s0.size * factor
    return {c: max(total[c] - fg[c], 0.0) / max(fg[c], 1.0) for c in CLASSES}


def _pointwise_3d():
    return torch.nn.Conv3d(1, len(CLASSES), kernel_size=1)


def _pointwise_2d():
    return torch.nn.Conv2d(1, len(CLASSES), kernel_size=1)


def _apply(model, raw, conv_dims):
    """The model on a whole raw region (a pointwise model, so tiling cannot change it)."""
    x = torch.from_numpy(raw)
    with torch.no_grad():
        if conv_dims == 3:
            return model(x[None, None])[0].numpy()
        return model(x[:, None]).permute(1, 0, 2, 3).numpy()  # z-slices -> [C, z, y, x]


# ----------------------------------------------------------------------------- datasplit


def test_datasplit_csv_in_the_toolbox_forms(tiny_data, tmp_path):
    rows = _write_csv(tiny_data, tmp_path / "datasplit.csv")
    lines = (tmp_path / "datasplit.csv").read_text().splitlines()
    assert len(lines) == len(rows) == len(tiny_data.crops)
    for line, row in zip(lines, rows):
        crop = next(c for c in tiny_data.crops if line.startswith(f'"{c.usage}"') and f"/{c.name}/[" in line)
        container = os.path.normpath(str(_dataset_of(tiny_data, crop).zarr_path))
        wanted = [c for c in CLASSES if c in crop.classes]
        gt = f"recon-1/labels/groundtruth/{crop.name}/[{','.join(wanted)}]"
        assert row == [crop.usage, container, "recon-1/em/fibsem-uint8", container, gt]
        assert line == ",".join(f'"{v}"' for v in row)
        assert list(csv.reader([line]))[0] == row
    _write_csv(tiny_data, tmp_path / "no_separator.csv", separator_before_bracket=False)
    assert all("/crop" in r[4] and "/[" not in r[4] for r in csv.reader(open(tmp_path / "no_separator.csv")))

    def split(path):
        return CellMapDataSplit(
            input_arrays={"input": SPEC_3D}, target_arrays={"output": SPEC_3D}, classes=CLASSES, pad=True,
            csv_path=str(path), train_raw_value_transforms=csc.default_raw_value_transforms(),
            val_raw_value_transforms=csc.default_raw_value_transforms(),
            target_value_transforms=csc.default_target_value_transforms(), spatial_transforms=SPATIAL_3D,
            device="cpu", class_relation_dict=RELATIONS,
        )

    with_sep, without_sep = split(tmp_path / "datasplit.csv"), split(tmp_path / "no_separator.csv")
    n_train = sum(c.usage == "train" for c in tiny_data.crops)
    # Datasets come in CSV row order; a row annotates the classes in its brackets.
    expected = {
        usage: np.array([[c in row[4].split("[")[1].rstrip("]").split(",") for c in CLASSES] for row in rows if row[0] == usage])
        for usage in ("train", "validate")
    }
    for name, s in (("crop/[...]", with_sep), ("crop[...]", without_sep)):
        assert len(s.train_datasets) == n_train, name
        assert len(s.validation_datasets) == len(tiny_data.crops) - n_train, name
        np.testing.assert_array_equal(s.train_datasets_combined.get_crop_class_matrix(), expected["train"], err_msg=name)
        np.testing.assert_array_equal(s.validation_datasets_combined.get_crop_class_matrix(), expected["validate"], err_msg=name)
    # Same data either way: the first validation batch is identical (NaN where unannotated).
    a = next(iter(CellMapDataLoader(with_sep.validation_blocks, classes=CLASSES, batch_size=2, is_train=False)))
    b = next(iter(CellMapDataLoader(without_sep.validation_blocks, classes=CLASSES, batch_size=2, is_train=False)))
    torch.testing.assert_close(a["input"], b["input"], equal_nan=True)
    torch.testing.assert_close(a["output"], b["output"], equal_nan=True)


# ----------------------------------------------------------------------------- class weights


def test_class_weights_are_the_reference_numbers(tiny_data, tmp_path):
    """``train_loader.dataset.class_weights`` becomes the loss's ``pos_weight``: its numbers
    are the reference's (see ``_expected_class_weights``)."""
    csv_path = tmp_path / "datasplit.csv"
    _write_csv(tiny_data, csv_path)
    train_loader, _, _ = csc.get_dataloader(
        csv_path, CLASSES, BATCH, SPEC_3D, SPEC_3D, iterations_per_epoch=ITERATIONS, device="cpu", **LOADER_KWARGS
    )
    weights = train_loader.dataset.class_weights
    expected = _expected_class_weights(tiny_data)
    assert list(weights) == CLASSES
    assert weights["lyso"] == 0.0, "a class no training crop annotates weighs 0"
    assert {c: pytest.approx(expected[c], rel=1e-6) for c in CLASSES} == weights


# ----------------------------------------------------------------------------- 3D


def test_challenge_3d_pipeline(tiny_data, tmp_path, fresh_torch_seed):
    csv_path = tmp_path / "datasplit.csv"
    _write_csv(tiny_data, csv_path)
    # No torch.manual_seed here: the loaders take torch's (large, random) default seed.
    train_loader, val_loader, _ = csc.get_dataloader(
        csv_path, CLASSES, BATCH, SPEC_3D, SPEC_3D, spatial_transforms=SPATIAL_3D,
        iterations_per_epoch=ITERATIONS, random_validation=True, device="cpu",
        class_relation_dict=RELATIONS, **LOADER_KWARGS,
    )
    assert val_loader is not None
    assert len(train_loader.loader) == ITERATIONS  # iterations_per_epoch counts batches

    weights = train_loader.dataset.class_weights
    assert list(weights) == CLASSES, "pos_weight is built from the values in class order"
    assert all(np.isfinite(list(weights.values()))), weights

    shapes = []

    def check(batch):
        shapes.append((tuple(batch["input"].shape), tuple(batch["output"].shape)))
        assert batch["input"].dtype == torch.float32 and batch["output"].dtype == torch.float32
        assert torch.isfinite(batch["input"]).all(), "NaNtoNum leaves no NaN in the input"
        known = batch["output"][~torch.isnan(batch["output"])]
        assert ((known == 0) | (known == 1)).all(), "Binarize gives 0/1 targets"

    torch.manual_seed(0)  # the model's initialisation only; the loaders already have their seed
    model = _pointwise_3d()
    result = csc.train(model, train_loader, val_loader, CLASSES, SPEC_3D, SPEC_3D, ITERATIONS, on_batch=check)
    assert len(result["losses"]) == ITERATIONS
    assert all(np.isfinite(result["losses"])), result["losses"]
    assert result["val_scores"] and all(np.isfinite(result["val_scores"])), result["val_scores"]
    assert tuple(result["pos_weight"].shape) == (len(CLASSES), 1, 1, 1)
    assert shapes[:ITERATIONS] == [((BATCH, 1, 16, 16, 16), (BATCH, len(CLASSES), 16, 16, 16))] * ITERATIONS
    assert all(i[1:] == (1, 16, 16, 16) and o[1:] == (len(CLASSES), 16, 16, 16) for i, o in shapes[ITERATIONS:])
    assert result["figures"]

    # Predict crop1 (on the raw s0 grid), both ways the toolbox builds the bounds.
    crop = _crop(tiny_data, "crop1")
    dataset = _dataset_of(tiny_data, crop)
    saved = [c for c in CLASSES if c in crop.classes]
    gt_meta = csc.crop_metadata(crop.path / saved[0])
    bounds_meta = csc.bounds_from_crop_metadata(crop.path / saved[0])
    bounds_image = csc.bounds_from_image(crop.path, saved[0], {"output": SPEC_3D})
    for axis in "zyx":
        assert list(bounds_image["output"][axis]) == pytest.approx(bounds_meta["output"][axis]), (
            f"CellMapImage.bounding_box[{axis!r}] is [translation, translation + shape * voxel]"
        )
    assert bounds_meta["output"]["z"][0] == gt_meta["translation"][0]

    common = {
        "raw_path": str(dataset.raw_path), "classes": saved, "model_classes": CLASSES,
        "input_arrays": {"input": SPEC_3D}, "target_arrays": {"output": SPEC_3D}, "overwrite": True,
        "device": "cpu", "raw_value_transforms": csc.default_raw_value_transforms(),
    }
    pred_a = tmp_path / "predictions" / f"{dataset.name}.zarr" / crop.name
    pred_b = tmp_path / "predictions_b" / f"{dataset.name}.zarr" / crop.name
    record = []
    csc.predict(model, {**common, "target_path": str(pred_a), "target_bounds": bounds_meta, "writer_model_classes": True}, 4, record=record)
    csc.predict(model, {**common, "target_path": str(pred_b), "target_bounds": bounds_image}, 4)
    assert sorted(p.name for p in pred_a.iterdir() if not p.name.startswith(".")) == sorted(saved)

    raw = _raw_under_crop(dataset, gt_meta)
    wanted = _apply(model, raw, 3)  # [model class, z, y, x]
    written = {}
    for c in saved:
        a = _assert_same_grid(pred_a / c, gt_meta, f"prediction {c} (bounds from metadata)")
        b = _assert_same_grid(pred_b / c, gt_meta, f"prediction {c} (bounds from CellMapImage)")
        np.testing.assert_array_equal(a, b, err_msg=f"{c}: the two bounds give different predictions")
        np.testing.assert_allclose(
            a, wanted[CLASSES.index(c)], rtol=1e-5, atol=1e-3,
            err_msg=f"{c}: written voxels are not the model on the raw voxels under them",
        )
        written[c] = a

    # Each tile the model produced is in the array at its tile's voxels (zarr-python), and
    # CellMapImage reads it back at the tile centre.
    tile = SPEC_3D["shape"]
    images = {c: CellMapImage(str(pred_a / c), c, SPEC_3D["scale"], tile, pad=True, pad_value=0) for c in saved}
    assert record
    for idx, centre, tensor in record:
        start = csc.tile_start(centre, tile, SPEC_3D["scale"], gt_meta["translation"])
        region = tuple(slice(s, s + n) for s, n in zip(start, tile))
        for k, c in enumerate(saved):
            np.testing.assert_allclose(written[c][region], tensor[k].numpy(), rtol=0, atol=1e-5, err_msg=f"tile {idx} {c}")
            np.testing.assert_allclose(
                images[c][centre].numpy(), tensor[k].numpy(), rtol=0, atol=1e-5,
                err_msg=f"tile {idx} {c}: CellMapImage at the tile centre",
            )

    # process: threshold the predictions into a processed volume on the same grid.
    processed = tmp_path / "processed" / f"{dataset.name}.zarr" / crop.name
    used = csc.process(pred_a, processed, CLASSES, SPEC_3D, SPEC_3D, batch_size=4)
    assert [k["classes"] for k in used] == [[c] for c in saved]
    for c in saved:
        out = _assert_same_grid(processed / c, gt_meta, f"processed {c}")
        np.testing.assert_array_equal(out, (written[c] > 0.5).astype(np.float32), err_msg=f"processed {c}")
        # The submission step reads the processed crop back at the ground-truth grid.
        image = CellMapImage(str(processed / c), c, gt_meta["voxel_size"], gt_meta["shape"], pad=True, pad_value=0)
        assert image._level_info[image.scale_level][0] == "s0"
        centre = {a: gt_meta["translation"][k] + gt_meta["voxel_size"][k] * gt_meta["shape"][k] / 2 for k, a in enumerate("zyx")}
        np.testing.assert_array_equal(image[centre].numpy(), out, err_msg=f"processed {c} read at the crop's centre")


# ----------------------------------------------------------------------------- 2D


def test_challenge_2d_orthoplane_pipeline(tiny_data, tmp_path, fresh_torch_seed):
    csv_path = tmp_path / "datasplit.csv"
    _write_csv(tiny_data, csv_path)
    train_loader, val_loader, _ = csc.get_dataloader(
        csv_path, CLASSES, BATCH, SPEC_2D, SPEC_2D, spatial_transforms=SPATIAL_2D,
        iterations_per_epoch=ITERATIONS, random_validation=True, device="cpu",
        class_relation_dict=RELATIONS, **LOADER_KWARGS,
    )
    shapes = []
    torch.manual_seed(0)
    model = _pointwise_2d()
    result = csc.train(
        model, train_loader, val_loader, CLASSES, SPEC_2D, SPEC_2D, ITERATIONS,
        on_batch=lambda b: shapes.append((tuple(b["input"].shape), tuple(b["output"].shape))),
    )
    assert all(np.isfinite(result["losses"])) and len(result["losses"]) == ITERATIONS, result["losses"]
    assert all(np.isfinite(result["val_scores"])), result["val_scores"]
    assert tuple(result["pos_weight"].shape) == (len(CLASSES), 1, 1)
    assert shapes[:ITERATIONS] == [((BATCH, 1, 32, 32), (BATCH, len(CLASSES), 32, 32))] * ITERATIONS
    assert csc.is_2d_model_config(SPEC_2D)

    crop = _crop(tiny_data, "crop1")
    dataset = _dataset_of(tiny_data, crop)
    saved = [c for c in CLASSES if c in crop.classes]
    gt_meta = csc.crop_metadata(crop.path / saved[0])
    raw = _raw_under_crop(dataset, gt_meta)
    wanted = _apply(model, raw, 2)
    for how, bounds in (
        ("metadata", csc.bounds_from_crop_metadata(crop.path / saved[0])),
        ("image", csc.bounds_from_image(crop.path, saved[0], {"output": SPEC_2D})),
    ):
        target = tmp_path / f"pred2d_{how}" / f"{dataset.name}.zarr" / crop.name
        axes_dir = tmp_path / f"axes_{how}"
        kwargs = {
            "raw_path": str(dataset.raw_path), "target_path": str(target), "classes": saved, "model_classes": CLASSES,
            "input_arrays": {"input": dict(SPEC_2D)}, "target_arrays": {"output": dict(SPEC_2D)},
            "target_bounds": bounds, "overwrite": True, "device": "cpu",
            "raw_value_transforms": csc.default_raw_value_transforms(),
        }
        csc.predict_orthoplanes(model, kwargs, 8, keep_axis_predictions=axes_dir)
        assert kwargs["input_arrays"] == {"input": SPEC_2D}, "the caller's specs are left as they were"
        for c in saved:
            for axis in range(3):
                per_axis = _assert_same_grid(axes_dir / "output.zarr" / str(axis) / c, gt_meta, f"{how}: axis {axis} {c}")
                np.testing.assert_allclose(
                    per_axis, wanted[CLASSES.index(c)], rtol=1e-5, atol=1e-3,
                    err_msg=f"{how}: slices along axis {axis} ({c}) are not the model on the raw voxels under them",
                )
            final = _assert_same_grid(target / c, gt_meta, f"{how}: orthoplane mean {c}")
            np.testing.assert_allclose(final, wanted[CLASSES.index(c)], rtol=1e-5, atol=1e-3, err_msg=f"{how}: mean {c}")


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [2**43 + 1, 2**62 + 12345, 2**64 - 1], ids=["2^43+1", "2^62+12345", "2^64-1"])
def test_loaders_under_large_torch_seeds(tiny_data, tmp_path, seed):
    state, initial = torch.get_rng_state(), torch.initial_seed()
    try:
        torch.manual_seed(seed)
        csv_path = tmp_path / "datasplit.csv"
        _write_csv(tiny_data, csv_path)
        train_loader, val_loader, _ = csc.get_dataloader(
            csv_path, CLASSES, BATCH, SPEC_2D, SPEC_2D, spatial_transforms=SPATIAL_2D,
            iterations_per_epoch=ITERATIONS, random_validation=True, device="cpu", **LOADER_KWARGS,
        )
        for loader, name in ((val_loader, "validation"), (train_loader, "training")):
            batch = next(iter(loader.loader))
            assert tuple(batch["input"].shape)[1:] == (1, 32, 32), name
            assert tuple(batch["output"].shape)[1:] == (len(CLASSES), 32, 32), name
    finally:
        torch.manual_seed(initial)
        torch.set_rng_state(state)
