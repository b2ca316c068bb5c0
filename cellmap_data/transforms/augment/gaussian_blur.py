"""``GaussianBlur``: separable Gaussian smoothing of 2-D or 3-D patches."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from cellmap_data.exceptions import ConfigError
from cellmap_data.transforms.augment._common import ValueTransform, as_float

__all__ = ["GaussianBlur", "GaussianBlurArgumentError"]

# The reference library rejects these arguments with an assertion; scripts and tests match on
# this text, so it is kept word for word.
ODD_KERNEL_MESSAGE = "Kernel size should be an odd number."
DIM_MESSAGE = "Only 2D or 3D Gaussian blur is supported."


class GaussianBlurArgumentError(ConfigError, AssertionError):
    """An unusable ``GaussianBlur`` argument (even kernel size, ``dim`` not 2 or 3).

    It is an :class:`AssertionError`, as the reference library raises, and also a
    :class:`ValueError` (through :class:`~cellmap_data.exceptions.ConfigError`), so either
    ``except`` clause catches it.
    """


class GaussianBlur(ValueTransform):
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
        GaussianBlurArgumentError: ``dim`` not 2 or 3 (message "Only 2D or 3D
            Gaussian blur is supported."), ``kernel_size`` even ("Kernel size
            should be an odd number.") or not positive.  Checked in that order,
            like the reference.  An ``AssertionError`` and a ``ValueError``.
        TypeError: ``kernel_size`` is not an integer.
        ValueError: ``sigma <= 0`` or ``channels < 1``.
    """

    def __init__(
        self, kernel_size: int = 3, sigma: float = 0.1, dim: int = 2, channels: int = 1
    ) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise GaussianBlurArgumentError(DIM_MESSAGE)
        if isinstance(kernel_size, bool):
            raise TypeError(f"kernel_size must be an int, got {kernel_size!r}")
        try:
            kernel_size = operator.index(kernel_size)
        except TypeError:
            raise TypeError(f"kernel_size must be an int, got {kernel_size!r}") from None
        if kernel_size % 2 == 0:
            raise GaussianBlurArgumentError(ODD_KERNEL_MESSAGE)
        if kernel_size < 1:
            raise GaussianBlurArgumentError(
                f"Kernel size should be a positive odd number, got {kernel_size}."
            )
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels!r}")
        self.kernel_size = kernel_size
        self.kernel_shape = (kernel_size,) * int(dim)
        self.sigma = float(sigma)
        self.dim = int(dim)
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
        values = as_float(x)
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
