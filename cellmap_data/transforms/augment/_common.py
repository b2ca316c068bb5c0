"""Helpers shared by the transforms of :mod:`cellmap_data.transforms.augment`.

Private: the public names live in the per-transform submodules; only
:func:`nominal_upper_bound` is re-exported by the package.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cellmap_data.transforms.seeding import (
    active_sample_seeds,
    next_sample_draw_seeds,
    sample_generator,
)

__all__ = ["ValueTransform", "may_overwrite", "nominal_upper_bound", "owned_batch"]

_owned: ContextVar[torch.Tensor | None] = ContextVar("cellmap_data_owned_batch", default=None)


@contextmanager
def owned_batch(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Declares that ``tensor`` belongs to the caller alone (a batch fresh from the engine), so
    the project's transforms called on it inside the block may overwrite it instead of
    allocating new tensors."""
    token = _owned.set(tensor)
    try:
        yield tensor
    finally:
        _owned.reset(token)


def may_overwrite(x: torch.Tensor) -> bool:
    """Whether a transform may work on ``x`` in place: ``x`` is the float tensor declared owned
    by :func:`owned_batch` (never a tensor a user handed in)."""
    return x is _owned.get() and x.is_floating_point() and not x.requires_grad

# Upper ends of the value ranges float data is assumed to come from:
# [0, 1] (already normalised), uint8 and uint16 volumes.
NOMINAL_FLOAT_MAXIMA = (1.0, 255.0, 65535.0)


class ValueTransform(nn.Module):
    """Base of every value transform: a :class:`torch.nn.Module` that also answers ``.transform``.

    The reference library's transforms built on torchvision offer
    ``transform(x, params=None)``; scripts call it directly, so every
    transform here has it, for every transform class alike.
    """

    def transform(self, x: Any, params: dict[str, Any] | None = None) -> Any:
        """Apply the transform to ``x``, exactly like calling it (``params`` is ignored)."""
        return self(x)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if floating point, else a float32 copy."""
    return x if x.is_floating_point() else x.float()


def draw_seeds_for(x: torch.Tensor) -> list[int] | None:
    """Per-sample generator seeds when inside ``sample_seeds``, else None."""
    if x.ndim == 0:
        if active_sample_seeds() is not None:
            raise ValueError(
                "inside sample_seeds, transforms need a batch with a sample axis (dim 0), "
                "got a 0-d tensor"
            )
        return None
    return next_sample_draw_seeds(x.shape[0])


def per_sample_reduce(
    x: torch.Tensor, reduce: Callable[[torch.Tensor, int], torch.Tensor], batched: bool
) -> torch.Tensor:
    """Reduce ``x`` per sample (batched) or as a whole, broadcastable to ``x``.

    ``reduce(t, dim)`` is called on a 2-D view, one row per sample.
    """
    if batched:
        rows = x.reshape(x.shape[0], -1)
        return reduce(rows, 1).reshape(x.shape[0], *([1] * (x.ndim - 1)))
    return reduce(x.reshape(1, -1), 1).reshape([])


def nan_free_max(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Maximum along ``dim`` ignoring NaNs (``-inf`` for an all-NaN row)."""
    return rows.nan_to_num(nan=-math.inf).amax(dim=dim)


def nan_free_min(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Minimum along ``dim`` ignoring NaNs (``inf`` for an all-NaN row)."""
    return rows.nan_to_num(nan=math.inf).amin(dim=dim)


def draw_uniform(
    x: torch.Tensor, low: float, high: float, dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """Draw U(low, high) once per sample (seeded) or once overall (global RNG).

    Returns the draw broadcastable to ``x`` (on ``x.device``, in ``dtype``)
    and whether the draw was per sample.  Draws happen on the CPU, so
    parameters are identical whatever device ``x`` lives on.
    """
    draw_seeds = draw_seeds_for(x)
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
    magnitude = per_sample_reduce(x.abs(), nan_free_max, batched)
    bound = torch.full_like(magnitude, math.inf)
    for candidate in reversed(NOMINAL_FLOAT_MAXIMA):
        bound = torch.where(magnitude <= candidate, torch.full_like(bound, candidate), bound)
    return bound


def zero_nans(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaNs replaced by 0 (unlike ``nan_to_num``, leaves +-inf alone)."""
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def check_range(name: str, value_range: Sequence[float]) -> tuple[float, float]:
    """``value_range`` as a float ``(low, high)`` pair.

    Raises:
        ValueError: ``low > high``.
    """
    low, high = (float(v) for v in value_range)
    if not low <= high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {tuple(value_range)}")
    return low, high
