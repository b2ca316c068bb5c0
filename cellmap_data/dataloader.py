"""``cellmap_data.dataloader``: where the reference library defines :class:`CellMapDataLoader`.

Scripts written for the reference import the loader from here.
The class lives in :mod:`cellmap_data.loader`; it is imported from there the first time
it is used, so importing this module alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellmap_data._lazy import lazy_attributes

if TYPE_CHECKING:
    from cellmap_data.loader import CellMapDataLoader

__all__ = ["CellMapDataLoader"]

__getattr__, __dir__ = lazy_attributes(__name__, {name: "cellmap_data.loader" for name in __all__})
