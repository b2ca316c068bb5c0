"""Write throughput of the prediction writer: ``python -m cellmap_data.tools.bench_write [size]
[tile] [overlap]`` writes a ``size``³ volume in ``tile``³ tiles through :class:`ImageWriter`
and prints MB/s (:func:`bench_write`). The many-process writer is timed by ``python -m
cellmap_data bench --writer-ranks`` (:func:`cellmap_data.tools.bench.bench_writer_ranks`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from .. import _engine
from .._config import SPATIAL_AXES
from ..writer import ImageWriter

__all__ = ["bench_write"]


def bench_write(
    out_dir: str | os.PathLike | None = None,
    size: int = 512,
    tile: int = 128,
    *,
    batch_size: int = 4,
    dtype: Any = "float32",
    zarr_format: int = 2,
    overlap: int = 0,
    blend: str = "linear",
    keep: bool = False,
) -> dict[str, Any]:
    """Writes a ``size``³ float32 prediction volume in ``tile``³ tiles (smooth values, as a
    model would predict) through the engine and reports the throughput.

    ``mb_per_s`` counts the uncompressed prediction bytes handed to the writer per second of
    wall time, from the first write to the end of ``close()``; ``volume_mb_per_s`` counts the
    output volume instead (smaller when tiles overlap). Tile data are generated before
    the clock starts. Returns the numbers (and prints them).
    """
    own_dir = out_dir is None
    root = tempfile.mkdtemp(prefix="cellmap-bench-write-") if out_dir is None else os.fspath(out_dir)
    path = os.path.join(root, "bench.zarr", "predictions", "mito")
    voxel = 8.0
    box = {a: (0.0, size * voxel) for a in SPATIAL_AXES}
    writer = ImageWriter(path, "mito", (voxel,) * 3, box, (tile,) * 3, overwrite=True, dtype=dtype,
                         zarr_format=zarr_format, overlap=overlap, blend=blend)
    grid = np.indices((tile,) * 3, dtype=np.float32).reshape(3, -1)
    pool = [
        (np.sin(grid[0] * 0.05 + s) * np.cos(grid[1] * 0.07 - s) + grid[2] * 1e-3).astype(np.float32).reshape(1, -1)
        for s in range(8)
    ]
    tiles = np.concatenate([pool[i % len(pool)] for i in range(batch_size)])
    n = len(writer)
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        idx = list(range(i, min(i + batch_size, n)))
        writer.write_tiles(idx, tiles[: len(idx)])
    writer.close()
    seconds = time.perf_counter() - start
    bytes_in = n * tile ** 3 * 4
    stats = writer.stats
    result = {
        "size": size,
        "tile": tile,
        "tiles": n,
        "overlap": overlap,
        "zarr_format": zarr_format,
        "seconds": seconds,
        "bytes_in": bytes_in,
        "bytes_written": stats["bytes_written"],
        "mb_per_s": bytes_in / seconds / 1e6,
        "volume_mb_per_s": size ** 3 * 4 / seconds / 1e6,
        "optimized_build": _engine.is_optimized_build(),
        "threads": os.environ.get("CELLMAP_NUM_THREADS") or os.cpu_count(),
    }
    print(
        f"wrote {size}^3 float32 ({bytes_in / 1e6:.0f} MB, {n} tiles of {tile}^3, overlap {overlap}) in "
        f"{seconds:.2f} s: {result['mb_per_s']:.0f} MB/s of tiles, {result['volume_mb_per_s']:.0f} MB/s of volume "
        f"({stats['bytes_written'] / 1e6:.0f} MB on disk, "
        f"{'release' if result['optimized_build'] else 'debug'} build)"
    )
    if own_dir and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":  # python -m cellmap_data.tools.bench_write [size] [tile] [overlap]
    numbers = [int(a) for a in sys.argv[1:]]
    options: dict[str, Any] = {"overlap": numbers[2]} if len(numbers) > 2 else {}
    bench_write(None, *(numbers[:2]), **options)
