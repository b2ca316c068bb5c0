"""CellMapDataLoader, samplers, Arrow/Polars access, IterableDataset, fork and Ctrl-C."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from cellmap_data import (
    CellMapDataLoader,
    CellMapDataset,
    CellMapIterableDataset,
    CellMapMultiDataset,
    ClassBalancedSampler,
)

AUGMENT = {"mirror": {"axes": {"x": 0.5, "y": 0.5}}, "transpose": {"axes": ["x", "y"]}, "rotate": {"axes": {"z": [-180, 180]}}}


def multi(data, augment=True, shape=(8, 8, 8), **kwargs):
    datasets = []
    for d in data.datasets:
        for crop in d.crops:
            datasets.append(CellMapDataset(
                str(d.raw_path), crop.target_path, data.classes,
                {"raw": {"shape": shape, "scale": (8, 8, 8)}}, {"gt": {"shape": shape, "scale": (8, 8, 8)}},
                pad=True, spatial_transforms=AUGMENT if augment else None, seed=5, **kwargs,
            ))
    return CellMapMultiDataset(datasets, data.classes, None, None)


def collect(loader):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loader]


def test_len_counts_batches_and_shapes(tiny_data):
    loader = CellMapDataLoader(multi(tiny_data), batch_size=3, iterations_per_epoch=7, num_workers=2)
    batches = collect(loader)
    assert len(loader) == 7 == len(batches)
    n_classes = len(tiny_data.classes)
    for b in batches:
        assert b["raw"].shape == (3, 1, 8, 8, 8) and b["gt"].shape == (3, n_classes, 8, 8, 8)
        assert b["idx"].dtype == torch.int64


def test_unweighted_epoch_without_iterations_covers_every_sample_once(tiny_data):
    m = multi(tiny_data, augment=False)
    loader = CellMapDataLoader(m, batch_size=16, is_train=False)
    idx = torch.cat([b["idx"] for b in loader]).tolist()
    assert sorted(idx) == list(range(len(m)))
    assert len(loader) == -(-len(m) // 16)


def test_items_match_dataset_getitem(tiny_data):
    m = multi(tiny_data, augment=False)
    loader = CellMapDataLoader(m, batch_size=4, is_train=False, iterations_per_epoch=3)
    for b in loader:
        for row, g in enumerate(b["idx"].tolist()):
            item = m[g]
            torch.testing.assert_close(b["raw"][row], item["raw"], equal_nan=True, rtol=0, atol=0)
            torch.testing.assert_close(b["gt"][row], item["gt"], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_same_seed_same_batches_at_any_thread_count(tiny_data, threads):
    reference = collect(CellMapDataLoader(multi(tiny_data), batch_size=4, iterations_per_epoch=5, num_workers=1, seed=11))
    got = collect(CellMapDataLoader(multi(tiny_data), batch_size=4, iterations_per_epoch=5, num_workers=threads, seed=11))
    for a, b in zip(reference, got):
        for k in a:
            torch.testing.assert_close(a[k], b[k], equal_nan=True, rtol=0, atol=0)


def test_epochs_differ_and_refresh_redraws(tiny_data):
    loader = CellMapDataLoader(multi(tiny_data), batch_size=4, iterations_per_epoch=4, seed=3)
    first = torch.cat([b["idx"] for b in loader])
    loader.refresh()
    second = torch.cat([b["idx"] for b in loader])
    assert not torch.equal(first, second)
    again = CellMapDataLoader(multi(tiny_data), batch_size=4, iterations_per_epoch=4, seed=3)
    assert torch.equal(torch.cat([b["idx"] for b in again]), first)


def test_weighted_sampler_balances_classes(tiny_data):
    m = multi(tiny_data)
    matrix = m.get_crop_class_matrix()
    loader = CellMapDataLoader(m, batch_size=8, iterations_per_epoch=25, weighted_sampler=True, seed=1)
    plan = [p for batch in loader.plan_epoch(0) for p in batch]
    seen = np.zeros(matrix.shape[1])
    for d, _, _ in plan:
        seen += matrix[d]
    active = matrix.any(axis=0)
    # Least-seen-class sampling keeps every annotated class within a small factor of the others.
    assert seen[active].min() >= 0.3 * seen[active].max()


def test_class_balanced_sampler_with_torch_dataloader(tiny_data):
    m = multi(tiny_data, augment=False)
    sampler = ClassBalancedSampler(m, samples_per_epoch=12, seed=4)
    loader = torch.utils.data.DataLoader(m, batch_size=4, sampler=sampler)
    batches = list(loader)
    assert len(sampler) == 12 and len(batches) == 3
    assert all(0 <= i < len(m) for b in batches for i in b["idx"].tolist())


def test_iter_arrow_and_polars_metadata(tiny_data):
    loader = CellMapDataLoader(multi(tiny_data), batch_size=4, iterations_per_epoch=2, seed=2)
    batches = list(loader.iter_arrow())
    assert len(batches) == 2 and all(isinstance(b, pa.RecordBatch) for b in batches)
    frame = pl.from_arrow(batches[0].drop_columns(["raw", "gt"]))
    assert isinstance(frame, pl.DataFrame)
    for column in ["dataset", "crop", "idx", "centre_z", "centre_y", "centre_x", "mirror_x", "transpose_x", "rotate_z", "value_seed", "level_raw"]:
        assert column in frame.columns, column
    assert frame.height == 4


def test_engine_copies_tensor_columns_into_caller_buffers(tiny_data):
    """The pinned-memory upload path: the engine fills a caller's buffer byte for byte."""
    m = multi(tiny_data, compact_targets=True)
    loader = CellMapDataLoader(m, batch_size=3, iterations_per_epoch=1, seed=6)
    _, stream = loader._begin_epoch()
    try:
        batch = next(iter(stream))
        for name in batch.tensor_names:
            tensor = torch.from_dlpack(batch.tensor(name))
            out = torch.empty_like(tensor)
            batch.copy_tensor_into(name, out.view(torch.uint8).numpy())
            assert torch.equal(out.view(torch.uint8), tensor.view(torch.uint8)), name
        assert {str(torch.from_dlpack(batch.tensor(n)).dtype) for n in batch.tensor_names} == {"torch.float32", "torch.uint8"}
        name = batch.tensor_names[0]
        size = torch.from_dlpack(batch.tensor(name)).view(torch.uint8).numel()
        with pytest.raises(ValueError, match="bytes"):
            batch.copy_tensor_into(name, np.empty(size - 1, dtype=np.uint8))
        read_only = np.empty(size, dtype=np.uint8)
        read_only.flags.writeable = False
        with pytest.raises((ValueError, BufferError)):
            batch.copy_tensor_into(name, read_only)
        with pytest.raises(KeyError, match="nope"):
            batch.copy_tensor_into("nope", np.empty(size, dtype=np.uint8))
    finally:
        stream.close()


def test_metadata_can_ride_along_in_batches(tiny_data):
    loader = CellMapDataLoader(multi(tiny_data), batch_size=2, iterations_per_epoch=1, return_metadata=True)
    batch = next(iter(loader))
    assert len(batch["__metadata__"]) == 2 and "centre_z" in batch["__metadata__"][0]


def test_value_transforms_run_on_batches_reproducibly(tiny_data):
    from cellmap_data.transforms import GaussianNoise

    m = multi(tiny_data)
    m.set_raw_value_transforms(GaussianNoise(std=5.0))
    a = collect(CellMapDataLoader(m, batch_size=4, iterations_per_epoch=2, seed=9))
    b = collect(CellMapDataLoader(m, batch_size=4, iterations_per_epoch=2, seed=9))
    m.set_raw_value_transforms(None)
    plain = collect(CellMapDataLoader(m, batch_size=4, iterations_per_epoch=2, seed=9))
    torch.testing.assert_close(a[0]["raw"], b[0]["raw"], equal_nan=True, rtol=0, atol=0)
    assert not torch.allclose(a[0]["raw"].nan_to_num(), plain[0]["raw"].nan_to_num())


def test_device_prefetch_path_runs_on_cpu(tiny_data):
    loader = CellMapDataLoader(multi(tiny_data), batch_size=2, iterations_per_epoch=3, device="cpu").to("cpu", non_blocking=True)
    batches = collect(loader)
    assert len(batches) == 3 and batches[0]["raw"].device.type == "cpu"


def test_loader_over_validation_subset(tiny_data):
    from cellmap_data import CellMapSubset

    m = multi(tiny_data, augment=False)
    blocks = CellMapSubset(m, m.validation_indices)
    loader = CellMapDataLoader(blocks, batch_size=4, is_train=False)
    idx = torch.cat([b["idx"] for b in loader]).tolist()
    assert sorted(idx) == sorted(m.validation_indices)


def test_iterable_dataset_shards_across_torch_workers(tiny_data):
    m = multi(tiny_data, augment=False)
    it = m.as_iterable(batch_size=4, is_train=False)
    assert isinstance(it, CellMapIterableDataset)
    single = torch.cat([b["idx"] for b in torch.utils.data.DataLoader(it, batch_size=None)]).tolist()
    it2 = m.as_iterable(batch_size=4, is_train=False)
    loader = torch.utils.data.DataLoader(it2, batch_size=None, num_workers=2, multiprocessing_context="fork")
    multi_worker = torch.cat([b["idx"] for b in loader]).tolist()
    assert sorted(multi_worker) == sorted(single) == list(range(len(m)))
    assert len(multi_worker) == len(set(multi_worker))


def _child_reads(dataset, queue):
    try:
        queue.put(float(torch.nan_to_num(dataset[0]["raw"]).sum()))
    except Exception as error:  # reported to the parent
        queue.put(repr(error))


def test_forked_child_gets_a_fresh_engine(tiny_data):
    m = multi(tiny_data, augment=False)
    loader = CellMapDataLoader(m, batch_size=2, iterations_per_epoch=2, num_workers=2)
    expected = float(torch.nan_to_num(m[0]["raw"]).sum())
    list(loader)  # engine threads and cache are busy in the parent before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(m.datasets[0], queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "child hung or crashed"
    assert queue.get(timeout=5) == expected


def test_ctrl_c_stops_iteration_promptly(tiny_data, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, threading, time
        # Ctrl-C raises KeyboardInterrupt even when the test runs in a background job, whose
        # children start with SIGINT ignored (Python then keeps it ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from cellmap_data import CellMapDataLoader, CellMapDataset
        d = {str(tiny_data.datasets[0].raw_path)!r}
        ds = CellMapDataset(d, {tiny_data.datasets[0].crops[0].target_path!r}, ["mito"],
            {{"raw": {{"shape": (48, 48, 48), "scale": (4, 4, 4)}}}}, {{"gt": {{"shape": (48, 48, 48), "scale": (4, 4, 4)}}}},
            pad=True, spatial_transforms={{"rotate": {{"z": 180}}}})
        loader = CellMapDataLoader(ds, batch_size=2, iterations_per_epoch=100000, num_workers=2)
        print("ready", flush=True)
        try:
            for batch in loader:
                pass
        except KeyboardInterrupt:
            print("interrupted", threading.active_count(), flush=True)
            sys.exit(0)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "interrupted" in out
    assert time.monotonic() - sent < 5


def test_each_dataset_s_axis_order_applies_to_its_own_samples(tiny_data):
    zyx = multi(tiny_data, augment=False)
    xyz = multi(tiny_data, augment=False, axis_order="xyz")
    mixed = CellMapMultiDataset([zyx.datasets[0], xyz.datasets[1]], tiny_data.classes, None, None)
    loader = CellMapDataLoader(mixed, batch_size=8, iterations_per_epoch=2, seed=3, is_train=False)
    for batch in loader:
        for row, g in enumerate(batch["idx"].tolist()):
            d, i = mixed.locate(g)
            expected = mixed.datasets[d][i]
            torch.testing.assert_close(batch["raw"][row], expected["raw"], equal_nan=True)
            torch.testing.assert_close(batch["gt"][row], expected["gt"], equal_nan=True)
    # the two datasets really order their axes differently
    plain = zyx.datasets[1][0]["raw"]
    turned = xyz.datasets[1][0]["raw"]
    torch.testing.assert_close(turned, plain.permute(0, 3, 2, 1), equal_nan=True)
