"""``GaussianNoise``: additive Gaussian noise."""

from __future__ import annotations

import torch

from cellmap_data.transforms.augment._common import ValueTransform, as_float, draw_seeds_for, may_overwrite
from cellmap_data.transforms.seeding import sample_generator

__all__ = ["GaussianNoise"]


class GaussianNoise(ValueTransform):
    """Add Gaussian noise N(mean, std) to every voxel (no clamping).

    Integer input is converted to float32 first; float input keeps its dtype.
    Inside ``sample_seeds`` each sample's noise field is drawn on ``x.device``
    from a generator of that device seeded from the sample's seed.
    """

    def __init__(self, mean: float = 0.0, std: float = 0.1) -> None:
        super().__init__()
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` plus noise."""
        values = as_float(x)
        draw_seeds = draw_seeds_for(values)
        if draw_seeds is None:
            return values + torch.randn_like(values) * self.std + self.mean
        noise = torch.empty_like(values)
        for sample_index, seed in enumerate(draw_seeds):
            generator = sample_generator(seed, values.device)
            noise[sample_index].normal_(self.mean, self.std, generator=generator)
        if may_overwrite(values):
            return values.add_(noise)
        return values + noise

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"
