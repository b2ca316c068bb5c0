"""Normalisation of user-facing configuration (array specs, centres, transforms) into the
plain, fully 3D (z, y, x) form the engine takes as JSON."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .exceptions import ConfigError

SPATIAL_AXES = ("z", "y", "x")
#: The shear terms, in the engine's order: "zy" is the z displacement per unit of y.
SHEAR_TERMS = ("zy", "zx", "yz", "yx", "xz", "xy")


def check_axis_order(axis_order: str) -> str:
    """Only z/y/x axis orders are supported; a shorter order (e.g. ``"yx"``) means 2D."""
    if not isinstance(axis_order, str) or not axis_order or any(a not in "zyx" for a in axis_order) or len(set(axis_order)) != len(axis_order):
        raise ConfigError(f"axis_order must be made of distinct 'z', 'y', 'x' letters, not {axis_order!r}")
    return axis_order


def spec_to_3d(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``{"shape": (..), "scale": (..)}`` → ``{"name", "shape": [z, y, x], "scale": [z, y, x]}``.

    Two-element specs are 2D slices: a singleton z is prepended and the first scale value
    replicated (the reference library's rule).
    """
    if not isinstance(spec, Mapping) or "shape" not in spec or "scale" not in spec:
        raise ConfigError(f"array '{name}' must be a dict with 'shape' and 'scale', not {spec!r}")
    if any(isinstance(spec[key], (str, bytes)) for key in ("shape", "scale")):
        raise ConfigError(f"array '{name}': shape and scale must be sequences of numbers, not {spec!r}")
    shape = list(spec["shape"])
    scale = list(spec["scale"])
    if len(shape) != len(scale) or not 1 <= len(shape) <= 3:
        raise ConfigError(f"array '{name}': shape {shape} and scale {scale} must both have 2 or 3 entries")
    try:
        shape = [int(s) for s in shape]
        scale = [float(s) for s in scale]
    except (TypeError, ValueError, OverflowError) as error:
        raise ConfigError(f"array '{name}': shape and scale must be numbers ({error})") from None
    while len(shape) < 3:
        shape.insert(0, 1)
        scale.insert(0, scale[0])
    if any(s <= 0 for s in shape):
        raise ConfigError(f"array '{name}': shape {shape} must be positive")
    if any(not (math.isfinite(s) and s > 0) for s in scale):
        raise ConfigError(f"array '{name}': scale {scale} must be positive and finite")
    return {"name": name, "shape": shape, "scale": scale}


def arrays_to_3d(arrays: Mapping[str, Mapping[str, Any]] | None, what: str) -> list[dict[str, Any]]:
    """Normalises an ``input_arrays`` / ``target_arrays`` dict."""
    if arrays is None:
        return []
    if not isinstance(arrays, Mapping):
        raise ConfigError(f"{what} must be a dict of {{name: {{'shape': ..., 'scale': ...}}}}, not {type(arrays).__name__}")
    return [spec_to_3d(name, spec) for name, spec in arrays.items()]


def centre_to_zyx(centre: Mapping[str, Any]) -> list[float]:
    """``{"z": .., "y": .., "x": ..}`` (values may be sequences: their mean is used) → [z, y, x]."""
    out = []
    for axis in SPATIAL_AXES:
        if axis not in centre:
            raise ConfigError(f"centre {dict(centre)!r} has no '{axis}' coordinate")
        value = centre[axis]
        if isinstance(value, (int, float)):
            out.append(float(value))
        else:
            try:
                import numpy as np

                out.append(float(np.mean(np.asarray(value, dtype=float))))
            except (TypeError, ValueError):
                raise ConfigError(f"centre['{axis}'] must be a number, not {value!r}") from None
    return out


def to_json(value: Any) -> str:
    """JSON without NaN (the engine reads ``null`` pad values as NaN)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False)


def spatial_transforms_json(config: Mapping[str, Any] | None) -> Any:
    """Checks the spatial transform config is JSON-able (the engine validates the contents)."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ConfigError(f"spatial_transforms must be a dict, not {type(config).__name__}")

    def plain(v: Any, key: str) -> Any:
        if isinstance(v, Mapping):
            return {str(k): plain(x, f"{key}['{k}']") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x, key) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"spatial_transforms{key} must be finite, not {v}")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max:
            raise ConfigError(f"spatial_transforms{key} must be finite, not an integer of {v.bit_length()} bits")
        if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
            return v.item()
        return v

    return plain(config, "")


def _axes_member(value: Any) -> Any:
    """``{"axes": X}`` (the reference library's nesting) → ``X``; anything else as it is."""
    if isinstance(value, Mapping) and set(value) == {"axes"}:
        return value["axes"]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def spatial_transforms_engine_form(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The reference library's spatial-transform dialects → the one form the engine reads:
    ``{"mirror": {axis: probability}, "transpose": [axis, ...], "rotate": {axis: [low, high]}}``.

    Dialects translated: ``{"axes": ...}`` nesting or the flat form; ``mirror``/``transpose``
    as a bool (every axis; mirror probability 0.5); mirror probabilities given as
    ``True``/``False`` (1 and 0); a rotation given as one number ``m`` (``[-|m|, |m|]``); a zoom
    as ``"scale": [low, high]`` and a shear as ``"shear": s`` (short for ``{"range": ...}``);
    ``elastic`` lengths given per axis name. Values are checked by the engine, which names the key in its errors."""
    config = spatial_transforms_json(config)
    if config is None:
        return None
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "mirror":
            if isinstance(value, bool):
                value = {a: 0.5 if value else 0.0 for a in SPATIAL_AXES}
            value = _axes_member(value)
            if not isinstance(value, Mapping):
                raise ConfigError("spatial_transforms['mirror'] must map axis names to probabilities")
            for a, p in value.items():
                if not isinstance(p, (bool, int, float)):
                    raise ConfigError(f"spatial_transforms['mirror'][{a!r}] must be a probability, not {p!r}")
            out[key] = {a: float(p) for a, p in value.items()}
        elif key == "transpose":
            if isinstance(value, bool):
                value = list(SPATIAL_AXES) if value else []
            value = _axes_member(value)
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise ConfigError(f"spatial_transforms['transpose'] must be {{'axes': ['x', 'y']}} (axis names), not {value!r}")
            out[key] = value
        elif key == "rotate":
            value = _axes_member(value)
            if not isinstance(value, Mapping):
                raise ConfigError("spatial_transforms['rotate'] must map axis names to angle ranges in degrees")
            ranges = {}
            for a, r in value.items():
                if _is_number(r):
                    r = [-abs(r), abs(r)]
                if not (isinstance(r, list) and len(r) == 2 and all(_is_number(x) for x in r)):
                    raise ConfigError(
                        f"spatial_transforms['rotate'][{a!r}] must be [low, high] in degrees or one number, not {r!r}")
                ranges[a] = r
            out[key] = ranges
        elif key == "scale" and isinstance(value, (list, tuple)):
            out[key] = {"range": list(value)}  # [low, high]: one factor for every axis
        elif key == "shear" and _is_number(value):
            out[key] = {"range": value}
        elif key == "elastic" and isinstance(value, Mapping):
            out[key] = _elastic_engine_form(value)
        else:
            out[key] = value  # the engine checks it (and names an unknown transform)
    return out


def _elastic_engine_form(config: Mapping[str, Any]) -> dict[str, Any]:
    """``elastic`` with lengths given per axis name (``{"y": 40, "x": 40}``) → lists in z, y, x
    order: an axis without a sigma is not deformed (its spacing then does not matter)."""
    out = dict(config)
    sigma = config.get("jitter_sigma")
    if isinstance(sigma, Mapping):
        out["jitter_sigma"] = [sigma.get(a, 0.0) for a in SPATIAL_AXES]
    spacing = config.get("control_point_spacing")
    if isinstance(spacing, Mapping):
        sigma = out.get("jitter_sigma")
        deformed = [a for a, s in zip(SPATIAL_AXES, sigma) if s != 0] if isinstance(sigma, list) else list(SPATIAL_AXES)
        missing = [a for a in deformed if a not in spacing]
        if missing:
            raise ConfigError(f"spatial_transforms['elastic']['control_point_spacing'] has no spacing for axes {missing}")
        given = [v for v in spacing.values() if _is_number(v)]
        fallback = max(given) if given else 1.0
        out["control_point_spacing"] = [spacing.get(a, fallback) for a in SPATIAL_AXES]
    return out


def as_sequence(value: Any) -> Sequence[Any]:
    """A list from a scalar or sequence."""
    if isinstance(value, (list, tuple)):
        return value
    return [value]


def specs_in_zyx(arrays: Mapping[str, Mapping[str, Any]] | None, axis_order: str) -> Mapping[str, Mapping[str, Any]] | None:
    """Array specs written in ``axis_order`` (e.g. ``"xyz"``) → the same specs in z, y, x order.

    A spec with as many entries as ``axis_order`` has axes is reordered; an axis missing from a
    shorter order (``"yx"``) becomes the leading singleton, as :func:`spec_to_3d` does. Specs of
    another length, and everything under ``"zyx"``, are left as they are.
    """
    if arrays is None or axis_order == "zyx" or not isinstance(arrays, Mapping):
        return arrays
    out: dict[str, Mapping[str, Any]] = {}
    for name, spec in arrays.items():
        if not isinstance(spec, Mapping) or "shape" not in spec or "scale" not in spec:
            out[name] = spec  # spec_to_3d reports the problem
            continue
        shape, scale = list(spec["shape"]), list(spec["scale"])
        if len(shape) != len(axis_order) or len(scale) != len(axis_order):
            out[name] = spec
            continue
        by_axis = {a: (n, s) for a, n, s in zip(axis_order, shape, scale)}
        present = [a for a in SPATIAL_AXES if a in by_axis]
        converted = dict(spec)
        converted["shape"] = [by_axis[a][0] for a in present]
        converted["scale"] = [by_axis[a][1] for a in present]
        out[name] = converted
    return out


def output_permutation(kept_axes: Sequence[str], axis_order: str) -> list[int] | None:
    """Permutation of the spatial dims ``kept_axes`` (in z, y, x order) into ``axis_order``
    (axes the order does not name first), or None when nothing moves."""
    order = sorted(kept_axes, key=lambda a: axis_order.index(a) if a in axis_order else -1)
    perm = [list(kept_axes).index(a) for a in order]
    return None if perm == sorted(perm) else perm


def accepts_older_positional_order(old_names: Sequence[str], is_old: Any) -> Any:
    """Decorates an ``__init__`` so that calls written for the reference library's older
    positional order still work: when ``is_old(args)`` recognises such a call, the positional
    arguments are bound to ``old_names`` and passed by keyword. The decorated function keeps its
    signature and docstring."""
    import functools

    def decorate(init: Any) -> Any:
        @functools.wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
            if args and is_old(args):
                if len(args) > len(old_names):
                    raise TypeError(f"{type(self).__name__}() takes at most {len(old_names)} positional arguments ({len(args)} given)")
                bound = dict(zip(old_names, args))
                repeated = sorted(set(bound) & set(kwargs))
                if repeated:
                    raise TypeError(f"{type(self).__name__}() got multiple values for {repeated}")
                kwargs.update(bound)
                args = ()
            init(self, *args, **kwargs)

        return wrapper

    return decorate


def set_coordinate_frame(frame: str) -> None:
    """Sets what an OME-NGFF ``translation`` marks, for images, datasets and writers created
    from now on.

    - ``"corner"`` (the default, the reference library's current frame): the translation is
      the corner of voxel 0, an array spans ``[t, t + n·voxel]``, and a writer given bounds
      ``[lo, hi]`` writes ``translation = lo``.
    - ``"centre"`` (OME-NGFF's voxel-centre reading): the translation is the centre of voxel 0,
      an array spans ``[t − voxel/2, t + (n − ½)·voxel]``; the levels of pyramids written with
      the voxel-centre rule (CellMap's ``s1…sN``) line up exactly with ``s0``.

    The environment variable ``CELLMAP_COORDINATE_FRAME`` sets the initial value.
    """
    from . import _engine

    _engine.set_coordinate_frame(frame)


def get_coordinate_frame() -> str:
    """The current coordinate frame, ``"corner"`` or ``"centre"`` (see :func:`set_coordinate_frame`)."""
    from . import _engine

    return _engine.coordinate_frame()


def distributed_context(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): given values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        import torch

        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size}")
    return rank, world_size


_FELL_BACK: set[str] = set()


def resolve_device(device: Any) -> Any:
    """``device`` as a ``torch.device`` (None stays None). A CUDA or MPS device on a machine
    without one falls back to the CPU with one :class:`~cellmap_data.exceptions.DeviceFallbackWarning`
    per process and device type, as the reference library runs on where torch would fail."""
    if device is None:
        return None
    import torch

    resolved = torch.device(device)
    missing = (resolved.type == "cuda" and not torch.cuda.is_available()) or (
        resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()))
    if not missing:
        return resolved
    if resolved.type not in _FELL_BACK:
        _FELL_BACK.add(resolved.type)
        import warnings

        from .exceptions import DeviceFallbackWarning

        warnings.warn(f"device={str(device)!r} was asked for but this machine has no {resolved.type.upper()} device: "
                      "tensors stay on the CPU", DeviceFallbackWarning, stacklevel=3)
    return torch.device("cpu")
