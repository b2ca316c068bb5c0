"""Reading from (and writing to) object stores: ``s3://``, ``gs://`` and ``http(s)://`` URLs
are accepted wherever a local path is (raw and label groups, target templates, datasplit CSV
rows, :class:`~cellmap_data.CellMapImage`, the writer's output, ``stats`` and ``inspect``).

Public buckets are read anonymously; credentials and region come from each service's usual
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``~/.aws/credentials``,
``GOOGLE_APPLICATION_CREDENTIALS`` ...). An S3-compatible store is reached with
``AWS_ENDPOINT_URL`` or :func:`configure_remote(endpoint_url=...) <configure_remote>`.

Options (also from the environment: ``CELLMAP_REMOTE_IN_FLIGHT``, ``CELLMAP_REMOTE_TIMEOUT``,
``CELLMAP_REMOTE_RETRIES``, ``CELLMAP_REMOTE_ANONYMOUS``, ``CELLMAP_DISK_CACHE``,
``CELLMAP_DISK_CACHE_BYTES``) apply to stores opened after they are set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from . import _engine

__all__ = ["configure_remote", "remote_options", "is_url", "groups_exist"]


def configure_remote(
    *,
    endpoint_url: str | None = None,
    anonymous: bool | str | None = None,
    max_in_flight: int | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    disk_cache: str | os.PathLike[str] | None = None,
    disk_cache_bytes: int | None = None,
    range_gap: int | None = None,
) -> dict[str, Any]:
    """Sets how object stores are read; ``None`` keeps a setting. Returns the options now in
    effect.

    Args:
        endpoint_url: S3 endpoint of an S3-compatible store (MinIO, Ceph, a lab's gateway);
            ``""`` goes back to AWS (or ``AWS_ENDPOINT_URL``).
        anonymous: ``True`` never signs requests (public buckets), ``False`` always does,
            ``"auto"`` (the default) signs only when credentials are configured.
        max_in_flight: requests in flight at most, over the whole process (default 64).
        timeout: seconds one request may take, per try (default 30).
        retries: tries after a 5xx answer, a reset or a timeout (default 5; with backoff).
        disk_cache: folder for a cache of fetched chunks, shared safely by processes;
            ``""`` turns it off.
        disk_cache_bytes: the disk cache's budget (default 20 GiB); least recently used
            chunks are deleted beyond it.
        range_gap: byte ranges of one object (inner chunks of a shard) less than this many
            bytes apart are asked for in one request (default 1 MiB); 0 asks for each range on
            its own. Larger values trade bytes for fewer round trips on high-latency stores.
    """
    _engine.set_remote_options(
        endpoint_url=endpoint_url, anonymous=anonymous, max_in_flight=max_in_flight, timeout=timeout, retries=retries,
        disk_cache=None if disk_cache is None else os.fspath(disk_cache), disk_cache_bytes=disk_cache_bytes,
        range_gap=range_gap,
    )
    return remote_options()


def remote_options() -> dict[str, Any]:
    """The object-store options in effect."""
    return dict(_engine.remote_options())


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names an object store (``s3://``, ``gs://``, ``http(s)://``)."""
    return isinstance(location, str) and _engine.is_remote(location)


def groups_exist(locations: Iterable[str]) -> list[bool]:
    """Whether a zarr group or array is at each location (paths or URLs); URLs are asked
    together in one round trip, nothing is listed."""
    return list(_engine.nodes_exist([os.fspath(loc) for loc in locations]))
