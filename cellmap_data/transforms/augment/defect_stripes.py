"""``DefectStripes``: dark or bright straight bands across sections (EM knife marks, folds)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from cellmap_data.transforms.augment._common import (
    as_float,
    may_overwrite,
    nan_free_max,
    nan_free_min,
    nominal_upper_bound,
    per_sample_reduce,
)
from cellmap_data.transforms.augment._sections import (
    SectionShape,
    SectionTransform,
    check_probability,
    check_signed_range,
    unit_draws,
)

__all__ = ["DefectStripes"]

# Uniforms drawn per section: hit, centre y, centre x, angle, width, strength.
_UNITS_PER_SECTION = 6


class DefectStripes(SectionTransform):
    """Darken or brighten a straight band across random sections (knife marks, folds, chatter).

    Each section of a sample gets, with probability ``prob``, one stripe: the voxels within
    ``width / 2`` of a straight line through a random point of the section (uniform over it) at a
    random ``angle`` (degrees from the x axis towards y: 0 is a band along x, 90 along y), with
    ``width ~ U(width_range)`` voxels, ``angle ~ U(angle_range)`` and ``strength ~
    U(strength_range)``.  A voxel ``v`` in the stripe becomes ``v + |s| * (t - v)``: pulled a
    fraction ``|s|`` of the way to the bottom of its value range for ``s < 0`` (dark: ``t`` = 0,
    or ``-b`` for data with negative values) or to the top for ``s > 0`` (bright: ``t = b``),
    with ``b`` the sample's :func:`~cellmap_data.transforms.augment.nominal_upper_bound` (1, 255
    or 65535; its largest magnitude beyond), as :class:`RandomContrast` clamps.  ``s = -1`` is a
    black band.  NaN voxels stay NaN.

    Stripes lie within a section, so 2-D patches (one section) get them too.  Input: a batch
    ``[B, C, z, y, x]`` inside ``sample_seeds`` (``[B, C, y, x]``: 2-D), else one patch ``[C, z,
    y, x]``, ``[z, y, x]`` or ``[y, x]``; y and x are the last two axes.  Integer input is
    converted to float32; float input keeps its dtype.  Meant for raw only.

    :meth:`draws` returns per sample ``{"stripes": [{"section", "centre": (y, x), "angle",
    "width", "strength"}, ...]}`` (centre in voxel coordinates, voxel centres at integers).

    Raises:
        ConfigError: ``prob`` not in [0, 1]; ``width_range`` not ``0 < low <= high``;
            ``angle_range`` not finite ``low <= high``; ``strength_range`` not within [-1, 1];
            ``key`` not a str or int.
    """

    def __init__(
        self,
        prob: float = 0.05,
        width_range: Sequence[float] = (1.0, 4.0),
        angle_range: Sequence[float] = (-90.0, 90.0),
        strength_range: Sequence[float] = (-0.8, 0.8),
        key: int | str | None = None,
    ) -> None:
        super().__init__(key)
        self.prob = check_probability("DefectStripes", "prob", prob)
        self.width_range = check_signed_range("DefectStripes", "width_range", width_range, 0.0, low_exclusive=True)
        self.angle_range = check_signed_range("DefectStripes", "angle_range", angle_range)
        self.strength_range = check_signed_range("DefectStripes", "strength_range", strength_range, -1.0, 1.0)

    def _draw_sample(self, generator: torch.Generator, shape: SectionShape) -> dict[str, Any]:
        sections, height, width = shape
        units = unit_draws(generator, sections * _UNITS_PER_SECTION)
        stripes = []
        for z in range(sections):
            hit, centre_y, centre_x, angle, size, strength = units[z * _UNITS_PER_SECTION : (z + 1) * _UNITS_PER_SECTION]
            if hit >= self.prob:
                continue
            stripes.append({
                "section": z,
                "centre": (centre_y * height - 0.5, centre_x * width - 0.5),
                "angle": _between(self.angle_range, angle),
                "width": _between(self.width_range, size),
                "strength": _between(self.strength_range, strength),
            })
        return {"stripes": stripes}

    def _apply_draws(self, x: torch.Tensor, view: torch.Tensor, draws: list[dict[str, Any]]) -> torch.Tensor:
        values = as_float(view)
        if values is view and not may_overwrite(x):
            values = values.clone()
        found = [(sample, stripe) for sample, drawn in enumerate(draws) for stripe in drawn["stripes"]]
        if not found:
            return values
        device = values.device
        samples = torch.tensor([sample for sample, _ in found], device=device)
        sections = torch.tensor([stripe["section"] for _, stripe in found], device=device)

        def column(extract: Any) -> torch.Tensor:
            # Geometry in float64: a voxel's side of a stripe edge does not depend on the dtype.
            return torch.tensor([extract(stripe) for _, stripe in found], dtype=torch.float64, device=device)[:, None, None]

        angle = column(lambda s: math.radians(s["angle"]))
        rows = torch.arange(values.shape[3], dtype=torch.float64, device=device)[None, :, None] - column(lambda s: s["centre"][0])
        columns = torch.arange(values.shape[4], dtype=torch.float64, device=device)[None, None, :] - column(lambda s: s["centre"][1])
        distance = (rows * torch.cos(angle) - columns * torch.sin(angle)).abs()
        inside = (distance <= column(lambda s: s["width"] / 2))[:, None]  # [N, 1, y, x]

        upper, lower = self._value_range(values)
        strength = column(lambda s: s["strength"]).to(values.dtype)[:, None]  # [N, 1, 1, 1]
        target = torch.where(strength > 0, upper[samples], lower[samples])
        affected = values[samples, :, sections]  # [N, C, y, x]
        changed = affected + strength.abs() * (target - affected)
        values[samples, :, sections] = torch.where(inside, changed, affected)
        return values

    @staticmethod
    def _value_range(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample ``(top, bottom)`` of the value range, each ``[N, 1, 1, 1]``."""
        rows = values.flatten(1)
        upper = nominal_upper_bound(rows, batched=True)
        # Past the last nominal range, the sample's own magnitude (as RandomGamma does).
        magnitude = per_sample_reduce(rows.abs(), nan_free_max, True)
        upper = torch.where(torch.isinf(upper), magnitude, upper)
        negative = per_sample_reduce(rows, nan_free_min, True) < 0
        lower = torch.where(negative, -upper, torch.zeros_like(upper))
        return upper[:, :, None, None], lower[:, :, None, None]

    def extra_repr(self) -> str:
        return (
            f"prob={self.prob}, width_range={self.width_range}, angle_range={self.angle_range}, "
            f"strength_range={self.strength_range}, key={self.key!r}"
        )


def _between(bounds: tuple[float, float], unit: float) -> float:
    low, high = bounds
    return low + (high - low) * unit
