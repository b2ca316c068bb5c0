"""``cellmap_data.dataset_writer``: where the reference library defines :class:`CellMapDatasetWriter`.

Scripts written for the reference import the prediction writer from here.
The class lives in :mod:`cellmap_data.writer`; it is imported from there the first time
it is used, so importing this module alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellmap_data._lazy import lazy_attributes

if TYPE_CHECKING:
    from cellmap_data.writer import CellMapDatasetWriter

__all__ = ["CellMapDatasetWriter"]

__getattr__, __dir__ = lazy_attributes(__name__, {name: "cellmap_data.writer" for name in __all__})
