"""``python -m cellmap_data demo``: generate a small CellMap-layout dataset, build a split from
its CSV and stream training batches through `CellMapDataLoader`, printing shapes and speed."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def run_demo(out: str | None = None, size: Any = "small", batches: int = 20, batch_size: int = 8, threads: int = 0) -> dict[str, Any]:
    from .. import CellMapDataLoader, _engine
    from ..datasplit import CellMapDataSplit
    from .synthetic import make_synthetic_data

    workdir = Path(out) if out else Path(tempfile.mkdtemp(prefix="cellmap-demo-"))
    started = time.perf_counter()
    data = make_synthetic_data(workdir, size=size, seed=0)
    print(f"generated {len(data.datasets)} datasets, {len(data.crops)} crops in {time.perf_counter() - started:.1f} s: {data.root}")
    split = CellMapDataSplit(
        input_arrays={"input": {"shape": (32, 32, 32), "scale": (8, 8, 8)}},
        target_arrays={"output": {"shape": (32, 32, 32), "scale": (8, 8, 8)}},
        classes=list(data.classes),
        pad=True,
        csv_path=data.csv_path,
        spatial_transforms={
            "mirror": {"axes": {"x": 0.5, "y": 0.5}},
            "transpose": {"axes": ["x", "y"]},
            "rotate": {"axes": {"z": [-180, 180]}},
        },
    )
    print(split)
    loader = CellMapDataLoader(split.train_datasets_combined, batch_size=batch_size, num_workers=threads,
                               weighted_sampler=True, iterations_per_epoch=batches, is_train=True)
    _engine.clear_cache()
    started = time.perf_counter()
    shapes: dict[str, tuple] = {}
    for batch in loader:
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
    elapsed = time.perf_counter() - started
    samples = batches * batch_size
    stats = _engine.cache_stats()
    print(f"batch: {shapes}")
    print(f"{batches} batches ({samples} samples) in {elapsed:.2f} s: {samples / elapsed:.1f} samples/s "
          f"on {loader.threads} engine threads ({'release' if _engine.is_optimized_build() else 'debug'} build)")
    print(f"chunk cache: {stats['hits']} hits, {stats['misses']} misses, {stats['bytes'] / 2**20:.1f} MiB held")
    return {"samples_per_s": samples / elapsed, "shapes": shapes}
