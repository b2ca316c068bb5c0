"""Shared machinery of the EM defect transforms (:class:`MissingSections`, :class:`Misalign`,
:class:`DefectStripes`): the section view of a patch or batch, their keyed per-sample draws and
their parameter checks.

Private: the public names live in the per-transform submodules.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence

import torch

from cellmap_data.exceptions import ConfigError
from cellmap_data.transforms.augment._common import ValueTransform
from cellmap_data.transforms.seeding import (
    SeedsLike,
    active_sample_seeds,
    next_keyed_draw_seeds,
    next_sample_draw_seeds,
    sample_draw_seeds,
    sample_generator,
)

__all__ = [
    "SectionShape",
    "SectionTransform",
    "check_count",
    "check_key",
    "check_probability",
    "check_signed_range",
    "pick",
    "section_view",
    "spatial_shape",
    "unit_draws",
]

# (z, y, x): the number of sections and the extent of each.
SectionShape = tuple[int, int, int]

# Exclusive upper end of the seed drawn from torch's global RNG outside ``sample_seeds``.
_GLOBAL_SEED_BOUND = 2**62


def check_probability(owner: str, name: str, value: Any) -> float:
    """``value`` as a float in [0, 1].

    Raises:
        ConfigError: ``value`` is not a number in [0, 1]; the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{owner}: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_signed_range(
    owner: str, name: str, value: Any, lowest: float = -math.inf, highest: float = math.inf,
    low_exclusive: bool = False,
) -> tuple[float, float]:
    """``value`` as a float ``(low, high)`` pair with ``lowest <= low <= high <= highest`` (``low >
    lowest`` with ``low_exclusive``).

    Raises:
        ConfigError: not a pair of finite numbers in those bounds; the message names ``name``.
    """
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: {name} must be a (low, high) pair of numbers, got {value!r}") from None
    lower_ok = low > lowest if low_exclusive else low >= lowest
    if not (math.isfinite(low) and math.isfinite(high) and lower_ok and low <= high <= highest):
        bound = f"{'>' if low_exclusive else '>='} {lowest}" if math.isfinite(lowest) else ""
        upper = f"<= {highest}" if math.isfinite(highest) else ""
        limits = " and ".join(b for b in (bound, upper) if b)
        raise ConfigError(
            f"{owner}: {name} must be a finite (low, high) pair with low <= high"
            + (f", both {limits}" if limits else "") + f", got {tuple(value)!r}"
        )
    return low, high


def check_key(owner: str, key: Any) -> int | str | None:
    """``key`` unchanged if None, a str or an int.

    Raises:
        ConfigError: any other type.
    """
    if key is None or isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return key
    raise ConfigError(f"{owner}: key must be None, a str or an int, got {key!r}")


def check_count(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``.

    Raises:
        ConfigError: not an integer (floats and bools included) or below ``minimum``.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise ConfigError(f"{owner}: {name} must be an integer, got {value!r}") from None
    if count < minimum:
        raise ConfigError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return count


def section_view(x: torch.Tensor, batched: bool, owner: str) -> torch.Tensor:
    """``x`` as a ``[N, C, z, y, x]`` view (no copy): N samples of C channels of z sections.

    Batched (inside ``sample_seeds``): ``[B, C, z, y, x]``, ``[B, C, y, x]`` (2-D: one section)
    or ``[B, y, x]``.  One patch: ``[C, z, y, x]``, ``[z, y, x]`` or ``[y, x]``.
    """
    if batched:
        views = {5: lambda t: t, 4: lambda t: t.unsqueeze(2), 3: lambda t: t[:, None, None]}
        expected = "[B, C, z, y, x], [B, C, y, x] or [B, y, x]"
    else:
        views = {4: lambda t: t[None], 3: lambda t: t[None, None], 2: lambda t: t[None, None, None]}
        expected = "[C, z, y, x], [z, y, x] or [y, x]"
    view = views.get(x.ndim)
    if view is None:
        raise ValueError(f"{owner} needs {expected}, got shape {tuple(x.shape)}")
    return view(x)


def spatial_shape(shape: Sequence[int], owner: str) -> SectionShape:
    """A sample's spatial shape ``(z, y, x)`` or ``(y, x)`` (one section) as ``(z, y, x)``."""
    sizes = [check_count(owner, "shape", n, 0) for n in shape]
    if len(sizes) == 2:
        return (1, sizes[0], sizes[1])
    if len(sizes) == 3:
        return (sizes[0], sizes[1], sizes[2])
    raise ConfigError(f"{owner}: shape must be a sample's spatial shape (z, y, x) or (y, x), got {tuple(shape)!r}")


class SectionTransform(ValueTransform):
    """Base of the EM defect transforms: per-sample draws from keyed generators, replayable.

    A subclass implements :meth:`_draw_sample` (one sample's draw from its generator, as plain Python
    data) and :meth:`_apply_draws` (the draws applied to a ``[N, C, z, y, x]`` view).  Inside
    ``sample_seeds`` each sample draws from its own generator, keyed like every random transform
    (salt, sample seed, call number) or, with ``key``, by the sample seed and ``key`` alone;
    outside it, the input is one patch and its generator is seeded from torch's global RNG.
    """

    def __init__(self, key: int | str | None = None) -> None:
        super().__init__()
        self.key = check_key(type(self).__name__, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with this defect drawn and applied per sample."""
        owner = type(self).__name__
        batched = active_sample_seeds() is not None
        view = section_view(x, batched, owner)
        if batched:
            claimed = (
                next_sample_draw_seeds(view.shape[0]) if self.key is None
                else next_keyed_draw_seeds(view.shape[0], self.key)
            )
            assert claimed is not None  # inside a block: a seed per sample
            generator_seeds = claimed
        else:
            generator_seeds = [int(torch.randint(0, _GLOBAL_SEED_BOUND, (1,)).item())]
        if x.numel() == 0:
            return x.clone()
        shape: SectionShape = (view.shape[2], view.shape[3], view.shape[4])
        draws = [self._draw_sample(sample_generator(seed), shape) for seed in generator_seeds]
        return self._apply_draws(x, view, draws).reshape(x.shape)

    def draws(
        self, seeds: SeedsLike, shape: Sequence[int], salt: int | str = 0, call_number: int = 0
    ) -> list[dict[str, Any]]:
        """What this transform draws for each sample, as plain Python data (one dict per seed).

        Replays the draws of a ``sample_seeds(seeds, salt=salt)`` block in which this transform
        was random-transform call number ``call_number`` (the project's datasets use the salt
        ``"raw"`` for inputs and ``f"target{c}"`` for class ``c`` of a target; the call number
        counts the random transforms that ran in torch before it in that pipeline, from 0).
        With a ``key`` salt and call number play no part: the draws follow from the samples'
        seeds (their recorded ``value_seed``) alone.

        Args:
            seeds: one seed per sample.
            shape: a sample's spatial shape, ``(z, y, x)`` or ``(y, x)`` (2-D: one section).
            salt: the salt of the block.
            call_number: the call number of this transform in the block.
        """
        sample_shape = spatial_shape(shape, type(self).__name__)
        generator_seeds = sample_draw_seeds(seeds, salt=salt, call_number=call_number, key=self.key)
        return [self._draw_sample(sample_generator(seed), sample_shape) for seed in generator_seeds]

    def _draw_sample(self, generator: torch.Generator, shape: SectionShape) -> dict[str, Any]:
        raise NotImplementedError

    def _apply_draws(self, x: torch.Tensor, view: torch.Tensor, draws: list[dict[str, Any]]) -> torch.Tensor:
        raise NotImplementedError


def unit_draws(generator: torch.Generator, count: int) -> list[float]:
    """``count`` uniform draws in [0, 1) from ``generator``, on the CPU in float64 (identical on
    every device and platform)."""
    return torch.rand(count, generator=generator, dtype=torch.float64).tolist()


def pick(unit: float, count: int) -> int:
    """The integer in ``[0, count)`` a uniform ``unit`` in [0, 1) falls on."""
    return min(int(unit * count), count - 1)
