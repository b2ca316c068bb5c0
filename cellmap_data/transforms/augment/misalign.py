"""``Misalign``: sections shifted in y and x, as slips and misalignments of EM stacks."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence

import torch

from cellmap_data.exceptions import ConfigError
from cellmap_data.transforms.augment._common import may_overwrite
from cellmap_data.transforms.augment._sections import (
    SectionShape,
    SectionTransform,
    check_count,
    check_probability,
    pick,
    unit_draws,
)

__all__ = ["Misalign"]

EDGE = "edge"


def shift_sections(sections: torch.Tensor, dy: int, dx: int, fill: float | str) -> torch.Tensor:
    """``sections`` (``[..., y, x]``) moved by ``(dy, dx)`` whole voxels: ``out[..., y, x] =
    in[..., y - dy, x - dx]``; voxels that come from outside take the nearest edge voxel
    (``fill="edge"``) or the value ``fill``.  A new tensor; never mixes values."""
    height, width = sections.shape[-2:]
    rows = torch.arange(height, device=sections.device) - dy
    columns = torch.arange(width, device=sections.device) - dx
    moved = sections.index_select(-2, rows.clamp(0, height - 1)).index_select(-1, columns.clamp(0, width - 1))
    if fill != EDGE:
        outside = ((rows < 0) | (rows >= height))[:, None] | ((columns < 0) | (columns >= width))[None, :]
        moved.masked_fill_(outside, float(fill))
    return moved


class Misalign(SectionTransform):
    """Shift sections by whole voxels in y and x: a slip or a misalignment of an EM stack.

    Per sample, with probability ``slip_prob`` one random section is shifted (a *slip*: that
    section alone is out of place), else with probability ``translation_prob`` every section from
    a random one onward is shifted (a *translation*: the stack is misaligned from there on; the
    first section never moves, so the patch is not simply displaced as a whole), else nothing
    happens.  The shift ``(dy, dx)`` is drawn uniformly among the integer vectors with ``|dy| <=
    max_shift[0]``, ``|dx| <= max_shift[1]``, the zero vector excluded.  Content moves towards
    larger indices for a positive shift (``out[y, x] = in[y - dy, x - dx]``, like ``np.roll``
    away from the borders); voxels that come from outside the patch are filled from the nearest
    edge voxel (``fill="edge"``, the default for raw) or with the value ``fill`` (NaN: unknown,
    for labels).  Shifts are whole voxels and nothing is interpolated, so label values stay label
    values.

    A patch of a single section (every 2-D patch) is never shifted: one section cannot be out of
    place relative to the others (and shifting it would only displace raw against its labels).

    **Raw and labels shifted alike.** By default a transform applied to raw only (labels keep the
    true geometry; the model learns to ignore the defect).  To shift labels with their raw, give
    ``key`` and use the same configuration for both: ``raw_value_transforms=m``,
    ``target_value_transforms=m.for_labels()``.  Keyed draws depend on the sample's seed and the
    key only, not on which array or pipeline position, so raw, every label array and every class
    of a sample get the same slip.  The section is drawn over ``frame_sections`` sections centred
    on the patch (default: the patch's own z size).  When raw and labels differ in z size, set
    ``frame_sections`` to the raw's z size: the label patch, centred on the same point, is then
    taken to start at raw section ``(frame_sections - z) // 2``, so both see the slip at the same
    world plane (sections outside a smaller patch leave it untouched).  This assumes raw and labels
    have the same voxel size (the shift is in voxels).

    Input: a batch ``[B, C, z, y, x]`` inside ``sample_seeds`` (``[B, C, y, x]``: 2-D), else one
    patch ``[C, z, y, x]`` or ``[z, y, x]``; z, y, x are the last three axes (the datasets'
    default ``axis_order="zyx"``).  All channels of a sample move alike.  The dtype is kept
    (integer input with a NaN or fractional ``fill`` becomes float32).

    :meth:`draws` returns per sample ``{"kind": "slip" | "translation" | None, "section": first
    shifted section (in this patch's indices; outside ``[0, z)`` when ``frame_sections`` places
    it outside the patch), "shift": (dy, dx), "sections": [sections actually shifted]}``.

    Raises:
        ConfigError: a probability not in [0, 1] or ``slip_prob + translation_prob > 1``;
            ``max_shift`` not a non-negative int or (y, x) pair of them, or all zero; ``fill``
            neither ``"edge"`` nor a number; ``frame_sections`` not an int >= 1; ``key`` not a
            str or int.
    """

    def __init__(
        self,
        slip_prob: float = 0.05,
        translation_prob: float = 0.05,
        max_shift: int | Sequence[int] = 4,
        fill: float | str = EDGE,
        frame_sections: int | None = None,
        key: int | str | None = None,
    ) -> None:
        super().__init__(key)
        self.slip_prob = check_probability("Misalign", "slip_prob", slip_prob)
        self.translation_prob = check_probability("Misalign", "translation_prob", translation_prob)
        if self.slip_prob + self.translation_prob > 1.0:
            raise ConfigError(
                f"Misalign: slip_prob + translation_prob must be <= 1, got {slip_prob!r} + {translation_prob!r}"
            )
        self.max_shift = self._check_max_shift(max_shift)
        if fill != EDGE and (isinstance(fill, bool) or not isinstance(fill, numbers.Real)):
            raise ConfigError(f"Misalign: fill must be 'edge' or a number (NaN for labels), got {fill!r}")
        self.fill: float | str = fill if fill == EDGE else float(fill)
        self.frame_sections = (
            None if frame_sections is None else check_count("Misalign", "frame_sections", frame_sections, 1)
        )

    @staticmethod
    def _check_max_shift(max_shift: Any) -> tuple[int, int]:
        pair = [max_shift, max_shift] if not isinstance(max_shift, (list, tuple)) else list(max_shift)
        if len(pair) != 2:
            raise ConfigError(f"Misalign: max_shift must be an int or a (y, x) pair, got {max_shift!r}")
        try:
            if any(isinstance(m, bool) for m in pair):
                raise TypeError
            dy, dx = (operator.index(m) for m in pair)
        except TypeError:
            raise ConfigError(f"Misalign: max_shift must be whole voxels (ints), got {max_shift!r}") from None
        if dy < 0 or dx < 0 or dy == dx == 0:
            raise ConfigError(f"Misalign: max_shift must be >= 0 and not all 0, got {max_shift!r}")
        return dy, dx

    def for_labels(self, fill: float = math.nan) -> "Misalign":
        """The same misalignment for label arrays: same draws, borders filled with ``fill`` (NaN,
        the unknown value of label tensors; the older dialect's ``empty_value`` if you use one).

        Raises:
            ConfigError: this transform has no ``key`` (without one, labels would draw their own
                shift instead of raw's).
        """
        if self.key is None:
            raise ConfigError("Misalign.for_labels: the raw transform needs a key= for labels to share its draws")
        return Misalign(self.slip_prob, self.translation_prob, self.max_shift, fill, self.frame_sections, self.key)

    def _draw_sample(self, generator: torch.Generator, shape: SectionShape) -> dict[str, Any]:
        sections = shape[0]
        frame = sections if self.frame_sections is None else self.frame_sections
        # Always three uniforms (kind, section, shift), so that arrays of different sizes that
        # share a key draw the same kind and shift.
        kind_unit, section_unit, shift_unit = unit_draws(generator, 3)
        nothing: dict[str, Any] = {"kind": None, "section": None, "shift": None, "sections": []}
        if frame < 2:
            return nothing
        if kind_unit < self.slip_prob:
            kind, in_frame = "slip", pick(section_unit, frame)
        elif kind_unit < self.slip_prob + self.translation_prob:
            kind, in_frame = "translation", 1 + pick(section_unit, frame - 1)
        else:
            return nothing
        section = in_frame - (frame - sections) // 2
        last = section + 1 if kind == "slip" else sections
        shifted = list(range(max(section, 0), min(last, sections)))
        return {"kind": kind, "section": section, "shift": self._shift(shift_unit), "sections": shifted}

    def _shift(self, unit: float) -> tuple[int, int]:
        """The ``unit``-th of the nonzero integer vectors within ``max_shift``, row by row."""
        reach_y, reach_x = self.max_shift
        columns = 2 * reach_x + 1
        index = pick(unit, (2 * reach_y + 1) * columns - 1)
        zero = reach_y * columns + reach_x
        index += index >= zero
        return index // columns - reach_y, index % columns - reach_x

    def _apply_draws(self, x: torch.Tensor, view: torch.Tensor, draws: list[dict[str, Any]]) -> torch.Tensor:
        fill_is_integral = self.fill == EDGE or (math.isfinite(float(self.fill)) and float(self.fill).is_integer())
        if not view.is_floating_point() and not fill_is_integral:
            view = view.float()
        elif not may_overwrite(x):
            view = view.clone()
        for sample, drawn in enumerate(draws):
            if not drawn["sections"]:
                continue
            first, stop = drawn["sections"][0], drawn["sections"][-1] + 1
            dy, dx = drawn["shift"]
            view[sample, :, first:stop] = shift_sections(view[sample, :, first:stop], dy, dx, self.fill)
        return view

    def extra_repr(self) -> str:
        return (
            f"slip_prob={self.slip_prob}, translation_prob={self.translation_prob}, max_shift={self.max_shift}, "
            f"fill={self.fill!r}, frame_sections={self.frame_sections}, key={self.key!r}"
        )
