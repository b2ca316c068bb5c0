"""Index sampling helpers."""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["min_redundant_inds"]


def min_redundant_inds(
    n: int,
    k: int,
    replacement: Union[bool, torch.Generator] = False,
    rng: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``k`` random indices in ``[0, n)`` with as few repeats as possible.

    Without replacement the result is random permutations of ``range(n)``
    concatenated and truncated to ``k``: every block of ``n`` consecutive
    indices is unique, so no index repeats until all have been used.  With
    ``replacement=True`` indices are drawn independently (``torch.randint``).

    Two call forms are accepted:

    * ``min_redundant_inds(n, k, replacement=False, rng=None)``;
    * ``min_redundant_inds(n, k, rng)`` -- the older form, recognised because
      the third positional argument is a ``torch.Generator`` (then without
      replacement).

    Args:
        n: size of the index range.
        k: number of indices to return.
        replacement: draw independently instead of by permutation blocks.
        rng: optional generator for reproducible draws.

    Returns:
        A CPU int64 tensor of length ``k``.

    Raises:
        ValueError: ``n <= 0`` or ``k < 0``.
        TypeError: a generator given both positionally and as ``rng``.
    """
    if isinstance(replacement, torch.Generator):
        if rng is not None:
            raise TypeError("min_redundant_inds got a generator both as third argument and as rng")
        rng = replacement
        replacement = False
    if n <= 0:
        raise ValueError(f"min_redundant_inds needs n > 0 indices to draw from, got n={n}")
    if k < 0:
        raise ValueError(f"min_redundant_inds needs k >= 0, got k={k}")
    device = rng.device if rng is not None else torch.device("cpu")
    if replacement:
        indices = torch.randint(n, (k,), generator=rng, device=device)
    else:
        blocks = -(-k // n)  # ceil(k / n)
        permutations = [torch.randperm(n, generator=rng, device=device) for _ in range(blocks)]
        indices = torch.cat(permutations)[:k] if permutations else torch.empty(0, dtype=torch.long)
    return indices.to(device="cpu", dtype=torch.long)
