"""Axis-aligned boxes in world units: ``{axis_name: (lo, hi)}``, half-open."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

__all__ = ["Box", "box_intersection", "box_shape", "box_union"]

Box = Mapping[str, Sequence[float]]


def box_intersection(a: Box, b: Box) -> Optional[dict[str, tuple[float, float]]]:
    """The overlap of two boxes, or None when they don't overlap.

    Only the axes the two boxes share are compared: an axis missing from one
    box is left out of the result (it constrains nothing).  Boxes are
    half-open, so boxes that only touch (``a.hi == b.lo``) do not overlap.
    Axes keep ``a``'s order.

    Returns:
        ``{axis: (lo, hi)}`` over the shared axes, or ``None`` when the boxes
        are disjoint on some shared axis or share no axis at all.
    """
    overlap = {}
    for axis, (a_lo, a_hi) in a.items():
        if axis not in b:
            continue
        b_lo, b_hi = b[axis]
        lo, hi = max(a_lo, b_lo), min(a_hi, b_hi)
        if hi <= lo:
            return None
        overlap[axis] = (lo, hi)
    return overlap or None


def box_union(a: Box, b: Box) -> dict[str, tuple[float, float]]:
    """The smallest box containing both boxes (their bounding box).

    Axes of both boxes are combined; an axis present in only one box keeps
    that box's extent.  Axes come in ``a``'s order, then ``b``'s other axes.
    """
    union: dict[str, tuple[float, float]] = {}
    for axis in list(a) + [axis for axis in b if axis not in a]:
        if axis in a and axis in b:
            union[axis] = (min(a[axis][0], b[axis][0]), max(a[axis][1], b[axis][1]))
        else:
            lo, hi = a[axis] if axis in a else b[axis]
            union[axis] = (lo, hi)
    return union


def box_shape(box: Box, scale: Union[Mapping[str, float], Sequence[float]]) -> dict[str, int]:
    """Number of voxels of size ``scale`` along each axis of ``box``, at least 1.

    ``scale`` is ``{axis: voxel_size}`` or a sequence in ``box``'s axis
    order.  Extents are rounded to the nearest integer (Python's ``round``) so
    float noise such as ``(0.3 - 0.0) / 0.1 == 2.9999999999999996`` doesn't
    lose a voxel; an empty or inverted extent counts as 1 voxel, as in the
    reference library.

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
        shape[axis] = max(1, round((hi - lo) / voxel_size))
    return shape
