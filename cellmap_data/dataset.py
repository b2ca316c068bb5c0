"""`CellMapDataset`: one raw volume plus one crop's labels, sampled on a grid of centres.

All reading, resampling and augmentation happens in the engine, a whole batch per call; this
module turns the user's configuration into the engine's, and the engine's Arrow batches into
dicts of torch tensors (zero copy), then applies the value transforms on the batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

from . import _engine
from ._config import (
    SPATIAL_AXES,
    accepts_older_positional_order,
    arrays_to_3d,
    check_axis_order,
    output_permutation,
    resolve_device,
    spatial_transforms_engine_form,
    spatial_transforms_json,
    specs_in_zyx,
    to_json,
)
from ._stats import ClassWeights
from .batches import expand_compact, run_torch_rest, sample_metadata_dicts
from .describe import describe
from .exceptions import ConfigError, NotFoundError
from .remote import groups_exist, is_url
from .transforms.plan import ValuePlan, plan_value_transforms
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


#: The older positional order of ``CellMapDataset`` (the README's), see ``CellMapDataset``.
_OLD_DATASET_ORDER = (
    "raw_path", "target_path", "classes", "input_arrays", "target_arrays", "spatial_transforms",
    "raw_value_transforms", "target_value_transforms", "class_relation_dict", "is_train", "axis_order",
    "context", "rng", "force_has_data", "empty_value", "pad", "device", "max_workers",
)


def _is_old_dataset_call(args: tuple) -> bool:
    # The 6th positional argument is ``pad`` (a bool) now, ``spatial_transforms`` (a dict or
    # None) in the older order.
    return len(args) >= 6 and (args[5] is None or isinstance(args[5], Mapping))


def _is_zarr_group(path: str) -> bool:
    return describe(path).kind == "group"


def class_path_template(template: str) -> str:
    """The label path template of a target path template: ``".../crop1/{label}"`` as it is, and
    ``".../crop1{label}"`` (no separator before the bracket, as some 5-column datasplit CSVs
    write it) as ``".../crop1/{label}"`` when ``.../crop1`` is a zarr group: its classes are its
    children."""
    prefix, placeholder, suffix = template.partition("{label}")
    if not placeholder or not prefix or prefix.endswith(("/", os.sep)):
        return template
    if _is_zarr_group(prefix):
        return os.path.join(prefix, "{label}") + suffix
    return template


class CellMapDataset(ClassWeights, torch.utils.data.Dataset):
    """Training samples from one raw volume and one label crop.

    ``ds[i]`` is ``{"idx": tensor(i), <input name>: [1, *spatial], <target name>:
    [n_classes, *spatial]}`` (float32; singleton spatial axes squeezed). A class in
    ``classes`` that the crop does not annotate is all NaN. With ``classes=None`` (raw only) each
    target array is a raw read, ``[1, *spatial]``, for self-supervised training.

    Both constructor dialects of the reference library are accepted: the current one
    (``pad``, ``seed``) and the older one (``is_train``, ``axis_order``, ``context``, ``rng``,
    ``empty_value``, ``max_workers``), including the older positional order
    ``(raw_path, target_path, classes, input_arrays, target_arrays, spatial_transforms,
    raw_value_transforms, target_value_transforms, class_relation_dict, is_train, ...)``,
    recognised by a dict (or None) in sixth place. The older keywords act where they mean
    something here:

    - ``is_train=False`` turns spatial augmentation off (default: on when configured);
    - ``axis_order`` (e.g. ``"xyz"``): array shapes and scales are given, and tensors come
      out, in that order;
    - ``rng`` (a ``torch.Generator`` or numpy ``Generator``) seeds the sample draws when
      ``seed`` is not given;
    - ``empty_value``: value of unknown target voxels (unannotated classes, padding) instead of
      NaN, as the older library filled them;
    - ``context`` (a TensorStore context) and ``max_workers`` (a thread pool size) have no
      meaning here and are ignored: the engine's shared chunk cache and threads replace them.

    With ``return_metadata=True`` every item (and every batch of :meth:`get_batch`) also
    carries ``"__metadata__"``: a dict per sample (see :func:`sample_metadata_dicts`).
    """

    @accepts_older_positional_order(_OLD_DATASET_ORDER, _is_old_dataset_call)
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
        return_metadata: bool = False,
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
        self.device = resolve_device(device)
        self.seed = _seed_from(seed, rng)
        self.epoch = 0
        self.raw_interpolation = raw_interpolation
        self.compact_targets = bool(compact_targets)
        self.return_metadata = bool(return_metadata)
        self.context = context  # accepted for compatibility; the engine has its own cache
        self.max_workers = max_workers  # accepted for compatibility; the engine has its own threads
        self._inputs = arrays_to_3d(specs_in_zyx(self.input_arrays, axis_order), "input_arrays")
        self._targets = arrays_to_3d(specs_in_zyx(self.target_arrays, axis_order), "target_arrays")
        self._permutations: dict[str, list[int] | None] | None = None
        self._input_sources: dict[str, Any] | None = None
        self._target_sources: dict[str, Any] | None = None
        if not self._inputs:
            raise ConfigError("input_arrays is empty: at least one input array is required")
        if self.target_path:
            template, self.annotated_classes = split_target_path(self.target_path)
            self.target_template = class_path_template(template)
        else:
            self.target_template, self.annotated_classes = "", []
        self.spatial_transforms = spatial_transforms_json(spatial_transforms)
        self._plan_values()
        # Every class the template lists must exist, requested or not: a typo in a CSV should
        # fail here, not silently turn into an unannotated class. (URLs: one round trip.)
        label_paths = [self.target_template.format(label=c) for c in self.annotated_classes]
        if is_url(self.target_template):
            found = groups_exist(label_paths)
        else:
            found = [os.path.exists(p) for p in label_paths]
        for c, label_path, present in zip(self.annotated_classes, label_paths, found):
            if not present:
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
        sources: list[list[Any]] = []
        for c in self.classes:
            if c in self.annotated_classes:
                sources.append([c, self.target_template.format(label=c), []])
            else:
                # Where an annotated, mutually exclusive class is present, c is a true negative.
                related = [r for r in self.exclusive_classes(c) if r in self.annotated_classes]
                sources.append([c, None, [self.target_template.format(label=r) for r in related]])
        return sources

    def _engine_arrays(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(input, target) specs for the engine. Without classes (the older dialect's
        ``classes=None``: raw only, e.g. for self-supervision) every target array is a raw read
        of its own shape and scale, returned as ``[1, *spatial]``."""
        if self.classes or not self._targets:
            return self._inputs, self._targets
        return self._inputs + self._targets, []

    def _engine_config(self) -> dict[str, Any]:
        inputs, targets = self._engine_arrays()
        return {
            "name": self.raw_path,
            "crop": self.target_path,
            "raw_path": self.raw_path,
            "classes": self._class_sources(),
            "inputs": inputs,
            "targets": targets,
            "pad": self.pad,
            "raw_pad_value": math.nan,
            "raw_interpolation": self.raw_interpolation,
            "spatial": spatial_transforms_engine_form(self.spatial_transforms) if self.is_train else None,
            "compact_targets": self.compact_targets,
            "raw_values": self._raw_plan.engine_ops,
            "target_values": self._engine_target_values(),
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

    @property
    def input_levels(self) -> dict[str, int]:
        """The multiscale level of the raw volume each input array is read from, by array name.
        Without classes the target arrays are raw reads too, and are listed here."""
        inputs, _ = self._engine_arrays()
        return {spec["name"]: int(level) for spec, level in zip(inputs, self.engine.input_levels)}

    @property
    def target_levels(self) -> dict[str, list[int | None]]:
        """The multiscale level of each class's label volume read for each target array, by array
        name: one entry per class of ``classes``, None where the crop does not annotate it."""
        _, targets = self._engine_arrays()
        return {spec["name"]: list(levels) for spec, levels in zip(targets, self.engine.target_levels)}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_engine_handle", None)
        state["_input_sources"] = state["_target_sources"] = None  # reopened on demand
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

    def batch_to_tensors(self, batch: Any, return_metadata: bool | None = None) -> dict[str, Any]:
        """Engine batch → ``{"idx", <array>: tensor [B, ...]}`` with value transforms applied
        (and ``"__metadata__"``, a list of per-sample dicts, with ``return_metadata``)."""
        import pyarrow as pa

        out: dict[str, Any] = {}
        table = pa.record_batch(batch.metadata())
        out["idx"] = torch.as_tensor(table.column("idx").to_numpy().astype("int64"))
        seeds = torch.tensor(batch.value_seeds, dtype=torch.int64)
        for name in batch.tensor_names:
            tensor = torch.from_dlpack(batch.tensor(name))
            if self.device is not None:
                tensor = tensor.to(self.device, non_blocking=True)
            tensor = self.to_axis_order(expand_compact(tensor), name)
            out[name] = self.apply_value_transforms(name, tensor, seeds)
        if self.return_metadata if return_metadata is None else return_metadata:
            out["__metadata__"] = sample_metadata_dicts(table, batch.tensor_names, [self] * table.num_rows)
        return out

    def get_batch(self, indices: Sequence[int], *, return_metadata: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        """Reads samples ``indices`` as one batch of stacked tensors (``return_metadata``:
        include ``"__metadata__"``; default: the dataset's ``return_metadata``)."""
        return self.batch_to_tensors(self.read_batch_raw(indices, **kwargs), return_metadata=return_metadata)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """Sample ``idx``: ``{"idx", <input>: [1, ...], <target>: [n_classes, ...]}`` (plus
        ``"__metadata__"``, one dict, when ``return_metadata`` is set)."""
        batch = self.get_batch([int(idx)])
        return {k: (v[0] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}

    def to_axis_order(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Batch tensor ``[B, C, *spatial]`` of array ``name`` (spatial axes in z, y, x order, as
        the engine returns them) with its spatial axes in the dataset's ``axis_order``."""
        if self.axis_order == "zyx":
            return tensor
        if self._permutations is None:
            self._permutations = self._axis_permutations()
        perm = self._permutations.get(name)
        if perm is None:
            return tensor
        return tensor.permute(0, 1, *[2 + p for p in perm]).contiguous()

    def _axis_permutations(self) -> dict[str, list[int] | None]:
        """Per array, how its spatial dims (those the engine kept) move into ``axis_order``."""
        planar = self.engine.planar_axis
        out: dict[str, list[int] | None] = {}
        specs = {s["name"]: s["shape"] for s in self._inputs + self._targets}
        for name, sample_shape in self.engine.sample_shapes:
            spatial = len(sample_shape) - 1
            if spatial == 3:
                kept = list(SPATIAL_AXES)
            elif planar is not None and spatial == 2:
                kept = [a for k, a in enumerate(SPATIAL_AXES) if k != planar]
            else:
                kept = [a for a, n in zip(SPATIAL_AXES, specs.get(name, (1, 1, 1))) if n != 1]
                if len(kept) != spatial:
                    out[name] = None
                    continue
            out[name] = output_permutation(kept, self.axis_order)
        return out

    # -- value transforms -------------------------------------------------------------------
    def _plan_values(self) -> None:
        """Splits the value transforms between the engine and torch (see
        :mod:`cellmap_data.transforms.plan`)."""
        # Raw-only datasets read their targets as raw arrays: keep their transforms in torch.
        engine = bool(self.classes) or not self._targets
        self._raw_plan = plan_value_transforms(self.raw_value_transforms, engine=engine)
        # Compact targets are expanded on the device, after the engine: their transforms run there.
        target_engine = engine and not self.compact_targets
        binary = math.isnan(self.empty_value)
        t = self.target_value_transforms
        self._target_plans: ValuePlan | list[ValuePlan]
        if isinstance(t, Mapping):
            self._target_plans = [plan_value_transforms(t.get(c), binary=binary, engine=target_engine) for c in self.classes]
        elif isinstance(t, (list, tuple)):
            self._target_plans = [
                plan_value_transforms(t[i] if i < len(t) else None, binary=binary, engine=target_engine)
                for i in range(len(self.classes))
            ]
        else:
            self._target_plans = plan_value_transforms(t, binary=binary, engine=target_engine)
        # The older dialect's empty_value fills unknown target voxels before the transforms.
        self._empty_value_in_engine = target_engine and not binary

    def _engine_target_values(self) -> dict[str, Any]:
        fill = [{"op": "nan_to_num", "nan": self.empty_value}] if self._empty_value_in_engine else []
        if isinstance(self._target_plans, list):
            return {"per_class": [fill + p.engine_ops for p in self._target_plans]}
        return {"whole": fill + self._target_plans.engine_ops}

    @property
    def value_transform_plan(self) -> list[dict[str, str]]:
        """Where each value transform runs: one row per (arrays, transform) with ``where`` one of
        ``engine``, ``skipped (identity)``, ``torch (whole batch)`` or ``torch (per sample)``."""
        rows = [{"arrays": "raw", "transform": t, "where": w} for t, w in self._raw_plan.describe()]
        if isinstance(self._target_plans, list):
            for c, plan in zip(self.classes, self._target_plans):
                rows.extend({"arrays": f"targets[{c}]", "transform": t, "where": w} for t, w in plan.describe())
        else:
            rows.extend({"arrays": "targets", "transform": t, "where": w} for t, w in self._target_plans.describe())
        return rows

    def value_transform_key(self, name: str) -> tuple[Any, ...]:
        """Identifies what :meth:`apply_value_transforms` does to array ``name``: datasets with
        equal keys transform a batch of their samples identically (the loader transforms such
        samples together)."""
        if any(s["name"] == name for s in self._inputs):
            return ("raw", id(self.raw_value_transforms), bool(self._raw_plan.engine_ops))
        return ("target", id(self.target_value_transforms), repr(self.empty_value), self._empty_value_in_engine,
                tuple(self.classes), self.compact_targets)

    def _reference_shape(self, name: str) -> list[int]:
        """The shape the reference library hands value transforms for array ``name``: the
        spatial patch in ``axis_order``, singleton axes included (e.g. ``[1, 128, 128]``)."""
        spec = next(s for s in self._inputs + self._targets if s["name"] == name)
        order = [a for a in SPATIAL_AXES if a not in self.axis_order] + list(self.axis_order)
        return [spec["shape"][SPATIAL_AXES.index(a)] for a in order]

    def apply_value_transforms(self, name: str, tensor: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The value transforms of array ``name`` that run in torch, on a batch tensor
        ``[B, C, *spatial]`` (the engine has applied those it runs while reading). ``seeds`` are
        the samples' ``value_seed`` values: random transforms draw from them."""
        if any(s["name"] == name for s in self._inputs):
            return run_torch_rest(self._raw_plan, tensor, seeds, "raw", self._reference_shape(name))
        if not self._empty_value_in_engine and not math.isnan(self.empty_value):
            # Older dialect: unknown target voxels hold ``empty_value`` instead of NaN.
            tensor = torch.nan_to_num(tensor, nan=self.empty_value)
        # Each class's channel is transformed on its own, as in the reference library (a blur never
        # mixes classes, a contrast uses each class's own mean).
        plans = self._target_plans if isinstance(self._target_plans, list) else [self._target_plans] * tensor.shape[1]
        if all(p.torch_rest is None for p in plans):
            return tensor
        if not isinstance(self._target_plans, list) and not self._target_plans.rest_batch_aware:
            # Called per sample and per class anyway (sample by sample, as the reference does).
            return run_torch_rest(self._target_plans, tensor, seeds, "target", self._reference_shape(name))
        channels = [
            run_torch_rest(plan, tensor[:, c : c + 1], seeds, f"target{c}", self._reference_shape(name))[:, 0]
            for c, plan in enumerate(plans)
        ]
        return torch.stack(channels, dim=1)

    # -- configuration setters ------------------------------------------------------------
    def set_raw_value_transforms(self, transforms: ValueTransform | None) -> None:
        """Replaces the raw value transforms."""
        self.raw_value_transforms = transforms
        self._replan()

    def set_target_value_transforms(self, transforms: Any) -> None:
        """Replaces the target value transforms (one callable, or one per class)."""
        self.target_value_transforms = transforms
        self._replan()

    def _replan(self) -> None:
        """Re-splits the value transforms; the engine reopens only when its share changed."""
        before = (self._raw_plan.engine_ops, self._engine_target_values())
        self._plan_values()
        if (self._raw_plan.engine_ops, self._engine_target_values()) != before:
            self._engine_handle = self._open_engine()
            self._engine_pid = os.getpid()

    def set_spatial_transforms(self, spatial_transforms: Mapping[str, Any] | None) -> None:
        """Replaces the spatial augmentation config (validated immediately)."""
        self.spatial_transforms = spatial_transforms_json(spatial_transforms)
        self._engine_handle = self._open_engine()
        self._engine_pid = os.getpid()

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapDataset":
        """Returns tensors on ``device`` from now on."""
        self.device = resolve_device(device)
        return self

    # -- tiles, classes and counts ------------------------------------------------------
    @property
    def validation_indices(self) -> list[int]:
        """Indices of non-overlapping tiles (the first target array's shape) that cover the
        whole crop, the last tile on each axis shifted back so the far edge is covered."""
        spec = (self._targets or self._inputs)[0]
        return self.get_indices({a: n * v for a, n, v in zip(SPATIAL_AXES, spec["shape"], spec["scale"])})

    def get_indices(self, chunk_size: Mapping[str, float]) -> list[int]:
        """Indices of samples whose centres step by ``chunk_size`` (``{axis: nm}``; a missing
        axis steps by one voxel) across the sampling grid, the last one on each axis shifted
        back to the far end, so tiles of that size cover the whole sampling box."""
        if len(self) == 0:
            return []
        spacing = (self._targets or self._inputs)[0]["scale"]
        steps = [max(1, int(round(float(chunk_size.get(a, v)) / v))) for a, v in zip(SPATIAL_AXES, spacing)]
        return [int(i) for i in self.engine.tile_indices(steps)]

    @property
    def input_sources(self) -> dict[str, Any]:
        """``{input array: CellMapImage}`` reading the raw volume at each input's scale and shape
        (for reading patches by hand; batches are read by the engine)."""
        from .image import CellMapImage

        if self._input_sources is None:
            self._input_sources = {
                spec["name"]: CellMapImage(self.raw_path, "raw", spec["scale"], spec["shape"], pad=self.pad,
                                           interpolation=self.raw_interpolation)
                for spec in self._inputs
            }
        return self._input_sources

    @property
    def target_sources(self) -> dict[str, Any]:
        """``{class: CellMapImage | EmptyImage}`` at the first target array's scale and shape:
        an image for each class the crop annotates, an :class:`EmptyImage` (unknown everywhere)
        for the others."""
        from .image import CellMapImage, EmptyImage

        if self._target_sources is None:
            sources: dict[str, Any] = {}
            if self._targets and self.classes:
                spec = self._targets[0]
                for c in self.classes:
                    if c in self.annotated_classes:
                        sources[c] = CellMapImage(self.target_template.format(label=c), c, spec["scale"], spec["shape"],
                                                  pad=self.pad, pad_value=self.empty_value, interpolation="nearest")
                    else:
                        sources[c] = EmptyImage(None, c, spec["scale"], spec["shape"], pad_value=self.empty_value)
            self._target_sources = sources
        return self._target_sources

    def get_crop_class_matrix(self) -> np.ndarray:
        """Bool ``[1, n_classes]``: whether this crop annotates each requested class."""
        return np.array([[c in self.annotated_classes for c in self.classes]], dtype=bool)

    @property
    def class_counts(self) -> dict[str, dict[str, float]]:
        """``{"totals": {cls: foreground voxels}, "totals_total": {cls: voxels}}`` at training
        resolution (read from ``complement_counts`` metadata when present, else counted by the
        engine and cached outside the data)."""
        from ._stats import class_counts

        return class_counts(self)

    def stats(self) -> Any:
        """Polars table: one row per (crop, class) with sizes, counts, fraction and weight."""
        from ._stats import stats

        return stats(self)

    def verify(self) -> bool:
        """Whether the dataset can produce samples (or ``force_has_data`` is set)."""
        return len(self) > 0 or self.force_has_data

    def as_multi(self) -> Any:
        """This dataset alone as a :class:`~cellmap_data.CellMapMultiDataset` (what a loader reads)."""
        from .multidataset import CellMapMultiDataset

        return CellMapMultiDataset([self], self.classes, self.input_arrays, self.target_arrays)

    def as_iterable(self, batch_size: int = 1, **loader_kwargs: Any) -> Any:
        """A torch ``IterableDataset`` of batches (see :class:`CellMapIterableDataset`)."""
        from .loader import CellMapIterableDataset

        return CellMapIterableDataset(self, batch_size=batch_size, **loader_kwargs)

    def __repr__(self) -> str:
        from .presentation.display import dataset_text

        return dataset_text(self)

    def _repr_html_(self) -> str:
        from .presentation.display import dataset_html

        return dataset_html(self)
