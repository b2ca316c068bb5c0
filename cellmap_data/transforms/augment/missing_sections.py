"""``MissingSections``: whole z-sections lost, as in EM stacks with missing or unusable sections."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import torch

from cellmap_data.exceptions import ConfigError
from cellmap_data.transforms.augment._common import may_overwrite
from cellmap_data.transforms.augment._sections import (
    SectionShape,
    SectionTransform,
    check_probability,
    pick,
    unit_draws,
)

__all__ = ["MissingSections"]

MODES = ("fill", "drop")


class MissingSections(SectionTransform):
    """Lose whole z-sections of raw patches (an EM stack's missing or unusable sections).

    Each section of a sample is hit independently with probability ``prob``.  At least one
    section is always kept: if every section is hit, one of them, drawn at random, is spared, so
    a patch of a single section (every 2-D patch) never changes.

    * ``mode="fill"``: a hit section is replaced by ``fill_value`` (0: a black section), NaN
      voxels included.
    * ``mode="drop"``: hit sections are taken out of the stack and the sections after them move
      up, as if they had never been cut; the stack is padded at the end by repeating its last
      kept section, so the shape stays.  Output section ``j`` is kept section ``min(j, K - 1)``
      (``K`` kept sections).

    Input: a batch ``[B, C, z, y, x]`` inside ``sample_seeds`` (``[B, C, y, x]``: 2-D, one
    section), else one patch ``[C, z, y, x]`` or ``[z, y, x]``; z is the third-last axis (the
    datasets' default ``axis_order="zyx"``).  All channels of a sample lose the same sections.
    The dtype is kept (integer input with a NaN or fractional ``fill_value`` becomes float32).
    Meant for raw only: labels keep every section (the model learns to see through the loss).

    Draws are keyed per sample like every random transform, or by the sample's seed and ``key``
    alone when ``key`` is given; :meth:`draws` returns them (``{"sections": [hit sections]}``).

    Raises:
        ConfigError: ``prob`` not in [0, 1], ``mode`` not ``"fill"`` or ``"drop"``,
            ``fill_value`` not a number, ``key`` not a str or int.
    """

    def __init__(
        self,
        prob: float = 0.05,
        mode: Literal["fill", "drop"] = "fill",
        fill_value: float = 0.0,
        key: int | str | None = None,
    ) -> None:
        super().__init__(key)
        self.prob = check_probability("MissingSections", "prob", prob)
        if mode not in MODES:
            raise ConfigError(f"MissingSections: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if isinstance(fill_value, bool) or not isinstance(fill_value, numbers.Real):
            raise ConfigError(f"MissingSections: fill_value must be a number, got {fill_value!r}")
        self.fill_value: float = float(fill_value)

    def _draw_sample(self, generator: torch.Generator, shape: SectionShape) -> dict[str, Any]:
        sections = shape[0]
        # One uniform per section, then one for the section spared when all are hit: the same
        # count whatever is hit, so a draw never shifts the stream of another.
        units = unit_draws(generator, sections + 1)
        hit = [u < self.prob for u in units[:sections]]
        if sections and all(hit):
            hit[pick(units[sections], sections)] = False
        return {"sections": [z for z, h in enumerate(hit) if h]}

    def _apply_draws(self, x: torch.Tensor, view: torch.Tensor, draws: list[dict[str, Any]]) -> torch.Tensor:
        sections = view.shape[2]
        if self.mode == "drop":
            return self._drop(x, view, draws)
        hit = torch.zeros(view.shape[0], sections, dtype=torch.bool)
        for sample, drawn in enumerate(draws):
            hit[sample, drawn["sections"]] = True
        mask = hit.to(view.device)[:, None, :, None, None]
        fill_is_integral = math.isfinite(self.fill_value) and self.fill_value.is_integer()
        if not view.is_floating_point() and not fill_is_integral:
            view = view.float()
        elif not may_overwrite(x):
            view = view.clone()
        return view.masked_fill_(mask, self.fill_value)

    def _drop(self, x: torch.Tensor, view: torch.Tensor, draws: list[dict[str, Any]]) -> torch.Tensor:
        sections = view.shape[2]
        if not any(drawn["sections"] for drawn in draws):
            return view if may_overwrite(x) else view.clone()
        source = torch.empty(view.shape[0], sections, dtype=torch.long)
        for sample, drawn in enumerate(draws):
            lost = set(drawn["sections"])
            kept = [z for z in range(sections) if z not in lost]
            source[sample] = torch.tensor(kept + [kept[-1]] * (sections - len(kept)))
        index = source.to(view.device)[:, None, :, None, None].expand(view.shape)
        return torch.gather(view, 2, index)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, mode={self.mode!r}, fill_value={self.fill_value}, key={self.key!r}"
