"""``Binarize``: threshold labels to 0/1, keeping NaN (unknown) voxels."""

from __future__ import annotations

import torch

from cellmap_data.transforms.augment._common import ValueTransform, as_float, may_overwrite

__all__ = ["Binarize"]


class Binarize(ValueTransform):
    """``x > threshold`` as x's float dtype (float32 for non-float input).

    NaN voxels (unknown labels) stay NaN instead of becoming 0.
    """

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Threshold ``x``, keeping NaNs (in place on an owned batch: one byte of mask per
        voxel instead of three float temporaries)."""
        if may_overwrite(x):
            unknown = torch.isnan(x)
            return x.gt_(self.threshold).masked_fill_(unknown, float("nan"))
        values = as_float(x)
        binary = (values > self.threshold).to(values.dtype)
        return torch.where(torch.isnan(values), values, binary)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
