"""Per-class sample metadata. The plan's ``annotated_<class>`` and ``weight_<class>`` agree with
``split.stats()`` and ``class_weights``; the delivered ``foreground_<class>``,
``fraction_<class>`` and ``unknown_<class>`` (counted by the engine as it writes the targets)
agree with counts over the tensors the loader yielded, for plain, rotated and elastic draws
with padding, in ``consumed_metadata()``, the Arrow record batches and ``__metadata__``."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from cellmap_data import CellMapDataLoader, CellMapDataSplit

CLASSES = ["mito", "er", "nuc", "ecs", "pm"]
RELATIONS = {"ecs": ["mito", "nuc"], "pm": ["er"]}
DRAWS = {
    "plain": None,
    "rotated": {"mirror": {"axes": {"x": 0.5}}, "rotate": {"axes": {"z": [-180, 180]}}},
    "elastic": {"rotate": {"axes": {"z": [-90, 90], "x": [-20, 20]}},
                "elastic": {"control_point_spacing": [64, 64, 64], "jitter_sigma": [6, 6, 6]}},
}


def related(c):
    """Classes exclusive with ``c``: the relation dict is read both ways."""
    return set(RELATIONS.get(c, [])) | {k for k, v in RELATIONS.items() if c in v}


def split_of(data, draw, shape=(16, 16, 16), **kwargs):
    return CellMapDataSplit(
        input_arrays={"raw": {"shape": shape, "scale": (4, 4, 4)}},
        target_arrays={"gt": {"shape": shape, "scale": (4, 4, 4)}},
        classes=CLASSES, csv_path=data.csv_path, pad=True, spatial_transforms=DRAWS[draw],
        class_relation_dict=RELATIONS, **kwargs,
    )


def loader_of(split, **kwargs):
    return CellMapDataLoader(split.train_datasets_combined, classes=CLASSES, batch_size=4, iterations_per_epoch=6,
                             weighted_sampler=True, seed=3, num_workers=2, **kwargs)


def test_the_plan_says_which_classes_each_crop_annotates_and_their_weights(tiny_data):
    split = split_of(tiny_data, "rotated")
    loader = loader_of(split)
    plan = loader.epoch_metadata()
    stats = split.stats().filter(pl.col("split") == "train")
    annotated = {(crop, c) for crop, c in stats.filter("annotated").select("crop", "class").iter_rows()}
    weights = split.train_datasets_combined.class_weights
    assert plan.height == 24
    for row in plan.iter_rows(named=True):
        crop = row["crop"].rsplit("/[", 1)[0]  # the dataset's target path names the crop group
        for c in CLASSES:
            if (crop, c) in annotated:
                expected = "annotated"
            elif any((crop, r) in annotated for r in related(c)):
                expected = "inferred"
            else:
                expected = "unknown"
            assert row[f"annotated_{c}"] == expected, (crop, c)
            assert row[f"weight_{c}"] == pytest.approx(weights[c])
    states = set(plan.select(pl.concat_list(pl.col("^annotated_.*$")).alias("s")).explode("s")["s"].to_list())
    assert states == {"annotated", "inferred", "unknown"}


@pytest.mark.parametrize("draw", sorted(DRAWS))
def test_delivered_counts_are_the_counts_of_the_delivered_tensors(tiny_data, draw):
    loader = loader_of(split_of(tiny_data, draw), return_metadata=True)
    expected = []
    for batch in loader:
        target = batch["gt"]
        voxels = target[0, 0].numel()
        for sample, meta in zip(target, batch["__metadata__"]):
            row = {}
            for k, c in enumerate(CLASSES):
                foreground = int((sample[k] > 0).sum())
                unknown = int(sample[k].isnan().sum())
                row.update({f"foreground_{c}": foreground, f"fraction_{c}": foreground / voxels,
                            f"unknown_{c}": unknown / voxels})
                # The same numbers travel with each batch's own metadata.
                assert meta[f"foreground_{c}"] == foreground and meta[f"unknown_{c}"] == unknown / voxels
            expected.append(row)
    delivered = loader.consumed_metadata()
    columns = [f"{kind}_{c}" for c in CLASSES for kind in ("foreground", "fraction", "unknown")]
    got = delivered.select(columns).to_dicts()
    assert got == expected
    # Padding and unknown classes show up as unknown voxels; some samples hold foreground.
    assert delivered.select(pl.col("^unknown_.*$")).to_numpy().max() > 0
    assert delivered.select(pl.col("^foreground_.*$")).to_numpy().sum() > 0
    # A class the crop does not label and nothing excludes is unknown everywhere.
    unknown_rows = delivered.filter(pl.col("annotated_nuc") == "unknown")
    assert unknown_rows.height == 0 or set(unknown_rows["unknown_nuc"].to_list()) == {1.0}


def test_arrow_batches_carry_the_counts(tiny_data):
    loader = loader_of(split_of(tiny_data, "rotated"))
    for record in loader.iter_arrow():
        values = record.column("gt").storage.flatten().to_numpy(zero_copy_only=False)
        target = torch.from_numpy(values.reshape(4, len(CLASSES), -1).copy())
        for k, c in enumerate(CLASSES):
            assert record.column(f"foreground_{c}").to_pylist() == (target[:, k] > 0).sum(dim=1).tolist()
    assert loader.consumed_metadata()["foreground_mito"].null_count() == 0


def test_counts_follow_target_transforms_the_engine_runs(tiny_data):
    from cellmap_data.transforms.augment import Binarize

    # A threshold above 1 turns every label to 0: the counts must say so.
    loader = loader_of(split_of(tiny_data, "plain", target_value_transforms=Binarize(1.5)), return_metadata=True)
    for batch in loader:
        assert torch.nansum(batch["gt"]) == 0
    delivered = loader.consumed_metadata()
    assert delivered.select(pl.col("^foreground_.*$")).to_numpy().sum() == 0
