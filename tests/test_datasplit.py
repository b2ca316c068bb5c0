"""CellMapDataSplit from CSV (5 and 3 columns), dict and datasets; skipped rows are reported."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from cellmap_data import CellMapDataSplit, CellMapMultiDataset, CellMapSubset
from cellmap_data.datasplit import read_datasplit_csv

ARRAYS = dict(input_arrays={"in": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, target_arrays={"out": {"shape": (8, 8, 8), "scale": (8, 8, 8)}})


def test_split_from_five_column_csv(tiny_data):
    split = CellMapDataSplit(classes=list(tiny_data.classes), pad=True, csv_path=str(tiny_data.csv_path), **ARRAYS)
    usages = [c.usage for c in tiny_data.crops]
    assert len(split.train_datasets) == usages.count("train")
    assert len(split.validation_datasets) == usages.count("validate")
    assert isinstance(split.train_datasets_combined, CellMapMultiDataset)
    assert isinstance(split.validation_blocks, CellMapSubset)
    assert set(split.class_counts) == {"train", "validate"}
    frame = split.stats()
    assert set(frame["split"].unique().to_list()) == {"train", "validate"}
    # Training datasets are augmented and transformed; validation ones are not augmented.
    assert split.train_datasets[0].is_train and not split.validation_datasets[0].is_train


def test_three_column_csv_and_comments(tiny_data, tmp_path):
    rows = read_datasplit_csv(tiny_data.csv_path)
    path = tmp_path / "three.csv"
    with path.open("w", newline="") as handle:
        handle.write("# a comment line\n\n")
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL)
        for usage in ("train", "validate"):
            for row in rows[usage]:
                writer.writerow([usage, row["raw"], row["gt"]])
    assert read_datasplit_csv(path) == rows


def test_bad_usage_and_empty_csv_raise(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('"training","a","b"\n')
    with pytest.raises(ValueError, match=r"bad.csv:1.*usage"):
        read_datasplit_csv(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        read_datasplit_csv(empty)
    with pytest.raises(FileNotFoundError):
        read_datasplit_csv(tmp_path / "missing.csv")


def test_unusable_rows_are_reported_not_dropped_silently(tiny_data):
    rows = read_datasplit_csv(tiny_data.csv_path)
    broken = dict(rows["train"][0])
    broken["gt"] = broken["gt"].replace("[", "[nosuchclass,")
    rows["train"].append(broken)
    with pytest.warns(UserWarning, match="nosuchclass"):
        split = CellMapDataSplit(classes=list(tiny_data.classes), pad=True, dataset_dict=rows, **ARRAYS)
    assert len(split.skipped_rows) == 1 and "nosuchclass" in split.skipped_rows[0]["reason"]
    assert len(split.train_datasets) == len(rows["train"]) - 1


def test_split_without_usable_training_rows_raises(tiny_data):
    rows = read_datasplit_csv(tiny_data.csv_path)
    rows["train"] = [{"raw": r["raw"], "gt": r["gt"].replace("[", "[nosuchclass,")} for r in rows["train"]]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable training dataset"):
        CellMapDataSplit(classes=list(tiny_data.classes), pad=True, dataset_dict=rows, **ARRAYS)


def test_split_from_ready_datasets(tiny_data):
    split = CellMapDataSplit(classes=list(tiny_data.classes), pad=True, csv_path=str(tiny_data.csv_path), **ARRAYS)
    again = CellMapDataSplit(classes=list(tiny_data.classes), datasets={"train": split.train_datasets, "validate": split.validation_datasets}, **ARRAYS)
    assert again.train_datasets == split.train_datasets


def test_setters_reach_every_dataset(tiny_data):
    split = CellMapDataSplit(classes=list(tiny_data.classes), pad=True, csv_path=str(tiny_data.csv_path), **ARRAYS)
    split.set_raw_value_transforms(train_transforms=lambda x: x * 0, val_transforms=None)
    assert torch.nan_to_num(split.train_datasets[0][0]["in"]).abs().sum() == 0
    split.set_spatial_transforms({"mirror": {"axes": {"x": 1.0}}})
    assert split.train_datasets[0].spatial_transforms == {"mirror": {"axes": {"x": 1.0}}}
    split.to("cpu")


def test_pad_may_name_one_split(tiny_data):
    split = CellMapDataSplit(classes=list(tiny_data.classes), pad="train", csv_path=str(tiny_data.csv_path),
                             input_arrays={"in": {"shape": (4, 4, 4), "scale": (8, 8, 8)}},
                             target_arrays={"out": {"shape": (4, 4, 4), "scale": (8, 8, 8)}})
    assert all(d.pad for d in split.train_datasets) and not any(d.pad for d in split.validation_datasets)


@pytest.mark.parametrize("config, key", [
    ({"shear": {"x": 1}}, "shear"),
    ({"rotate": {"axes": {"z": ["a", "b"]}}}, "['rotate']['z']"),
    ({"mirror": {"axes": {"t": 0.5}}}, "'t'"),
    ({"rotate": {"axes": {"z": [float("nan"), 1]}}}, "finite"),
])
def test_bad_spatial_config_raises_at_build_naming_the_key(tiny_data, config, key):
    from cellmap_data import CellMapDataset

    d = tiny_data.datasets[0]
    with pytest.raises(ValueError) as info:
        CellMapDataset(str(d.raw_path), d.crops[0].target_path, ["mito"], spatial_transforms=config, pad=True, **ARRAYS)
    assert key in str(info.value)


@pytest.mark.parametrize("dialect, engine_form", [
    ({"mirror": {"axes": {"x": 0.5, "z": True}}}, {"mirror": {"x": 0.5, "z": 1.0}}),
    ({"mirror": {"x": False}}, {"mirror": {"x": 0.0}}),
    ({"mirror": True}, {"mirror": {"z": 0.5, "y": 0.5, "x": 0.5}}),
    ({"transpose": {"axes": ("x", "y")}}, {"transpose": ["x", "y"]}),
    ({"transpose": True}, {"transpose": ["z", "y", "x"]}),
    ({"transpose": False}, {"transpose": []}),
    ({"rotate": {"axes": {"z": 45}}}, {"rotate": {"z": [-45, 45]}}),
    ({"rotate": {"z": [-10, 30], "y": -15}}, {"rotate": {"z": [-10, 30], "y": [-15, 15]}}),
    ({"shear": {"x": 1}}, {"shear": {"x": 1}}),
    (None, None),
])
def test_reference_spatial_dialects_translate_to_the_engine_form(dialect, engine_form):
    from cellmap_data._config import spatial_transforms_engine_form

    assert spatial_transforms_engine_form(dialect) == engine_form


def test_nested_and_flat_dialects_draw_the_same_batches(tiny_data):
    from cellmap_data import CellMapDataset

    d = tiny_data.datasets[0]
    nested = {"mirror": {"axes": {"x": 0.5}}, "rotate": {"axes": {"z": 30}}, "transpose": {"axes": ["x", "y"]}}
    flat = {"mirror": {"x": 0.5}, "rotate": {"z": [-30, 30]}, "transpose": ["x", "y"]}
    batches = []
    for config in (nested, flat):
        ds = CellMapDataset(str(d.raw_path), d.crops[0].target_path, ["mito"], spatial_transforms=config, pad=True,
                            seed=3, **ARRAYS)
        batches.append([ds[i] for i in range(4)])
    for a, b in zip(*batches):
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), equal_nan=True), key
