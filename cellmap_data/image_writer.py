"""``cellmap_data.image_writer``: where the reference library defines :class:`ImageWriter`.

Scripts written for the reference import the single-image writer from here.
The class lives in :mod:`cellmap_data.writer`; it is imported from there the first time
it is used, so importing this module alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellmap_data._lazy import lazy_attributes

if TYPE_CHECKING:
    from cellmap_data.writer import ImageWriter

__all__ = ["ImageWriter"]

__getattr__, __dir__ = lazy_attributes(__name__, {name: "cellmap_data.writer" for name in __all__})
