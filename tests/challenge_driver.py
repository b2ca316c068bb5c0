"""A driver that uses ``cellmap_data`` the way the CellMap segmentation challenge toolbox does.

The challenge toolbox (``cellmap-segmentation-challenge``, "CSC") is the main user of the
library this package replaces; its call sites are the contract.  This module is written for
this project (nothing of CSC is imported or fetched): each function makes the same library
calls, with the same arguments in the same forms, as the CSC step it is named after:

- :func:`make_datasplit_csv`: crawl ``<dataset>.zarr/recon-1/labels/groundtruth/<crop>/<label>``
  and write the 5-column, fully quoted datasplit CSV
  (``usage, raw container, raw dataset, gt container, gt dataset/[classes]``);
- :func:`get_dataloader`: ``CellMapDataSplit`` from that CSV, then a validation
  ``CellMapDataLoader`` over ``validation_blocks`` and a weighted training loader over
  ``train_datasets_combined.to(device)``;
- :func:`train`: iterate ``train_loader.loader``, break after ``iterations_per_epoch``
  batches, loss = BCE-with-logits with ``pos_weight`` from ``train_loader.dataset.class_weights``
  and NaN targets masked out; then a validation pass;
- :func:`predict` / :func:`predict_orthoplanes`: ``CellMapDatasetWriter`` over a crop's bounds,
  ``for batch in writer.loader(batch_size): writer[batch["idx"]] = {...}``; 2D models predict
  along each axis (``permute_singleton_dimension``) and the three predictions, read back
  with ``CellMapImage(..., pad=True, pad_value=0)``, are averaged;
- :func:`process`: a writer whose "raw" is a prediction, thresholding every tile.

Writers are never closed explicitly (CSC does not close them): they are dropped when the
function that made them returns, which must write everything they hold.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torchvision.transforms.v2 as T

from cellmap_data import CellMapDataLoader, CellMapDataSplit, CellMapDatasetWriter, CellMapImage
from cellmap_data.transforms.augment import Binarize, NaNtoNum
from cellmap_data.utils import (
    array_has_singleton_dim,
    get_fig_dict,
    is_array_2D,
    longest_common_substring,
    permute_singleton_dimension,
)

# CSC's path layout below a dataset container (its RAW_NAME / CROP_NAME).
RAW_NAME = "em/fibsem-uint8"
CROP_NAME = "labels/groundtruth/{crop}/{label}"


def search_path_for(root: str | os.PathLike) -> str:
    """CSC's SEARCH_PATH template (``{dataset}``, ``{name}``) for containers ``root/<dataset>.zarr``."""
    return os.path.join(os.fspath(root), "{dataset}.zarr", "recon-1", "{name}")


# ----------------------------------------------------------------------------- transforms


def default_raw_value_transforms() -> T.Transform:
    """CSC's default raw value transform (training, validation and prediction)."""
    return T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])


def default_target_value_transforms() -> T.Transform:
    """CSC's ``get_dataloader`` default target value transform."""
    return T.Compose([T.ToDtype(torch.float), Binarize()])


# ----------------------------------------------------------------------------- datasplit


def make_datasplit_csv(
    classes: Sequence[str],
    search_path: str,
    csv_path: str | os.PathLike,
    usage_of: Callable[[str], str],
    *,
    separator_before_bracket: bool = True,
) -> list[list[str]]:
    """Write a CSC-style datasplit CSV; return its rows (as ``csv.reader`` would read them).

    Like CSC's ``make_datasplit_csv``: each requested class is globbed in every crop, a crop's
    row lists the requested classes it has (in ``classes`` order), raw is the container's
    ``recon-1/em/fibsem-uint8``, every field is double-quoted and there is no header.  The
    train/validate choice is ``usage_of(crop_path)`` (CSC draws it at random).  CSC writes the
    ground-truth field as ``recon-1/labels/groundtruth/<crop>/[a,b]``; with
    ``separator_before_bracket=False`` the field is ``.../<crop>[a,b]``, the form the
    reference library's own 5-column test writes.
    """
    datapaths: dict[str, list[str]] = {}
    for label in classes:
        pattern = search_path.format(dataset="*", name=CROP_NAME.format(crop="*", label=label))
        for path in sorted(glob.glob(pattern)):
            crop_path = path.removesuffix(os.path.sep + label)
            datapaths.setdefault(crop_path, []).append(label)
    rows = []
    lines = []
    for crop_path, labels in datapaths.items():
        zarr_path = crop_path.split(".zarr")[0] + ".zarr"
        crop = os.path.basename(crop_path)
        raw_path = os.path.join(crop_path.removesuffix(CROP_NAME.format(crop=crop, label="").rstrip(os.path.sep)), RAW_NAME)
        if not os.path.exists(raw_path):
            continue
        zarr_path, crop_path, raw_path = map(os.path.normpath, (zarr_path, crop_path, raw_path))
        raw_ds = raw_path.removeprefix(zarr_path + os.path.sep)
        gt_ds = crop_path.removeprefix(zarr_path + os.path.sep)
        sep = os.path.sep if separator_before_bracket else ""
        gt_field = f"{gt_ds}{sep}[{','.join(labels)}]"
        usage = usage_of(crop_path)
        row = [usage, zarr_path, raw_ds, zarr_path, gt_field]
        rows.append(row)
        lines.append(",".join(f'"{v}"' for v in row) + "\n")
    assert rows, f"no crops found with {search_path}"
    Path(csv_path).write_text("".join(lines))
    return rows


# ----------------------------------------------------------------------------- loaders


def get_dataloader(
    datasplit_path: str | os.PathLike,
    classes: Sequence[str],
    batch_size: int,
    input_array_info: Mapping[str, Any],
    target_array_info: Mapping[str, Any] | None = None,
    spatial_transforms: Mapping[str, Any] | None = None,
    target_value_transforms: Any = None,
    train_raw_value_transforms: Any = None,
    val_raw_value_transforms: Any = None,
    iterations_per_epoch: int = 1000,
    random_validation: bool = False,
    device: str | torch.device | None = None,
    class_relation_dict: Mapping[str, Any] | None = None,
    weighted_sampler: bool = True,
    **kwargs: Any,
) -> tuple[CellMapDataLoader, CellMapDataLoader | None, CellMapDataSplit]:
    """CSC's ``get_dataloader``: (train loader, validation loader or None, the split)."""
    target_value_transforms = target_value_transforms or default_target_value_transforms()
    train_raw_value_transforms = train_raw_value_transforms or default_raw_value_transforms()
    val_raw_value_transforms = val_raw_value_transforms or default_raw_value_transforms()
    # A bare {"shape", "scale"} spec is wrapped as the single array "input" / "output".
    if set(input_array_info) == {"shape", "scale"}:
        input_arrays = {"input": input_array_info}
    else:
        input_arrays = input_array_info
    if target_array_info is not None and set(target_array_info) == {"shape", "scale"}:
        target_arrays = {"output": target_array_info}
    else:
        target_arrays = target_array_info
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    datasplit = CellMapDataSplit(
        input_arrays=input_arrays,
        target_arrays=target_arrays,
        classes=classes,
        pad=True,
        csv_path=datasplit_path,
        train_raw_value_transforms=train_raw_value_transforms,
        val_raw_value_transforms=val_raw_value_transforms,
        target_value_transforms=target_value_transforms,
        spatial_transforms=spatial_transforms,
        device=device,
        class_relation_dict=class_relation_dict,
    )

    validation_loader = None
    if len(datasplit.validation_datasets) > 0:
        options = {"classes": classes, "batch_size": batch_size, "is_train": random_validation, "device": device}
        options.update(kwargs)
        validation_loader = CellMapDataLoader(datasplit.validation_blocks, **options)

    options = {
        "classes": classes,
        "batch_size": batch_size,
        "iterations_per_epoch": iterations_per_epoch,
        "weighted_sampler": weighted_sampler,
        "device": device,
        "is_train": True,
    }
    options.update(kwargs)
    train_loader = CellMapDataLoader(datasplit.train_datasets_combined.to(device), **options)
    return train_loader, validation_loader, datasplit


# ----------------------------------------------------------------------------- training


class NaNMaskedLoss(torch.nn.Module):
    """A loss applied only where the target is known (not NaN), as CSC's loss wrapper does:
    the wrapped loss is built with ``reduction="none"``, NaN targets are replaced by 0, the
    element losses are multiplied by the known-voxel mask and averaged (``nanmean``)."""

    def __init__(self, loss_type: type[torch.nn.Module], **loss_kwargs: Any) -> None:
        super().__init__()
        self.loss = loss_type(reduction="none", **loss_kwargs)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        element_loss = self.loss(outputs, torch.nan_to_num(targets, nan=0.0))
        return (element_loss * known).nanmean()


def singleton_dim(shape: Sequence[int]) -> int | None:
    """Index of the first size-1 axis of a spec shape (CSC's ``get_singleton_dim``)."""
    for i, size in enumerate(shape):
        if size == 1:
            return i
    return None


def spec_shape(info: Mapping[str, Any]) -> Sequence[int]:
    return info["shape"] if "shape" in info else next(iter(info.values()))["shape"]


def train(
    model: torch.nn.Module,
    train_loader: CellMapDataLoader,
    val_loader: CellMapDataLoader | None,
    classes: Sequence[str],
    input_array_info: Mapping[str, Any],
    target_array_info: Mapping[str, Any],
    iterations_per_epoch: int,
    epochs: int = 1,
    learning_rate: float = 1e-4,
    validation_batch_limit: int | None = 2,
    device: str = "cpu",
    on_batch: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """One CSC training run; returns ``{"losses", "val_scores", "pos_weight", "figures"}``
    (``figures``: figure title -> figure type, for the last validation batch)."""
    optimizer = torch.optim.RAdam(model.parameters(), lr=learning_rate, decoupled_weight_decay=True)
    spatial_dims = sum(s > 1 for s in spec_shape(target_array_info))
    # pos_weight is the class weights' values, in their order, shaped to broadcast per class.
    pos_weight = torch.tensor(list(train_loader.dataset.class_weights.values()), dtype=torch.float32).to(device).flatten()
    pos_weight = pos_weight[:, None, None]
    if spatial_dims == 3:
        pos_weight = pos_weight[..., None]
    criterion = NaNMaskedLoss(torch.nn.BCEWithLogitsLoss, pos_weight=pos_weight)
    input_keys = list(train_loader.dataset.input_arrays.keys())
    target_keys = list(train_loader.dataset.target_arrays.keys())
    squeeze_at = singleton_dim(spec_shape(input_array_info))

    def forward(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = batch[input_keys[0]].to(device)
        if squeeze_at is not None:
            inputs = inputs.squeeze(dim=squeeze_at + 2)
        outputs = model(inputs)
        if squeeze_at is not None:
            outputs = outputs.unsqueeze(dim=squeeze_at + 2)
        return outputs, batch[target_keys[0]].to(device)

    losses: list[float] = []
    val_scores: list[float] = []
    figures: dict[str, Any] = {}
    for _ in range(epochs):
        model.train()
        optimizer.zero_grad()
        for epoch_iter, batch in enumerate(train_loader.loader):
            if on_batch is not None:
                on_batch(batch)
            outputs, targets = forward(batch)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if epoch_iter >= iterations_per_epoch - 1:
                break
        if val_loader is not None and len(val_loader.loader) > 0:
            model.eval()
            score, count = 0.0, 0
            with torch.no_grad():
                for batch in val_loader.loader:
                    if on_batch is not None:
                        on_batch(batch)
                    outputs, targets = forward(batch)
                    score += criterion(outputs, targets).item()
                    count += 1
                    if validation_batch_limit is not None and count >= validation_batch_limit:
                        break
            val_scores.append(score / count)
            # CSC logs a figure per class of the last validation batch.
            import matplotlib.pyplot as plt

            figs = get_fig_dict(batch[input_keys[0]], batch[target_keys[0]], outputs, list(classes))
            figures = {f"{name}: {longest_common_substring(input_keys[0], target_keys[0])}": type(fig).__name__ for name, fig in figs.items()}
            for fig in figs.values():
                plt.close(fig)
    return {"losses": losses, "val_scores": val_scores, "pos_weight": pos_weight, "figures": figures}


# ----------------------------------------------------------------------------- prediction


def crop_metadata(crop_class_path: str | os.PathLike) -> dict[str, list]:
    """Voxel size, translation and shape of level s0 of a ground-truth class group (OME-NGFF 0.4)."""
    group = Path(crop_class_path)
    multiscale = json.loads((group / ".zattrs").read_text())["multiscales"][0]
    first = multiscale["datasets"][0]
    transforms = {t["type"]: t for t in first["coordinateTransformations"]}
    shape = json.loads((group / first["path"] / ".zarray").read_text())["shape"]
    return {
        "voxel_size": [float(v) for v in transforms["scale"]["scale"]],
        "translation": [float(v) for v in transforms["translation"]["translation"]],
        "shape": [int(v) for v in shape],
    }


def bounds_from_crop_metadata(crop_class_path: str | os.PathLike, array_name: str = "output") -> dict:
    """CSC's test-crop bounds: ``translation .. translation + voxel_size * shape`` per axis."""
    meta = crop_metadata(crop_class_path)
    return {
        array_name: {
            axis: [meta["translation"][i], meta["translation"][i] + meta["voxel_size"][i] * meta["shape"][i]]
            for i, axis in enumerate("zyx")
        }
    }


def bounds_from_image(crop_path: str | os.PathLike, label: str, target_arrays: Mapping[str, Mapping[str, Any]]) -> dict:
    """CSC's bounds for crops named by number: ``CellMapImage(<crop>/<label>, ...).bounding_box``."""
    images = {
        name: CellMapImage(
            os.path.join(os.fspath(crop_path), label),
            target_class=label,
            target_scale=info["scale"],
            target_voxel_shape=info["shape"],
            pad=True,
            pad_value=0,
        )
        for name, info in target_arrays.items()
    }
    return {name: image.bounding_box for name, image in images.items()}


def _predict(
    model: torch.nn.Module,
    writer_kwargs: dict[str, Any],
    batch_size: int,
    *,
    record: list | None = None,
) -> None:
    """CSC's ``_predict``; ``record`` (if given) collects ``(tile index, centre, tensor written)``.

    When ``writer_kwargs`` names ``model_classes`` and ``writer_model_classes`` is true in it,
    the writer gets ``model_classes`` and the model's full output; otherwise (CSC's current
    code) ``model_classes`` is dropped and the output's channels are filtered here.
    """
    writer_kwargs = dict(writer_kwargs)
    hand_to_writer = writer_kwargs.pop("writer_model_classes", False)
    model.eval()
    device = writer_kwargs["device"]
    input_keys = list(writer_kwargs["input_arrays"].keys())
    model_classes = list(writer_kwargs.get("model_classes", writer_kwargs["classes"]))
    classes_to_save = [c for c in writer_kwargs["classes"] if c in model_classes]
    writer_kwargs["classes"] = classes_to_save
    if not classes_to_save:
        return
    squeeze_at = singleton_dim(next(iter(writer_kwargs["input_arrays"].values()))["shape"])

    # Probe the model once for its channel count (one channel per model class here).
    probe = torch.rand((1, 1, *next(iter(writer_kwargs["input_arrays"].values()))["shape"])).to(device)
    if squeeze_at is not None:
        probe = probe.squeeze(dim=squeeze_at + 2)
    with torch.no_grad():
        channels = model(probe).shape[1]
    assert channels == len(model_classes), f"model emits {channels} channels for {len(model_classes)} classes"

    if "raw_value_transforms" not in writer_kwargs:
        writer_kwargs["raw_value_transforms"] = default_raw_value_transforms()
    if not hand_to_writer:
        writer_kwargs.pop("model_classes", None)
    writer = CellMapDatasetWriter(**writer_kwargs)
    filter_here = not hand_to_writer and model_classes != classes_to_save
    keep = [model_classes.index(c) for c in classes_to_save]
    with torch.no_grad():
        for batch in writer.loader(batch_size=batch_size):
            inputs = batch[input_keys[0]].to(device)
            if squeeze_at is not None:
                inputs = inputs.squeeze(dim=squeeze_at + 2)
            outputs = model(inputs)
            if squeeze_at is not None:
                outputs = outputs.unsqueeze(dim=squeeze_at + 2)
            if filter_here:
                outputs = outputs[:, keep, ...]
            if record is not None:
                written = outputs if not hand_to_writer else outputs[:, keep, ...]
                for row, idx in enumerate(batch["idx"].tolist()):
                    record.append((idx, writer.get_center(idx), written[row].detach().cpu().clone()))
            writer[batch["idx"]] = {"output": outputs}


def predict(model: torch.nn.Module, writer_kwargs: dict[str, Any], batch_size: int, *, record: list | None = None) -> None:
    """CSC's 3D path: one writer over the crop."""
    _predict(model, writer_kwargs, batch_size, record=record)


def predict_orthoplanes(
    model: torch.nn.Module,
    writer_kwargs: dict[str, Any],
    batch_size: int,
    *,
    keep_axis_predictions: str | os.PathLike | None = None,
) -> None:
    """CSC's 2D ("2.5D") path: predict with the singleton axis at z, y and x in turn, read the
    three predictions back with ``CellMapImage(..., pad=True, pad_value=0)`` at each tile
    centre of a writer over the original specs, and write their mean.

    The per-axis predictions go to a temporary folder (``keep_axis_predictions`` keeps them
    there instead, as ``output.zarr/<axis>``)."""
    holder = None
    if keep_axis_predictions is None:
        holder = tempfile.TemporaryDirectory()
        tmp_root = holder.name
    else:
        tmp_root = os.fspath(keep_axis_predictions)
    try:
        for axis in range(3):
            axis_kwargs = dict(writer_kwargs)
            axis_kwargs["target_path"] = os.path.join(tmp_root, "output.zarr", str(axis))
            input_arrays = {k: dict(v) for k, v in axis_kwargs["input_arrays"].items()}
            target_arrays = {k: dict(v) for k, v in axis_kwargs["target_arrays"].items()}
            permute_singleton_dimension(input_arrays, axis)
            permute_singleton_dimension(target_arrays, axis)
            axis_kwargs["input_arrays"] = input_arrays
            axis_kwargs["target_arrays"] = target_arrays
            _predict(model, axis_kwargs, batch_size)

        final_kwargs = {k: v for k, v in writer_kwargs.items() if k not in ("model_classes", "writer_model_classes")}
        writer = CellMapDatasetWriter(**final_kwargs)
        images = {
            name: {
                label: [
                    CellMapImage(
                        os.path.join(tmp_root, "output.zarr", str(axis), label),
                        target_class=label,
                        target_scale=info["scale"],
                        target_voxel_shape=info["shape"],
                        pad=True,
                        pad_value=0,
                    )
                    for axis in range(3)
                ]
                for label in final_kwargs["classes"]
            }
            for name, info in final_kwargs["target_arrays"].items()
        }
        for batch in writer.loader(batch_size=batch_size):
            outputs: dict[str, dict[str, torch.Tensor]] = {}
            for name, per_label in images.items():
                outputs[name] = {}
                for label, axis_images in per_label.items():
                    tiles = []
                    for idx in batch["idx"]:
                        centre = writer.get_center(idx)
                        tiles.append(torch.stack([image[centre] for image in axis_images]).mean(dim=0))
                    outputs[name][label] = torch.stack(tiles)
            writer[batch["idx"]] = outputs
    finally:
        if holder is not None:
            holder.cleanup()


# ----------------------------------------------------------------------------- processing


def threshold(x: torch.Tensor) -> torch.Tensor:
    """The challenge examples' process function."""
    return x > 0.5


def process(
    prediction_path: str | os.PathLike,
    output_path: str | os.PathLike,
    classes: Sequence[str],
    input_array_info: Mapping[str, Any],
    target_array_info: Mapping[str, Any] | None = None,
    process_func: Callable[[torch.Tensor], torch.Tensor] = threshold,
    batch_size: int = 8,
    overwrite: bool = True,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """CSC's ``process`` for one crop: for each class saved under ``prediction_path``, a writer
    reads the prediction as its raw input (bounds from ``CellMapImage(...).bounding_box``) and
    writes ``process_func`` of every tile to ``output_path/<class>``.  Returns the writer
    keyword arguments used."""
    input_array_info = copy.deepcopy(dict(input_array_info))
    target_array_info = copy.deepcopy(dict(target_array_info or input_array_info))
    if is_array_2D(input_array_info, summary=any):
        permute_singleton_dimension(input_array_info, axis=0)
    if is_array_2D(target_array_info, summary=any):
        permute_singleton_dimension(target_array_info, axis=0)
    input_arrays = {"input": input_array_info}
    target_arrays = {"output": target_array_info}
    used = []
    for label in classes:
        class_in_path = os.path.join(os.fspath(prediction_path), label)
        if not os.path.exists(class_in_path):
            continue
        target_bounds = bounds_from_image(prediction_path, label, target_arrays)
        kwargs = {
            "raw_path": class_in_path,
            "target_path": os.fspath(output_path),
            "classes": [label],
            "input_arrays": input_arrays,
            "target_arrays": target_arrays,
            "target_bounds": target_bounds,
            "overwrite": overwrite,
            "device": device,
        }
        used.append(kwargs)
        _process(kwargs, process_func, batch_size)
    return used


def _process(writer_kwargs: dict[str, Any], process_func: Callable, batch_size: int) -> None:
    writer = CellMapDatasetWriter(**writer_kwargs)
    for batch in writer.loader(batch_size=batch_size):
        writer[batch["idx"]] = {"output": process_func(batch["input"])}


def is_2d_model_config(input_array_info: Mapping[str, Any]) -> bool:
    """CSC's test for choosing orthoplane prediction."""
    return bool(array_has_singleton_dim(input_array_info) or is_array_2D(input_array_info, summary=any))


def tile_start(centre: Mapping[str, float], tile: Sequence[int], scale: Sequence[float], translation: Sequence[float]) -> list[int]:
    """First voxel (per axis) of the output tile centred at ``centre`` in an array whose voxel 0
    has its corner at ``translation``."""
    return [
        int(round((centre[a] - tile[k] * scale[k] / 2 - translation[k]) / scale[k]))
        for k, a in enumerate("zyx")
    ]


__all__ = [
    "NaNMaskedLoss",
    "bounds_from_crop_metadata",
    "bounds_from_image",
    "crop_metadata",
    "default_raw_value_transforms",
    "default_target_value_transforms",
    "get_dataloader",
    "is_2d_model_config",
    "make_datasplit_csv",
    "predict",
    "predict_orthoplanes",
    "process",
    "search_path_for",
    "tile_start",
    "train",
]
