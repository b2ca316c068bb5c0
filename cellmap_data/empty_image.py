"""``cellmap_data.empty_image``: where the reference library defines :class:`EmptyImage`.

Scripts written for the reference import the placeholder image from here.
The class lives in :mod:`cellmap_data.image`; it is imported from there the first time
it is used, so importing this module alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellmap_data._lazy import lazy_attributes

if TYPE_CHECKING:
    from cellmap_data.image import EmptyImage

__all__ = ["EmptyImage"]

__getattr__, __dir__ = lazy_attributes(__name__, {name: "cellmap_data.image" for name in __all__})
