"""`CellMapDataset`: one raw volume plus one crop's labels, sampled on a grid of centres.

All reading, resampling and augmentation happens in the engine, a whole batch per call; this
module turns the user's configuration into the engine's, and the engine's Arrow batches into
dicts of torch tensors (zero copy), then applies the value transforms on the batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import _engine
from ._config import SPATIAL_AXES, arrays_to_3d, check_axis_order, spatial_transforms_json, to_json
from .exceptions import ConfigError, NotFoundError
from .transforms.seeding import sample_seeds
from .utils.paths import split_target_path

__all__ = ["CellMapDataset"]

ValueTransform = Callable[[torch.Tensor], torch.Tensor]


def _seed_from(seed: int | None, rng: Any) -> int:
    if seed is not None:
        return int(seed) & ((1 << 63) - 1)
    if isinstance(rng, torch.Generator):
        return int(rng.initial_seed()) & ((1 << 63) - 1)
    if rng is not None and hasattr(rng, "integers"):  # numpy Generator
        return int(rng.integers(0, 1 << 62))
    return int(torch.initial_seed()) & ((1 << 63) - 1)


def expand_compact(tensor: torch.Tensor) -> torch.Tensor:
    """uint8 compact targets (0, 1, 255 = unknown) → float32 with NaN, on the tensor's device.

    Moving uint8 and expanding on the GPU moves 4× less memory than shipping float32."""
    if tensor.dtype != torch.uint8:
        return tensor
    out = tensor.to(torch.float32)
    return out.masked_fill_(tensor == 255, float("nan"))


class CellMapDataset(torch.utils.data.Dataset):
    """Training samples from one raw volume and one label crop.

    ``ds[i]`` is ``{"idx": tensor(i), <input name>: [1, *spatial], <target name>:
    [n_classes, *spatial]}`` (float32; singleton spatial axes squeezed). A class in
    ``classes`` that the crop does not annotate is all NaN.

    Both constructor dialects of the reference library are accepted: the current one
    (``pad``, ``seed``) and the older one (``is_train``, ``axis_order``, ``context``, ``rng``,
    ``empty_value``, ``max_workers``).
    """

    def __init__(
        self,
        raw_path: str,
        target_path: str,
        classes: Sequence[str] | None,
        input_arrays: Mapping[str, Mapping[str, Any]],
        target_arrays: Mapping[str, Mapping[str, Any]] | None = None,
        pad: bool = False,
        spatial_transforms: Mapping[str, Any] | None = None,
        raw_value_transforms: ValueTransform | None = None,
        target_value_transforms: ValueTransform | Mapping[str, ValueTransform] | Sequence[ValueTransform] | None = None,
        class_relation_dict: Mapping[str, Sequence[str]] | None = None,
        force_has_data: bool = False,
        device: str | torch.device | None = None,
        seed: int | None = None,
        *,
        is_train: bool | None = None,
        axis_order: str = "zyx",
        context: Any = None,
        rng: Any = None,
        empty_value: float = math.nan,
        max_workers: int | None = None,
        raw_interpolation: str = "linear",
        compact_targets: bool = False,
    ) -> None:
        check_axis_order(axis_order)
        self.raw_path = os.fspath(raw_path)
        self.target_path = os.fspath(target_path) if target_path is not None else ""
        self.classes = list(classes) if classes is not None else []
        self.input_arrays = dict(input_arrays)
        self.target_arrays = dict(target_arrays) if target_arrays else {}
        self.pad = bool(pad)
        self.is_train = True if is_train is None else bool(is_train)
        self.axis_order = axis_order
        self.empty_value = float(empty_value)
        self.force_has_data = bool(force_has_data)
        self.class_relation_dict = dict(class_relation_dict) if class_relation_dict else None
        self.raw_value_transforms = raw_value_transforms
        self.target_value_transforms = target_value_transforms
        self.device = torch.device(device) if device is not None else None
        self.seed = _seed_from(seed, rng)
        self.epoch = 0
        self.raw_interpolation = raw_interpolation
        self.compact_targets = bool(compact_targets)
        self._inputs = arrays_to_3d(self.input_arrays, "input_arrays")
        self._targets = arrays_to_3d(self.target_arrays, "target_arrays")
        if not self._inputs:
            raise ConfigError("input_arrays is empty: at least one input array is required")
        if self.target_path:
            self.target_template, self.annotated_classes = split_target_path(self.target_path)
        else:
            self.target_template, self.annotated_classes = "", []
        self.spatial_transforms = spatial_transforms_json(spatial_transforms)
        for c in self.annotated_classes:
            # Every class the template lists must exist, requested or not: a typo in a CSV
            # should fail here, not silently turn into an unannotated class.
            label_path = self.target_template.format(label=c)
            if not os.path.exists(label_path):
                raise NotFoundError(f"{label_path}: no such file or directory (class '{c}' listed in {self.target_path})")
        self._engine_handle = self._open_engine()
        self._engine_pid = os.getpid()
        if self._engine_handle.sampling_box is None and not self.force_has_data:
            raise ConfigError(self._no_fit_message())

    def _no_fit_message(self) -> str:
        """Which array does not fit along which axis (pad=False)."""
        lo, hi = self._engine_handle.bounding_box
        for spec in self._inputs + self._targets:
            for k, axis in enumerate(SPATIAL_AXES):
                size = spec["shape"][k] * spec["scale"][k]
                if size > hi[k] - lo[k] + 1e-9:
                    return (
                        f"array '{spec['name']}' spans {size:g} nm along {axis} but the data ({self.raw_path} ∩ "
                        f"{self.target_path}) spans only {hi[k] - lo[k]:g} nm there and pad=False"
                    )
        return f"no patch fits in {self.target_path} with pad=False"

    # -- engine configuration ---------------------------------------------------------------
    def exclusive_classes(self, cls: str) -> list[str]:
        """Classes mutually exclusive with ``cls`` per ``class_relation_dict`` (symmetric)."""
        relations = self.class_relation_dict or {}
        related = set(relations.get(cls, ()))
        related.update(other for other, excluded in relations.items() if cls in excluded)
        related.discard(cls)
        return sorted(related)

    def _class_sources(self) -> list[list[Any]]:
        sources = []
        for c in self.classes:
            if c in self.annotated_classes:
                sources.append([c, self.target_template.format(label=c), []])
            else:
                # Where an annotated, mutually exclusive class is present, c is a true negative.
                related = [r for r in self.exclusive_classes(c) if r in self.annotated_classes]
                sources.append([c, None, [self.target_template.format(label=r) for r in related]])
        return sources

    def _engine_config(self) -> dict[str, Any]:
        return {
            "name": self.raw_path,
            "crop": self.target_path,
            "raw_path": self.raw_path,
            "classes": self._class_sources(),
            "inputs": self._inputs,
            "targets": self._targets,
            "pad": self.pad,
            "raw_pad_value": math.nan,
            "raw_interpolation": self.raw_interpolation,
            "spatial": self.spatial_transforms if self.is_train else None,
            "compact_targets": self.compact_targets,
        }

    def _open_engine(self) -> Any:
        return _engine.Dataset(to_json(self._engine_config()))

    @property
    def engine(self) -> Any:
        """The engine dataset. A forked child process reopens its own (the parent's threads and
        cache are not usable there)."""
        if self._engine_pid != os.getpid():
            self._engine_handle = self._open_engine()
            self._engine_pid = os.getpid()
        return self._engine_handle

    # Older code paths and tests use the private name.
    @property
    def _engine(self) -> Any:
        return self.engine

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_engine_handle", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._engine_handle = self._open_engine()
        self._engine_pid = os.getpid()

    # -- size and geometry --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._engine)

    @property
    def bounding_box(self) -> dict[str, tuple[float, float]]:
        """Intersection of the raw and annotated label boxes (nm)."""
        lo, hi = self._engine.bounding_box
        return {a: (lo[k], hi[k]) for k, a in enumerate(SPATIAL_AXES)}

    @property
    def sampling_box(self) -> dict[str, tuple[float, float]] | None:
        """Box of valid sample centres (nm), or None when no patch fits (``pad=False``)."""
        box = self._engine.sampling_box
        if box is None:
            return None
        lo, hi = box
        return {a: (lo[k], hi[k]) for k, a in enumerate(SPATIAL_AXES)}

    def get_center(self, idx: int) -> dict[str, float]:
        """World centre (nm) of sample ``idx``."""
        return dict(zip(SPATIAL_AXES, self._engine.centre(int(idx))))

    # -- reading ------------------------------------------------------------------------
    def read_batch_raw(self, indices: Sequence[int], *, augment: bool | None = None, epoch: int | None = None,
                       rank: int = 0, stream_indices: Sequence[int] | None = None) -> Any:
        """The engine batch (Arrow record batch + zero-copy tensors) for ``indices``."""
        n = len(self)
        checked = []
        for i in indices:
            i = int(i)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"sample index {i} out of range for a dataset of {n} samples")
            checked.append(i)
        return self._engine.read_batch(
            checked,
            seed=self.seed,
            epoch=self.epoch if epoch is None else int(epoch),
            rank=int(rank),
            augment=self.is_train and self.spatial_transforms is not None if augment is None else bool(augment),
            stream_indices=None if stream_indices is None else [int(s) for s in stream_indices],
        )

    def batch_to_tensors(self, batch: Any) -> dict[str, Any]:
        """Engine batch → ``{"idx", <array>: tensor [B, ...]}`` with value transforms applied."""
        out: dict[str, Any] = {}
        record = batch.record_batch()
        import pyarrow as pa

        table = pa.record_batch(record)
        out["idx"] = torch.as_tensor(table.column("idx").to_numpy().astype("int64"))
        seeds = torch.as_tensor(table.column("value_seed").to_numpy().astype("int64"))
        input_names = [a["name"] for a in self._inputs]
        for name in batch.tensor_names:
            tensor = torch.from_dlpack(batch.tensor(name))
            if self.device is not None:
                tensor = tensor.to(self.device, non_blocking=True)
            tensor = expand_compact(tensor)
            if name in input_names:
                tensor = self._apply_raw_transform(tensor, seeds)
            else:
                tensor = self._apply_target_transform(tensor, seeds)
            out[name] = tensor
        return out

    def get_batch(self, indices: Sequence[int], **kwargs: Any) -> dict[str, Any]:
        """Reads samples ``indices`` as one batch of stacked tensors."""
        return self.batch_to_tensors(self.read_batch_raw(indices, **kwargs))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        batch = self.get_batch([int(idx)])
        return {k: (v[0] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _apply_raw_transform(self, tensor: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        if self.raw_value_transforms is None:
            return tensor
        with sample_seeds(seeds, salt="raw"):
            return self.raw_value_transforms(tensor)

    def _apply_target_transform(self, tensor: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        t = self.target_value_transforms
        if t is None:
            return tensor
        with sample_seeds(seeds, salt="target"):
            if isinstance(t, Mapping):
                channels = [t[c](tensor[:, i]) if c in t else tensor[:, i] for i, c in enumerate(self.classes)]
                return torch.stack(channels, dim=1)
            if isinstance(t, (list, tuple)):
                channels = [t[i](tensor[:, i]) if i < len(t) and t[i] is not None else tensor[:, i] for i in range(len(self.classes))]
                return torch.stack(channels, dim=1)
            return t(tensor)

    # -- configuration setters ------------------------------------------------------------
    def set_raw_value_transforms(self, transforms: ValueTransform | None) -> None:
        """Replaces the raw value transforms."""
        self.raw_value_transforms = transforms

    def set_target_value_transforms(self, transforms: Any) -> None:
        """Replaces the target value transforms (one callable, or one per class)."""
        self.target_value_transforms = transforms

    def set_spatial_transforms(self, spatial_transforms: Mapping[str, Any] | None) -> None:
        """Replaces the spatial augmentation config (validated immediately)."""
        self.spatial_transforms = spatial_transforms_json(spatial_transforms)
        self._engine_handle = self._open_engine()
        self._engine_pid = os.getpid()

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapDataset":
        """Returns tensors on ``device`` from now on."""
        self.device = torch.device(device)
        return self

    # -- tiles, classes and counts ------------------------------------------------------
    @property
    def validation_indices(self) -> list[int]:
        """Indices of non-overlapping tiles (the first target array's shape) that cover the
        whole crop, the last tile on each axis shifted back so the far edge is covered."""
        grid = self.engine.grid
        if len(self) == 0:
            return []
        spec = (self._targets or self._inputs)[0]["shape"]
        per_axis = []
        for g, n in zip(grid, spec):
            positions = list(range(0, g, n))
            if positions[-1] != g - 1:
                positions.append(g - 1)
            per_axis.append(positions)
        return [(z * grid[1] + y) * grid[2] + x for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]

    def get_crop_class_matrix(self) -> "np.ndarray":
        """Bool ``[1, n_classes]``: whether this crop annotates each requested class."""
        import numpy as np

        return np.array([[c in self.annotated_classes for c in self.classes]], dtype=bool)

    @property
    def class_counts(self) -> dict[str, dict[str, float]]:
        """``{"totals": {cls: foreground voxels}, "totals_total": {cls: voxels}}`` at training
        resolution (read from ``complement_counts`` metadata when present, else counted by the
        engine and cached outside the data)."""
        from ._stats import class_counts

        return class_counts(self)

    @property
    def class_weights(self) -> dict[str, float]:
        """Per-class background/foreground ratio (finite for classes without foreground)."""
        from ._stats import class_weights

        return class_weights(self.class_counts)

    def stats(self) -> Any:
        """Polars table: one row per (crop, class) with sizes, counts, fraction and weight."""
        from ._stats import stats

        return stats(self)

    def verify(self) -> bool:
        """Whether the dataset can produce samples (or ``force_has_data`` is set)."""
        return len(self) > 0 or self.force_has_data

    def as_iterable(self, batch_size: int = 1, **loader_kwargs: Any) -> Any:
        """A torch ``IterableDataset`` of batches (see :class:`CellMapIterableDataset`)."""
        from .loader import CellMapIterableDataset

        return CellMapIterableDataset(self, batch_size=batch_size, **loader_kwargs)

    def __repr__(self) -> str:
        return (
            f"CellMapDataset(raw={self.raw_path!r}, target={self.target_path!r}, "
            f"classes={self.classes}, len={len(self)})"
        )
