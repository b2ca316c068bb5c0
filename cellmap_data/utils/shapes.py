"""Helpers for array specs: dicts like ``{"shape": [...], "scale": [...]}``.

A function taking ``info`` accepts either one spec or a dict mapping array
names to specs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence, Union

__all__ = [
    "array_has_singleton_dim",
    "expand_scale",
    "get_sliced_shape",
    "is_array_2D",
    "is_array_spec",
    "permute_singleton_dimension",
]

Summary = Callable[[Iterable[bool]], bool]
ArrayInfo = Mapping[str, Any]


def is_array_spec(info: Any) -> bool:
    """Whether ``info`` is one array spec (has a sequence under ``"shape"``).

    A dict of specs that happens to hold an array named ``"shape"`` is not a
    spec, because its ``"shape"`` value is itself a mapping.
    """
    return isinstance(info, Mapping) and "shape" in info and not isinstance(info["shape"], Mapping)


def _specs(info: Any, caller: str) -> Mapping[str, Any]:
    if not isinstance(info, Mapping):
        raise TypeError(
            f"{caller} expects an array spec with a 'shape' key or a dict of specs, "
            f"got {type(info).__name__}"
        )
    return info


def is_array_2D(
    info: ArrayInfo | None, summary: Summary | None = None
) -> Union[bool, dict[str, bool]]:
    """Whether arrays are 2-D (``len(shape) == 2``).

    Args:
        info: one spec, or a dict ``{name: spec}``; ``None`` or an empty
            dict means "no arrays".
        summary: for a dict of specs, a function such as ``any`` or ``all``
            applied to the per-array results; None returns the dict.

    Returns:
        A bool for one spec; for a dict of specs ``{name: bool}``, or
        ``summary(values)`` when given; ``False`` for ``None`` or ``{}``
        (as the reference library answers).
    """
    if info is None or (isinstance(info, Mapping) and len(info) == 0):
        return False
    if is_array_spec(info):
        return len(info["shape"]) == 2
    results = {name: bool(is_array_2D(spec)) for name, spec in _specs(info, "is_array_2D").items()}
    return results if summary is None else summary(results.values())


def array_has_singleton_dim(
    info: ArrayInfo | None, summary: Union[bool, Summary, None] = True
) -> Union[bool, dict[str, bool]]:
    """Whether arrays have a size-1 axis.

    Args:
        info: one spec, or a dict ``{name: spec}``; ``None`` or an empty
            dict means "no arrays".
        summary: for a dict of specs, ``True`` returns ``any`` over the
            arrays, a callable is applied to the per-array results, and a
            falsy value returns the dict ``{name: bool}``.

    Returns:
        A bool for one spec or with a summary, else ``{name: bool}``;
        ``False`` for ``None`` or ``{}`` (as the reference library answers).
    """
    if info is None or (isinstance(info, Mapping) and len(info) == 0):
        return False
    if is_array_spec(info):
        return any(size == 1 for size in info["shape"])
    specs = _specs(info, "array_has_singleton_dim")
    results = {name: bool(array_has_singleton_dim(spec)) for name, spec in specs.items()}
    if callable(summary):
        return summary(results.values())
    if summary:
        return any(results.values())
    return results


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")


def _singleton_position(shape: Sequence[int], axis: int) -> int:
    """Index of the size-1 axis that get_sliced_shape moves to ``axis``."""
    if shape[axis] == 1:
        return axis
    for position, size in enumerate(shape):
        if size == 1:
            return position
    raise ValueError(f"3-D shape {list(shape)} has no singleton axis to move")


def get_sliced_shape(shape: Sequence[int], axis: int) -> list[int]:
    """The 3-D shape of a 2-D slice lying perpendicular to ``axis``.

    A 2-element shape gets a 1 inserted at ``axis``; a 3-element shape has
    its singleton axis moved to ``axis`` (unchanged if ``shape[axis]`` is
    already 1; with several singletons, the first is moved).

    Raises:
        ValueError: ``axis`` not in 0..2, a shape that is not 2- or 3-element,
            or a 3-element shape without a singleton.
    """
    _check_axis(axis)
    sizes = list(shape)
    if len(sizes) == 2:
        sizes.insert(axis, 1)
        return sizes
    if len(sizes) == 3:
        sizes.pop(_singleton_position(sizes, axis))
        sizes.insert(axis, 1)
        return sizes
    raise ValueError(f"get_sliced_shape needs a 2- or 3-element shape, got {sizes}")


def expand_scale(scale: Sequence[float]) -> list[float]:
    """A 2-D voxel size made 3-D by repeating its first value in front.

    ``expand_scale([4, 8])`` gives ``[4, 4, 8]``; scales of any other length
    come back unchanged (as a new list).
    """
    values = list(scale)
    if len(values) == 2:
        values.insert(0, values[0])
    return values


def _permute_spec(spec: MutableMapping[str, Any], axis: int) -> None:
    shape = list(spec["shape"])
    scale = list(spec["scale"]) if "scale" in spec else None
    if scale is not None:
        if len(shape) == 3 and len(scale) == 3:
            # Move the scale entry with its axis.
            scale.insert(axis, scale.pop(_singleton_position(shape, axis)))
        elif len(scale) == 2:
            # The new axis gets the in-plane voxel size.
            scale.insert(axis, scale[0])
        spec["scale"] = scale
    spec["shape"] = get_sliced_shape(shape, axis)


def permute_singleton_dimension(arr_dict: MutableMapping[str, Any], axis: int) -> None:
    """Make every array 3-D with its singleton axis at ``axis``, in place.

    ``arr_dict`` is one spec or a (possibly nested) dict of specs.  Each
    ``shape`` becomes ``get_sliced_shape(shape, axis)``.  ``scale`` keeps the
    same length as the new shape: a 2-element scale gets its in-plane value
    (``scale[0]``) inserted at ``axis``; a 3-element scale of a 3-D shape is
    permuted like the shape (the singleton's scale moves with it).  A
    3-element scale of a 2-D shape is left as is.
    """
    _check_axis(axis)
    if is_array_spec(arr_dict):
        _permute_spec(arr_dict, axis)
        return None
    for value in _specs(arr_dict, "permute_singleton_dimension").values():
        permute_singleton_dimension(value, axis)
    return None
