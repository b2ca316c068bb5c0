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
    "WaitTimeoutError",
    "ReadErrorWarning",
    "ReferenceDifferenceWarning",
    "DeviceFallbackWarning",
    "warn_reference_difference",
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


class WaitTimeoutError(CellMapError, TimeoutError):
    """A wait ran past its limit: rank 0 closing a writer before the other ranks' chunks
    arrived (a rank may have died; a restart with the same arguments resumes)."""


class ReadErrorWarning(UserWarning):
    """A read failed and was retried or skipped per the loader's ``on_read_error`` (shown once
    per failing path; ``loader.stats()`` counts them all)."""


class ReferenceDifferenceWarning(UserWarning):
    """A setting means something different here than in the reference ``cellmap-data`` release,
    so a script written for it does a different amount of work (shown once per kind)."""


class DeviceFallbackWarning(UserWarning):
    """A device was asked for that this machine does not have (``device="cuda"`` without CUDA):
    tensors stay on the CPU (shown once per process)."""


_WARNED: set[str] = set()


def warn_reference_difference(key: str, message: str, stacklevel: int = 3) -> None:
    """Emits :class:`ReferenceDifferenceWarning` ``message`` once per process for ``key``."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    import warnings

    warnings.warn(message, ReferenceDifferenceWarning, stacklevel=stacklevel)
