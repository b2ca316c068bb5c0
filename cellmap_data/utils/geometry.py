"""Axis-aligned boxes in world units: ``{axis_name: (lo, hi)}``, half-open."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

__all__ = ["Box", "box_intersection", "box_shape", "box_union"]

Box = Mapping[str, Sequence[float]]


def _check_same_axes(a: Box, b: Box) -> None:
    if set(a) != set(b):
        raise ValueError(f"boxes have different axes: {list(a)} vs {list(b)}")


def box_intersection(a: Box, b: Box) -> Optional[dict[str, tuple[float, float]]]:
    """The overlap of two boxes, or None when they don't overlap.

    Boxes are half-open, so boxes that only touch (``a.hi == b.lo``) do not
    overlap.  Axes keep ``a``'s order.

    Raises:
        ValueError: the boxes have different axes.
    """
    _check_same_axes(a, b)
    overlap = {}
    for axis, (a_lo, a_hi) in a.items():
        b_lo, b_hi = b[axis]
        lo, hi = max(a_lo, b_lo), min(a_hi, b_hi)
        if hi <= lo:
            return None
        overlap[axis] = (lo, hi)
    return overlap


def box_union(a: Box, b: Box) -> dict[str, tuple[float, float]]:
    """The smallest box containing both boxes (their bounding box).

    Raises:
        ValueError: the boxes have different axes.
    """
    _check_same_axes(a, b)
    return {
        axis: (min(a_lo, b[axis][0]), max(a_hi, b[axis][1])) for axis, (a_lo, a_hi) in a.items()
    }


def box_shape(box: Box, scale: Union[Mapping[str, float], Sequence[float]]) -> dict[str, int]:
    """Number of voxels of size ``scale`` along each axis of ``box``.

    ``scale`` is ``{axis: voxel_size}`` or a sequence in ``box``'s axis
    order.  Extents are rounded to the nearest integer so float noise such as
    ``(0.3 - 0.0) / 0.1 == 2.9999999999999996`` doesn't lose a voxel.

    Raises:
        ValueError: scale length or axes don't match, or a non-positive scale.
    """
    axes = list(box)
    if isinstance(scale, Mapping):
        missing = [axis for axis in axes if axis not in scale]
        if missing:
            raise ValueError(f"scale {dict(scale)} lacks axes {missing}")
        voxel_sizes = [scale[axis] for axis in axes]
    else:
        voxel_sizes = list(scale)
        if len(voxel_sizes) != len(axes):
            raise ValueError(f"scale {voxel_sizes} does not match box axes {axes}")
    shape = {}
    for axis, voxel_size in zip(axes, voxel_sizes):
        if voxel_size <= 0:
            raise ValueError(f"scale must be positive, got {voxel_size} for axis {axis!r}")
        lo, hi = box[axis]
        shape[axis] = max(0, round((hi - lo) / voxel_size))
    return shape
