"""OME-NGFF 0.4 ``multiscales`` metadata: build it, write it as ``.zattrs``, pick a level.

The dicts built here are the attributes of a multiscale image group::

    {"multiscales": [{
        "axes": [{"name": "z", "type": "space", "unit": "nanometer"}, ...],
        "coordinateTransformations": [{"scale": [1.0, 1.0, 1.0], "type": "scale"}],
        "datasets": [{"coordinateTransformations": [
                          {"scale": [8, 8, 8], "type": "scale"},
                          {"translation": [0, 0, 0], "type": "translation"}],
                      "path": "s0"}, ...],
        "name": "/recon-1/em/fibsem-uint8",
        "version": "0.4"}]}

Level ``s{n}`` of a x2 pyramid has voxel size ``base * 2**n`` and its translation
(the centre of its first voxel) moved by ``base * (2**n - 1) / 2``, half of a
coarse voxel minus half of a base voxel, as in CellMap's published data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, MutableMapping, Optional, Sequence, Union

from cellmap_data.describe import Multiscale, describe
from cellmap_data.exceptions import MetadataError, NotFoundError

__all__ = [
    "add_multiscale_metadata_levels",
    "create_multiscale_metadata",
    "find_level",
    "generate_base_multiscales_metadata",
    "write_metadata",
]

PathLike = Union[str, "os.PathLike[str]"]
ZARR_SUFFIX = ".zarr"
NGFF_VERSION = "0.4"
# Relative slack when comparing voxel sizes, so float noise in stored metadata
# (8.000000000001 nm) doesn't make a level count as coarser than requested.
SCALE_TOLERANCE = 1e-6


def _plain_number(value: Any) -> Union[int, float]:
    """``value`` as a JSON-ready int or float (numpy and torch scalars included)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, int):
        return value
    return float(value)


def _numbers(values: Sequence[Any], what: str, count: int) -> list[Union[int, float]]:
    numbers = [_plain_number(value) for value in values]
    if len(numbers) != count:
        raise ValueError(f"{what} has {len(numbers)} values but there are {count} axes: {numbers}")
    return numbers


def generate_base_multiscales_metadata(
    ds_name: str,
    scale_level: int,
    voxel_size: Sequence[float],
    translation: Sequence[float],
    units: str,
    axes: Sequence[str],
) -> dict[str, Any]:
    """The ``multiscales`` attributes of an image with one level, ``s{scale_level}``.

    Args:
        ds_name: the image's path; only the part after the last ``".zarr"``
            (e.g. ``"/recon-1/em/fibsem-uint8"``) is kept as the ``name``.
        scale_level: number of the level (its path is ``f"s{scale_level}"``).
        voxel_size: voxel size of that level, one value per axis.
        translation: world position of that level's first voxel, per axis.
        units: unit of every axis, e.g. ``"nanometer"``.
        axes: axis names, e.g. ``["z", "y", "x"]``; all of type ``"space"``.

    Returns:
        ``{"multiscales": [...]}`` (OME-NGFF 0.4), a new dict.

    Raises:
        ValueError: ``voxel_size`` or ``translation`` length differs from ``axes``.
    """
    axis_names = [str(axis) for axis in axes]
    name = ds_name.split(ZARR_SUFFIX)[-1] if ZARR_SUFFIX in ds_name else ds_name
    dataset = {
        "coordinateTransformations": [
            {"scale": _numbers(voxel_size, "voxel_size", len(axis_names)), "type": "scale"},
            {"translation": _numbers(translation, "translation", len(axis_names)), "type": "translation"},
        ],
        "path": f"s{int(scale_level)}",
    }
    multiscale = {
        "axes": [{"name": axis, "type": "space", "unit": units} for axis in axis_names],
        "coordinateTransformations": [{"scale": [1.0] * len(axis_names), "type": "scale"}],
        "datasets": [dataset],
        "name": name,
        "version": NGFF_VERSION,
    }
    return {"multiscales": [multiscale]}


def _transform_values(dataset: Mapping[str, Any], kind: str) -> Optional[list[float]]:
    """The ``scale`` or ``translation`` vector of one ``datasets`` entry (None if absent)."""
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == kind or kind in transform:
            values = transform.get(kind)
            if values is not None:
                return list(values)
    return None


def add_multiscale_metadata_levels(
    multsc: MutableMapping[str, Any], base_scale_level: int, levels_to_add: int
) -> MutableMapping[str, Any]:
    """Append ``levels_to_add`` coarser levels of a x2 pyramid to ``multsc``, in place.

    The base is the dataset with path ``s{base_scale_level}`` (the first dataset
    when there is none).  Level ``s{base_scale_level + k}`` for ``k = 1 ..
    levels_to_add`` gets voxel size ``base_scale * 2**k`` and translation
    ``base_translation + base_scale * (2**k - 1) / 2``.

    Args:
        multsc: attributes as made by :func:`generate_base_multiscales_metadata`.
        base_scale_level: number of the base level.
        levels_to_add: how many levels to append (0 appends nothing).

    Returns:
        ``multsc`` itself, changed.

    Raises:
        MetadataError: ``multsc`` has no dataset or its base has no scale.
        ValueError: ``levels_to_add`` is negative.
    """
    if levels_to_add < 0:
        raise ValueError(f"levels_to_add must be >= 0, got {levels_to_add}")
    datasets = multsc["multiscales"][0].get("datasets", [])
    if not datasets:
        raise MetadataError("multiscales metadata has no datasets to add levels to")
    base_path = f"s{int(base_scale_level)}"
    base = next((dataset for dataset in datasets if dataset.get("path") == base_path), datasets[0])
    base_scale = _transform_values(base, "scale")
    if base_scale is None:
        raise MetadataError(f"multiscales dataset {base.get('path')!r} has no scale transform")
    base_translation = _transform_values(base, "translation") or [0.0] * len(base_scale)
    for step in range(1, int(levels_to_add) + 1):
        factor = 2**step
        datasets.append(
            {
                "coordinateTransformations": [
                    {"scale": [size * factor for size in base_scale], "type": "scale"},
                    {
                        "translation": [
                            offset + size * (factor - 1) / 2
                            for size, offset in zip(base_scale, base_translation)
                        ],
                        "type": "translation",
                    },
                ],
                "path": f"s{int(base_scale_level) + step}",
            }
        )
    return multsc


def write_metadata(z_attrs: Mapping[str, Any], out_path: PathLike) -> Path:
    """Write attributes as indented JSON.

    ``out_path`` is the file to write (e.g. ``".../image/.zattrs"``); when it
    is an existing directory (a zarr group), ``.zattrs`` inside it is written.
    Missing parent directories are created.

    Returns:
        The path of the file written.
    """
    target = Path(out_path)
    if target.is_dir():
        target = target / ".zattrs"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(z_attrs, indent=4))
    return target


def create_multiscale_metadata(
    ds_name: str,
    voxel_size: Sequence[float],
    translation: Sequence[float],
    units: str,
    axes: Sequence[str],
    base_scale_level: int = 0,
    levels_to_add: int = 0,
    out_path: Optional[PathLike] = None,
) -> dict[str, Any]:
    """OME-NGFF 0.4 ``multiscales`` attributes for a pyramid, optionally written to disk.

    The base level ``s{base_scale_level}`` has ``voxel_size`` and
    ``translation``; ``levels_to_add`` coarser levels follow (see
    :func:`add_multiscale_metadata_levels`).  With ``out_path`` the result is
    also written there by :func:`write_metadata`.

    Returns:
        The attributes dict (also when it was written).
    """
    z_attrs = generate_base_multiscales_metadata(ds_name, base_scale_level, voxel_size, translation, units, axes)
    if levels_to_add > 0:
        add_multiscale_metadata_levels(z_attrs, base_scale_level, levels_to_add)
    if out_path is not None:
        write_metadata(z_attrs, out_path)
    return z_attrs


def _read_multiscale(path: PathLike) -> Multiscale:
    """The first multiscale of the image group at ``path``, as the engine reads it (zarr v2
    ``.zattrs`` or v3 ``zarr.json``)."""
    node = describe(path)
    if node.kind is None and not Path(path).exists():
        raise NotFoundError(f"multiscale group {str(path)!r} does not exist")
    if node.multiscale is None:
        if node.multiscale_error is not None:
            raise MetadataError(node.multiscale_error)
        raise MetadataError(f"{str(path)!r} has no OME-NGFF multiscales metadata (.zattrs or zarr.json)")
    return node.multiscale


def find_level(path: PathLike, target_scale: Union[Mapping[str, float], Sequence[float]]) -> str:
    """The path of the coarsest level no coarser than ``target_scale`` on any spatial axis.

    Levels are walked in the order of the group's ``multiscales`` datasets
    (finest first); the walk stops at the first level whose voxel size is
    larger than the target on some spatial axis and returns the level before
    it -- or that first level itself if even it is coarser than the target.
    If no level is coarser, the last level is returned.

    Args:
        path: the multiscale image group (zarr v2 with ``.zattrs`` or v3 with
            ``zarr.json``), e.g. ``".../crop234/mito"``.
        target_scale: ``{axis: voxel size}`` for the spatial axes, or a
            sequence in the group's spatial axis order.

    Returns:
        The level's ``path``, e.g. ``"s1"``.

    Raises:
        NotFoundError: ``path`` does not exist.
        MetadataError: no multiscales metadata, no datasets, or a level without scale.
        KeyError: ``target_scale`` lacks a spatial axis of the image.
    """
    multiscale = _read_multiscale(path)
    spatial = [axis.name for axis in multiscale.axes if axis.spatial]
    if isinstance(target_scale, Mapping):
        missing = [name for name in spatial if name not in target_scale]
        if missing:
            raise KeyError(f"target_scale {dict(target_scale)} lacks axes {missing} of {str(path)!r}")
        target = {name: float(target_scale[name]) for name in spatial}
    else:
        values = list(target_scale)
        if len(values) != len(spatial):
            raise KeyError(f"target_scale {values} does not match the spatial axes {spatial} of {str(path)!r}")
        target = dict(zip(spatial, (float(value) for value in values)))
    previous: Optional[str] = None
    for level in multiscale.levels:
        sizes = {axis.name: size for axis, size in zip(multiscale.axes, level.scale)}
        if any(sizes[name] > target[name] * (1 + SCALE_TOLERANCE) for name in spatial):
            return previous if previous is not None else level.path
        previous = level.path
    return str(previous)
