"""Type stubs of ``cellmap_data._engine``, the compiled Rust engine (pyo3 module).

Checked against the built module by ``tests/test_stubs.py`` (``mypy.stubtest``). Values that
cross the boundary as JSON (dataset and writer configurations) are built by the Python package
(``cellmap_data._config``, ``cellmap_data.writer``); plans are lists of
``(dataset, index, stream)`` tuples; boxes are ``(lo, hi)`` pairs of ``[z, y, x]`` lists (nm).
"""

from collections.abc import Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, final

from typing_extensions import Self, TypeAlias

_Plan: TypeAlias = tuple[int, int, int]
_Box: TypeAlias = tuple[list[float], list[float]]
_Triple: TypeAlias = Sequence[float]
_StrPath: TypeAlias = str | PathLike[str]

__all__ = [
    "cache_stats",
    "set_cache_budget",
    "set_label_cache_budget",
    "inject_fault",
    "clear_faults",
    "fault_injection_available",
    "clear_cache",
    "live_batch_bytes",
    "pooled_batch_bytes",
    "is_optimized_build",
    "set_coordinate_frame",
    "coordinate_frame",
    "apply_value_ops",
    "elastic_field",
    "check_spatial_draw",
    "finish_ranks",
    "remote_options",
    "set_remote_options",
    "nodes_exist",
    "is_remote",
    "describe",
    "balanced_plan",
    "Volume",
    "Dataset",
    "Batch",
    "Collection",
    "BatchStream",
    "Tensor",
    "RecordBatch",
    "ImageWriter",
    "CountProgress",
    "label_counts",
    "class_stats",
    "default_count_cache_dir",
    "class_weight",
    "CLASS_WEIGHT_CAP",
]

CLASS_WEIGHT_CAP: float
"""Largest background/foreground class weight (also the weight of a class with no foreground)."""

# -- shared chunk cache and build ------------------------------------------------------------

def cache_stats() -> dict[str, Any]:
    """Counters of the shared decoded-chunk cache: hits, misses, bytes, budget, entries,
    decode_seconds, decoded_bytes; and of the label-crop cache: label_hits, label_misses,
    label_passed, label_bytes, label_budget, label_crops, label_decoded_bytes,
    label_decode_seconds."""

def set_cache_budget(bytes: int) -> None:
    """Sets the byte budget of the shared decoded-chunk cache."""

def set_label_cache_budget(bytes: int) -> None:
    """Sets the byte budget of the label-crop cache (0 turns it off: labels are read chunk by chunk)."""

def inject_fault(kind: str, pattern: str, count: int = 1) -> None:
    """Test hook (debug builds only): the next ``count`` chunk reads of arrays whose path
    contains ``pattern`` fail with ``kind`` (``"eio"``: a transient I/O error; ``"panic"``: a
    panic in the read)."""

def clear_faults() -> None:
    """Disarms any injected fault."""

def fault_injection_available() -> bool:
    """Whether this build of the engine can inject faults (debug builds)."""

def clear_cache() -> None:
    """Drops every cached chunk, held label crop and pooled batch buffer, and resets the counters."""

def live_batch_bytes() -> int:
    """Bytes of batch tensor memory currently alive (in the engine or held by Python tensors)."""

def pooled_batch_bytes() -> int:
    """Bytes of freed batch buffers the engine keeps for reuse by later batches (at most 512 MiB
    per element type; ``clear_cache()`` frees them)."""

def is_optimized_build() -> bool:
    """Whether the extension was compiled with optimisations."""

def set_coordinate_frame(frame: str) -> None:
    """Sets what an OME-NGFF ``translation`` marks for volumes and writers opened from now on:
    ``"corner"`` (of voxel 0; the default) or ``"centre"``."""

def coordinate_frame() -> str:
    """The current coordinate frame: ``"corner"`` or ``"centre"``."""

def apply_value_ops(ops_json: str, values: Sequence[float], shape: Sequence[int], value_seed: int = 0, stream: int = 0) -> list[float]:
    """Applies engine value-transform ops (the JSON list a dataset sends) to ``values``, a sample
    tensor of ``shape`` (channel first), drawing random ops from ``value_seed`` and ``stream`` as
    a dataset read does. For tests and inspection; datasets apply the ops while reading."""

def elastic_field(
    seed: int, control_point_spacing: _Triple, jitter_sigma: _Triple, shape: Sequence[int], voxel_size: _Triple
) -> Tensor:
    """The elastic displacement field (nm, in the patch's frame before its rotation) of the draw
    ``(seed, control_point_spacing, jitter_sigma)`` at the voxel centres of a patch of ``shape``
    voxels of ``voxel_size`` nm: a ``[3, *shape]`` tensor (z, y, x components)."""

def check_spatial_draw(
    *,
    mirror: Sequence[bool] = ...,
    permutation: Sequence[int] = ...,
    rotation_deg: _Triple = ...,
    rotation_matrix: Sequence[Sequence[float]] | None = None,
    zoom: _Triple = ...,
    shear: Sequence[float] = ...,
    elastic: tuple[int, _Triple, _Triple] | None = None,
) -> None:
    """Checks a hand-given spatial transform as ``Volume.read`` does (permutation, orthonormal
    rotation, zoom, shear, elastic draw); raises ``ConfigError`` naming what is wrong."""

# -- object stores ---------------------------------------------------------------------------

def balanced_plan(sizes: Sequence[int], annotated: Sequence[Sequence[bool]], count: int, seed: int, epoch: int) -> list[_Plan]:
    """The class-balanced plan of ``count`` samples over rows of ``sizes`` samples, where
    ``annotated[d][c]`` says whether row ``d`` annotates class ``c``: ``(row, index, stream)``."""
def remote_options() -> dict[str, Any]:
    """The object-store options in effect."""

def set_remote_options(
    *, max_in_flight: int | None = None, timeout: float | None = None, retries: int | None = None,
    endpoint_url: str | None = None, anonymous: bool | str | None = None, disk_cache: str | None = None,
    disk_cache_bytes: int | None = None, range_gap: int | None = None,
) -> None:
    """Replaces the object-store options (stores opened afterwards use them)."""

def nodes_exist(locations: list[str]) -> list[bool]:
    """Whether a zarr group or array exists at each location (URLs in one round trip)."""

def is_remote(location: str) -> bool:
    """Whether ``location`` is an object-store URL."""

def describe(location: str) -> str:
    """The engine's description of the zarr node at ``location`` (path or URL), as JSON."""

# -- tensors and batches ---------------------------------------------------------------------

@final
class Tensor:
    """A CPU tensor sharing memory with an engine batch (DLPack export, zero copy)."""

    def __dlpack__(
        self,
        *,
        stream: Any | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """DLPack export (zero copy): a capsule for ``torch.from_dlpack`` / ``numpy.from_dlpack``."""
    def __dlpack_device__(self) -> tuple[int, int]:
        """DLPack device: always CPU (device type 1, id 0)."""
    @property
    def shape(self) -> list[int]:
        """Shape of the tensor."""
    @property
    def dtype(self) -> str:
        """Element type name (``float32`` or ``uint8``)."""
    @property
    def data_ptr(self) -> int:
        """Address of the first element (to check sharing)."""

@final
class RecordBatch:
    """An Arrow record batch (pyo3-arrow / arro3). Pass it to ``pyarrow.record_batch`` or
    ``polars.from_arrow`` (Arrow PyCapsule interface) to work with it."""

    __hash__: ClassVar[None]  # type: ignore[assignment]
    def __new__(
        cls, data: Any, *, names: Sequence[str] | None = None, schema: Any | None = None, metadata: Any | None = None
    ) -> Self: ...
    @classmethod
    def from_arrays(
        cls, arrays: Sequence[Any], *, names: Sequence[str] | None = None, schema: Any | None = None, metadata: Any | None = None
    ) -> Self: ...
    @classmethod
    def from_pydict(cls, mapping: dict[str, Any], *, schema: Any | None = None, metadata: Any | None = None) -> Self: ...
    @classmethod
    def from_struct_array(cls, struct_array: Any) -> Self: ...
    @classmethod
    def from_arrow(cls, input: Any) -> Self: ...
    @classmethod
    def from_arrow_pycapsule(cls, schema_capsule: Any, array_capsule: Any) -> Self: ...
    def __arrow_c_array__(self, requested_schema: Any | None = None) -> tuple[Any, Any]: ...
    def __arrow_c_schema__(self) -> Any: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    def __lt__(self, value: object, /) -> bool: ...
    def __le__(self, value: object, /) -> bool: ...
    def __gt__(self, value: object, /) -> bool: ...
    def __ge__(self, value: object, /) -> bool: ...
    def __getitem__(self, key: int | str, /) -> Any: ...
    def add_column(self, i: int, field: Any, column: Any) -> RecordBatch: ...
    def append_column(self, field: Any, column: Any) -> RecordBatch: ...
    def column(self, i: int | str) -> Any: ...
    def equals(self, other: Any) -> bool: ...
    def field(self, i: int | str) -> Any: ...
    def remove_column(self, i: int) -> RecordBatch: ...
    def select(self, columns: Sequence[int] | Sequence[str]) -> RecordBatch: ...
    def set_column(self, i: int, field: Any, column: Any) -> RecordBatch: ...
    def slice(self, offset: int = 0, length: int | None = None) -> RecordBatch: ...
    def take(self, indices: Any) -> RecordBatch: ...
    def to_struct_array(self) -> Any: ...
    def with_schema(self, schema: Any) -> RecordBatch: ...
    @property
    def column_names(self) -> list[str]: ...
    @property
    def columns(self) -> list[Any]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def num_columns(self) -> int: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def schema(self) -> Any: ...
    @property
    def shape(self) -> tuple[int, int]: ...

@final
class Batch:
    """A batch read by the engine: an Arrow record batch whose tensor columns can be taken as
    zero-copy DLPack tensors."""

    def __len__(self) -> int: ...
    @property
    def tensor_names(self) -> list[str]:
        """Names of the tensor columns (inputs then targets)."""
    def tensor(self, name: str) -> Tensor:
        """The tensor column ``name`` as a ``[batch, *sample_shape]`` DLPack tensor (no copy)."""
    def copy_tensor_into(self, name: str, out: Any) -> None:
        """Copies the tensor column ``name`` into ``out``, a writable C-contiguous uint8 numpy array of
        exactly its size in bytes (e.g. a view of a pinned torch tensor), on the engine's threads
        without the GIL."""
    def record_batch(self) -> RecordBatch:
        """The whole batch as an Arrow record batch (Arrow PyCapsule interface)."""
    def metadata(self) -> RecordBatch:
        """The per-sample metadata columns only (no tensor column), as a record batch."""
    def class_tallies(self) -> RecordBatch:
        """The per-class counts of the delivered targets only (``foreground_*``, ``fraction_*``,
        ``unknown_*`` columns), as a record batch."""
    @property
    def indices(self) -> list[int]:
        """Each sample's index within its dataset."""
    @property
    def positions(self) -> list[int]:
        """Each sample's dataset position in the collection it was read from (empty for a batch
        read from one dataset)."""
    @property
    def incidents(self) -> list[tuple[int, str, str, int, list[float], str]]:
        """Reads retried or samples replaced while reading this batch, per the loader's
        ``on_read_error``: ``(position, action, dataset, index, (z, y, x) centre, message)``
        with action ``"retried"`` or ``"skipped"``."""
    @property
    def value_seeds(self) -> list[int]:
        """Each sample's ``value_seed`` (read from the batch without converting it)."""
    def __arrow_c_array__(self, requested_schema: object | None = None) -> tuple[object, object]:
        """Arrow PyCapsule interface: the batch as one Arrow array (a struct of its columns), so
        ``polars.from_arrow``, ``pyarrow.record_batch`` and DuckDB take it directly. Tensor columns
        keep their fixed-shape-tensor extension type."""
    def __arrow_c_schema__(self) -> object:
        """Arrow PyCapsule interface: the batch's schema."""
    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        """Arrow PyCapsule interface: the batch as a stream of one record batch."""

# -- images and datasets ---------------------------------------------------------------------

@final
class Volume:
    """A multiscale OME-NGFF image opened by the engine."""

    def __new__(cls, path: str) -> Self: ...
    @property
    def path(self) -> str:
        """The image group path."""
    @property
    def ngff_version(self) -> str:
        """OME-NGFF version of the metadata."""
    @property
    def axes(self) -> list[tuple[str, str | None, str | None]]:
        """Axes as (name, type, unit) tuples."""
    @property
    def levels(self) -> list[dict[str, Any]]:
        """One dict per level: path, shape, chunks, voxel_size, translation (as written),
        voxel0_centre (world centre of voxel 0 in the coordinate frame), dtype, world_box."""
    def pick_level(self, voxel_size: _Triple) -> int:
        """Index of the level closest to ``voxel_size`` (z, y, x nm); ties go to the finer level."""
    def read(
        self,
        centre: _Triple,
        shape: Sequence[int],
        voxel_size: _Triple,
        *,
        level: int | None = None,
        pad: bool = True,
        pad_value: float = ...,
        interpolation: str = "nearest",
        foreground: bool = False,
        mirror: Sequence[bool] = ...,
        permutation: Sequence[int] = ...,
        rotation_deg: _Triple = ...,
        rotation_matrix: Sequence[Sequence[float]] | None = None,
        zoom: _Triple = ...,
        shear: Sequence[float] = ...,
        elastic: tuple[int, _Triple, _Triple] | None = None,
    ) -> Tensor:
        """Reads a patch of ``shape`` voxels of ``voxel_size`` nm centred at ``centre`` (nm, z y x);
        world offset = rotation · diag(zoom) · shear · transpose · mirror · (patch offset +
        elastic displacement), with the six shear terms in the order zy, zx, yz, yx, xz, xy and
        ``elastic`` = ``(seed, control_point_spacing, jitter_sigma)`` (nm)."""

@final
class Dataset:
    """One raw volume with one crop's labels, as configured by ``CellMapDataset``."""

    def __new__(cls, config_json: str) -> Self: ...
    def __len__(self) -> int: ...
    def centre(self, index: int) -> list[float]:
        """World centre (z, y, x nm) of grid sample ``index``."""
    @property
    def bounding_box(self) -> _Box:
        """Intersection of the raw and annotated label boxes, as (lo, hi)."""
    @property
    def sampling_box(self) -> _Box | None:
        """Box of valid sample centres, or None when no patch fits."""
    @property
    def grid(self) -> list[int]:
        """Samples per axis of the sample grid."""
    def tile_indices(self, step: Sequence[int]) -> list[int]:
        """Indices of the samples stepping by ``step`` grid positions per axis, the last on each
        axis at the far end (validation tiles covering the whole grid)."""
    @property
    def input_levels(self) -> list[int]:
        """Raw level read by each input array."""
    @property
    def target_levels(self) -> list[list[int | None]]:
        """Per target array, per class, the label level read (None: unannotated)."""
    @property
    def sample_shapes(self) -> list[tuple[str, list[int]]]:
        """Per-sample tensor shape of each array, in output order."""
    @property
    def planar_axis(self) -> int | None:
        """Singleton axis shared by all arrays (2D patches), if any."""
    def read_batch(
        self,
        indices: Sequence[int],
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        augment: bool = False,
        stream_indices: Sequence[int] | None = None,
    ) -> Batch:
        """Reads the grid samples ``indices`` as one batch."""
    def read_centres(self, centres: Sequence[_Triple], indices: Sequence[int]) -> Batch:
        """Reads patches centred at arbitrary world ``centres`` (z, y, x nm) without augmentation."""

# -- collections and streams -----------------------------------------------------------------

@final
class Collection:
    """Several datasets concatenated into one sample index space."""

    def __new__(cls, datasets: Sequence[Dataset]) -> Self: ...
    @property
    def sizes(self) -> list[int]:
        """Samples per dataset."""
    @property
    def annotated(self) -> list[list[bool]]:
        """``[n_datasets][n_classes]``: whether each dataset annotates each class."""
    def plan_uniform(self, count: int | None, shuffle: bool, seed: int, epoch: int) -> list[_Plan]:
        """Uniform plan: ``count`` samples (None: all once), shuffled or in order."""
    def plan_balanced(self, count: int, seed: int, epoch: int) -> list[_Plan]:
        """Class-balanced plan of ``count`` samples."""
    @staticmethod
    def shard(plan: Sequence[_Plan], part: int, parts: int) -> list[_Plan]:
        """Shard ``part`` of ``parts`` of a plan."""
    def read(self, samples: Sequence[_Plan], *, seed: int = 0, epoch: int = 0, augment: bool = False) -> Batch:
        """Reads one batch of planned samples now."""
    def epoch_plan(self, settings_json: str) -> list[list[_Plan]]:
        """The batches of one epoch from its settings (JSON: source, samples, batch_size, drop_last,
        iterations, rank, world_size, worker, workers, seed, epoch); every random decision comes
        from the keyed streams."""
    def epoch_stream(
        self, settings_json: str, *, threads: int, prefetch: int, augment: bool = False, start: int = 0
    ) -> BatchStream:
        """Plans the epoch of ``settings_json`` and starts reading it in the background from batch
        ``start`` (a resumed epoch): one call, the plan never crosses to Python."""
    def epoch_shape(self, settings_json: str) -> dict[str, int]:
        """The shape of the epoch of ``settings_json`` on this rank, without planning it:
        ``planned`` (samples, all ranks), ``per_rank``, ``padding``, ``dropped``, ``batches`` (per
        rank), ``worker_batches`` and ``worker_samples``."""
    def epoch_metadata(self, settings_json: str, *, augment: bool = False) -> RecordBatch:
        """The sample metadata of the epoch of ``settings_json``, read from its plan alone: the
        columns every batch's record batch carries, after a ``batch`` column."""
    def stream(
        self,
        batches: Sequence[Sequence[_Plan]],
        *,
        threads: int,
        prefetch: int,
        seed: int = 0,
        epoch: int = 0,
        augment: bool = False,
    ) -> BatchStream:
        """Starts reading ``batches`` in the background on ``threads`` engine threads."""

@final
class BatchStream:
    """An epoch being read by engine threads; iterate it to get ``Batch``es in plan order."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def close(self) -> None:
        """Stops the background reads and frees queued batches."""
    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        """The rest of the epoch as an Arrow C stream of record batches (the stream takes over
        the reads; the first batch is awaited)."""

# -- writing ---------------------------------------------------------------------------------

@final
class ImageWriter:
    """An output image being written (zarr v2 + OME-NGFF 0.4 or zarr v3 + OME-NGFF 0.5)."""

    def __new__(cls, config_json: str) -> Self: ...
    @staticmethod
    def validate(config_json: str) -> None:
        """Checks a configuration (values, existing output, write permission) without writing."""
    @staticmethod
    def clear(config_json: str) -> bool:
        """Removes an existing image at the configured path (checked as ``overwrite`` checks it);
        returns whether one was there."""
    def __len__(self) -> int: ...
    @property
    def path(self) -> str:
        """The image group path."""
    @property
    def shape(self) -> list[int]:
        """Array shape of the first level (z, y, x voxels)."""
    @property
    def chunks(self) -> list[int]:
        """Chunk shape (z, y, x voxels)."""
    @property
    def write_shape(self) -> list[int]:
        """Shape of one write (z, y, x voxels)."""
    @property
    def translation(self) -> list[float]:
        """The translation written in the metadata (nm): the corner of voxel 0, or its centre in
        the ``"centre"`` coordinate frame."""
    @property
    def levels(self) -> list[dict[str, Any]]:
        """One dict per level: path, shape, voxel_size, translation."""
    @property
    def tile_starts(self) -> list[list[int]] | None:
        """Per-axis tile starts of the plan (array voxels), or None without a plan."""
    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
    @property
    def stats(self) -> dict[str, int]:
        """Counters: chunks_written, bytes_written, pending_chunks, complete_chunks."""
    def tile_centres(self, indices: Sequence[int]) -> list[list[float]]:
        """World centres (z, y, x nm) of planned tiles ``indices``."""
    def tiles_to_write(self) -> list[int]:
        """The planned tiles this process has to write, ascending (its rank's share; without the
        chunks already complete when it opened)."""
    def progress(self) -> tuple[dict[int, int], int] | None:
        """Completion of the first level, read from disk: ``(complete chunks per rank that wrote
        them, total chunks)``, or None without a tiling plan."""
    def levels_done(self) -> tuple[int, int] | None:
        """``(built, total)`` chunks of the second level (counted on disk), or None without
        downsampled levels or a tiling plan."""
    def write_tiles(self, indices: Sequence[int], data: Any) -> None:
        """Writes planned tiles ``indices``; ``data`` is a C-contiguous float32 numpy array."""
    def write_boxes(self, starts: Sequence[Sequence[int]], data: Any) -> None:
        """Writes boxes of the write shape at ``starts`` (array voxels; clipped to the array)."""
    def read_box(self, start: Sequence[int], shape: Sequence[int]) -> Tensor:
        """Reads back ``shape`` voxels starting at ``start`` (pending data included)."""
    def flush(self) -> None:
        """Writes every pending chunk."""
    def close(self) -> None:
        """Flushes, writes the downsampled levels, and refuses further writes."""

def finish_ranks(writers: Sequence[ImageWriter], job: str, timeout: float) -> dict[str, Any]:
    """Rank 0's close of a job written by several ranks: flushes ``writers``, builds rank 0's
    shares of their second levels and waits (up to ``timeout`` seconds; Ctrl-C ends it) until
    every rank's chunks are there. Returns ``{"done", "total", "by_rank": [(rank, chunks)]}``;
    raises ``WaitTimeoutError`` naming ``job`` and what is missing."""

# -- class counts and statistics -------------------------------------------------------------

@final
class CountProgress:
    """Progress of a running count (chunks scanned / announced), shared with the engine threads;
    ``cancel()`` makes the count stop with ``KeyboardInterrupt``."""

    def __new__(cls) -> Self: ...
    @property
    def done(self) -> int:
        """Chunks scanned so far."""
    @property
    def total(self) -> int:
        """Chunks announced so far (grows as scans start)."""
    @property
    def cancelled(self) -> bool:
        """Whether ``cancel()`` was called."""
    def cancel(self) -> None:
        """Asks the running count to stop."""

def label_counts(
    path: _StrPath,
    voxel_size: _Triple,
    *,
    cache_dir: _StrPath | None = None,
    use_cache: bool = True,
    use_metadata: bool = True,
    progress: CountProgress | None = None,
) -> dict[str, Any]:
    """Foreground/total counts of the label group ``path`` at the training ``voxel_size``."""

def class_stats(
    entries: Sequence[tuple[str, str, str, _StrPath | None, _Triple]],
    *,
    cache_dir: _StrPath | None = None,
    use_cache: bool = True,
    use_metadata: bool = True,
    progress: CountProgress | None = None,
) -> RecordBatch:
    """The class statistics table of ``entries`` ``(dataset, crop, class, label path or None,
    training voxel size)``."""

def class_weight(foreground: float, total: float) -> float:
    """Background/foreground weight of a class, capped at ``CLASS_WEIGHT_CAP``."""

def default_count_cache_dir() -> Path | None:
    """The count cache folder used when none is given (None: caching is off)."""
