"""``RandomContrast``: random contrast change around the patch mean."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from cellmap_data.transforms.augment._common import (
    ValueTransform,
    as_float,
    check_range,
    may_overwrite,
    draw_uniform,
    nan_free_min,
    nominal_upper_bound,
    per_sample_reduce,
    zero_nans,
)
from cellmap_data.utils.misc import torch_max_value

__all__ = ["RandomContrast"]


class RandomContrast(ValueTransform):
    """Scale contrast around the mean: ``ratio * x + (1 - ratio) * mean(x)``.

    ``ratio ~ U(contrast_range)``.  The mean ignores NaN voxels (so a few NaNs
    don't wipe the patch); NaN voxels become 0 in the output.

    Clamping (keeps the reference behaviour for data in [0, 1] without
    destroying 0..255 data):

    * integer input: computed in float32, clamped to
      ``[0, max of dtype]`` (``[min of dtype, max of dtype]`` if the patch has
      negative values), rounded and returned in the input dtype;
    * float input: clamped to ``[0, b]`` where ``b`` is
      :func:`~cellmap_data.transforms.augment.nominal_upper_bound` (1 for data
      in [0, 1], 255 for data up to 255, 65535 for data up to 65535, no upper
      clamp beyond), or to ``[-b, b]`` if the patch has negative values.

    In batched (``sample_seeds``) mode the ratio, mean and clamp range are
    per sample.
    """

    def __init__(self, contrast_range: Sequence[float] = (0.5, 1.5)) -> None:
        super().__init__()
        self.contrast_range = check_range("contrast_range", contrast_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with randomly scaled contrast."""
        values = as_float(x)
        ratio, batched = draw_uniform(values, *self.contrast_range, dtype=values.dtype)
        if values.numel() == 0:
            return x.clone()
        mean = per_sample_reduce(values, lambda rows, dim: rows.nanmean(dim=dim), batched)
        has_negatives = per_sample_reduce(values, nan_free_min, batched) < 0
        if may_overwrite(x):
            # An owned batch is changed in place: no output-sized temporaries.
            upper = nominal_upper_bound(x, batched)
            lower = torch.where(has_negatives, -upper, torch.zeros_like(upper))
            x.mul_(ratio).add_((1 - ratio) * mean).clamp_(lower, upper)
            return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        contrasted = ratio * values + (1 - ratio) * mean

        if x.is_floating_point():
            upper = nominal_upper_bound(values, batched)
            lower = torch.where(has_negatives, -upper, torch.zeros_like(upper))
        else:
            upper = torch.full_like(has_negatives, torch_max_value(x.dtype), dtype=values.dtype)
            dtype_min = 0 if x.dtype == torch.bool else torch.iinfo(x.dtype).min
            lower = torch.where(
                has_negatives,
                torch.full_like(upper, dtype_min),
                torch.zeros_like(upper),
            )
        result = zero_nans(torch.clamp(contrasted, lower, upper))
        if x.is_floating_point():
            return result
        return result.round().to(x.dtype)

    def extra_repr(self) -> str:
        return f"contrast_range={self.contrast_range}"
