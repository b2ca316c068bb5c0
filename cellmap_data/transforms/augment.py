"""Intensity augmentations and value clean-up transforms for training patches.

Every transform is a :class:`torch.nn.Module`, so they compose with
``torchvision.transforms.v2.Compose`` and ``T.ToDtype``.  They work on CPU
and CUDA tensors alike: all work is vectorised and allocated on ``x.device``.

Random transforms (:class:`GaussianNoise`, :class:`RandomContrast`,
:class:`RandomGamma`) have two modes:

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

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cellmap_data.transforms.seeding import (
    active_sample_seeds,
    next_sample_draw_seeds,
    sample_generator,
)
from cellmap_data.utils.misc import torch_max_value

__all__ = [
    "Binarize",
    "GaussianBlur",
    "GaussianNoise",
    "NaNtoNum",
    "Normalize",
    "RandomContrast",
    "RandomGamma",
    "nominal_upper_bound",
]

# Upper ends of the value ranges float data is assumed to come from:
# [0, 1] (already normalised), uint8 and uint16 volumes.
_NOMINAL_FLOAT_MAXIMA = (1.0, 255.0, 65535.0)


# --------------------------------------------------------------------------
# Helpers shared by the random transforms
# --------------------------------------------------------------------------


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if floating point, else a float32 copy."""
    return x if x.is_floating_point() else x.float()


def _draw_seeds_for(x: torch.Tensor) -> list[int] | None:
    """Per-sample generator seeds when inside ``sample_seeds``, else None."""
    if x.ndim == 0:
        if active_sample_seeds() is not None:
            raise ValueError(
                "inside sample_seeds, transforms need a batch with a sample axis (dim 0), "
                "got a 0-d tensor"
            )
        return None
    return next_sample_draw_seeds(x.shape[0])


def _per_sample_reduce(
    x: torch.Tensor, reduce: Callable[[torch.Tensor, int], torch.Tensor], batched: bool
) -> torch.Tensor:
    """Reduce ``x`` per sample (batched) or as a whole, broadcastable to ``x``.

    ``reduce(t, dim)`` is called on a 2-D view, one row per sample.
    """
    if batched:
        rows = x.reshape(x.shape[0], -1)
        return reduce(rows, 1).reshape(x.shape[0], *([1] * (x.ndim - 1)))
    return reduce(x.reshape(1, -1), 1).reshape([])


def _nan_free_max(rows: torch.Tensor, dim: int) -> torch.Tensor:
    return rows.nan_to_num(nan=-math.inf).amax(dim=dim)


def _nan_free_min(rows: torch.Tensor, dim: int) -> torch.Tensor:
    return rows.nan_to_num(nan=math.inf).amin(dim=dim)


def _draw_uniform(
    x: torch.Tensor, low: float, high: float, dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """Draw U(low, high) once per sample (seeded) or once overall (global RNG).

    Returns the draw broadcastable to ``x`` (on ``x.device``, in ``dtype``)
    and whether the draw was per sample.  Draws happen on the CPU, so
    parameters are identical whatever device ``x`` lives on.
    """
    draw_seeds = _draw_seeds_for(x)
    if draw_seeds is None:
        unit = torch.rand(1)
        batched = False
    else:
        unit = torch.cat([torch.rand(1, generator=sample_generator(seed)) for seed in draw_seeds])
        batched = True
    values = (low + (high - low) * unit.double()).to(device=x.device, dtype=dtype)
    if batched:
        return values.reshape(x.shape[0], *([1] * (x.ndim - 1))), True
    return values.reshape([]), False


def nominal_upper_bound(x: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """The upper end of the value range a float patch is assumed to come from.

    This is the smallest of 1, 255 and 65535 that is >= the largest absolute
    (non-NaN) value of ``x`` -- i.e. data already in [0, 1], uint8-range or
    uint16-range data -- and ``inf`` for anything larger.  With
    ``batched=True`` it is computed per sample (over the non-batch dims) and
    returned with shape ``[B, 1, ..., 1]``; otherwise as a 0-d tensor.
    """
    magnitude = _per_sample_reduce(x.abs(), _nan_free_max, batched)
    bound = torch.full_like(magnitude, math.inf)
    for candidate in reversed(_NOMINAL_FLOAT_MAXIMA):
        bound = torch.where(magnitude <= candidate, torch.full_like(bound, candidate), bound)
    return bound


def _zero_nans(x: torch.Tensor) -> torch.Tensor:
    # Unlike nan_to_num this leaves +-inf alone.
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def _check_range(name: str, value_range: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in value_range)
    if not low <= high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {tuple(value_range)}")
    return low, high


# --------------------------------------------------------------------------
# Deterministic transforms
# --------------------------------------------------------------------------


class Normalize(nn.Module):
    """Shift and scale intensities: ``(x.float() + shift) * scale``.

    The default maps uint8-range data (0..255) to [0, 1].
    """

    def __init__(self, shift: float = 0, scale: float = 1 / 255) -> None:
        super().__init__()
        self.shift = shift
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(x.float() + shift) * scale``."""
        return (x.float() + self.shift) * self.scale

    def extra_repr(self) -> str:
        return f"shift={self.shift}, scale={self.scale}"


class Binarize(nn.Module):
    """``x > threshold`` as x's float dtype (float32 for non-float input).

    NaN voxels (unknown labels) stay NaN instead of becoming 0.
    """

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Threshold ``x``, keeping NaNs."""
        values = _as_float(x)
        binary = (values > self.threshold).to(values.dtype)
        return torch.where(torch.isnan(values), values, binary)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class NaNtoNum(nn.Module):
    """Replace NaN / +-inf: ``x.nan_to_num(**params)``.

    Example: ``NaNtoNum({"nan": 0, "posinf": None, "neginf": None})``.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__()
        self.params = dict(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x.nan_to_num(**params)``."""
        return x.nan_to_num(**self.params)

    def extra_repr(self) -> str:
        return f"params={self.params}"


class GaussianBlur(nn.Module):
    """Gaussian blur over the last ``dim`` axes, output the same size as input.

    The kernel is ``exp(-d**2 / (2 * sigma**2))`` sampled at integer offsets
    ``d`` in ``[-(kernel_size // 2), kernel_size // 2]`` and normalised to sum
    1 per axis; borders use replicate padding (``scipy.ndimage`` mode
    ``"nearest"``).  The blur is applied as separable 1-D convolutions, which
    is exactly the N-D convolution with the product kernel.

    Accepts ``[*spatial]``, ``[C, *spatial]``, ``[B, C, *spatial]`` (or any
    number of leading axes): every leading index is blurred independently, as
    in a depthwise convolution.  ``channels`` is the expected channel count,
    kept for API compatibility; inputs with another channel count are also
    blurred per channel.  Integer input is converted to float32.

    Raises:
        ValueError: ``kernel_size`` not a positive odd int, ``sigma <= 0``,
            ``dim`` not 2 or 3, or ``channels < 1``.
    """

    def __init__(
        self, kernel_size: int = 3, sigma: float = 0.1, dim: int = 2, channels: int = 1
    ) -> None:
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels!r}")
        self.kernel_size = kernel_size
        self.sigma = float(sigma)
        self.dim = dim
        self.channels = channels

    def kernel_1d(self, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        """The normalised 1-D Gaussian kernel (length ``kernel_size``)."""
        radius = self.kernel_size // 2
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
        kernel = torch.exp(-(offsets**2) / (2 * self.sigma**2))
        return (kernel / kernel.sum()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur the last ``dim`` axes of ``x``."""
        if x.ndim < self.dim:
            raise ValueError(
                f"GaussianBlur(dim={self.dim}) needs at least {self.dim} axes, "
                f"got shape {tuple(x.shape)}"
            )
        values = _as_float(x)
        spatial_shape = values.shape[-self.dim :]
        # One single-channel image per leading index == depthwise convolution.
        blurred = values.reshape(-1, 1, *spatial_shape)
        kernel = self.kernel_1d(values.dtype, values.device)
        radius = self.kernel_size // 2
        convolve = F.conv2d if self.dim == 2 else F.conv3d
        for axis in range(self.dim):
            kernel_shape = [1] * self.dim
            kernel_shape[axis] = self.kernel_size
            # F.pad lists (before, after) pairs starting from the LAST axis.
            padding = [0] * (2 * self.dim)
            pad_slot = self.dim - 1 - axis
            padding[2 * pad_slot] = padding[2 * pad_slot + 1] = radius
            padded = F.pad(blurred, padding, mode="replicate")
            blurred = convolve(padded, kernel.view(1, 1, *kernel_shape))
        return blurred.reshape(values.shape)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, sigma={self.sigma}, "
            f"dim={self.dim}, channels={self.channels}"
        )


# --------------------------------------------------------------------------
# Random transforms
# --------------------------------------------------------------------------


class GaussianNoise(nn.Module):
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
        values = _as_float(x)
        draw_seeds = _draw_seeds_for(values)
        if draw_seeds is None:
            return values + torch.randn_like(values) * self.std + self.mean
        noise = torch.empty_like(values)
        for sample_index, seed in enumerate(draw_seeds):
            generator = sample_generator(seed, values.device)
            noise[sample_index].normal_(self.mean, self.std, generator=generator)
        return values + noise

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class RandomContrast(nn.Module):
    """Scale contrast around the mean: ``ratio * x + (1 - ratio) * mean(x)``.

    ``ratio ~ U(contrast_range)``.  The mean ignores NaN voxels (so a few NaNs
    don't wipe the patch); NaN voxels become 0 in the output.

    Clamping (keeps the reference behaviour for data in [0, 1] without
    destroying 0..255 data):

    * integer input: computed in float32, clamped to
      ``[0, max of dtype]`` (``[min of dtype, max of dtype]`` if the patch has
      negative values), rounded and returned in the input dtype;
    * float input: clamped to ``[0, b]`` where ``b`` is
      :func:`nominal_upper_bound` (1 for data in [0, 1], 255 for data up to
      255, 65535 for data up to 65535, no upper clamp beyond), or to
      ``[-b, b]`` if the patch has negative values.

    In batched (``sample_seeds``) mode the ratio, mean and clamp range are
    per sample.
    """

    def __init__(self, contrast_range: Sequence[float] = (0.5, 1.5)) -> None:
        super().__init__()
        self.contrast_range = _check_range("contrast_range", contrast_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with randomly scaled contrast."""
        values = _as_float(x)
        ratio, batched = _draw_uniform(values, *self.contrast_range, dtype=values.dtype)
        if values.numel() == 0:
            return x.clone()
        mean = _per_sample_reduce(values, lambda rows, dim: rows.nanmean(dim=dim), batched)
        contrasted = ratio * values + (1 - ratio) * mean

        has_negatives = _per_sample_reduce(values, _nan_free_min, batched) < 0
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
        result = _zero_nans(torch.clamp(contrasted, lower, upper))
        if x.is_floating_point():
            return result
        return result.round().to(x.dtype)

    def extra_repr(self) -> str:
        return f"contrast_range={self.contrast_range}"


class RandomGamma(nn.Module):
    """Gamma correction ``x ** gamma`` with ``gamma ~ U(gamma_range)``.

    Gamma is defined on intensities in [0, 1]:

    * integer input is converted to float32 in [0, 1] (divided by the dtype
      max) and returned as such;
    * float input is divided by its :func:`nominal_upper_bound` ``b`` (1, 255
      or 65535; the patch's largest absolute value if larger),
      gamma-corrected, and multiplied back by ``b`` -- so [0, 1] data stays
      in [0, 1] and 0..255 data in 0..255.

    Values below 0 are treated as 0; NaN voxels become 0.  In batched
    (``sample_seeds``) mode gamma and ``b`` are per sample.
    """

    def __init__(self, gamma_range: Sequence[float] = (0.5, 1.5)) -> None:
        super().__init__()
        self.gamma_range = _check_range("gamma_range", gamma_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with a random gamma correction."""
        if x.is_floating_point():
            values = x
        else:
            values = x.float() / torch_max_value(x.dtype)
        gamma, batched = _draw_uniform(values, *self.gamma_range, dtype=values.dtype)
        if values.numel() == 0:
            return values.clone()
        if not x.is_floating_point():
            return _zero_nans(values.clamp(min=0) ** gamma)

        bound = nominal_upper_bound(values, batched)
        # Past the last nominal range, normalise by the patch's own magnitude.
        magnitude = _per_sample_reduce(values.abs(), _nan_free_max, batched)
        bound = torch.where(torch.isinf(bound), magnitude, bound)
        unit = (values / bound).clamp(0, 1)
        return _zero_nans(unit**gamma * bound)

    def extra_repr(self) -> str:
        return f"gamma_range={self.gamma_range}"
