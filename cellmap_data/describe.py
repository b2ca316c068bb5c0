"""What a zarr node is, as the engine reads it: :func:`describe` returns one typed record
(kind, zarr format, attributes, an image group's OME-NGFF multiscale, an array's layout and
codecs) for a local path or an object-store URL. Nothing in the package reads zarr or
OME-NGFF JSON itself; ``inspect``, :func:`cellmap_data.utils.find_level` and the dataset's
probes ask this."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import _engine


@dataclass(frozen=True)
class Axis:
    """One axis of a multiscale image."""

    name: str
    kind: str | None  # "space", "channel", "time", or None when the metadata does not say
    unit: str | None
    spatial: bool  # whether the engine samples along it


@dataclass(frozen=True)
class Level:
    """One level of a multiscale image: its array path, voxel size and translation (every
    axis, in metadata order; top-level transforms folded in)."""

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Multiscale:
    """The first OME-NGFF multiscale of an image group."""

    version: str
    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]


@dataclass(frozen=True)
class Codec:
    """One codec and its parameters; a sharding codec lists its inner chunks' codecs."""

    name: str
    configuration: dict[str, Any]
    inner: tuple[Codec, ...] = ()


@dataclass(frozen=True)
class ArrayLayout:
    """An array's shape, chunks (a sharded array's shards, and its inner chunks), data type and
    codecs (zarr v3 form: a v2 compressor appears as its v3 codec)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    inner_chunks: tuple[int, ...] | None
    data_type: str
    codecs: tuple[Codec, ...]


@dataclass(frozen=True)
class NodeDescription:
    """A zarr node at a path or URL. ``kind`` is ``"group"``, ``"array"``, or None where there
    is no zarr metadata."""

    location: str
    kind: str | None
    zarr_format: int | None
    attributes: dict[str, Any] = field(default_factory=dict)
    multiscale: Multiscale | None = None
    multiscale_error: str | None = None  # why declared multiscales could not be read
    array: ArrayLayout | None = None

    @property
    def is_image(self) -> bool:
        """An OME-NGFF image group (a group with a readable multiscale)."""
        return self.kind == "group" and self.multiscale is not None


def _codec(record: dict[str, Any]) -> Codec:
    return Codec(record["name"], dict(record["configuration"]), tuple(_codec(c) for c in record["inner"]))


def describe(location: str | os.PathLike[str]) -> NodeDescription:
    """The zarr node at ``location`` (a folder, or an ``s3://``, ``gs://`` or ``http(s)://``
    URL), read by the engine: a few metadata requests, no chunk, no listing.

    Raises:
        MetadataError: its metadata is malformed (naming the document).
        PermissionDeniedError, StorageError: the store refused or failed the reads.
    """
    record = json.loads(_engine.describe(os.fspath(location)))
    multiscale = record["multiscale"]
    array = record["array"]
    return NodeDescription(
        location=record["location"],
        kind=record["kind"],
        zarr_format=record["zarr_format"],
        attributes=record["attributes"] if isinstance(record["attributes"], dict) else {},
        multiscale=None if multiscale is None else Multiscale(
            version=multiscale["version"],
            axes=tuple(Axis(a["name"], a["kind"], a["unit"], a["spatial"]) for a in multiscale["axes"]),
            levels=tuple(Level(lv["path"], tuple(lv["scale"]), tuple(lv["translation"])) for lv in multiscale["levels"]),
        ),
        multiscale_error=record["multiscale_error"],
        array=None if array is None else ArrayLayout(
            shape=tuple(array["shape"]), chunks=tuple(array["chunks"]),
            inner_chunks=None if array["inner_chunks"] is None else tuple(array["inner_chunks"]),
            data_type=array["data_type"], codecs=tuple(_codec(c) for c in array["codecs"]),
        ),
    )
