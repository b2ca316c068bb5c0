"""Single multiscale arrays: :class:`CellMapImage` (read a patch at a world centre) and
:class:`EmptyImage` (a class with no annotation: a constant, NaN by default)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from . import _engine
from ._config import SHEAR_TERMS, SPATIAL_AXES, centre_to_zyx, check_axis_order, resolve_device
from .exceptions import ConfigError

_log = logging.getLogger(__name__)

__all__ = ["CellMapImage", "EmptyImage"]


def _left_pad(values: Any, length: int, fill: Any, what: str) -> list:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) > length:
        raise ConfigError(f"{what} {values} has more entries than the axis order has axes ({length})")
    return [fill(values)] * (length - len(values)) + values


class CellMapImage:
    """One multiscale image (raw EM or one label class) read by the engine.

    ``img[{"z": .., "y": .., "x": ..}]`` returns a float32 tensor of ``target_voxel_shape``
    voxels of ``target_scale`` nm centred at that world position (nm), read from the level
    closest to ``target_scale`` (finer on ties). Voxels outside the array are ``pad_value``
    when ``pad`` is true; otherwise the read is moved inside the array.
    """

    def __init__(
        self,
        path: str,
        target_class: str,
        target_scale: Any,
        target_voxel_shape: Any,
        pad: bool = False,
        pad_value: float = math.nan,
        interpolation: str = "nearest",
        axis_order: str = "zyx",
        value_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        context: Any = None,
        device: str | torch.device | None = None,
    ) -> None:
        check_axis_order(axis_order)
        if interpolation not in ("nearest", "linear"):
            raise ConfigError(f"interpolation must be 'nearest' or 'linear', not {interpolation!r}")
        self.path = str(path)
        self.label_class = target_class
        #: Axis names in order (a list, as the reference library has it).
        self.axes = list(axis_order)
        # Short specs are left-padded to the axis order (scale with its first value, shape with 1).
        scale = _left_pad(target_scale, len(axis_order), lambda v: v[0], "target_scale")
        shape = _left_pad(target_voxel_shape, len(axis_order), lambda v: 1, "target_voxel_shape")
        self._scale_zyx = [float(scale[axis_order.index(a)]) if a in axis_order else float(scale[0]) for a in SPATIAL_AXES]
        self._shape_zyx = [int(shape[axis_order.index(a)]) if a in axis_order else 1 for a in SPATIAL_AXES]
        self.pad = bool(pad)
        self.pad_value = float(pad_value)
        self.interpolation = interpolation
        self.value_transform = value_transform
        self.device = resolve_device(device)
        self._spatial: dict[str, Any] | None = None
        self._volume = _engine.Volume(self.path)
        self._levels = self._volume.levels

    # -- geometry -----------------------------------------------------------------------
    @property
    def scale(self) -> dict[str, float]:
        """Requested voxel size per axis (nm)."""
        return dict(zip(SPATIAL_AXES, self._scale_zyx))

    @property
    def output_shape(self) -> dict[str, int]:
        """Requested patch shape per axis (voxels)."""
        return dict(zip(SPATIAL_AXES, self._shape_zyx))

    @property
    def output_size(self) -> dict[str, float]:
        """Requested patch extent per axis (nm)."""
        return {a: s * n for a, s, n in zip(SPATIAL_AXES, self._scale_zyx, self._shape_zyx)}

    @property
    def scale_level(self) -> int:
        """Index of the level read for the requested scale."""
        return self._volume.pick_level(self._scale_zyx)

    @property
    def _level_info(self) -> list[tuple[str, list[float], list[float]]]:
        """(path, voxel size, origin) per level, as the reference exposes it."""
        return [(lv["path"], lv["voxel_size"], lv["translation"]) for lv in self._levels]

    @property
    def levels(self) -> list[dict[str, Any]]:
        """The multiscale levels, finest first, as the engine opened them: ``path``,
        ``voxel_size``, ``translation``, ``shape``, ``chunks``, ``dtype`` and ``world_box``
        (z, y, x; nm)."""
        return [dict(level) for level in self._levels]

    @property
    def bounding_box(self) -> dict[str, tuple[float, float]]:
        """World box (nm, voxel edges) of the finest level."""
        lo, hi = self._levels[0]["world_box"]
        return {a: (lo[k], hi[k]) for k, a in enumerate(SPATIAL_AXES)}

    @property
    def sampling_box(self) -> dict[str, tuple[float, float]] | None:
        """Box of centres whose patch stays inside the image; ``None`` when the patch does not
        fit and ``pad`` is false (a padded image collapses to its centre on such axes)."""
        box = {}
        for a, (lo, hi) in self.bounding_box.items():
            half = self.output_size[a] / 2
            if hi - half >= lo + half:
                box[a] = (lo + half, hi - half)
            elif self.pad:
                c = (lo + hi) / 2
                box[a] = (c, c)
            else:
                return None
        return box

    def get_center(self, idx: int) -> dict[str, float]:
        """World centre of sample ``idx`` on a grid with the requested voxel spacing over the
        sampling box."""
        box = self.sampling_box
        if box is None:
            raise ConfigError(f"{self.path}: the patch does not fit in the image and pad is False")
        counts = [int((box[a][1] - box[a][0]) / s + 1e-9) + 1 for a, s in zip(SPATIAL_AXES, self._scale_zyx)]
        total = counts[0] * counts[1] * counts[2]
        if not 0 <= idx < total:
            raise IndexError(f"index {idx} out of range for {total} centres")
        ijk = (idx // (counts[1] * counts[2]), (idx // counts[2]) % counts[1], idx % counts[2])
        out = {}
        for k, a in enumerate(SPATIAL_AXES):
            lo, hi = box[a]
            used = (counts[k] - 1) * self._scale_zyx[k]
            out[a] = lo + (hi - lo - used) / 2 + ijk[k] * self._scale_zyx[k]
        return out

    # -- counts -------------------------------------------------------------------------
    def _counts(self) -> dict[str, Any]:
        from ._stats import label_counts

        return label_counts(self.path, self._scale_zyx, progress=False)

    @property
    def class_counts(self) -> dict[str, float]:
        """``{label_class: foreground voxels}`` at the requested scale (from the labels'
        ``complement_counts`` metadata, the count cache, or a scan; the data is never written)."""
        return {self.label_class: float(self._counts()["foreground"])}

    @property
    def total_voxels(self) -> float:
        """Voxels of the image at the requested scale."""
        return float(self._counts()["total"])

    @property
    def bg_count(self) -> float:
        """Background (non-foreground) voxels at the requested scale."""
        counts = self._counts()
        return float(counts["total"] - counts["foreground"])

    # -- reading ------------------------------------------------------------------------
    def set_spatial_transforms(self, transforms: Mapping[str, Any] | None) -> None:
        """Sets a concrete transform for following reads (any subset of the keys), or ``None``.

        Both the project's form and the reference library's are accepted:

        - ``"mirror"``: axis names (``["x"]``), ``{axis: bool}``, or one bool per axis of
          ``axis_order``;
        - ``"transpose"``: axis names in their new order (``["z", "x", "y"]``) or a permutation
          of axis positions (``[0, 2, 1]``): output axis ``k`` walks input axis ``perm[k]``;
        - ``"rotate"``: ``{axis: degrees}`` (rotating about an axis turns the plane of the other
          two), or ``"rotation_matrix"``: a 3×3 (or, for a 2D ``axis_order``, 2×2) orthonormal
          matrix in ``axis_order``, used as given: world offset = matrix · turned offset;
        - ``"scale"``: ``{axis: factor}`` (the patch covers ``factor`` times its world extent) and
          ``"shear"``: ``{"zy": term, ...}`` (the z displacement per unit of y, ...), as recorded
          in a sample's metadata (``current_spatial_transforms``);
        - ``"elastic"``: ``{"seed": s, "control_point_spacing": [z, y, x], "jitter_sigma": [z, y, x]}``
          (nm; a length may be one number): the deformation field a sample drew, as recorded in
          its metadata; the same seed gives the same field at any patch size and scale.
        """
        if transforms is not None and not isinstance(transforms, Mapping):
            raise ConfigError("spatial transforms must be a dict or None")
        unknown = set(transforms or {}) - {"mirror", "transpose", "rotate", "rotation_matrix", "scale", "shear",
                                            "elastic"}
        if unknown:
            raise ConfigError(f"unknown spatial transform(s) {sorted(unknown)}")
        self._spatial = dict(transforms) if transforms else None
        if self._spatial is not None:
            # The engine's own check of a hand-given transform: errors now, not at the next read.
            _engine.check_spatial_draw(**self._draw_arguments())

    def _axes_of(self, what: str, values: Any) -> list[str]:
        """Axis names from names, or from positions in ``axis_order``."""
        out = []
        for v in values:
            if isinstance(v, str) and v in SPATIAL_AXES:
                out.append(v)
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < len(self.axes):
                out.append(self.axes[int(v)])
            else:
                raise ConfigError(f"spatial transform {what!r}: {v!r} is not an axis name or a position in {self.axes!r}")
        return out

    def _draw_arguments(self) -> dict[str, Any]:
        t = self._spatial or {}
        mirror_spec = t.get("mirror", ())
        if isinstance(mirror_spec, Mapping):
            mirrored = {a for a, flag in mirror_spec.items() if flag}
        elif all(isinstance(v, (bool, np.bool_)) for v in mirror_spec) and len(mirror_spec) == len(self.axes):
            mirrored = {a for a, flag in zip(self.axes, mirror_spec) if flag}
        else:
            mirrored = set(self._axes_of("mirror", mirror_spec))
        unknown = mirrored - set(SPATIAL_AXES)
        if unknown:
            raise ConfigError(f"spatial transform 'mirror': unknown axes {sorted(unknown)}")
        mirror = [a in mirrored for a in SPATIAL_AXES]
        order = self._axes_of("transpose", t["transpose"]) if "transpose" in t else list(self.axes)
        if sorted(order) != sorted(self.axes):
            raise ConfigError(f"transpose must list the axes {list(self.axes)} once each, not {list(t.get('transpose', ()))}")
        # Axes outside a 2D axis_order stay where they are.
        moved = iter(order)
        full_order = [next(moved) if a in self.axes else a for a in SPATIAL_AXES]
        permutation = [SPATIAL_AXES.index(a) for a in full_order]
        rotation = [float(t.get("rotate", {}).get(a, 0.0)) for a in SPATIAL_AXES]
        zoom = [float(t.get("scale", {}).get(a, 1.0)) for a in SPATIAL_AXES]
        unknown_terms = set(t.get("shear", {})) - set(SHEAR_TERMS)
        if unknown_terms:
            raise ConfigError(f"spatial transform 'shear': unknown terms {sorted(unknown_terms)} (terms: {list(SHEAR_TERMS)})")
        shear = [float(t.get("shear", {}).get(term, 0.0)) for term in SHEAR_TERMS]
        arguments: dict[str, Any] = {"mirror": mirror, "permutation": permutation, "rotation_deg": rotation,
                                     "zoom": zoom, "shear": shear}
        if t.get("rotation_matrix") is not None:
            arguments["rotation_matrix"] = self._rotation_in_zyx(t["rotation_matrix"])
        if t.get("elastic") is not None:
            arguments["elastic"] = _elastic_arguments(t["elastic"])
        return arguments

    def _rotation_in_zyx(self, matrix: Any) -> list[list[float]]:
        """A rotation matrix written in ``axis_order`` as a 3×3 matrix in z, y, x order."""
        r = np.asarray(matrix, dtype=float)
        n = len(self.axes)
        if r.shape != (n, n):
            raise ConfigError(f"rotation_matrix must be {n}x{n} for axis_order {self.axes!r}, not {list(r.shape)}")
        full = np.eye(3)
        index = [SPATIAL_AXES.index(a) for a in self.axes]
        full[np.ix_(index, index)] = r
        return full.tolist()

    def __getitem__(self, center: Mapping[str, Any]) -> torch.Tensor:
        """The patch centred at world position ``center`` (``{"z", "y", "x"}`` nm)."""
        centre = centre_to_zyx(center)
        outside = self._axis_outside(centre)
        if outside is not None:
            axis, (lo, hi) = outside
            message = (f"{self.path}: the patch centred at {dict(zip(SPATIAL_AXES, centre))} lies entirely outside the "
                       f"image along {axis} ([{lo:g}, {hi:g}] nm); returning {self.pad_value if self.pad else math.nan} "
                       "everywhere")
            # Both channels: scripts filter warnings, pipelines read logs (the reference logs an
            # "out-of-bounds" record).
            _log.warning("out-of-bounds read: %s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            value = self.pad_value if self.pad else math.nan
            return self._finish(torch.full(self._shape_zyx, value, dtype=torch.float32))
        tensor = self._volume.read(
            centre,
            self._shape_zyx,
            self._scale_zyx,
            pad=self.pad,
            pad_value=self.pad_value,
            interpolation=self.interpolation,
            **self._draw_arguments(),
        )
        return self._finish(torch.from_dlpack(tensor))

    def _axis_outside(self, centre: list[float]) -> tuple[str, tuple[float, float]] | None:
        """The first axis along which a patch centred at ``centre`` misses the image entirely
        (and the image's extent there), or None when the patch overlaps it."""
        extents = [n * v for n, v in zip(self._shape_zyx, self._scale_zyx)]
        spatial = self._spatial or {}
        turned = spatial.get("rotation_matrix") is not None or any(spatial.get("rotate", {}).values())
        for k, (a, (lo, hi)) in enumerate(self.bounding_box.items()):
            # A turned patch reaches at most half its diagonal from the centre.
            half = math.hypot(*extents) / 2 if turned else extents[k] / 2
            if centre[k] + half <= lo or centre[k] - half >= hi:
                return a, (lo, hi)
        return None

    def _finish(self, data: torch.Tensor) -> torch.Tensor:
        """A read ``[z, y, x]`` in the image's axis order, value transform applied, on its device."""
        if len(self.axes) < 3:
            data = data.reshape([self.output_shape[a] for a in self.axes])
        if self.value_transform is not None:
            data = self.value_transform(data)
        if self.device is not None:
            data = data.to(self.device)
        return data

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapImage":
        """Returns tensors on ``device`` from now on."""
        self.device = resolve_device(device)
        return self

    def __repr__(self) -> str:
        from .presentation.display import image_text

        return image_text(self)

    def _repr_html_(self) -> str:
        from .presentation.display import image_html

        return image_html(self)


class EmptyImage:
    """A class that is not annotated: every read is a constant (NaN by default).

    Accepts the current signature ``(path, target_class, target_scale, target_voxel_shape,
    ...)`` and the older ``(label_class, scale, voxel_shape, store=None, axis_order="zyx",
    empty_value=nan)`` one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names_new = ["path", "target_class", "target_scale", "target_voxel_shape", "pad", "pad_value", "interpolation", "axis_order", "value_transform", "context", "device"]
        names_old = ["label_class", "scale", "voxel_shape", "store", "axis_order", "empty_value"]
        old_style = (len(args) >= 2 and not isinstance(args[1], str)) or "label_class" in kwargs or "voxel_shape" in kwargs
        bound = dict(zip(names_old if old_style else names_new, args))
        bound.update(kwargs)
        if old_style:
            self.label_class = bound.get("label_class")
            scale, shape = bound.get("scale"), bound.get("voxel_shape")
            self.pad_value = float(bound.get("empty_value", math.nan))
            self.path = None
        else:
            self.label_class = bound.get("target_class")
            scale, shape = bound.get("target_scale"), bound.get("target_voxel_shape")
            self.pad_value = float(bound.get("pad_value", math.nan))
            self.path = bound.get("path")
        self.axes = list(check_axis_order(bound.get("axis_order", "zyx")))
        if scale is None or shape is None:
            raise ConfigError("EmptyImage needs a scale and a voxel shape")
        if isinstance(scale, Mapping):
            scale = [scale[a] for a in self.axes]
        if isinstance(shape, Mapping):
            shape = [shape[a] for a in self.axes]
        # Short specs are left-padded to the axis order, as CellMapImage does: a 2D spec of a
        # "zyx" image still reports all three axes.
        scale = _left_pad(list(scale) if not isinstance(scale, (int, float)) else scale, len(self.axes), lambda v: v[0], "scale")
        shape = _left_pad(list(shape) if not isinstance(shape, (int, float)) else shape, len(self.axes), lambda v: 1, "voxel_shape")
        self.scale = dict(zip(self.axes, map(float, scale)))
        self.output_shape = dict(zip(self.axes, map(int, shape)))
        self.device = bound.get("device")
        self.bounding_box = None
        self.sampling_box = None
        self.total_voxels = 0
        self.bg_count = 0.0
        self.class_counts = {self.label_class: 0}

    def __getitem__(self, center: Mapping[str, Any]) -> torch.Tensor:
        """The constant patch (``empty_value`` / ``pad_value``, NaN by default), wherever ``center`` is."""
        return torch.full(list(self.output_shape.values()), self.pad_value, dtype=torch.float32, device=self.device)

    def set_spatial_transforms(self, transforms: Any) -> None:
        """No-op: an empty image looks the same however it is turned."""

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "EmptyImage":
        """Returns tensors on ``device`` from now on."""
        self.device = resolve_device(device)
        return self

    def __repr__(self) -> str:
        return f"EmptyImage(class={self.label_class!r}, shape={list(self.output_shape.values())})"


def _elastic_arguments(elastic: Any) -> tuple[int, list[float], list[float]]:
    """``{"seed", "control_point_spacing", "jitter_sigma"}`` → the engine's ``(seed, spacing,
    sigma)`` (the values are checked by the engine)."""
    if not isinstance(elastic, Mapping) or set(elastic) != {"seed", "control_point_spacing", "jitter_sigma"}:
        raise ConfigError("spatial transform 'elastic' must be {'seed': int, 'control_point_spacing': [z, y, x], "
                          f"'jitter_sigma': [z, y, x]}}, not {elastic!r}")
    seed = elastic["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ConfigError(f"spatial transform 'elastic': seed must be an integer in [0, 2^64), not {seed!r}")

    def per_axis(key: str) -> list[float]:
        value = elastic[key]
        values = [value] * 3 if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else value
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise ConfigError(f"spatial transform 'elastic': {key} must be a number or [z, y, x], not {value!r}")
        return [float(v) for v in values]

    return int(seed), per_axis("control_point_spacing"), per_axis("jitter_sigma")

