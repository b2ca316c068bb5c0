"""`CellMapMultiDataset` (datasets concatenated into one index space) and `CellMapSubset`."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import _engine
from ._stats import ClassWeights
from .exceptions import ConfigError

__all__ = ["CellMapMultiDataset", "CellMapSubset"]


def _is_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a single dataset (a :class:`~cellmap_data.CellMapDataset`): told by what
    it holds, so this module does not import the dataset module."""
    return hasattr(obj, "engine") and hasattr(obj, "annotated_classes") and not hasattr(obj, "cumulative_sizes")


class CellMapMultiDataset(ClassWeights, torch.utils.data.ConcatDataset):
    """Several :class:`CellMapDataset` objects behind one index space.

    Accepts the current positional order ``(datasets, classes, input_arrays, target_arrays)``
    and the older ``(classes, input_arrays, target_arrays, datasets)``.
    """

    datasets: list[Any]  # flattened CellMapDataset objects: never nested

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names_new = ["datasets", "classes", "input_arrays", "target_arrays"]
        names_old = ["classes", "input_arrays", "target_arrays", "datasets"]
        old_order = bool(args) and isinstance(args[0], Sequence) and bool(args[0]) and all(isinstance(a, str) for a in args[0])
        bound = dict(zip(names_old if old_order else names_new, args))
        overlap = set(bound) & set(kwargs)
        if overlap:
            raise TypeError(f"CellMapMultiDataset got multiple values for {sorted(overlap)}")
        bound.update(kwargs)
        datasets = list(bound.get("datasets") or [])
        for d in datasets:
            if not (isinstance(d, CellMapMultiDataset) or _is_dataset(d)):
                raise ConfigError(f"CellMapMultiDataset takes CellMapDataset objects, not {type(d).__name__}")
        flat: list[Any] = []
        for d in datasets:
            flat.extend(d.datasets if isinstance(d, CellMapMultiDataset) else [d])
        self.classes = list(bound.get("classes") or (flat[0].classes if flat else []))
        self.input_arrays = dict(bound.get("input_arrays") or (flat[0].input_arrays if flat else {}))
        self.target_arrays = dict(bound.get("target_arrays") or (flat[0].target_arrays if flat else {}))
        if not flat:
            # torch's ConcatDataset refuses an empty list; keep an empty, well-defined object.
            self.datasets = []
            self.cumulative_sizes = []
            return
        super().__init__(flat)

    # -- index space ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.cumulative_sizes[-1] if self.cumulative_sizes else 0

    def locate(self, idx: int) -> tuple[int, int]:
        """(dataset number, index within it) of global index ``idx``."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"index {idx} out of range for {n} samples")
        d = bisect.bisect_right(self.cumulative_sizes, idx)
        return d, idx - (self.cumulative_sizes[d - 1] if d else 0)

    def offset(self, d: int) -> int:
        """Global index of the first sample of dataset ``d``."""
        return self.cumulative_sizes[d - 1] if d else 0

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """The sample at global index ``idx``; its ``"idx"`` is the index inside the dataset
        that owns it, as in the reference library (:meth:`locate` maps one to the other)."""
        d, i = self.locate(int(idx))
        return self.datasets[d][i]

    def as_multi(self) -> "CellMapMultiDataset":
        """This multi-dataset (what a loader reads; a single dataset answers with a one-dataset
        multi-dataset)."""
        return self

    def engine_collection(self) -> Any:
        """The engine's view of these datasets (one index space, shared reads)."""
        return _engine.Collection([d.engine for d in self.datasets])

    # -- statistics and tiles -------------------------------------------------------------
    @property
    def validation_indices(self) -> list[int]:
        """Global indices of non-overlapping tiles covering every crop to its far edge."""
        out: list[int] = []
        for d, dataset in enumerate(self.datasets):
            out.extend(self.offset(d) + i for i in dataset.validation_indices)
        return out

    def get_crop_class_matrix(self) -> np.ndarray:
        """Bool ``[n_datasets, n_classes]``: whether each crop annotates each class."""
        from ._stats import crop_class_matrix

        if not self.datasets:
            return np.zeros((0, len(self.classes)), dtype=bool)
        return crop_class_matrix(self.datasets)

    @property
    def class_counts(self) -> dict[str, dict[str, float]]:
        """Summed ``{"totals": {cls: fg}, "totals_total": {cls: voxels}}`` over datasets (one
        parallel engine call for all crops)."""
        from ._stats import class_counts

        counts = class_counts(self.datasets)
        return {key: {c: counts[key].get(c, 0.0) for c in self.classes} for key in ("totals", "totals_total")}

    def stats(self) -> Any:
        """Polars table: one row per (dataset, crop, class)."""
        from ._stats import stats_for

        return stats_for(self.datasets)

    def verify(self) -> bool:
        """Whether any dataset can produce samples."""
        return any(d.verify() for d in self.datasets)

    # -- configuration --------------------------------------------------------------------
    def set_raw_value_transforms(self, transforms: Any) -> None:
        """Sets the raw value transforms of every dataset."""
        for d in self.datasets:
            d.set_raw_value_transforms(transforms)

    def set_target_value_transforms(self, transforms: Any) -> None:
        """Sets the target value transforms of every dataset."""
        for d in self.datasets:
            d.set_target_value_transforms(transforms)

    def set_spatial_transforms(self, spatial_transforms: Mapping[str, Any] | None) -> None:
        """Sets the spatial augmentation of every dataset."""
        for d in self.datasets:
            d.set_spatial_transforms(spatial_transforms)

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapMultiDataset":
        """Returns tensors on ``device`` from now on."""
        for d in self.datasets:
            d.to(device, non_blocking=non_blocking)
        return self

    def as_iterable(self, batch_size: int = 1, **loader_kwargs: Any) -> Any:
        """A torch ``IterableDataset`` of batches (see :class:`CellMapIterableDataset`)."""
        from .loader import CellMapIterableDataset

        return CellMapIterableDataset(self, batch_size=batch_size, **loader_kwargs)

    def __repr__(self) -> str:
        from .presentation.display import multidataset_text

        return multidataset_text(self)

    def _repr_html_(self) -> str:
        from .presentation.display import multidataset_html

        return multidataset_html(self)


class CellMapSubset(torch.utils.data.Subset):
    """A subset of a dataset that still answers the dataset's questions (classes, arrays,
    counts, weights, ``to``) and can be loaded by :class:`CellMapDataLoader`."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(int(i) for i in indices))

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapSubset":
        """Moves the underlying dataset's output to ``device``."""
        dataset: Any = self.dataset
        dataset.to(device, non_blocking=non_blocking)
        return self

    def __repr__(self) -> str:
        from .presentation.display import subset_text

        return subset_text(self)

    def _repr_html_(self) -> str:
        from .presentation.display import subset_html

        return subset_html(self)
