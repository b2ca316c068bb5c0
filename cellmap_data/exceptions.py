"""Exceptions raised by cellmap_data.

Every class derives from :class:`CellMapError` *and* from the builtin exception a caller
would naturally catch, so ``except FileNotFoundError`` and ``except CellMapError`` both work.
Messages always name the file, array, key or class involved.
"""

from __future__ import annotations

__all__ = [
    "CellMapError",
    "NotFoundError",
    "MetadataError",
    "ConfigError",
    "ChunkDecodeError",
    "PermissionDeniedError",
    "StorageError",
    "OutputExistsError",
]


class CellMapError(Exception):
    """Base class of every error raised by cellmap_data."""


class NotFoundError(CellMapError, FileNotFoundError):
    """A path (raw group, label folder, level array, CSV) does not exist."""


class MetadataError(CellMapError, ValueError):
    """Zarr / OME-NGFF metadata is malformed, missing or unsupported."""


class ConfigError(CellMapError, ValueError):
    """An argument or configuration value cannot be used (bad shape, unknown key...)."""


class ChunkDecodeError(CellMapError, OSError):
    """A chunk could not be read or decoded (corrupt or truncated bytes, codec failure)."""


class PermissionDeniedError(CellMapError, PermissionError):
    """The operating system refused access to a path."""


class StorageError(CellMapError, OSError):
    """Any other operating-system error while reading or writing data."""


class OutputExistsError(CellMapError, FileExistsError):
    """An output image already exists and ``overwrite`` is false."""
