"""Helpers that training scripts import from ``cellmap_data.utils``."""

from cellmap_data.utils.figures import get_fig_dict
from cellmap_data.utils.geometry import box_intersection, box_shape, box_union
from cellmap_data.utils.misc import longest_common_substring, torch_max_value
from cellmap_data.utils.paths import split_target_path
from cellmap_data.utils.sampling import min_redundant_inds
from cellmap_data.utils.shapes import (
    array_has_singleton_dim,
    get_sliced_shape,
    is_array_2D,
    permute_singleton_dimension,
)

__all__ = [
    "array_has_singleton_dim",
    "box_intersection",
    "box_shape",
    "box_union",
    "get_fig_dict",
    "get_sliced_shape",
    "is_array_2D",
    "longest_common_substring",
    "min_redundant_inds",
    "permute_singleton_dimension",
    "split_target_path",
    "torch_max_value",
]
