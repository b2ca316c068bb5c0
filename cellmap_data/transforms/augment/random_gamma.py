"""``RandomGamma``: random gamma correction."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from cellmap_data.transforms.augment._common import (
    ValueTransform,
    check_range,
    may_overwrite,
    draw_uniform,
    nan_free_max,
    nominal_upper_bound,
    per_sample_reduce,
    zero_nans,
)
from cellmap_data.utils.misc import torch_max_value

__all__ = ["RandomGamma"]


class RandomGamma(ValueTransform):
    """Gamma correction ``x ** gamma`` with ``gamma ~ U(gamma_range)``.

    Gamma is defined on intensities in [0, 1]:

    * integer input is converted to float32 in [0, 1] (divided by the dtype
      max) and returned as such;
    * float input is divided by its
      :func:`~cellmap_data.transforms.augment.nominal_upper_bound` ``b`` (1, 255
      or 65535; the patch's largest absolute value if larger),
      gamma-corrected, and multiplied back by ``b`` -- so [0, 1] data stays
      in [0, 1] and 0..255 data in 0..255.

    Values below 0 are treated as 0; NaN voxels become 0.  In batched
    (``sample_seeds``) mode gamma and ``b`` are per sample.
    """

    def __init__(self, gamma_range: Sequence[float] = (0.5, 1.5)) -> None:
        super().__init__()
        self.gamma_range = check_range("gamma_range", gamma_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with a random gamma correction."""
        if x.is_floating_point():
            values = x
        else:
            values = x.float() / torch_max_value(x.dtype)
        gamma, batched = draw_uniform(values, *self.gamma_range, dtype=values.dtype)
        if values.numel() == 0:
            return values.clone()
        if not x.is_floating_point():
            return zero_nans(values.clamp(min=0) ** gamma)

        bound = nominal_upper_bound(values, batched)
        # Past the last nominal range, normalise by the patch's own magnitude.
        magnitude = per_sample_reduce(values.abs(), nan_free_max, batched)
        bound = torch.where(torch.isinf(bound), magnitude, bound)
        if may_overwrite(x):
            # An owned batch is changed in place: no output-sized temporaries.
            x.div_(bound).clamp_(0, 1).pow_(gamma).mul_(bound)
            return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        unit = (values / bound).clamp(0, 1)
        return zero_nans(unit**gamma * bound)

    def extra_repr(self) -> str:
        return f"gamma_range={self.gamma_range}"
