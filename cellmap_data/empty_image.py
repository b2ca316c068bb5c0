"""``cellmap_data.empty_image``: where the reference library defines :class:`EmptyImage`.

Scripts written for the reference import the placeholder image from here.
The class lives in :mod:`cellmap_data.image`; it is imported from there the first time
it is used, so importing this module alone stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellmap_data.image import EmptyImage

__all__ = ["EmptyImage"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("cellmap_data.image"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
