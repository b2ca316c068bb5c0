"""``cellmap_data.image_writer``: where the reference library defines :class:`ImageWriter`.

Scripts written for the reference import the single-image writer from here.
The class lives in :mod:`cellmap_data.writer`; it is imported from there the first time
it is used, so importing this module alone stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellmap_data.writer import ImageWriter

__all__ = ["ImageWriter"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("cellmap_data.writer"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
