"""``NaNtoNum``: replace NaN / infinite values (``torch.nan_to_num``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from cellmap_data.transforms.augment._common import ValueTransform, may_overwrite

__all__ = ["NaNtoNum"]


class NaNtoNum(ValueTransform):
    """Replace NaN / +-inf: ``x.nan_to_num(**params)``.

    Example: ``NaNtoNum({"nan": 0, "posinf": None, "neginf": None})``.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__()
        self.params = dict(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x.nan_to_num(**params)`` (in place on an owned batch)."""
        if may_overwrite(x):
            return x.nan_to_num_(**self.params)
        return x.nan_to_num(**self.params)

    def extra_repr(self) -> str:
        return f"params={self.params}"
