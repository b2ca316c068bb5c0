"""Intensity augmentations and value clean-up transforms for training patches.

One submodule per transform, as in the reference library:
:mod:`~cellmap_data.transforms.augment.binarize` (:class:`Binarize`),
:mod:`~cellmap_data.transforms.augment.gaussian_blur` (:class:`GaussianBlur`),
:mod:`~cellmap_data.transforms.augment.gaussian_noise` (:class:`GaussianNoise`),
:mod:`~cellmap_data.transforms.augment.nan_to_num` (:class:`NaNtoNum`),
:mod:`~cellmap_data.transforms.augment.random_contrast` (:class:`RandomContrast`),
:mod:`~cellmap_data.transforms.augment.random_gamma` (:class:`RandomGamma`) and
:mod:`~cellmap_data.transforms.augment.normalize` (:class:`Normalize`, which the reference
removed), and the EM defect augmentations beyond the reference,
:mod:`~cellmap_data.transforms.augment.missing_sections` (:class:`MissingSections`),
:mod:`~cellmap_data.transforms.augment.misalign` (:class:`Misalign`) and
:mod:`~cellmap_data.transforms.augment.defect_stripes` (:class:`DefectStripes`); every class is
also importable from this package.

Every transform is a :class:`torch.nn.Module`, so they compose with
``torchvision.transforms.v2.Compose`` and ``T.ToDtype``, and each also answers
``.transform(x)`` (the same as calling it).  They work on CPU and CUDA tensors
alike: all work is vectorised and allocated on ``x.device``.

Random transforms (:class:`GaussianNoise`, :class:`RandomContrast`,
:class:`RandomGamma` and the EM defects) have two modes:

* outside :func:`~cellmap_data.transforms.seeding.sample_seeds` the input is
  one patch and one parameter / noise field is drawn from torch's global RNG;
* inside ``sample_seeds(seeds)`` the input is a batch (dim 0 = sample axis)
  and every sample gets its own reproducible draw; per-sample statistics
  (means, value ranges) are taken over each sample's non-batch dims.

Intensity convention: raw data reaches the transforms as float32 *in the
range of the stored dtype* (0..255 for uint8 volumes), not rescaled to [0, 1].
The contrast and gamma transforms therefore infer a "nominal range" for float
inputs from the data, see :func:`nominal_upper_bound`.
"""

from __future__ import annotations

from cellmap_data.transforms.augment._common import nominal_upper_bound
from cellmap_data.transforms.augment.binarize import Binarize
from cellmap_data.transforms.augment.defect_stripes import DefectStripes
from cellmap_data.transforms.augment.gaussian_blur import GaussianBlur
from cellmap_data.transforms.augment.gaussian_noise import GaussianNoise
from cellmap_data.transforms.augment.misalign import Misalign
from cellmap_data.transforms.augment.missing_sections import MissingSections
from cellmap_data.transforms.augment.nan_to_num import NaNtoNum
from cellmap_data.transforms.augment.normalize import Normalize
from cellmap_data.transforms.augment.random_contrast import RandomContrast
from cellmap_data.transforms.augment.random_gamma import RandomGamma

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
    "nominal_upper_bound",
]
