"""Former home of the figure helpers, kept so ``cellmap_data.utils.figures`` imports still work.

The helpers live in :mod:`cellmap_data.utils.figs` (the reference library's module name).
"""

from __future__ import annotations

from cellmap_data.utils.figs import (
    fig_to_image,
    get_fig_dict,
    get_image_dict,
    get_image_grid,
    get_image_grid_numpy,
)

__all__ = ["fig_to_image", "get_fig_dict", "get_image_dict", "get_image_grid", "get_image_grid_numpy"]
