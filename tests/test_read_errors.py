"""The loader's read-error policy (``on_read_error``) and faults under load: a corrupt chunk in
the middle of an epoch raises naming the chunk and the sample, or is skipped with a replacement
drawn from the seed (the same at any thread count); transient I/O errors (EIO, injected in
debug builds) are retried; a panic on an engine thread becomes an exception within a second,
the stream's threads end, and a new loader works afterwards in the same process."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cellmap_data import CellMapDataLoader, CellMapDataset, _engine
from cellmap_data.exceptions import CellMapError, ChunkDecodeError, ConfigError, ReadErrorWarning
from conftest import write_ome_image

pytestmark = pytest.mark.timeout(120, method="thread")

VOXEL = (4.0, 4.0, 4.0)
ARRAYS = dict(input_arrays={"raw": {"shape": (4, 4, 4), "scale": VOXEL}},
              target_arrays={"gt": {"shape": (4, 4, 4), "scale": VOXEL}})
needs_faults = pytest.mark.skipif(not _engine.fault_injection_available(),
                                  reason="fault injection exists only in debug builds of the engine")


def engine_threads() -> int:
    """Engine loader threads alive in this process (named cellmap-*)."""
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")
             if Path(f"/proc/self/task/{t}/comm").exists()]
    return sum(1 for n in names if n.startswith("cellmap-dispatch") or n.startswith("cellmap-loader"))


@pytest.fixture()
def crop(tmp_path):
    """A 32³ raw image (8³ chunks, values never 0) and one crop of class mito over all of it."""
    root = tmp_path / "data.zarr"
    raw = (np.arange(32 ** 3) % 251 + 1).astype(np.float32).reshape(32, 32, 32)
    labels = (np.indices((32, 32, 32)).sum(axis=0) % 3 == 0).astype(np.uint8)
    write_ome_image(root / "raw", [raw], [VOXEL], [(2.0, 2.0, 2.0)], chunks=(8, 8, 8))
    write_ome_image(root / "crop" / "mito", [labels], [VOXEL], [(2.0, 2.0, 2.0)], chunks=(8, 8, 8))
    return root


def dataset(root: Path) -> CellMapDataset:
    return CellMapDataset(str(root / "raw"), f"{root / 'crop'}/[mito]", ["mito"], pad=False, seed=7,
                          spatial_transforms={"mirror": {"x": 0.5}, "rotate": {"z": [-30, 30]}}, **ARRAYS)


def loader(root: Path, threads: int = 2, **kwargs) -> CellMapDataLoader:
    return CellMapDataLoader(dataset(root), batch_size=4, num_workers=threads, iterations_per_epoch=8, seed=7,
                             **kwargs)


def corrupt_chunk(root: Path, chunk: str = "1.1.1") -> Path:
    path = root / "raw" / "s0" / chunk
    path.write_bytes(b"\xa5" * path.stat().st_size)
    return path


def epoch(loader: CellMapDataLoader) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReadErrorWarning)
        return list(loader)


def test_unknown_policy_is_a_config_error(crop):
    with pytest.raises(ConfigError, match="on_read_error"):
        loader(crop, on_read_error="ignore")


def test_corrupt_chunk_mid_epoch_raises_naming_chunk_and_sample(crop):
    chunk = corrupt_chunk(crop)
    with pytest.raises(ChunkDecodeError) as info:
        epoch(loader(crop))
    message = str(info.value)
    assert "raw/s0 chunk [1, 1, 1]" in message, message
    assert "reading sample" in message and "centred at" in message, message
    assert chunk.exists()  # user data is never modified


def test_skip_replaces_failed_samples_deterministically_at_any_thread_count(crop):
    corrupt_chunk(crop)
    runs = {}
    for threads in (1, 3):
        l = loader(crop, threads=threads, on_read_error="skip", return_metadata=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(l)
        runs[threads] = (batches, l.stats())
        read_warnings = [w for w in caught if issubclass(w.category, ReadErrorWarning)]
        assert len(read_warnings) == 1, "one warning per failing path"
        assert "raw/s0 chunk [1, 1, 1]" in str(read_warnings[0].message)
    (one, stats_one), (three, stats_three) = runs[1], runs[3]
    assert stats_one["skipped"] > 0 and stats_one["retried"] == 0
    assert stats_one["skipped"] == stats_three["skipped"]
    assert len(one) == 8 and all(b["raw"].shape[0] == 4 for b in one), "every planned sample is delivered"
    for a, b in zip(one, three):
        assert torch.equal(a["idx"], b["idx"])
        assert torch.equal(a["raw"], b["raw"])
        assert torch.allclose(a["gt"], b["gt"], equal_nan=True)
    # The replacement's own metadata, never the failed sample's; no NaN or zero-filled raw.
    for incident in stats_one["incidents"]:
        assert incident["action"] == "skipped" and "chunk [1, 1, 1]" in incident["message"]
        delivered = one[incident["batch"]]["__metadata__"][incident["position"]]
        assert (delivered["idx"], delivered["centre_z"]) != (incident["index"], incident["centre"][0])
    assert all(torch.isfinite(b["raw"]).all() and (b["raw"] != 0).all() for b in one)


@needs_faults
def test_retry_reads_transient_errors_again(crop):
    l = loader(crop, on_read_error="retry")
    _engine.clear_cache()
    _engine.inject_fault("eio", str(crop / "raw"), 3)
    try:
        batches = epoch(l)
    finally:
        _engine.clear_faults()
    assert len(batches) == 8
    assert l.stats()["retried"] == 3 and l.stats()["skipped"] == 0
    # Without retry, the same transient error is raised (an OSError naming the chunk).
    _engine.clear_cache()
    _engine.inject_fault("eio", str(crop / "raw"), 1)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            epoch(loader(crop))
    finally:
        _engine.clear_faults()


@needs_faults
def test_panic_on_an_engine_thread_raises_quickly_and_the_process_recovers(crop):
    before = engine_threads()
    l = loader(crop, threads=4)
    _engine.clear_cache()
    _engine.inject_fault("panic", str(crop / "raw"), 1)
    started = time.perf_counter()
    try:
        with pytest.raises(CellMapError, match="internal engine error.*injected fault"):
            epoch(l)
    finally:
        _engine.clear_faults()
    assert time.perf_counter() - started < 5.0
    deadline = time.time() + 5
    while engine_threads() > before and time.time() < deadline:
        time.sleep(0.05)
    assert engine_threads() <= before, "the stream's threads ended"
    assert len(epoch(loader(crop, threads=4))) == 8, "a new loader works afterwards"


@needs_faults
def test_fault_while_streaming_augmented_batches_under_load(crop):
    """Faults injected while 3 engine threads stream augmented batches: raise within a second of
    the fault, and the batch buffers are freed once the loader is gone."""
    _engine.clear_cache()
    l = loader(crop, threads=3)
    l.iterations_per_epoch = 40
    it = iter(l)
    for _ in range(3):
        next(it)
    _engine.clear_cache()  # the next reads decode again, so the fault fires
    _engine.inject_fault("eio", str(crop / "raw"), 1_000)
    started = time.perf_counter()
    try:
        with pytest.raises(OSError):
            for batch in it:
                del batch  # the test holds no batch
    finally:
        _engine.clear_faults()
    assert time.perf_counter() - started < 1.0 + 0.5  # a second, plus the batches in flight
    del it, l
    import gc

    gc.collect()
    deadline = time.time() + 5
    while _engine.live_batch_bytes() > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert _engine.live_batch_bytes() == 0, "every batch buffer is freed"


def _stream_some(l: CellMapDataLoader, n: int):
    it = iter(l)
    for _ in range(n):
        next(it)
    return it


def test_chunk_corrupted_mid_epoch_under_load_raises_within_a_second(crop):
    l = loader(crop, threads=3)
    l.iterations_per_epoch = 40
    it = _stream_some(l, 3)
    for chunk in (crop / "raw" / "s0").glob("[0-9]*"):
        chunk.write_bytes(b"\x00" * chunk.stat().st_size)
    _engine.clear_cache()
    started = time.perf_counter()
    with pytest.raises(ChunkDecodeError, match="raw/s0 chunk"):
        for _ in it:
            pass
    assert time.perf_counter() - started < 1.5  # a second, plus the batches already in flight
    del it, l


def test_chunk_file_replaced_while_streaming_reads_old_or_new_never_torn(crop):
    """Another process atomically replaces chunk files with new contents mid-epoch: every sample
    reads either the old or the new values, never a mix inside one chunk, never an error."""
    import zarr

    l = loader(crop, threads=3)
    l.iterations_per_epoch = 30
    it = _stream_some(l, 2)
    # Write the same array with every value + 1000 elsewhere, then move its chunks over.
    shadow = crop.parent / "shadow.zarr"
    source = zarr.open_array(str(crop / "raw" / "s0"), mode="r")
    copy = zarr.create_array(str(shadow), shape=source.shape, chunks=source.chunks, dtype=source.dtype,
                             zarr_format=2, compressors=source.compressors, chunk_key_encoding={"name": "v2", "separator": "."})
    copy[:] = source[:] + 1000
    for chunk in sorted(shadow.glob("[0-9]*")):
        os.replace(chunk, crop / "raw" / "s0" / chunk.name)
    _engine.clear_cache()
    batches = list(it)
    assert batches
    for batch in batches:
        raw = batch["raw"]
        assert torch.isfinite(raw).all()
        # Each value is an old one (1..251) or a new one (1001..1251).
        assert (((raw >= 1) & (raw <= 251)) | ((raw >= 1001) & (raw <= 1251))).all()
