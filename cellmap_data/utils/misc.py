"""Small standalone helpers, gathered where the reference library defines them.

``cellmap_data.utils.misc`` holds the reference's miscellaneous helpers.  Here
:func:`longest_common_substring` and :func:`torch_max_value` are defined in this
module; the spec-shape helpers come from :mod:`cellmap_data.utils.shapes`,
:func:`split_target_path` from :mod:`cellmap_data.utils.paths` and
:func:`min_redundant_inds` from :mod:`cellmap_data.utils.sampling`, and are
re-exported so that ``from cellmap_data.utils.misc import ...`` works for
every name the reference puts there.
"""

from __future__ import annotations

from difflib import SequenceMatcher

import torch

from cellmap_data.utils.paths import split_target_path
from cellmap_data.utils.sampling import min_redundant_inds
from cellmap_data.utils.shapes import (
    array_has_singleton_dim,
    expand_scale,
    get_sliced_shape,
    is_array_2D,
    permute_singleton_dimension,
)

__all__ = [
    "array_has_singleton_dim",
    "expand_scale",
    "get_sliced_shape",
    "is_array_2D",
    "longest_common_substring",
    "min_redundant_inds",
    "permute_singleton_dimension",
    "split_target_path",
    "torch_max_value",
]


def longest_common_substring(a: str, b: str) -> str:
    """The longest contiguous substring shared by ``a`` and ``b`` ("" if none).

    Ties resolve to the earliest match in ``a``.
    """
    # autojunk would silently ignore frequent characters in long strings.
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    match = matcher.find_longest_match(0, len(a), 0, len(b))
    return a[match.a : match.a + match.size]


def torch_max_value(dtype: torch.dtype) -> int:
    """The largest value of an integer dtype; 1 for floating and bool dtypes.

    ``torch.uint8`` gives 255, ``torch.int16`` 32767; floating dtypes give 1
    (intensities in [0, 1]); ``torch.bool`` gives 1 (== True).

    Raises:
        TypeError: for complex or other non-real dtypes.
    """
    if dtype == torch.bool or dtype.is_floating_point:
        return 1
    if dtype.is_complex:
        raise TypeError(f"torch_max_value is undefined for complex dtype {dtype}")
    try:
        return torch.iinfo(dtype).max
    except TypeError as error:
        raise TypeError(f"torch_max_value does not support dtype {dtype}") from error
