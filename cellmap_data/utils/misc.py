"""Small standalone helpers."""

from __future__ import annotations

from difflib import SequenceMatcher

import torch

__all__ = ["longest_common_substring", "torch_max_value"]


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
