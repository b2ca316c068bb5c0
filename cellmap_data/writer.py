"""Writing predictions into OME-NGFF zarr: :class:`CellMapDatasetWriter` (a dataset of input
tiles over some world bounds that also writes the model's outputs back, class by class) and
:class:`ImageWriter` (one output image).

The engine does the writing: tiles are accumulated per output chunk, each chunk is encoded and
written whole (temporary file + rename, so a crash never leaves a torn chunk) as soon as every
tile touching it has arrived, and ``close()`` writes what is left. Concurrent
``writer[idx] = ...`` calls from several threads are safe.

Geometry: bounds are voxel **edges** in nm (build them the usual way, ``translation ..
translation + voxel * shape`` of a ground-truth crop, or from ``CellMapImage(...).bounding_box``).
The output array has ``ceil((hi - lo) / voxel)`` voxels per axis and voxel ``i`` spans ``[lo +
i*voxel, lo + (i+1)*voxel)``. In the default coordinate frame (see
:func:`cellmap_data.set_coordinate_frame`) the translation is the corner of voxel 0, so the
metadata says ``translation = lo``: the written grid equals the ground truth's. In the
``"centre"`` frame it says ``lo + voxel / 2``. Either way, reading the image back in the same
frame puts every value at the world position it was predicted for.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from . import _engine
from ._config import SPATIAL_AXES, accepts_older_positional_order, arrays_to_3d, check_axis_order, resolve_device, to_json
from .exceptions import ConfigError

__all__ = ["CellMapDatasetWriter", "ImageWriter"]

_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
}


def _dtype_name(dtype: Any) -> str:
    """A numpy-style dtype name from a torch dtype, numpy dtype or string."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES:
            raise ConfigError(f"dtype {dtype} cannot be written (use a float or integer type)")
        return _TORCH_DTYPES[dtype]
    if isinstance(dtype, str) and dtype.startswith("torch."):
        dtype = dtype[len("torch."):]
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise ConfigError(f"dtype {dtype!r} is not a data type") from None
    if name not in set(_TORCH_DTYPES.values()):
        raise ConfigError(f"dtype {name!r} cannot be written (use a float or integer type)")
    return name


def _zyx(value: Any, axis_order: str, what: str, pad: Callable[[list], Any]) -> list:
    """A per-axis value (dict ``{axis: v}`` or a sequence in ``axis_order``) as [z, y, x]."""
    if isinstance(value, Mapping):
        missing = [a for a in axis_order if a not in value]
        if missing:
            raise ConfigError(f"{what} {dict(value)!r} has no {missing[0]!r} entry")
        seq = [value[a] for a in axis_order]
    elif isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
        seq = list(value)
    else:
        seq = [value] * len(axis_order)
    if len(seq) > len(axis_order):
        raise ConfigError(f"{what} {seq} has more entries than the axis order {axis_order!r}")
    seq = [pad(seq)] * (len(axis_order) - len(seq)) + seq
    by_axis = dict(zip(axis_order, seq))
    return [by_axis[a] if a in by_axis else pad(seq) for a in SPATIAL_AXES]


def _check_axis_order(axis_order: str) -> str:
    check_axis_order(axis_order)
    if not "zyx".endswith(axis_order):
        raise ConfigError(f"writers store z, y, x arrays; axis_order must be 'zyx' (or 'yx'), not {axis_order!r}")
    return axis_order


def _box_zyx(box: Any, what: str, defaults: Mapping[str, tuple[float, float]] | None = None) -> tuple[list[float], list[float]]:
    """``{axis: (lo, hi)}`` → ([lo z, y, x], [hi z, y, x]); ``defaults`` fill axes left out."""
    if not isinstance(box, Mapping):
        raise ConfigError(f"{what} must be a dict {{axis: [lo, hi]}}, not {type(box).__name__}")
    unknown = [a for a in box if a not in SPATIAL_AXES]
    if unknown:
        raise ConfigError(f"{what} has an unknown axis {unknown[0]!r} (expected z, y, x)")
    lo, hi = [], []
    for a in SPATIAL_AXES:
        if a not in box and defaults and a in defaults:
            lo.append(float(defaults[a][0]))
            hi.append(float(defaults[a][1]))
            continue
        if a not in box:
            raise ConfigError(f"{what} has no {a!r} entry")
        try:
            a_lo, a_hi = (float(v) for v in box[a])
        except (TypeError, ValueError):
            raise ConfigError(f"{what}[{a!r}] must be a pair [lo, hi] of numbers, not {box[a]!r}") from None
        if not (math.isfinite(a_lo) and math.isfinite(a_hi) and a_hi > a_lo):
            raise ConfigError(f"{what}[{a!r}] = [{a_lo}, {a_hi}] must be finite with lo < hi")
        lo.append(a_lo)
        hi.append(a_hi)
    return lo, hi


def _overlap_zyx(overlap: Any, tile: Sequence[int]) -> list[int]:
    """An int applies to every axis on which the tile is longer than one voxel."""
    if isinstance(overlap, Mapping):
        values = [int(overlap.get(a, 0)) for a in SPATIAL_AXES]
    elif isinstance(overlap, (list, tuple)):
        values = [0] * (3 - len(overlap)) + [int(v) for v in overlap]
    else:
        values = [int(overlap) if t > 1 else 0 for t in tile]
    if len(values) != 3:
        raise ConfigError(f"overlap {overlap!r} must be an int or one per axis")
    return values  # the engine checks each: non-negative, smaller than the tile


def _as_float32(value: Any, what: str) -> np.ndarray:
    """A prediction as a C-contiguous float32 numpy array (a copy only when needed)."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            raise TypeError(f"prediction for {what} is a scalar; write a tensor shaped like the tile")
        return value.detach().to("cpu", torch.float32).contiguous().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise TypeError(f"prediction for {what} is a scalar; write an array shaped like the tile")
        return np.ascontiguousarray(value, dtype=np.float32)
    raise TypeError(f"prediction for {what} must be a torch tensor or numpy array, not {type(value).__name__}")


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


def _reject_scalar(data: Any) -> None:
    """Scalars and zero-dimensional arrays/tensors cannot be written (a tile needs its shape);
    the messages are the reference library's, which scripts may match on."""
    if np.isscalar(data):
        raise TypeError("Scalar writes are not supported. Pass an array or tensor with shape matching the patch.")
    if isinstance(data, np.ndarray) and data.ndim == 0:
        raise TypeError(
            "Zero-dimensional NumPy arrays are not supported for writes. "
            "Pass a non-scalar array or tensor with shape matching the patch."
        )
    if isinstance(data, torch.Tensor) and data.dim() == 0:
        raise TypeError(
            "Zero-dimensional torch.Tensors are not supported for writes. "
            "Pass a non-scalar tensor or array with shape matching the patch."
        )


class ImageWriter:
    """Writes one multiscale image (one class) tile by tile.

    ``writer[center] = data`` writes a tile of ``write_voxel_shape`` voxels centred at the world
    position ``center`` (``{"z": .., "y": .., "x": ..}`` in nm; values may be sequences for a
    batch, then ``data`` is ``[B, *tile]``). The tile starts at voxel ``round((center - lo) /
    scale - tile / 2)`` and is clipped at the array edge. ``writer[center]`` reads a tile back.

    The image is created at construction: ``<path>/s<scale_level>`` (plus
    ``downsample_levels`` 2× averaged levels, computed at ``close()``), zarr v2 + OME-NGFF 0.4
    (``zarr_format=2``, default) or zarr v3 + OME-NGFF 0.5 (``zarr_format=3``), zstd-compressed,
    chunks = ``write_voxel_shape`` unless ``chunks`` is given; every group from the enclosing
    ``.zarr`` container down gets group metadata. An existing image raises
    :class:`~cellmap_data.exceptions.OutputExistsError` (a ``FileExistsError``) unless
    ``overwrite=True`` (replace it) or ``exist_ok=True`` (write into it, keeping what is there:
    several processes writing one image, or a run resumed after a crash; the image must have
    the layout this writer would create, and chunks written only in part here are merged with
    the stored ones under a file lock, so processes writing disjoint regions never undo each
    other's voxels). See the module docstring for the written translation.

    A chunk is written as soon as all its voxels were written; ``close()`` (or leaving a
    ``with`` block) writes partly written chunks (unwritten voxels = ``fill_value``) and the
    downsampled levels (the 2× block mean for float dtypes, the most frequent value for integer
    dtypes, or as ``downsample="mean"``/``"mode"`` says). Integer dtypes store rounded, saturated
    values.

    With ``overlap`` (keyword only, used by :class:`CellMapDatasetWriter`) the writer also
    carries a tiling plan: ``len(writer)`` tiles, written with :meth:`write_tiles`, blended
    with ``blend`` weights when the overlap is positive.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        target_class: str,
        scale: Any,
        bounding_box: Mapping[str, Sequence[float]],
        write_voxel_shape: Any,
        scale_level: int = 0,
        axis_order: str = "zyx",
        context: Any = None,
        overwrite: bool = False,
        dtype: Any = torch.float32,
        fill_value: float = 0,
        *,
        chunks: Any = None,
        zarr_format: int = 2,
        overlap: Any = None,
        blend: str = "linear",
        downsample_levels: int = 0,
        compression_level: int = 3,
        fsync: bool = False,
        protected: Sequence[str | os.PathLike] = (),
        exist_ok: bool = False,
        downsample: str | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self._config = self._build_config(
            path, scale, bounding_box, write_voxel_shape, scale_level, axis_order, overwrite, dtype,
            fill_value, chunks, zarr_format, overlap, blend, downsample_levels, compression_level,
            fsync, protected, exist_ok, downsample, shard,
        )
        self.path = os.fspath(path)
        self.label_class = target_class
        self.axes = axis_order
        self.scale_level = int(scale_level)
        self.overwrite = bool(overwrite)
        self.dtype = self._config["dtype"]
        self.fill_value = fill_value
        self.context = context
        self._engine = _engine.ImageWriter(to_json(self._config))

    @staticmethod
    def _build_config(path, scale, bounding_box, write_voxel_shape, scale_level=0, axis_order="zyx",
                      overwrite=False, dtype=torch.float32, fill_value=0, chunks=None, zarr_format=2,
                      overlap=None, blend="linear", downsample_levels=0, compression_level=3,
                      fsync=False, protected=(), exist_ok=False, downsample=None, shard=None) -> dict[str, Any]:
        _check_axis_order(axis_order)
        voxel = [float(v) for v in _zyx(scale, axis_order, "scale", lambda s: s[0])]
        tile = [int(v) for v in _zyx(write_voxel_shape, axis_order, "write_voxel_shape", lambda s: 1)]
        # Axes outside a 2-letter axis order (e.g. z for "yx") span one voxel from 0.
        outside = {a: (0.0, v) for a, v in zip(SPATIAL_AXES, voxel) if a not in axis_order}
        lo, hi = _box_zyx(bounding_box, "bounding_box", outside)
        # Values are converted here and checked once, by the engine (writer/config.rs).
        config: dict[str, Any] = {
            "path": os.fspath(path),
            "voxel_size": voxel,
            "bounds_lo": lo,
            "bounds_hi": hi,
            "write_shape": tile,
            "chunk_shape": None if chunks is None else [int(c) for c in _zyx(chunks, axis_order, "chunks", lambda s: 1)],
            "dtype": _dtype_name(dtype),
            "fill_value": float(fill_value),
            "zarr_format": int(zarr_format),
            "overwrite": bool(overwrite),
            "exist_ok": bool(exist_ok),
            "first_level": int(scale_level),
            "downsample_levels": int(downsample_levels),
            "compression_level": int(compression_level),
            "fsync": bool(fsync),
            "protected": [os.fspath(p) for p in protected],
            "tiling": None,
            "downsample": downsample,
            "shard": None if shard is None else {"rank": int(shard[0]), "world_size": int(shard[1])},
        }
        if overlap is not None:
            config["tiling"] = {"overlap": _overlap_zyx(overlap, tile), "blend": str(blend)}
        return config

    # -- geometry -----------------------------------------------------------------------
    @property
    def scale(self) -> dict[str, float]:
        """Voxel size per axis (nm)."""
        return dict(zip(SPATIAL_AXES, self._config["voxel_size"]))

    @property
    def write_voxel_shape(self) -> dict[str, int]:
        """Voxels per write (tile) per axis."""
        return dict(zip(SPATIAL_AXES, self._config["write_shape"]))

    @property
    def write_world_shape(self) -> dict[str, float]:
        """World extent of one write (nm)."""
        return {a: n * s for a, n, s in zip(SPATIAL_AXES, self._config["write_shape"], self._config["voxel_size"])}

    @property
    def bounding_box(self) -> dict[str, tuple[float, float]]:
        """The requested world bounds (nm, voxel edges)."""
        return {a: (lo, hi) for a, lo, hi in zip(SPATIAL_AXES, self._config["bounds_lo"], self._config["bounds_hi"])}

    @property
    def offset(self) -> dict[str, float]:
        """World position (nm) of the lower edge of voxel 0."""
        return dict(zip(SPATIAL_AXES, self._config["bounds_lo"]))

    @property
    def translation(self) -> dict[str, float]:
        """The translation written in the metadata (nm): the lower bound (the corner of voxel 0),
        or the centre of voxel 0 in the ``"centre"`` coordinate frame."""
        return dict(zip(SPATIAL_AXES, self._engine.translation))

    @property
    def shape(self) -> dict[str, int]:
        """Array shape per axis (voxels)."""
        return dict(zip(SPATIAL_AXES, self._engine.shape))

    @property
    def chunk_shape(self) -> dict[str, int]:
        """Chunk shape per axis (voxels)."""
        return dict(zip(SPATIAL_AXES, self._engine.chunks))

    @property
    def array_path(self) -> str:
        """Path of the full-resolution array (``<path>/s<scale_level>``)."""
        return os.path.join(self.path, self._engine.levels[0]["path"])

    @property
    def levels(self) -> list[dict[str, Any]]:
        """Per level: path, shape, voxel_size, translation."""
        return self._engine.levels

    @property
    def stats(self) -> dict[str, int]:
        """chunks_written, bytes_written (encoded), pending_chunks (incomplete, in memory) and
        complete_chunks (complete, waiting to be written with the next group)."""
        return self._engine.stats

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._engine.closed

    def __len__(self) -> int:
        """Number of planned tiles (0 without ``overlap``)."""
        return len(self._engine)

    # -- writing ------------------------------------------------------------------------
    def _starts(self, center: Mapping[str, Any]) -> tuple[list[list[int]], bool]:
        if not isinstance(center, Mapping):
            raise TypeError(f"writer[center] needs a dict {{axis: nm}}, not {type(center).__name__}")
        columns: list[Any] = []
        batched = False
        for a, lo, v, t in zip(SPATIAL_AXES, self._config["bounds_lo"], self._config["voxel_size"], self._config["write_shape"]):
            if a not in center:
                if t == 1 and a not in self.axes:
                    columns.append(None)
                    continue
                raise ConfigError(f"center {dict(center)!r} has no {a!r} coordinate")
            value = center[a]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arr = np.asarray(value, dtype=float)
            if not np.isfinite(arr).all():
                raise ConfigError(f"center[{a!r}] = {value!r} must be finite")
            batched |= arr.ndim > 0
            columns.append(np.round((arr.reshape(-1) - lo) / v - t / 2).astype(np.int64))
        n = max((len(c) for c in columns if c is not None), default=1)
        columns = [np.zeros(n, np.int64) if c is None else (np.repeat(c, n) if len(c) == 1 else c) for c in columns]
        if any(len(c) != n for c in columns):
            raise ConfigError(f"center {dict(center)!r}: axes have different numbers of coordinates")
        return np.stack(columns, axis=1).tolist(), batched

    def _tile_data(self, data: Any, count: int, what: str) -> np.ndarray:
        array = _as_float32(data, what)
        tile = self._config["write_shape"]
        n = int(np.prod(tile))
        want = _squeezed(tile)
        shape = array.shape
        if shape[0] == count and (_squeezed(shape[1:]) == want or shape[1:] == (n,)):
            return array.reshape(count, n)
        if count == 1 and _squeezed(shape) == want:
            return array.reshape(1, n)
        raise ConfigError(
            f"{what}: data of shape {tuple(shape)} does not match {count} tile(s) of shape {tuple(tile)} (z, y, x)"
        )

    def __setitem__(self, center: Mapping[str, Any], data: Any) -> None:
        _reject_scalar(data)
        starts, _ = self._starts(center)
        values = self._tile_data(data, len(starts), f"{self.path}")
        self._engine.write_boxes(starts, values)

    def write_tiles(self, indices: Sequence[int], data: Any) -> None:
        """Writes planned tiles ``indices`` (``data``: ``[len(indices), *tile]``)."""
        indices = [int(i) for i in indices]
        values = self._tile_data(data, len(indices), f"{self.path}")
        self._engine.write_tiles(indices, values)

    def tile_centers(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """World centres ``[N, 3]`` (z, y, x nm) of planned tiles (all by default)."""
        if indices is None:
            indices = range(len(self))
        return np.asarray(self._engine.tile_centres([int(i) for i in indices]), dtype=float).reshape(-1, 3)

    def __getitem__(self, center: Mapping[str, Any]) -> torch.Tensor:
        starts, batched = self._starts(center)
        tile = self._config["write_shape"]
        tiles = [torch.from_dlpack(self._engine.read_box(s, tile)) for s in starts]
        out = torch.stack(tiles) if batched else tiles[0]
        if len(self.axes) < 3:
            out = out.reshape(*out.shape[: out.ndim - 3], *[self.write_voxel_shape[a] for a in self.axes])
        return out

    def flush(self) -> None:
        """Writes every chunk still held in memory."""
        self._engine.flush()

    def close(self) -> None:
        """Flushes, writes the downsampled levels, and refuses further writes."""
        self._engine.close()

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageWriter({self.path!r}, class={self.label_class!r}, shape={list(self._engine.shape)}, dtype={self.dtype})"


class _TileLoader:
    """Batches of writer tiles, read by the engine ``batch_size`` tiles per call; the next batch
    is read on a background thread while the current one is in use."""

    def __init__(self, writer: "CellMapDatasetWriter", batch_size: int, indices: Sequence[int], prefetch: bool,
                 progress: str | None = None, device: Any = None) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
        self.dataset = writer
        self.batch_size = int(batch_size)
        self.indices = list(indices)
        self.prefetch = prefetch
        self.progress = progress
        self.device = resolve_device(device)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.progress is None:
            yield from self._batches()
            return
        from tqdm.auto import tqdm

        with tqdm(total=len(self), desc=self.progress, unit="batch") as bar:
            for batch in self._batches():
                yield batch
                bar.update(1)

    def _read(self, group: list[int]) -> dict[str, Any]:
        batch = self.dataset.get_batch(group)
        if self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _batches(self) -> Iterator[dict[str, Any]]:
        groups = [self.indices[i: i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        if not self.prefetch or len(groups) < 2:
            for g in groups:
                yield self._read(g)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellmap-writer-prefetch") as pool:
            future = pool.submit(self._read, groups[0])
            for g in groups[1:]:
                batch = future.result()
                future = pool.submit(self._read, g)
                yield batch
            yield future.result()


# The older release's positional order: raw_value_transforms came right after target_bounds.
_OLD_WRITER_ORDER = ("raw_path", "target_path", "classes", "input_arrays", "target_arrays", "target_bounds",
                     "raw_value_transforms", "axis_order", "context", "rng", "empty_value", "overwrite", "device")


def _process_group(world_size: int) -> Any:
    """The initialised ``torch.distributed`` of ``world_size`` ranks that an overwrite by several
    ranks needs to meet at a barrier (a clear error without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        raise ConfigError(
            f"overwrite=True with {world_size} ranks needs torch.distributed initialised (dist.init_process_group) so "
            "that rank 0 clears the old outputs while the other ranks wait; without it, remove the old outputs first "
            "(the ranks write into one image with exist_ok=True)")
    return dist


def _clear_on_rank_0(rank: int, configs: Sequence[Mapping[str, Any]]) -> None:
    """Rank 0 removes the existing outputs (each checked as ``overwrite`` checks it); every rank
    waits for it, and raises rank 0's error if it failed, so no rank hangs or writes into an old
    output."""
    import torch.distributed as dist

    failure: list[Any] = [None]
    error: Exception | None = None
    if rank == 0:
        try:
            for config in configs:
                _engine.ImageWriter.validate(to_json(config))
            for config in configs:
                _engine.ImageWriter.clear(to_json(config))
        except Exception as e:  # noqa: BLE001 - every rank learns of it before anyone raises
            error, failure = e, [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(failure, src=0)
    dist.barrier()
    if error is not None:
        raise error
    if failure[0] is not None:
        raise ConfigError(f"rank 0 could not clear the old outputs for overwrite=True: {failure[0]}")


def _ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank and the number of processes: as given, else from an initialised
    ``torch.distributed``, else from ``RANK``/``WORLD_SIZE`` (torchrun), else one process."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    elif rank is None or world_size is None:
        raise ConfigError(f"pass both rank and world_size (or neither), not rank={rank!r}, world_size={world_size!r}")
    if isinstance(rank, bool) or isinstance(world_size, bool) or not 0 <= int(rank) < int(world_size):
        raise ConfigError(f"rank {rank!r} must be in [0, world_size) with world_size {world_size!r} >= 1")
    return int(rank), int(world_size)


def _is_old_writer_call(args: Sequence[Any]) -> bool:
    """A 7th positional argument that is a transform (or None followed by an axis order) is the
    older order; in the current order it would be the ``overwrite`` flag."""
    if len(args) < 7 or isinstance(args[6], bool):
        return False
    return callable(args[6]) or (args[6] is None and len(args) >= 8 and isinstance(args[7], str))


class CellMapDatasetWriter(torch.utils.data.Dataset):
    """Input tiles over ``target_bounds`` for a model, and the writer of its predictions.

    ``writer[i]`` is ``{"idx": tensor(i), <input name>: [1, *input shape]}`` (raw read with
    linear interpolation, padded with 0 outside the volume, ``raw_value_transforms`` applied; the
    spec's shape is kept as given, singleton axes included). ``writer.loader(batch_size)``
    yields such dicts stacked into batches. Predictions go back with ``writer[batch["idx"]] =
    {"output": tensor [B, C, *tile]}`` (channels in ``model_classes`` order, default
    ``classes``), ``{"output": {class: tensor [B, *tile]}}`` or ``{class: tensor}``; only the
    classes in ``classes`` are written, each to ``<target_path>/<class>`` (see
    :class:`ImageWriter` for the layout and the written translation).

    The tiles (``writer_indices``) cover the whole bounds, far edge included: along each axis
    they step by the target tile and the last one is shifted back inside the bounds. With
    ``overlap`` (voxels, beyond the reference library) they step by ``tile - overlap`` and
    overlapping predictions are blended with ``blend`` ("linear" tent or "gaussian") weights, so
    tile seams disappear; with the default ``overlap=0`` each output voxel is exactly the value
    of the one tile that owns it.

    ``target_bounds`` is ``{target array name: {axis: [lo, hi]}}`` in nm (voxel edges); several
    arrays' bounds are united; ``None`` means the whole raw volume. Bounds must lie inside the
    raw volume. All target arrays share one output per class, so they must have the same shape
    and scale. ``close()`` (or leaving a ``with`` block) writes any chunk still in memory.

    **Several processes.** Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment, or an
    initialised ``torch.distributed``), or with ``rank=``/``world_size=``, each process owns a
    contiguous run of whole output chunks and ``writer_indices`` / ``loader()`` hand it the
    tiles touching them (tiles on a border between two ranks are predicted by both, each keeping
    its own chunks' share). A chunk is summed by one process, tile by tile in index order, so the
    union of the ranks' outputs equals a one-process run bit for bit, blending included (write
    the tiles in loader order). The outputs are opened with ``exist_ok`` semantics; with
    ``overwrite=True`` and an initialised ``torch.distributed``, rank 0 removes the old outputs and
    the ranks meet at a barrier before writing (without a process group it is refused: remove old
    outputs first). The runs are cut to give the busiest rank the fewest
    tiles (in Z order, compact boxes, or in slabs, whichever does better) and keep together the
    2×2×2 chunks under each chunk of the second level, so with downsampled levels each rank
    builds the second level over its own chunks at ``close()``; rank 0's ``close()`` waits for
    every rank (``timeout`` seconds), builds the few second-level chunks over two ranks' chunks
    and the levels below, and prints a summary per rank.

    **Resume.** Each complete chunk is marked on disk after it is written; a job restarted with
    the same arguments and ``exist_ok=True`` (implied for several ranks) skips the complete
    chunks and the tiles that only touch them, and ends with the output an uninterrupted run
    writes. :meth:`status` reports chunks done / total (readable from a notebook while a job runs).

    ``exist_ok=True`` also writes into existing outputs of the same layout instead of raising.
    """

    @accepts_older_positional_order(_OLD_WRITER_ORDER, _is_old_writer_call)
    def __init__(
        self,
        raw_path: str | os.PathLike,
        target_path: str | os.PathLike,
        classes: Sequence[str],
        input_arrays: Mapping[str, Mapping[str, Any]],
        target_arrays: Mapping[str, Mapping[str, Any]],
        target_bounds: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        overwrite: bool = False,
        device: str | torch.device | None = None,
        raw_value_transforms: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_classes: Sequence[str] | None = None,
        axis_order: str = "zyx",
        context: Any = None,
        *,
        overlap: Any = 0,
        blend: str = "linear",
        dtype: Any = "float32",
        zarr_format: int = 2,
        chunks: Any = None,
        downsample_levels: int = 0,
        fill_value: float | None = None,
        compression_level: int = 3,
        fsync: bool = False,
        raw_interpolation: str = "linear",
        exist_ok: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        downsample: str | None = None,
        **kwargs: Any,
    ) -> None:
        _check_axis_order(axis_order)
        self.rank, self.world_size = _ranks(rank, world_size)
        # Several ranks asked to overwrite: rank 0 clears the outputs once every output has been
        # checked (below), then the ranks meet at a barrier and write into them together.
        clear_first = self.world_size > 1 and bool(overwrite)
        if clear_first:
            _process_group(self.world_size)
            overwrite = False
        if self.world_size > 1:
            exist_ok = True
        self.downsample_levels = int(downsample_levels)
        empty_value = kwargs.pop("empty_value", None)
        kwargs.pop("rng", None)
        if kwargs:
            warnings.warn(f"CellMapDatasetWriter ignores the keyword(s) {sorted(kwargs)}", stacklevel=2)
        if fill_value is None:
            fill_value = 0.0 if empty_value is None else float(empty_value)
        self.raw_path = os.fspath(raw_path)
        self.target_path = os.fspath(target_path)
        if isinstance(classes, str) or not classes:
            raise ConfigError(f"classes must be a non-empty list of class names, not {classes!r}")
        self.classes = list(classes)
        self.model_classes = list(model_classes) if model_classes is not None else list(self.classes)
        for name, names in (("classes", self.classes), ("model_classes", self.model_classes)):
            if len(set(names)) != len(names):
                raise ConfigError(f"{name} {names} lists a class twice")
        missing = [c for c in self.classes if c not in self.model_classes]
        if missing:
            raise ConfigError(f"class {missing[0]!r} is in classes but not in model_classes {self.model_classes}")
        self.input_arrays = dict(input_arrays)
        self.target_arrays = dict(target_arrays) if target_arrays else {}
        self.axis_order = axis_order
        self.context = context
        self.device = resolve_device(device)
        self.raw_value_transforms = raw_value_transforms
        self.overwrite = bool(overwrite)
        self.overlap = overlap
        self.blend = blend

        self._inputs = arrays_to_3d(self.input_arrays, "input_arrays")
        self._targets = arrays_to_3d(self.target_arrays, "target_arrays")
        if not self._inputs:
            raise ConfigError("input_arrays is empty: at least one input array is required")
        if not self._targets:
            raise ConfigError("target_arrays is empty: the writer needs the output tile shape and scale")
        first = self._targets[0]
        for spec in self._targets[1:]:
            if spec["shape"] != first["shape"] or spec["scale"] != first["scale"]:
                raise ConfigError(
                    f"target arrays {first['name']!r} and {spec['name']!r} differ in shape or scale; "
                    "all target arrays of a writer share one output per class"
                )
        self._input_shapes = {name: tuple(int(s) for s in spec["shape"]) for name, spec in self.input_arrays.items()}
        self._target_names = [spec["name"] for spec in self._targets]
        self._tile = list(first["shape"])
        self._voxel = list(first["scale"])

        self._engine = _engine.Dataset(to_json({
            "raw_path": self.raw_path,
            "classes": [],
            "inputs": self._inputs,
            "targets": [],
            "pad": True,
            "raw_pad_value": 0.0,
            "raw_interpolation": raw_interpolation,
            "spatial": None,
        }))
        raw_lo, raw_hi = self._engine.bounding_box
        self.target_bounds = self._parse_bounds(target_bounds, raw_lo, raw_hi)
        lo = [min(b[a][0] for b in self.target_bounds.values()) for a in SPATIAL_AXES]
        hi = [max(b[a][1] for b in self.target_bounds.values()) for a in SPATIAL_AXES]
        self._box = (lo, hi)

        box = {a: (lo[k], hi[k]) for k, a in enumerate(SPATIAL_AXES)}
        common = dict(
            scale=self._voxel, bounding_box=box, write_voxel_shape=self._tile, overwrite=self.overwrite,
            dtype=dtype, fill_value=fill_value, chunks=chunks, zarr_format=zarr_format, overlap=overlap,
            blend=blend, downsample_levels=downsample_levels, compression_level=compression_level,
            fsync=fsync, protected=[self.raw_path], exist_ok=exist_ok, downsample=downsample,
            shard=(self.rank, self.world_size),
        )
        # Validate every output before creating any, so bad input leaves nothing behind.
        if clear_first:
            single = dict(common, shard=(0, 1), exist_ok=False, overwrite=True)
            _clear_on_rank_0(self.rank, [ImageWriter._build_config(os.path.join(self.target_path, c), **single)
                                         for c in self.classes])
        for c in self.classes:
            _engine.ImageWriter.validate(to_json(ImageWriter._build_config(os.path.join(self.target_path, c), **common)))
        self.writers: dict[str, ImageWriter] = {
            c: ImageWriter(os.path.join(self.target_path, c), c, **common) for c in self.classes
        }
        self._class_set = set(self.classes)
        self._model_class_set = set(self.model_classes)
        self._centres = self.writers[self.classes[0]].tile_centers()

    def _parse_bounds(self, target_bounds: Any, raw_lo: Sequence[float], raw_hi: Sequence[float]) -> dict[str, dict[str, tuple[float, float]]]:
        raw_box = {a: (raw_lo[k], raw_hi[k]) for k, a in enumerate(SPATIAL_AXES)}
        if target_bounds is None:
            return {self._target_names[0]: raw_box}
        if not isinstance(target_bounds, Mapping) or not target_bounds:
            raise ConfigError(f"target_bounds must be a dict {{target array name: {{axis: [lo, hi]}}}}, not {target_bounds!r}")
        out = {}
        for name, box in target_bounds.items():
            if name not in self._target_names:
                raise ConfigError(f"target_bounds key {name!r} is not a target array (expected one of {self._target_names})")
            lo, hi = _box_zyx(box, f"target_bounds[{name!r}]")
            for k, a in enumerate(SPATIAL_AXES):
                tol = 1e-6 * max(1.0, abs(raw_lo[k]), abs(raw_hi[k]))
                if lo[k] < raw_lo[k] - tol or hi[k] > raw_hi[k] + tol:
                    raise ConfigError(
                        f"target_bounds[{name!r}][{a!r}] = [{lo[k]}, {hi[k]}] lies outside the raw volume "
                        f"[{raw_lo[k]}, {raw_hi[k]}] of {self.raw_path}"
                    )
            out[name] = {a: (lo[k], hi[k]) for k, a in enumerate(SPATIAL_AXES)}
        return out

    # -- tiles --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._centres)

    @property
    def writer_indices(self) -> list[int]:
        """Indices of the tiles this process writes, ascending: all the tiles covering the
        bounds for one process; a rank's share with several; without the tiles whose chunks
        were already complete when the writer opened (a resumed job)."""
        todo: set[int] = set()
        for w in self.writers.values():
            todo.update(w._engine.tiles_to_write())
        return sorted(todo)

    def status(self) -> dict[str, Any]:
        """Progress of the whole job, read from the completion marks on disk (every rank's):
        ``{"done", "total", "fraction", "by_rank": {rank: chunks}, "classes": {class: {"done",
        "total"}}, "levels", "rank", "world_size"}`` (chunks of the first level, all classes
        together). With downsampled levels, ``levels`` is ``{"s1": {"done", "total"}}``: the
        second level's chunks built from complete chunks (all classes together; with several
        ranks each builds its own share at close); it is empty otherwise."""
        classes: dict[str, dict[str, int]] = {}
        by_rank: dict[int, int] = {}
        levels: dict[str, dict[str, int]] = {}
        for c, w in self.writers.items():
            marks = w._engine.progress()
            assert marks is not None  # dataset writers always have a tiling plan
            per_rank, total = marks
            for r, n in per_rank.items():
                by_rank[r] = by_rank.get(r, 0) + n
            classes[c] = {"done": sum(per_rank.values()), "total": total}
            built = w._engine.levels_done()
            if built is not None:
                name = w._engine.levels[1]["path"]
                level = levels.setdefault(name, {"done": 0, "total": 0})
                level["done"] += built[0]
                level["total"] += built[1]
        done = sum(v["done"] for v in classes.values())
        total = sum(v["total"] for v in classes.values())
        return {"done": done, "total": total, "fraction": done / total if total else 1.0,
                "by_rank": dict(sorted(by_rank.items())), "classes": classes, "levels": levels,
                "rank": self.rank, "world_size": self.world_size}

    @property
    def blocks(self) -> torch.utils.data.Subset:
        """The tiles as a ``Subset`` of this dataset."""
        return torch.utils.data.Subset(self, self.writer_indices)

    @property
    def bounding_box(self) -> dict[str, tuple[float, float]]:
        """World box written (nm, voxel edges): the union of the target bounds."""
        lo, hi = self._box
        return {a: (lo[k], hi[k]) for k, a in enumerate(SPATIAL_AXES)}

    @property
    def sampling_box(self) -> dict[str, tuple[float, float]]:
        """Box spanned by the tile centres (nm)."""
        lo, hi = self._centres.min(axis=0), self._centres.max(axis=0)
        return {a: (float(lo[k]), float(hi[k])) for k, a in enumerate(SPATIAL_AXES)}

    @property
    def target_array_writers(self) -> dict[str, dict[str, ImageWriter]]:
        """``{target array name: {class: ImageWriter}}`` (all arrays share the writers)."""
        return {name: dict(self.writers) for name in self._target_names}

    def _check_index(self, idx: Any) -> int:
        i = int(idx)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"tile index {int(idx)} out of range for a writer of {n} tiles")
        return i

    def get_center(self, idx: int) -> dict[str, float]:
        """World centre (nm) of tile ``idx``."""
        return {a: float(v) for a, v in zip(SPATIAL_AXES, self._centres[self._check_index(idx)])}

    # -- reading inputs -----------------------------------------------------------------
    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Input tiles ``indices`` as ``{"idx": [B], <input>: [B, 1, *input shape]}``."""
        checked = [self._check_index(i) for i in indices]
        centres = [list(map(float, self._centres[i])) for i in checked]
        batch = self._engine.read_centres(centres, checked)
        out: dict[str, torch.Tensor] = {"idx": torch.tensor(checked, dtype=torch.int64)}
        for name in batch.tensor_names:
            tensor = torch.from_dlpack(batch.tensor(name))
            tensor = tensor.reshape(len(checked), 1, *self._input_shapes[name])
            if self.device is not None:
                tensor = tensor.to(self.device, non_blocking=True)
            if self.raw_value_transforms is not None:
                tensor = self.raw_value_transforms(tensor)
            out[name] = tensor
        return out

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        batch = self.get_batch([idx])
        return {k: v[0] for k, v in batch.items()}

    def loader(self, batch_size: int = 1, num_workers: int = 0, **kwargs: Any) -> _TileLoader:
        """Batches of input tiles in tile order. Reading happens in the engine (``num_workers``
        and DataLoader keywords are accepted and ignored); the next batch is read while the
        current one is in use unless ``prefetch=False``; ``device`` moves the batches there (the
        CPU, with a warning, on a machine without it)."""
        progress = kwargs.get("progress")
        if progress is None:
            progress = self.world_size > 1 and self.rank == 0
        return _TileLoader(self, batch_size, self.writer_indices, bool(kwargs.get("prefetch", True)),
                           f"rank {self.rank}/{self.world_size}" if progress else None, kwargs.get("device"))

    # -- writing predictions ------------------------------------------------------------
    def _indices(self, idx: Any) -> list[int]:
        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        if isinstance(idx, np.ndarray):
            if idx.ndim == 0:
                return [self._check_index(idx.item())]
            return [self._check_index(i) for i in idx.reshape(-1).tolist()]
        if isinstance(idx, (list, tuple, range)):
            return [self._check_index(i) for i in idx]
        if isinstance(idx, (int, np.integer)):
            return [self._check_index(idx)]
        raise TypeError(f"writer index must be an int or a sequence of ints, not {type(idx).__name__}")

    def _class_values(self, value: Any, count: int, what: str) -> np.ndarray:
        array = _as_float32(value, what)
        n = int(np.prod(self._tile))
        want = _squeezed(self._tile)
        shape = array.shape
        if shape[0] == count and _squeezed(shape[1:]) == want:
            return array.reshape(count, n)
        if count == 1 and _squeezed(shape) == want:
            return array.reshape(1, n)
        raise ConfigError(
            f"prediction {what} has shape {tuple(shape)}; expected [{count}, *{tuple(self._tile)}] "
            f"(batch, tile z, y, x; singleton axes may be dropped)"
        )

    def _channel_values(self, value: Any, count: int, what: str) -> np.ndarray:
        array = _as_float32(value, what)
        n = int(np.prod(self._tile))
        c = len(self.model_classes)
        want = _squeezed(self._tile)
        shape = array.shape
        if array.ndim >= 2 and shape[0] == count and shape[1] == c and _squeezed(shape[2:]) == want:
            return array.reshape(count, c, n)
        if count == 1 and shape[0] == c and _squeezed(shape[1:]) == want:
            return array.reshape(1, c, n)
        raise ConfigError(
            f"prediction {what} has shape {tuple(shape)}; expected [{count}, {c}, *{tuple(self._tile)}] "
            f"(batch, one channel per model class {self.model_classes}, tile z, y, x)"
        )

    def _known_class(self, name: Any, what: str) -> None:
        if name not in self._model_class_set and name not in self._class_set:
            raise ConfigError(f"unknown class {name!r} in {what}; model classes are {self.model_classes}")

    def __setitem__(self, idx: Any, arrays: Any) -> None:
        indices = self._indices(idx)
        count = len(indices)
        if isinstance(arrays, (torch.Tensor, np.ndarray)):
            arrays = {self._target_names[0]: arrays}
        if not isinstance(arrays, Mapping):
            raise TypeError(
                f"writer[idx] = ... needs a dict such as {{{self._target_names[0]!r}: tensor}}, not {type(arrays).__name__}"
            )
        per_class: dict[str, np.ndarray] = {}
        # Validate everything before writing anything.
        for key, value in arrays.items():
            if key in ("idx", "__metadata__"):
                continue
            if key in self._target_names:
                if isinstance(value, Mapping):
                    for cls, v in value.items():
                        self._known_class(cls, f"prediction {key!r}")
                        if cls in self._class_set:
                            per_class[cls] = self._class_values(v, count, f"{key!r}[{cls!r}]")
                else:
                    data = self._channel_values(value, count, repr(key))
                    for c, cls in enumerate(self.model_classes):
                        if cls in self._class_set:
                            per_class[cls] = data[:, c]
            elif key in self._model_class_set or key in self._class_set:
                if key in self._class_set:
                    per_class[key] = self._class_values(value, count, repr(key))
            else:
                raise ConfigError(
                    f"unknown key {key!r} in the predictions: expected a target array name {self._target_names} "
                    f"or a class name {self.model_classes}"
                )
        for cls, data in per_class.items():
            self.writers[cls]._engine.write_tiles(indices, np.ascontiguousarray(data))

    # -- life cycle ---------------------------------------------------------------------
    def flush(self) -> None:
        """Writes every chunk still held in memory."""
        for w in self.writers.values():
            w.flush()

    def close(self, timeout: float = 3600.0) -> None:
        """Flushes every class's output and refuses further writes. With several ranks each
        rank builds the second level over its own chunks; rank 0 then waits (up to ``timeout``
        seconds) until every rank is done, builds the rest of the levels and prints a summary
        per rank."""
        if self.world_size > 1 and self.rank == 0 and not all(w.closed for w in self.writers.values()):
            # The engine flushes, builds rank 0's share of the second level and waits for the
            # other ranks' chunks (a TimeoutError names what is missing).
            done = _engine.finish_ranks([w._engine for w in self.writers.values()], str(self.target_path), timeout)
            print(f"CellMapDatasetWriter {self.target_path}: {done['done']}/{done['total']} chunks; by rank: "
                  + ", ".join(f"rank {r}: {n}" for r, n in done["by_rank"]), flush=True)
        for w in self.writers.values():
            w.close()

    def __enter__(self) -> "CellMapDatasetWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_raw_value_transforms(self, transforms: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Replaces the raw value transforms."""
        self.raw_value_transforms = transforms

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapDatasetWriter":
        """Returns input tensors on ``device`` from now on."""
        self.device = resolve_device(device)
        return self

    def verify(self) -> bool:
        """Whether there is at least one tile."""
        return len(self) > 0

    def __repr__(self) -> str:
        return (
            f"CellMapDatasetWriter(raw={self.raw_path!r}, target={self.target_path!r}, classes={self.classes}, "
            f"tiles={len(self)})"
        )

