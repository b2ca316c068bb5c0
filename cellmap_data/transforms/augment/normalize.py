"""``Normalize``: shift and scale intensities (removed from the reference, kept here)."""

from __future__ import annotations

import torch

from cellmap_data.transforms.augment._common import ValueTransform, may_overwrite

__all__ = ["Normalize"]


class Normalize(ValueTransform):
    """Shift and scale intensities: ``(x.float() + shift) * scale``.

    The default maps uint8-range data (0..255) to [0, 1].
    """

    def __init__(self, shift: float = 0, scale: float = 1 / 255) -> None:
        super().__init__()
        self.shift = shift
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(x.float() + shift) * scale`` (in place on an owned float32 batch)."""
        if may_overwrite(x) and x.dtype == torch.float32:
            return x.add_(self.shift).mul_(self.scale)
        return (x.float() + self.shift) * self.scale

    def extra_repr(self) -> str:
        return f"shift={self.shift}, scale={self.scale}"
