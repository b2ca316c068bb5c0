"""`CellMapDataSplit`: training and validation datasets from a datasplit CSV, a dict, or ready
datasets, with the split-level transforms and a report of the rows that could not be used."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._config import accepts_older_positional_order, resolve_device
from .dataset import CellMapDataset
from .exceptions import ConfigError, NotFoundError
from .multidataset import CellMapMultiDataset, CellMapSubset

__all__ = ["CellMapDataSplit", "read_datasplit_csv", "default_raw_transforms", "default_target_transforms"]

USAGES = {"train": "train", "validate": "validate", "validation": "validate", "val": "validate"}


def default_raw_transforms() -> Any:
    """The reference default for raw: ``ToDtype(float32, scale=True)`` then NaN → 0.

    Raw reaches transforms as float32 in the raw dtype's range (0..255 for uint8 data), and
    torchvision's ``ToDtype(float32, scale=True)`` leaves float32 input unchanged, so this keeps
    raw in 0..255 exactly like the reference's current release.
    """
    import torchvision.transforms.v2 as T

    from .transforms import NaNtoNum

    return T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])


def default_target_transforms() -> Any:
    """The reference default for targets: ``ToDtype(float32)`` then ``Binarize()`` (NaN kept)."""
    import torchvision.transforms.v2 as T

    from .transforms import Binarize

    return T.Compose([T.ToDtype(torch.float), Binarize()])


_DEFAULT = object()

#: The older positional order of ``CellMapDataSplit``: ``empty_value`` after ``classes``.
_OLD_SPLIT_ORDER = (
    "input_arrays", "target_arrays", "classes", "empty_value", "pad", "datasets", "dataset_dict", "csv_path",
    "spatial_transforms", "train_raw_value_transforms", "val_raw_value_transforms", "target_value_transforms",
    "class_relation_dict", "force_has_data", "context", "device",
)


def _is_old_split_call(args: tuple) -> bool:
    # Fourth positional: ``pad`` (bool or split name) now, ``empty_value`` (a float) before.
    return len(args) >= 4 and isinstance(args[3], float)


def read_datasplit_csv(path: str | os.PathLike[str]) -> dict[str, list[dict[str, str]]]:
    """Parses a datasplit CSV (no header; quoted fields).

    Five columns ``usage, raw_container, raw_dataset, gt_container, gt_dataset`` (raw =
    container/dataset, likewise gt) or three columns ``usage, raw_path, gt_path``. Blank lines
    and lines starting with ``#`` are skipped. ``usage`` is ``train`` or ``validate``.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: datasplit CSV not found")
    out: dict[str, list[dict[str, str]]] = {"train": [], "validate": []}
    # UTF-8 whatever the locale (a byte-order mark, as spreadsheets write, is skipped).
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            for row in reader:
                _add_split_row(out, path, reader.line_num, row)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: the datasplit CSV is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise ConfigError(f"{path}:{reader.line_num}: unreadable CSV: {e}") from None
    if not out["train"] and not out["validate"]:
        raise ConfigError(f"{path}: the datasplit CSV has no rows")
    return out


def _add_split_row(out: dict[str, list[dict[str, str]]], path: Path, line_no: int, row: list[str]) -> None:
    """Adds one CSV row to ``out`` (blank and ``#`` rows are skipped)."""
    row = [field.strip() for field in row]
    if not row or not any(row) or row[0].startswith("#"):
        return
    usage = USAGES.get(row[0].lower())
    if usage is None:
        raise ConfigError(f"{path}:{line_no}: usage must be 'train' or 'validate', not {row[0]!r}")
    if len(row) == 5:
        raw, gt = os.path.join(row[1], row[2]), os.path.join(row[3], row[4])
    elif len(row) == 3:
        raw, gt = row[1], row[2]
    else:
        raise ConfigError(f"{path}:{line_no}: expected 5 (or 3) columns, found {len(row)}")
    out[usage].append({"raw": raw, "gt": gt})


class CellMapDataSplit:
    """Training and validation datasets built from ``datasets`` > ``dataset_dict`` > ``csv_path``.

    Rows that cannot be used (missing class folder, no sample fits with ``pad=False``...) are
    reported once with the reason (a warning, and ``skipped_rows``) instead of being dropped
    silently; a split whose rows give no usable training dataset raises. With none of the three
    sources the split is empty (fill it later with :meth:`construct`).

    ``dataset_dict`` is ``{"train": [{"raw": path, "gt": path_with_[classes]}, ...],
    "validate": [...]}``; ``datasets`` is ``{"train": [CellMapDataset, ...], "validate": [...]}``.
    The older dialect's ``empty_value`` (keyword, or fourth positional argument) is passed on
    to the datasets; ``context`` is accepted and ignored.
    """

    @accepts_older_positional_order(_OLD_SPLIT_ORDER, _is_old_split_call)
    def __init__(
        self,
        input_arrays: Mapping[str, Mapping[str, Any]] | None = None,
        target_arrays: Mapping[str, Mapping[str, Any]] | None = None,
        classes: Sequence[str] | None = None,
        pad: bool | str = False,
        datasets: Mapping[str, Sequence[CellMapDataset]] | None = None,
        dataset_dict: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
        csv_path: str | os.PathLike[str] | None = None,
        spatial_transforms: Mapping[str, Any] | None = None,
        train_raw_value_transforms: Any = _DEFAULT,
        val_raw_value_transforms: Any = _DEFAULT,
        target_value_transforms: Any = _DEFAULT,
        class_relation_dict: Mapping[str, Sequence[str]] | None = None,
        force_has_data: bool = False,
        context: Any = None,
        device: str | torch.device | None = None,
        *,
        empty_value: float = math.nan,
        seed: int | None = None,
        raw_interpolation: str = "linear",
        compact_targets: bool = False,
    ) -> None:
        self.input_arrays = dict(input_arrays) if input_arrays else {}
        self.target_arrays = dict(target_arrays) if target_arrays else {}
        self.classes = list(classes) if classes is not None else []
        self.pad = pad
        self.spatial_transforms = spatial_transforms
        self.train_raw_value_transforms = default_raw_transforms() if train_raw_value_transforms is _DEFAULT else train_raw_value_transforms
        self.val_raw_value_transforms = default_raw_transforms() if val_raw_value_transforms is _DEFAULT else val_raw_value_transforms
        self.target_value_transforms = default_target_transforms() if target_value_transforms is _DEFAULT else target_value_transforms
        self.class_relation_dict = dict(class_relation_dict) if class_relation_dict else None
        self.force_has_data = bool(force_has_data)
        self.device = resolve_device(device)
        self.empty_value = empty_value
        self.seed = seed
        self.raw_interpolation = raw_interpolation
        self.compact_targets = compact_targets
        self.csv_path = csv_path
        self.context = context  # accepted for compatibility; the engine has its own cache
        self.skipped_rows: list[dict[str, str]] = []
        self._combined: dict[str, CellMapMultiDataset] = {}
        if datasets is not None:
            self.dataset_dict: dict[str, list[dict[str, str]]] = {}
            self.train_datasets = list(datasets.get("train", []))
            self.validation_datasets = list(datasets.get("validate", datasets.get("val", [])))
        else:
            if dataset_dict is not None:
                self.dataset_dict = {USAGES.get(k, k): [dict(row) for row in v] for k, v in dataset_dict.items()}
            elif csv_path is not None:
                self.dataset_dict = read_datasplit_csv(csv_path)
            else:
                # Nothing given: an empty split, as the reference builds (``construct`` fills it).
                self.dataset_dict = {}
            unknown = set(self.dataset_dict) - {"train", "validate"}
            if unknown:
                raise ConfigError(f"dataset_dict keys must be 'train' and 'validate', not {sorted(unknown)}")
            self.train_datasets = self._build("train")
            self.validation_datasets = self._build("validate")
        if not self.train_datasets and not self.force_has_data and (self.dataset_dict or datasets):
            reasons = "; ".join(f"{r['gt']}: {r['reason']}" for r in self.skipped_rows) or "no training rows"
            raise ConfigError(f"no usable training dataset in the split ({reasons})")
        if self.device is not None:
            self.to(self.device)

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def from_csv(csv_path: str | os.PathLike[str]) -> dict[str, list[dict[str, str]]]:
        """The ``dataset_dict`` of a datasplit CSV (see :func:`read_datasplit_csv`)."""
        return read_datasplit_csv(csv_path)

    def construct(self, dataset_dict: Mapping[str, Sequence[Mapping[str, str]]]) -> None:
        """(Re)builds the training and validation datasets from ``dataset_dict``."""
        self.dataset_dict = {USAGES.get(k, k): [dict(row) for row in v] for k, v in dataset_dict.items()}
        self.train_datasets = self._build("train")
        self.validation_datasets = self._build("validate")
        self._combined.clear()

    def verify_datasets(self) -> None:
        """Drops datasets that cannot produce samples (unless ``force_has_data``)."""
        if self.force_has_data:
            return
        self.train_datasets = [d for d in self.train_datasets if d.verify()]
        self.validation_datasets = [d for d in self.validation_datasets if d.verify()]
        self._combined.clear()

    @property
    def datasets(self) -> dict[str, list[CellMapDataset]]:
        """``{"train": [...], "validate": [...]}``: the datasets of each split."""
        return {"train": self.train_datasets, "validate": self.validation_datasets}

    def _pad_for(self, usage: str) -> bool:
        if isinstance(self.pad, str):
            return self.pad == usage or (self.pad.startswith("val") and usage == "validate")
        return bool(self.pad)

    def _build(self, usage: str) -> list[CellMapDataset]:
        built = []
        for row in self.dataset_dict.get(usage, []):
            try:
                dataset = CellMapDataset(
                    row["raw"], row["gt"], self.classes, self.input_arrays, self.target_arrays,
                    pad=self._pad_for(usage),
                    spatial_transforms=self.spatial_transforms if usage == "train" else None,
                    raw_value_transforms=self.train_raw_value_transforms if usage == "train" else self.val_raw_value_transforms,
                    target_value_transforms=self.target_value_transforms,
                    class_relation_dict=self.class_relation_dict,
                    force_has_data=self.force_has_data,
                    seed=self.seed,
                    is_train=usage == "train",
                    empty_value=self.empty_value,
                    raw_interpolation=self.raw_interpolation,
                    **({"compact_targets": True} if self.compact_targets else {}),
                )
            except (FileNotFoundError, ValueError, OSError) as error:
                self._skip(usage, row, str(error))
                continue
            if len(dataset) == 0 and not self.force_has_data:
                self._skip(usage, row, "no sample fits in this crop")
                continue
            built.append(dataset)
        return built

    def _skip(self, usage: str, row: Mapping[str, str], reason: str) -> None:
        self.skipped_rows.append({"usage": usage, "raw": row["raw"], "gt": row["gt"], "reason": reason})
        warnings.warn(f"skipping {usage} row {row['gt']}: {reason}", stacklevel=3)

    # -- combined views -------------------------------------------------------------------
    @property
    def train_datasets_combined(self) -> CellMapMultiDataset:
        """All training datasets behind one index space."""
        if "train" not in self._combined:
            self._combined["train"] = CellMapMultiDataset(self.train_datasets, self.classes, self.input_arrays, self.target_arrays)
        return self._combined["train"]

    @property
    def validation_datasets_combined(self) -> CellMapMultiDataset:
        """All validation datasets behind one index space."""
        if "validate" not in self._combined:
            self._combined["validate"] = CellMapMultiDataset(self.validation_datasets, self.classes, self.input_arrays, self.target_arrays)
        return self._combined["validate"]

    @property
    def validation_blocks(self) -> CellMapSubset:
        """Non-overlapping tiles covering every validation crop to its far edge."""
        combined = self.validation_datasets_combined
        return CellMapSubset(combined, combined.validation_indices)

    @property
    def class_counts(self) -> dict[str, Any]:
        """``{"train": counts, "validate": counts}`` (see ``CellMapMultiDataset.class_counts``)."""
        return {"train": self.train_datasets_combined.class_counts, "validate": self.validation_datasets_combined.class_counts}

    def stats(self) -> Any:
        """Polars table of every (split, dataset, crop, class)."""
        import polars as pl

        frames = []
        for usage, datasets in (("train", self.train_datasets), ("validate", self.validation_datasets)):
            if datasets:
                frames.append(CellMapMultiDataset(datasets, self.classes, self.input_arrays, self.target_arrays).stats().with_columns(pl.lit(usage).alias("split")))
        return pl.concat(frames) if frames else pl.DataFrame()

    # -- setters --------------------------------------------------------------------------
    def set_raw_value_transforms(self, train_transforms: Any = None, val_transforms: Any = None) -> None:
        """Sets the raw value transforms of the training and validation datasets."""
        self.train_raw_value_transforms = train_transforms
        self.val_raw_value_transforms = val_transforms
        for d in self.train_datasets:
            d.set_raw_value_transforms(train_transforms)
        for d in self.validation_datasets:
            d.set_raw_value_transforms(val_transforms)

    def set_target_value_transforms(self, transforms: Any) -> None:
        """Sets the target value transforms of every dataset."""
        self.target_value_transforms = transforms
        for d in self.train_datasets + self.validation_datasets:
            d.set_target_value_transforms(transforms)

    def set_spatial_transforms(self, train_transforms: Any = None, val_transforms: Any = None) -> None:
        """Sets the spatial augmentation of the training datasets (and, if given, validation)."""
        self.spatial_transforms = train_transforms
        for d in self.train_datasets:
            d.set_spatial_transforms(train_transforms)
        if val_transforms is not None:
            for d in self.validation_datasets:
                d.set_spatial_transforms(val_transforms)
        self._combined.clear()

    def set_arrays(self, arrays: Mapping[str, Mapping[str, Any]], type: str = "target", usage: str = "validate") -> None:
        """Replaces the input or target arrays of one split and rebuilds its datasets."""
        if type not in ("input", "target"):
            raise ConfigError(f"type must be 'input' or 'target', not {type!r}")
        if type == "input":
            self.input_arrays = dict(arrays)
        else:
            self.target_arrays = dict(arrays)
        usage = USAGES.get(usage, usage)
        if self.dataset_dict:
            if usage == "train":
                self.train_datasets = self._build("train")
            else:
                self.validation_datasets = self._build("validate")
        self._combined.clear()

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapDataSplit":
        """Returns tensors on ``device`` from now on."""
        self.device = resolve_device(device)
        for d in self.train_datasets + self.validation_datasets:
            d.to(device, non_blocking=non_blocking)
        return self

    def __repr__(self) -> str:
        from .presentation.display import datasplit_text

        return datasplit_text(self)

    def _repr_html_(self) -> str:
        from .presentation.display import datasplit_html

        return datasplit_html(self)
