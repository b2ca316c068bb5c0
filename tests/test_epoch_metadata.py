"""An epoch's sample metadata as one Polars table (known before any voxel is read), one metadata
schema everywhere, and batches handed to Arrow consumers through the PyCapsule interface."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapMultiDataset, _engine
from cellmap_data.exceptions import ConfigError

CLASSES = ["mito", "er", "nuc"]
SPATIAL = {"mirror": {"axes": {"x": 0.5}}, "transpose": {"axes": ["x", "y"]}, "rotate": {"axes": {"z": [-30, 30]}}}


@pytest.fixture(scope="module")
def multi(tiny_data):
    datasets = []
    for ds in tiny_data.datasets:
        for crop in ds.crops:
            if crop.usage == "train":
                scale = list(crop.voxel_size)
                datasets.append(CellMapDataset(
                    str(ds.raw_path), crop.target_path, CLASSES,
                    {"input": {"shape": (8, 8, 8), "scale": scale}}, {"output": {"shape": (8, 8, 8), "scale": scale}},
                    pad=True, spatial_transforms=SPATIAL, seed=5,
                ))
    shapes = {tuple(d.engine.sample_shapes[0][1]) for d in datasets}
    assert len(shapes) == 1
    return CellMapMultiDataset(datasets, CLASSES, None, None)


def make_loader(multi, **kwargs):
    return CellMapDataLoader(multi, batch_size=4, num_workers=2, iterations_per_epoch=5, weighted_sampler=True, seed=11, **kwargs)


def test_epoch_metadata_is_what_the_epoch_then_reads(multi):
    loader = make_loader(multi)
    planned = loader.epoch_metadata()
    assert planned.height == 5 * 4 and planned["batch"].to_list() == [b for b in range(5) for _ in range(4)]
    for _ in loader:
        pass
    consumed = loader.consumed_metadata()
    assert consumed.select(planned.columns).equals(planned), "the plan names exactly the samples and draws the epoch read"


def test_epoch_metadata_reads_no_voxel(multi):
    loader = make_loader(multi)
    before = _engine.cache_stats()
    table = loader.epoch_metadata(epoch=3)
    after = _engine.cache_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert table.height == 20
    assert not table.equals(loader.epoch_metadata(epoch=4)), "each epoch draws anew"


def test_consumed_metadata_grows_with_the_batches_taken(multi):
    loader = make_loader(multi)
    iterator = iter(loader)
    next(iterator)
    next(iterator)
    assert loader.consumed_metadata()["batch"].unique().sort().to_list() == [0, 1]
    planned = loader.epoch_metadata(epoch=0).filter(pl.col("batch") < 2)
    assert loader.consumed_metadata().select(planned.columns).equals(planned)


def test_one_metadata_schema_in_batches_and_tables(multi):
    loader = make_loader(multi)
    stream = loader.collection().stream([list(loader.plan_epoch(0)[0])], threads=1, prefetch=1, seed=loader.seed, epoch=0, augment=True)
    batch = next(iter(stream))
    # A batch adds what its targets held; a table adds the classes' weights: the rest is one schema.
    delivered = pl.DataFrame(batch.metadata())
    from_batch = delivered.select(pl.exclude("^(foreground|fraction|unknown)_.*$"))
    planned = loader.epoch_metadata(epoch=0).drop("batch").select(pl.exclude("^weight_.*$"))
    assert from_batch.schema == planned.schema
    assert set(delivered.columns) - set(from_batch.columns) == {f"{k}_{c}" for c in multi.classes
                                                                 for k in ("foreground", "fraction", "unknown")}
    assert planned.schema["transpose_y"] == pl.UInt8 and planned.schema["level_output"] == pl.Int64
    assert planned.schema["value_seed"] == pl.UInt64 and planned.schema["mirror_x"] == pl.Boolean
    assert from_batch.equals(planned.head(4))
    # the rotations the config asks for were drawn, and recorded
    assert planned["rotate_z"].abs().max() <= 30 and planned["rotate_z"].n_unique() > 1


def test_iterable_dataset_hands_back_its_epoch_table(multi):
    iterable = multi.as_iterable(batch_size=4, iterations_per_epoch=3, weighted_sampler=True, seed=2, num_workers=1)
    table = iterable.epoch_metadata()
    seen = torch.cat([b["idx"] for b in iterable]).tolist()
    assert table.height == len(seen) == 12


def test_batches_speak_the_arrow_pycapsule_interface(multi):
    batch = multi.datasets[0].read_batch_raw([0, 1, 2])
    record = pa.record_batch(batch)
    assert record.num_rows == 3 and "input" in record.schema.names and "value_seed" in record.schema.names
    tensor_type = record.schema.field("input").type
    assert isinstance(tensor_type, pa.FixedShapeTensorType) and tensor_type.shape == [1, 8, 8, 8]
    table = pa.table(batch)  # through __arrow_c_stream__
    assert table.num_rows == 3
    frame = pl.DataFrame(batch)
    assert frame.height == 3 and frame["idx"].to_list() == [0, 1, 2]
    # the tensor column's values are the batch's tensors
    values = torch.from_numpy(record.column("input").storage.flatten().to_numpy(zero_copy_only=False).reshape(3, 1, 8, 8, 8))
    torch.testing.assert_close(values, torch.from_dlpack(batch.tensor("input")), equal_nan=True)
    assert batch.value_seeds == record.column("value_seed").to_pylist()


def test_an_epoch_stream_exports_as_an_arrow_stream_of_its_batches(multi):
    # The same epoch read batch by batch and read as one Arrow stream: the same record batches.
    loader = make_loader(multi)
    settings = json.dumps(loader.epoch_settings(0))
    collection = loader.collection()

    def stream():
        return collection.epoch_stream(settings, threads=2, prefetch=2, augment=True)

    expected = [pa.record_batch(batch) for batch in stream()]
    reader = pa.RecordBatchReader.from_stream(stream())
    exported = list(reader)
    assert len(exported) == len(expected) == 5
    def values(column: pa.Array) -> np.ndarray:
        # Tensor and list columns down to their numbers (NaN compares equal to NaN below).
        while not (pa.types.is_primitive(column.type) or pa.types.is_string(column.type)):
            column = column.storage if isinstance(column, pa.ExtensionArray) else column.flatten()
        return column.to_numpy(zero_copy_only=False)

    for got, want in zip(exported, expected):
        assert got.schema.equals(want.schema, check_metadata=True)
        for name in want.schema.names:
            if not got.column(name).equals(want.column(name)):
                np.testing.assert_array_equal(values(got.column(name)), values(want.column(name)), err_msg=name)
    spent = stream()
    pa.RecordBatchReader.from_stream(spent).read_all()
    with pytest.raises(ConfigError, match="read to its end or closed"):
        pa.RecordBatchReader.from_stream(spent)


def test_the_training_loop_converts_no_record_batch(multi, monkeypatch):
    loader = make_loader(multi)

    def refuse(*args, **kwargs):
        raise AssertionError("the hot path converted a record batch to pyarrow")

    monkeypatch.setattr(pa, "record_batch", refuse)
    assert sum(b["input"].shape[0] for b in loader) == 20
