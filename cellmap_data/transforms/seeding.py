"""Per-sample, reproducible randomness for the random transforms.

By default a random transform behaves like a plain torchvision transform: it
treats its input as ONE patch and draws from torch's global RNG.

Inside :func:`sample_seeds` the input is instead a *batch* whose dim 0 is the
sample axis, and every random transform draws one parameter (or one noise
field) per sample from generators seeded from that sample's seed::

    with sample_seeds(seeds):          # len(seeds) == batch.shape[0]
        batch = transforms(batch)

Contract
--------
* Within one ``with`` block, random transform calls are numbered 0, 1, 2, ...
  in call order (one shared counter for all transforms).  Call number ``k``
  gives sample ``i`` a generator seeded with ``mix(salt, seeds[i], k)``.
* Hence the output for sample ``i`` depends only on ``seeds[i]``, ``salt``,
  that sample's data and the sequence of random transform calls made in the
  block: running the pipeline on the whole batch equals running it on each
  sample alone inside ``sample_seeds([seeds[i]])`` on a batch of one.
* Same seeds (and salt) give identical outputs; different seeds give
  independent draws.  Use ``salt`` to decorrelate streams that share seeds
  (e.g. one block per array: ``sample_seeds(seeds, salt="raw")``).
* Scalar parameters are drawn on the CPU and are identical on every device.
  Noise fields are drawn directly on the tensor's device with a generator of
  that device seeded the same way (no host-to-device copy of the noise), so
  noise is reproducible per device type but CPU and CUDA noise differ.
* Keyed draws (:func:`next_keyed_draw_seeds`, the ``key=`` of the EM defect transforms) still
  claim a call number, but their generator seed is ``mix(key, seeds[i])``: it ignores the salt
  and the call number, so every array of a sample (each with its own salt, its own pipeline)
  draws the same for the same key -- one slip for raw and labels alike.
* :func:`sample_draw_seeds` recomputes, after the fact, the generator seeds a call handed out
  (the draws of a sample are replayed from its recorded seed).
* The state lives in a :class:`contextvars.ContextVar`: each thread (and each
  asyncio task that enters its own block) has its own scope, and nested blocks
  shadow the outer one until they exit.
"""

from __future__ import annotations

import hashlib
import operator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import torch

__all__ = [
    "SeedsLike",
    "active_sample_seeds",
    "next_keyed_draw_seeds",
    "next_sample_draw_seeds",
    "sample_draw_seeds",
    "sample_generator",
    "sample_seeds",
]

SeedsLike = Union[Sequence[int], torch.Tensor]

_UINT64_MASK = (1 << 64) - 1


@dataclass
class _SeedScope:
    """The state of one ``sample_seeds`` block."""

    seeds: tuple[int, ...]
    salt: int
    calls_made: int = field(default=0)


_active_scope: ContextVar[_SeedScope | None] = ContextVar(
    "cellmap_data_sample_seed_scope", default=None
)


def _stable_salt(salt: int | str) -> int:
    """Turn a salt into an int that is stable across processes.

    ``hash(str)`` is randomised per process, so strings are hashed explicitly.
    """
    if isinstance(salt, str):
        digest = hashlib.blake2b(salt.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little")
    if isinstance(salt, int) and not isinstance(salt, bool):
        return salt & _UINT64_MASK
    raise TypeError(f"salt must be an int or a str, got {type(salt).__name__}")


def _mix(*parts: int) -> int:
    """Hash integers into one well-spread 64-bit generator seed.

    Hashing (rather than e.g. ``seed + k``) keeps nearby seeds and call
    numbers from producing overlapping or correlated streams.
    """
    payload = b"".join((part & _UINT64_MASK).to_bytes(8, "little") for part in parts)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def _normalise_seeds(seeds: SeedsLike) -> tuple[int, ...]:
    if isinstance(seeds, torch.Tensor):
        if seeds.ndim != 1:
            raise ValueError(f"seeds must be 1-D, got a tensor of shape {tuple(seeds.shape)}")
        if seeds.is_floating_point() or seeds.is_complex():
            raise TypeError(f"seeds must be an integer tensor, got {seeds.dtype}")
        return tuple(int(seed) for seed in seeds.tolist())
    normalised = []
    for seed in seeds:
        if isinstance(seed, torch.Tensor):
            seed = seed.item()
        # operator.index accepts ints and numpy integers but rejects floats.
        if isinstance(seed, bool) or not hasattr(seed, "__index__"):
            raise TypeError(f"seeds must be integers, got {seed!r}")
        normalised.append(operator.index(seed))
    return tuple(normalised)


@contextmanager
def sample_seeds(seeds: SeedsLike, salt: int | str = 0) -> Iterator[tuple[int, ...]]:
    """Declare that transforms called inside the block receive seeded batches.

    Args:
        seeds: one integer seed per sample (a sequence of ints or a 1-D
            integer tensor of length ``B``).  Tensors passed to random
            transforms inside the block must have ``shape[0] == B``.
        salt: optional int or str mixed into every generator seed, to get
            independent streams from the same seeds.

    Yields:
        The seeds as a tuple of Python ints.

    See the module docstring for the full reproducibility contract.
    """
    scope = _SeedScope(seeds=_normalise_seeds(seeds), salt=_stable_salt(salt))
    if len(scope.seeds) == 0:
        raise ValueError("sample_seeds needs at least one seed")
    token = _active_scope.set(scope)
    try:
        yield scope.seeds
    finally:
        _active_scope.reset(token)


def active_sample_seeds() -> tuple[int, ...] | None:
    """The seeds of the innermost active ``sample_seeds`` block, or None."""
    scope = _active_scope.get()
    return None if scope is None else scope.seeds


def next_sample_draw_seeds(batch_size: int) -> list[int] | None:
    """Claim the next call number and return one generator seed per sample.

    Random transforms call this once per forward pass.  Returns None outside
    any ``sample_seeds`` block (the caller then uses torch's global RNG).

    Raises:
        ValueError: if ``batch_size`` differs from the number of seeds.
    """
    scope = _active_scope.get()
    if scope is None:
        return None
    if batch_size != len(scope.seeds):
        raise ValueError(
            f"sample_seeds was given {len(scope.seeds)} seeds but the transform "
            f"received a batch of {batch_size} samples (dim 0)"
        )
    call_number = scope.calls_made
    scope.calls_made += 1
    return [_mix(scope.salt, seed, call_number) for seed in scope.seeds]


def sample_generator(draw_seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``draw_seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(draw_seed)
    return generator


def _keyed_seed(key: int | str, seed: int) -> int:
    # Two parts where call-numbered seeds mix three: the hashed payloads never coincide.
    return _mix(_stable_salt(key), seed)


def next_keyed_draw_seeds(batch_size: int, key: int | str) -> list[int] | None:
    """Like :func:`next_sample_draw_seeds` (claims the next call number, checks the batch size),
    but each sample's generator seed depends on its seed and ``key`` only, not on the block's
    salt or the call number: transforms with the same key draw the same for a sample whichever
    array, pipeline or position they run in.  None outside any ``sample_seeds`` block.

    Raises:
        ValueError: if ``batch_size`` differs from the number of seeds.
        TypeError: ``key`` is not an int or a str.
    """
    if next_sample_draw_seeds(batch_size) is None:
        return None
    seeds = active_sample_seeds()
    assert seeds is not None  # the block is active: next_sample_draw_seeds found it
    return [_keyed_seed(key, seed) for seed in seeds]


def sample_draw_seeds(
    seeds: SeedsLike, salt: int | str = 0, call_number: int = 0, key: int | str | None = None
) -> list[int]:
    """The generator seeds, one per sample, that call number ``call_number`` of a
    ``sample_seeds(seeds, salt=salt)`` block hands out (:func:`next_sample_draw_seeds`), or with
    ``key`` those of a keyed call (:func:`next_keyed_draw_seeds`; salt and call number are then
    ignored).  A pure function: it replays a block's draws from the recorded seeds.

    Raises:
        ValueError: ``call_number`` is negative.
    """
    normalised = _normalise_seeds(seeds)
    if key is not None:
        return [_keyed_seed(key, seed) for seed in normalised]
    if call_number < 0:
        raise ValueError(f"call_number must be >= 0, got {call_number}")
    stable = _stable_salt(salt)
    return [_mix(stable, seed, call_number) for seed in normalised]
