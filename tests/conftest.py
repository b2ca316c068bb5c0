"""Shared fixtures: small OME-NGFF images written with zarr-python (the independent reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import zarr
from numcodecs import Zstd


def write_ome_image(
    group_path: Path,
    levels: Sequence[np.ndarray],
    scales: Sequence[Sequence[float]],
    voxel0_centres: Sequence[Sequence[float]],
    *,
    zarr_format: int = 2,
    chunks: Sequence[int] = (16, 16, 16),
    axes: Sequence[str] = ("z", "y", "x"),
    fill_value: float | int = 0,
    shards: Sequence[int] | None = None,
) -> Path:
    """Writes an OME-NGFF multiscale image (0.4 on zarr v2, 0.5 on zarr v3) with zarr-python.

    Tests place voxels by the world position of the *centre* of voxel 0 of each level; the
    metadata gets the translation the default (corner) coordinate frame reads as that: the corner
    of voxel 0, half a voxel lower. ``shards`` (zarr v3 only) groups ``chunks`` into shards."""
    group_path = Path(group_path)
    group = zarr.open_group(str(group_path), mode="w", zarr_format=zarr_format)
    datasets = []
    for i, (data, scale, centre) in enumerate(zip(levels, scales, voxel0_centres)):
        translation = [c - v / 2 for c, v in zip(map(float, centre), map(float, scale))]
        kwargs = {"compressors": [Zstd(level=6)]} if zarr_format == 2 else {}
        if shards is not None:
            kwargs["shards"] = tuple(shards)[-data.ndim:]
        array = group.create_array(
            f"s{i}", shape=data.shape, chunks=tuple(chunks)[-data.ndim:], dtype=data.dtype,
            fill_value=fill_value, **kwargs,
        )
        array[...] = data
        datasets.append({
            "path": f"s{i}",
            "coordinateTransformations": [
                {"type": "scale", "scale": list(map(float, scale))},
                {"type": "translation", "translation": list(map(float, translation))},
            ],
        })
    multiscale = {
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in axes],
        "datasets": datasets,
    }
    if zarr_format == 2:
        multiscale["version"] = "0.4"
        group.attrs["multiscales"] = [multiscale]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return group_path


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """The engine's rotation matrix, written independently: world offset = R · output offset;
    rotating about z turns the y-x plane (applied x first)."""
    r = np.eye(3)
    for axis in (2, 1, 0):
        a = math.radians(angles_deg[axis])
        p, q = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[p, p], m[p, q], m[q, p], m[q, q] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        r = m @ r
    return r


def reference_patch(data: np.ndarray, start: Sequence[int], shape: Sequence[int], pad_value: float = np.nan) -> np.ndarray:
    """numpy slicing of ``data[start:start+shape]`` padded with ``pad_value`` outside."""
    out = np.full(shape, pad_value, dtype=np.float32)
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, shape, data.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = data[src]
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny synthetic CellMap-layout dataset (zarr v2), generated once per session."""
    from cellmap_data.tools.synthetic import make_synthetic_data

    return make_synthetic_data(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache_dir(tmp_path_factory):
    """Class-count caches of the tests go to a temporary folder, never to ~/.cache."""
    import os

    previous = os.environ.get("CELLMAP_CACHE_DIR")
    os.environ["CELLMAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cellmap-cache"))
    yield
    if previous is None:
        os.environ.pop("CELLMAP_CACHE_DIR", None)
    else:
        os.environ["CELLMAP_CACHE_DIR"] = previous
