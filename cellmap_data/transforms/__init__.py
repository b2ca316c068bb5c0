"""Transforms applied to training patches (all ``torch.nn.Module``s).

``from cellmap_data.transforms import GaussianNoise, RandomContrast, ...``;
the same classes are importable from :mod:`cellmap_data.transforms.augment`.
Use :func:`sample_seeds` to apply random transforms per sample, reproducibly,
to a batch (see :mod:`cellmap_data.transforms.seeding`).
"""

from cellmap_data.transforms import augment, seeding
from cellmap_data.transforms.augment import (
    Binarize,
    DefectStripes,
    GaussianBlur,
    GaussianNoise,
    Misalign,
    MissingSections,
    NaNtoNum,
    Normalize,
    RandomContrast,
    RandomGamma,
)
from cellmap_data.transforms.seeding import active_sample_seeds, sample_seeds

__all__ = [
    "Binarize",
    "DefectStripes",
    "GaussianBlur",
    "GaussianNoise",
    "Misalign",
    "MissingSections",
    "NaNtoNum",
    "Normalize",
    "RandomContrast",
    "RandomGamma",
    "active_sample_seeds",
    "augment",
    "sample_seeds",
    "seeding",
]
