"""Figures for looking at training data, made for notebooks.

* :func:`sample_grid` -- sample patches (raw middle slice with label overlays) of a batch or
  a dataset;
* :func:`class_balance` -- foreground voxels (or fraction) per class from the statistics
  table, and how many crops annotate each class;
* :func:`crop_locations` -- where the crops sit inside each raw volume;
* :func:`sampling_audit` -- what an epoch actually sampled: samples per crop, sample centres,
  rotation angles and, given the statistics table, how often each class was seen.

Every function returns a :class:`matplotlib.figure.Figure`. Figures are built without
pyplot (so nothing is kept open globally and no GUI backend is needed; a notebook displays
the returned figure), nothing is shown or closed, and matplotlib is imported only when a
figure is made: ``import cellmap_data.presentation.plot`` stays cheap.

Unknown voxels (NaN: unannotated classes, padding) are drawn with grey diagonal stripes
everywhere, so they never look like background (0).
"""

from __future__ import annotations

import functools

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .formatting import short_names

if TYPE_CHECKING:  # matplotlib and polars are imported lazily
    import polars as pl
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["class_balance", "crop_locations", "no_foreground", "sample_grid", "sampling_audit"]

#: Background of unknown (NaN) voxels ...
UNKNOWN_BACKGROUND = "#b0b0b0"
#: ... and the colour of the diagonal stripes drawn over it.
UNKNOWN_STRIPE = "#6e6e6e"
#: Colour of training / validation crop boxes in :func:`crop_locations`.
USAGE_COLOURS = {"train": "#ff7f0e", "validate": "#17becf"}

_AXES = ("z", "y", "x")
_PANEL_INCHES = 2.0


# -- shared drawing helpers (also used by cellmap_data.utils.figs) ------------------------------
def _to_numpy(data: Any) -> np.ndarray:
    """A float32 numpy copy of a tensor (any device or dtype) or array."""
    if hasattr(data, "detach"):
        data = data.detach().float().cpu().numpy()
    return np.asarray(data, dtype=np.float32)


def _plane(image: Any, slice_axis: str = "z", axis_order: str = "zyx") -> np.ndarray:
    """A 2-D plane of one sample's channel: singleton axes dropped, then the middle slice.

    ``(y, x)`` is returned as is, ``(1, y, x)`` and ``(z, 1, x)`` lose their singleton axis,
    and a 3-D patch gives its middle slice across ``slice_axis`` (its axes are in
    ``axis_order``).

    Raises:
        ValueError: fewer than 2 or more than 3 non-singleton axes.
    """
    plane = np.asarray(image)
    while plane.ndim > 2 and 1 in plane.shape:
        plane = np.squeeze(plane, axis=plane.shape.index(1))
    if plane.ndim == 3:
        position = axis_order.index(slice_axis) if slice_axis in axis_order else 0
        return np.take(plane, plane.shape[position] // 2, axis=position)
    if plane.ndim == 2:
        return plane
    raise ValueError(f"expected a 2-D or 3-D image per sample and channel, got {np.shape(image)}")


def _rgba(colour: Any) -> np.ndarray:
    from matplotlib.colors import to_rgba

    return np.asarray(to_rgba(colour), dtype=np.float32)


def _unknown_rgba(mask: np.ndarray, opacity: float = 1.0) -> np.ndarray:
    """An RGBA image: grey diagonal stripes where ``mask`` is true, transparent elsewhere."""
    height, width = mask.shape
    period = max(4, int(round(max(height, width) / 12)))
    rows, columns = np.indices(mask.shape)
    stripe = ((rows + columns) % period) < (period + 1) // 2
    out = np.zeros((height, width, 4), dtype=np.float32)
    out[...] = _rgba(UNKNOWN_BACKGROUND)
    out[stripe] = _rgba(UNKNOWN_STRIPE)
    out[..., 3] = np.where(mask, opacity, 0.0)
    return out


def _draw_unknown(ax: "Axes", mask: np.ndarray, extent: Sequence[float], opacity: float = 1.0) -> None:
    """Stripes over the ``mask`` pixels of an image drawn with ``extent``."""
    if mask.any():
        left, right, bottom, top = (float(v) for v in extent)
        ax.imshow(_unknown_rgba(mask, opacity), extent=(left, right, bottom, top), interpolation="nearest")


def _show_image(
    ax: "Axes",
    image: np.ndarray,
    *,
    cmap: Optional[str] = None,
    clim: Optional[Sequence[float]] = None,
    extent: Optional[Sequence[float]] = None,
    ticks: bool = False,
    colorbar: bool = False,
    colorbar_size: float = 0.1,
) -> Any:
    """Draw a 2-D ``image`` on ``ax`` with NaN voxels striped grey; returns the data's image.

    The data is the first image of the axes (NaNs masked, so they are transparent in it);
    the stripes, when there are NaNs, are a second image on top.
    """
    from matplotlib import colormaps, rcParams

    image = np.asarray(image, dtype=np.float32)
    colour_map = colormaps[cmap or rcParams["image.cmap"]].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    ax.set_facecolor(UNKNOWN_BACKGROUND)
    vmin, vmax = (None, None) if clim is None else clim
    box: Any = None if extent is None else tuple(float(v) for v in extent)
    shown = ax.imshow(
        np.ma.masked_invalid(image), cmap=colour_map, vmin=vmin, vmax=vmax, extent=box, interpolation="nearest"
    )
    _draw_unknown(ax, ~np.isfinite(image), shown.get_extent())
    if not ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    if colorbar:
        figure: Any = ax.get_figure()
        figure.colorbar(shown, ax=ax, fraction=colorbar_size)
    return shown


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct RGBA colours (tab10, then tab20, then a hue wheel)."""
    from matplotlib import colormaps

    if n <= 10:
        values = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        values = [colormaps["tab20"](i) for i in range(n)]
    else:
        values = [colormaps["hsv"](i / n) for i in range(n)]
    return [(float(r), float(g), float(b), float(a)) for r, g, b, a in values]


def _unknown_patch(label: str = "unknown (NaN)") -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=UNKNOWN_BACKGROUND, edgecolor=UNKNOWN_STRIPE, hatch="///", label=label)


@functools.lru_cache(maxsize=None)
def _notebook_figure_class() -> type:
    """A matplotlib ``Figure`` that shows itself as a PNG in Jupyter even when no pyplot backend
    was set up (figures here are made without pyplot, which is what registers matplotlib's own
    display hooks; where those are active, they take precedence)."""
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", bbox_inches="tight")
            return buffer.getvalue()

    return NotebookFigure


def _new_figure(figsize: Sequence[float], layout: str | None = "constrained") -> "Figure":
    """A new figure (no pyplot) of ``figsize`` inches, shown as a PNG by Jupyter."""
    width, height = (float(v) for v in figsize)
    return _notebook_figure_class()(figsize=(width, height), layout=layout)


def _check_figsize(figsize: Any) -> Optional[tuple[float, float]]:
    if figsize is None:
        return None
    try:
        width, height = (float(v) for v in figsize)
    except (TypeError, ValueError):
        raise ValueError(f"figsize must be (width, height) in inches, got {figsize!r}") from None
    if not (width > 0 and height > 0):
        raise ValueError(f"figsize must be positive, got {figsize!r}")
    return width, height


# -- names of paths ------------------------------------------------------------------------------
def _crop_key(crop: Any) -> str:
    """A crop's label group: ``.../crop1/[mito,nuc]``, ``.../crop1[mito]`` and ``.../crop1/{label}``
    all give ``.../crop1`` (the form of the statistics table's ``crop`` column)."""
    text = os.fspath(crop) if not isinstance(crop, str) else crop
    for marker in ("{label}", "["):
        if marker in text:
            text = text[: text.index(marker) if marker == "{label}" else text.rindex(marker)]
    return text.rstrip("/\\") or str(crop)


def _volume_name(path: str) -> str:
    """A raw volume's path from its container on (``ds0.zarr/recon-1/em/fibsem-uint8``)."""
    parts = [c for c in str(path).replace("\\", "/").split("/") if c]
    for i, part in enumerate(parts):
        if part.endswith((".zarr", ".n5")):
            return "/".join(parts[i:])
    return "/".join(parts[-3:]) if parts else str(path)


# -- sample_grid -----------------------------------------------------------------------------------
def _is_tensor_like(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__array__") or hasattr(value, "detach")


def _batch_keys(batch: Mapping[str, Any], input_key: Optional[str], target_key: Optional[str]) -> tuple[str, Optional[str]]:
    """The raw and target keys of a batch: the given ones, else by name, else in order."""
    candidates = [
        k for k, v in batch.items()
        if isinstance(k, str) and k != "idx" and not k.startswith("__") and _is_tensor_like(v) and len(v.shape) >= 3
    ]
    for key in (input_key, target_key):
        if key is not None and key not in batch:
            raise ValueError(f"no array {key!r} in the batch; its arrays are {candidates}")
    if input_key is None:
        remaining = [k for k in candidates if k != target_key]
        if not remaining:
            raise ValueError(f"the batch has no image array ([B, C, (z,) y, x]); its keys are {list(batch)}")
        named = [k for k in remaining if any(w in k.lower() for w in ("input", "raw"))]
        input_key = (named or remaining)[0]
    if target_key is None:
        remaining = [k for k in candidates if k != input_key]
        named = [k for k in remaining if any(w in k.lower() for w in ("target", "output", "label", "gt"))]
        target_key = (named or remaining)[0] if (named or remaining) else None
    return input_key, target_key


def _dataset_axis_order(dataset: Any) -> str:
    order = getattr(dataset, "axis_order", None)
    if not isinstance(order, str):
        inner = getattr(dataset, "datasets", None)
        order = getattr(inner[0], "axis_order", None) if isinstance(inner, Sequence) and inner else None
    return order if isinstance(order, str) and len(order) == 3 else "zyx"


def _plane_scale(spec: Any, slice_axis: str, axis_order: str) -> Optional[np.ndarray]:
    """Voxel size (rows, columns) of the plane shown of an array spec, when it can be told."""
    if not isinstance(spec, Mapping) or "shape" not in spec or "scale" not in spec:
        return None
    shape = [int(v) for v in spec["shape"]]
    scale = [float(v) for v in spec["scale"]]
    if len(shape) != len(scale) or not 2 <= len(shape) <= 3:
        return None
    if len(shape) == 2:
        shape, scale = [1] + shape, [scale[0]] + scale
    kept = [k for k in range(3) if shape[k] != 1]
    if len(kept) == 3:
        kept.remove(axis_order.index(slice_axis))
    if len(kept) != 2:
        return None
    return np.array([scale[k] for k in kept])


def _stack_samples(dataset: Any, indices: Sequence[int]) -> dict[str, Any]:
    """``dataset[i]`` for each index, stacked into a batch dict of numpy arrays."""
    samples = [dataset[int(i)] for i in indices]
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        if _is_tensor_like(value):
            out[key] = np.stack([_to_numpy(s[key]) for s in samples])
    out["idx"] = np.array([int(_to_numpy(s["idx"]).reshape(-1)[0]) if "idx" in s else i for s, i in zip(samples, indices)])
    return out


def _label_rgba(
    planes: Sequence[np.ndarray], colours: Sequence[Any], alpha: float, unknown_opacity: float
) -> np.ndarray:
    """One RGBA overlay of label planes: each class in its colour with opacity ``alpha *
    value`` (values clipped to [0, 1]; later classes over earlier ones), stripes where every
    plane is NaN."""
    shape = planes[0].shape
    premultiplied: np.ndarray = np.zeros(shape + (3,), dtype=np.float32)
    coverage: np.ndarray = np.zeros(shape, dtype=np.float32)
    unknown = np.ones(shape, dtype=bool)
    for plane, colour in zip(planes, colours):
        finite = np.isfinite(plane)
        unknown &= ~finite
        a = alpha * np.clip(np.where(finite, plane, 0.0), 0.0, 1.0)
        rgb = np.asarray(colour[:3], dtype=np.float32)
        premultiplied = rgb * a[..., None] + premultiplied * (1.0 - a[..., None])
        coverage = a + coverage * (1.0 - a)
    out = np.zeros(shape + (4,), dtype=np.float32)
    covered = coverage > 0
    out[covered, :3] = premultiplied[covered] / coverage[covered, None]
    out[..., 3] = coverage
    stripes = _unknown_rgba(unknown, unknown_opacity)
    out[unknown] = stripes[unknown]
    return out


def _overlay_extent(
    raw_shape: Sequence[int], label_shape: Sequence[int], ratio: Optional[np.ndarray]
) -> tuple[float, float, float, float]:
    """Extent (in the raw plane's pixel coordinates) of a label plane centred on the raw plane;
    ``ratio`` is label voxel size / raw voxel size per (row, column), 1 when unknown."""
    ratio = np.ones(2) if ratio is None else ratio
    rows, columns = raw_shape
    height, width = label_shape[0] * ratio[0], label_shape[1] * ratio[1]
    centre_row, centre_column = (rows - 1) / 2, (columns - 1) / 2
    return (centre_column - width / 2, centre_column + width / 2, centre_row + height / 2, centre_row - height / 2)


def sample_grid(
    batch_or_dataset: Any,
    indices: Optional[Sequence[int]] = None,
    *,
    n: int = 8,
    classes: Optional[Sequence[str]] = None,
    slice_axis: str = "z",
    input_key: Optional[str] = None,
    target_key: Optional[str] = None,
    alpha: float = 0.5,
    figsize: Optional[Sequence[float]] = None,
    combined: bool = False,
) -> "Figure":
    """A grid of sample patches: one row per sample, the raw input, then its labels over it.

    Each row starts with the middle slice of the sample's raw input (first channel, grey),
    followed by one panel per class with that class's label drawn over the raw slice in the
    class's colour (opacity ``alpha * value``, values clipped to [0, 1]), or, with
    ``combined=True``, one panel with every class drawn over the raw slice together. Unknown
    voxels (NaN: a class the crop does not annotate, padding) are drawn as grey diagonal
    stripes, so they never look like background. 2-D patches are shown as they are; 3-D
    patches show their middle slice across ``slice_axis``. A label patch smaller (or at
    another voxel size, when a dataset tells) than the raw patch is drawn over the raw
    patch's centre.

    Args:
        batch_or_dataset: a batch dict ``{"idx": [B], <input>: [B, 1, (z,) y, x], <target>:
            [B, C, (z,) y, x]}`` of tensors (any device) or arrays, as the loaders yield; or a
            dataset (``CellMapDataset``, ``CellMapMultiDataset``, a subset...) whose samples
            ``dataset[i]`` are read.
        indices: rows of the batch, or sample indices of the dataset, to show (default: the
            first ``n``).
        n: number of samples shown when ``indices`` is not given.
        classes: for a dataset, the classes to show, a subset of ``dataset.classes`` in any
            order (default: all); for a batch, the names of the target channels, one per
            channel (default: ``<target>[i]``).
        slice_axis: ``"z"``, ``"y"`` or ``"x"``: the axis across which 3-D patches are
            sliced (in the dataset's ``axis_order``; a batch is taken as z, y, x).
        input_key: the raw array's key (default: the first array named like ``input`` or
            ``raw``, else the first array).
        target_key: the label array's key (default: the first other array named like
            ``target``, ``output``, ``label`` or ``gt``, else the next array; without one
            only the raw column is drawn).
        alpha: opacity of a label value of 1.
        figsize: figure size in inches (default: 2 inches per panel: ``(2 * columns, 2 *
            rows)``, with ``columns = 1 + number of classes``, or 2 with ``combined``).
        combined: draw all classes in one panel instead of one panel per class.

    Returns:
        A :class:`matplotlib.figure.Figure` with ``rows * columns`` axes (row-major), plus a
        legend of the class colours and the unknown stripes.

    Raises:
        ValueError: an unknown class name, a class count that does not match a batch's
            channels, a missing key, indices out of range, bad shapes or options.
    """
    if slice_axis not in _AXES:
        raise ValueError(f"slice_axis must be 'z', 'y' or 'x', not {slice_axis!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    size = _check_figsize(figsize)
    if isinstance(classes, str):
        classes = [classes]
    dataset = None
    if isinstance(batch_or_dataset, Mapping):
        batch = batch_or_dataset
        available = None
        first = next((v for v in batch.values() if _is_tensor_like(v) and len(v.shape) >= 1), None)
        batch_size = int(first.shape[0]) if first is not None else 0
        rows = list(range(min(int(n), batch_size))) if indices is None else [int(i) for i in indices]
        for i in rows:
            if not -batch_size <= i < batch_size:
                raise ValueError(f"row {i} is outside the batch of {batch_size} samples")
        axis_order = "zyx"
    elif hasattr(batch_or_dataset, "__getitem__") and hasattr(batch_or_dataset, "__len__"):
        dataset = batch_or_dataset
        total = len(dataset)
        wanted = list(range(min(int(n), total))) if indices is None else [int(i) for i in indices]
        for i in wanted:
            if not -total <= i < total:
                raise ValueError(f"sample {i} is outside the dataset of {total} samples")
        available = list(getattr(dataset, "classes", None) or [])
        axis_order = _dataset_axis_order(dataset)
        batch = _stack_samples(dataset, wanted) if wanted else {}
        rows = list(range(len(wanted)))
    else:
        raise ValueError(
            f"sample_grid takes a batch dict or a dataset, not {type(batch_or_dataset).__name__}"
        )
    if not rows:
        raise ValueError("no samples to show (empty batch, dataset or indices, or n=0)")
    input_key, target_key = _batch_keys(batch, input_key, target_key)
    inputs = _to_numpy(batch[input_key])
    if inputs.ndim < 4:
        raise ValueError(f"{input_key!r} must be [B, C, (z,) y, x], got shape {list(inputs.shape)}")
    targets = None if target_key is None else _to_numpy(batch[target_key])
    channels: list[int] = []
    names: list[str] = []
    if targets is not None:
        if targets.ndim < 4 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"{target_key!r} must be [B, C, (z,) y, x] with the batch size of {input_key!r} "
                f"({inputs.shape[0]}), got shape {list(targets.shape)}"
            )
        count = targets.shape[1]
        if available is not None and len(available) == count:
            channel_names = available
        elif available is None and classes is not None:
            if len(classes) != count:
                raise ValueError(
                    f"{target_key!r} has {count} channels but {len(classes)} classes were given "
                    "(for a batch, classes names every target channel)"
                )
            channel_names = [str(c) for c in classes]
        else:
            channel_names = [f"{target_key}[{i}]" for i in range(count)]
        wanted_names = channel_names if classes is None or available is None else [str(c) for c in classes]
        for name in wanted_names:
            if name not in channel_names:
                raise ValueError(f"unknown class {name!r}; the classes are {channel_names}")
            channels.append(channel_names.index(name))
            names.append(name)
        if not channels:
            raise ValueError("classes is empty: give at least one class to show")

    ratio = None
    if dataset is not None and targets is not None:
        raw_spec = (getattr(dataset, "input_arrays", None) or {}).get(input_key)
        label_spec = (getattr(dataset, "target_arrays", None) or {}).get(target_key)
        raw_scale = _plane_scale(raw_spec, slice_axis, axis_order)
        label_scale = _plane_scale(label_spec, slice_axis, axis_order)
        if raw_scale is not None and label_scale is not None:
            ratio = label_scale / raw_scale

    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    colours = _colours(len(names))
    columns = 1 + (0 if targets is None else (1 if combined else len(names)))
    fig = _new_figure(size or (_PANEL_INCHES * columns, _PANEL_INCHES * len(rows)))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    sample_ids = _to_numpy(batch["idx"]).reshape(-1) if "idx" in batch else None
    for r, row in enumerate(rows):
        raw = _plane(inputs[row, 0], slice_axis, axis_order)
        finite = raw[np.isfinite(raw)]
        clim = (float(finite.min()), float(finite.max())) if finite.size else None
        _show_image(axes[r, 0], raw, cmap="gray", clim=clim)
        label = f"sample {int(sample_ids[row])}" if sample_ids is not None and sample_ids.size > row else f"row {row}"
        axes[r, 0].set_ylabel(label)
        if r == 0:
            axes[r, 0].set_title(input_key)
        if targets is None:
            continue
        planes = [_plane(targets[row, c], slice_axis, axis_order) for c in channels]
        groups = [(planes, colours, "all classes")] if combined else [
            ([p], [colour], name) for p, colour, name in zip(planes, colours, names)
        ]
        for column, (group_planes, group_colours, title) in enumerate(groups, start=1):
            ax = axes[r, column]
            _show_image(ax, raw, cmap="gray", clim=clim)
            extent = _overlay_extent(raw.shape, group_planes[0].shape, ratio)
            ax.imshow(_label_rgba(group_planes, group_colours, float(alpha), 0.85), extent=extent, interpolation="nearest")
            ax.set_xlim(-0.5, raw.shape[1] - 0.5)
            ax.set_ylim(raw.shape[0] - 0.5, -0.5)
            if r == 0:
                ax.set_title(title, color=group_colours[0] if len(group_colours) == 1 else "black")
    if targets is not None:
        handles = [
            Line2D([], [], marker="s", linestyle="", markersize=9, color=to_hex(colour), label=name)
            for name, colour in zip(names, colours)
        ] + [_unknown_patch()]
        per_row = max(1, min(len(handles), int(fig.get_size_inches()[0] / 1.3)))
        fig.legend(handles=handles, loc="outside lower center", ncols=per_row, fontsize="small", frameon=False)
    return fig


# -- class_balance ---------------------------------------------------------------------------------
_BALANCE_VALUES = ("foreground_voxels", "total_voxels", "fraction")
_BALANCE_BY = ("class", "crop", "dataset")


def _require_polars(frame: Any, what: str) -> "pl.DataFrame":
    import polars as pl

    if isinstance(frame, pl.LazyFrame):
        frame = frame.collect()
    if not isinstance(frame, pl.DataFrame):
        raise ValueError(f"{what} must be a polars DataFrame, not {type(frame).__name__}")
    return frame


def _require_columns(frame: "pl.DataFrame", columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {missing}; it has {frame.columns}")


def class_balance(
    stats: Any,
    *,
    by: str = "class",
    value: str = "foreground_voxels",
    ax: Any = None,
    log: bool = False,
    figsize: Optional[Sequence[float]] = None,
) -> "Figure":
    """Bar charts of class balance from the statistics table.

    ``stats`` is the Polars table of ``dataset.stats()``, ``split.stats()`` or
    ``multi.stats()`` (one row per dataset, crop and class; see
    :func:`cellmap_data._stats.stats_for`). Only annotated rows count towards the values.

    The left panel shows ``value`` per ``by`` group: with ``by="class"`` one bar per class
    (one bar per split and class when the table has a ``split`` column), with ``by="crop"``
    or ``by="dataset"`` one group of bars per crop or raw volume with a bar per class.
    ``foreground_voxels`` and ``total_voxels`` are summed; ``fraction`` is the summed
    foreground over the summed total. Bars are labelled with how many of their crops annotate
    the class. The right panel stacks annotated and unannotated (crop, class) pairs per group:
    with ``by="class"``, how many crops annotate each class and how many do not.

    Args:
        stats: a polars DataFrame (a LazyFrame is collected) with at least ``crop``,
            ``class``, ``annotated``, ``foreground_voxels`` and ``total_voxels`` (and
            ``dataset`` for ``by="dataset"``).
        by: ``"class"``, ``"crop"`` or ``"dataset"``.
        value: ``"foreground_voxels"``, ``"total_voxels"`` or ``"fraction"``.
        ax: draw the value panel only, into this Axes (its figure is returned); or a pair of
            Axes for both panels. Default: a new figure with both.
        log: logarithmic value axis.
        figsize: size of a new figure in inches (default ``(2 * w, 4)`` with ``w = max(4, 1.5
            + 0.6 * groups + 0.12 * bars)``).

    Returns:
        A :class:`matplotlib.figure.Figure` (two axes when made here).

    Raises:
        ValueError: not a polars DataFrame, an empty table, missing columns, an unknown
            ``by`` or ``value``.
    """
    import polars as pl

    frame = _require_polars(stats, "stats")
    if by not in _BALANCE_BY:
        raise ValueError(f"by must be one of {list(_BALANCE_BY)}, not {by!r}")
    if value not in _BALANCE_VALUES:
        raise ValueError(f"value must be one of {list(_BALANCE_VALUES)}, not {value!r}")
    size = _check_figsize(figsize)
    _require_columns(frame, ["crop", "class", "annotated", "foreground_voxels", "total_voxels"] + (["dataset"] if by == "dataset" else []), "stats")
    if frame.height == 0:
        raise ValueError("stats is empty: there are no (crop, class) rows to plot")

    frame = frame.with_columns(pl.col("annotated").fill_null(False))
    class_order = list(dict.fromkeys(frame["class"].to_list()))
    if by == "class":
        groups = class_order
        series_column = "split" if "split" in frame.columns else None
        series = list(dict.fromkeys(frame["split"].to_list())) if series_column else [None]
        group_labels = {g: str(g) for g in groups}
    else:
        groups = list(dict.fromkeys(frame[by].to_list()))
        series_column = "class"
        series = class_order
        group_labels = short_names([str(g) for g in groups])
        group_labels = {g: group_labels[str(g)] for g in groups}

    keys = [by] + ([series_column] if series_column else [])
    annotated = frame.filter(pl.col("annotated"))
    sums = annotated.group_by(keys).agg(
        pl.col("foreground_voxels").sum().alias("fg"),
        pl.col("total_voxels").sum().alias("total"),
        pl.len().alias("crops"),
    )
    pairs = frame.group_by(keys).agg(pl.len().alias("rows"))
    table: dict[tuple[Any, Any], tuple[float, int, int]] = {}
    for row in pairs.iter_rows(named=True):
        table[(row[by], row[series_column] if series_column else None)] = (math.nan, 0, int(row["rows"]))
    for row in sums.iter_rows(named=True):
        key = (row[by], row[series_column] if series_column else None)
        fg, total = float(row["fg"] or 0.0), float(row["total"] or 0.0)
        amount = {"foreground_voxels": fg, "total_voxels": total}.get(value, fg / total if total > 0 else math.nan)
        table[key] = (amount, int(row["crops"]), table.get(key, (0, 0, int(row["crops"])))[2])

    n_bars = len(groups) * len(series)
    if ax is None:
        width = max(4.0, 1.5 + 0.6 * len(groups) + 0.12 * n_bars)
        fig = _new_figure(size or (2 * width, 4.0))
        value_ax, count_ax = fig.subplots(1, 2)
    elif isinstance(ax, Sequence) and not isinstance(ax, str):
        if len(ax) != 2:
            raise ValueError(f"ax must be one Axes or a pair of Axes, got {len(ax)}")
        value_ax, count_ax = ax
        fig = value_ax.get_figure()
    else:
        value_ax, count_ax = ax, None
        fig = ax.get_figure()

    positions = np.arange(len(groups), dtype=float)
    bar_width = 0.8 / len(series)
    colours = _colours(len(class_order) if by == "class" and series == [None] else len(series))
    for s, name in enumerate(series):
        offsets = positions - 0.4 + bar_width * (s + 0.5)
        heights = [table.get((g, name), (math.nan, 0, 0))[0] for g in groups]
        heights = [0.0 if math.isnan(h) else h for h in heights]
        if by == "class" and series == [None]:
            colour: Any = [c[:3] for c in colours]
        else:
            colour = colours[s][:3]
        bars = value_ax.bar(offsets, heights, bar_width, color=colour, label=None if name is None else str(name))
        labels = []
        for g in groups:
            _, crops, rows_ = table.get((g, name), (math.nan, 0, 0))
            labels.append(f"{crops}/{rows_}" if rows_ else "")
        value_ax.bar_label(bars, labels=labels, fontsize="x-small", padding=1)
    value_ax.set_xticks(positions, [group_labels[g] for g in groups], rotation=45 if n_bars > 8 else 0, ha="right" if n_bars > 8 else "center")
    value_ax.set_ylabel({"foreground_voxels": "foreground voxels", "total_voxels": "annotated voxels", "fraction": "foreground fraction"}[value])
    value_ax.set_title(f"{value.replace('_', ' ')} per {by} (labels: annotating crops / crops)", fontsize="small")
    if log:
        value_ax.set_yscale("log")
    if series != [None]:
        value_ax.legend(fontsize="x-small", title=series_column, title_fontsize="x-small")

    if count_ax is not None:
        yes = frame.filter(pl.col("annotated")).group_by(by).agg(pl.len().alias("n"))
        no = frame.filter(~pl.col("annotated")).group_by(by).agg(pl.len().alias("n"))
        yes_counts = dict(yes.iter_rows())
        no_counts = dict(no.iter_rows())
        annotated_heights = [yes_counts.get(g, 0) for g in groups]
        missing_heights = [no_counts.get(g, 0) for g in groups]
        count_ax.bar(positions, annotated_heights, 0.6, color="#4c72b0", label="annotated")
        count_ax.bar(positions, missing_heights, 0.6, bottom=annotated_heights, color=UNKNOWN_BACKGROUND,
                     edgecolor=UNKNOWN_STRIPE, hatch="///", label="not annotated")
        count_ax.set_xticks(positions, [group_labels[g] for g in groups], rotation=45 if len(groups) > 8 else 0,
                            ha="right" if len(groups) > 8 else "center")
        count_ax.set_ylabel("crops" if by == "class" else "classes")
        count_ax.set_title("crops annotating each class" if by == "class" else f"classes annotated per {by}", fontsize="small")
        count_ax.legend(fontsize="x-small")
    return fig


# -- crop_locations --------------------------------------------------------------------------------
def _datasets_with_usage(obj: Any) -> list[tuple[Any, Optional[str]]]:
    """(dataset, "train" / "validate" / None) of a split, multi-dataset, subset, dataset or list."""
    if hasattr(obj, "train_datasets") and hasattr(obj, "validation_datasets"):
        return [(d, "train") for d in obj.train_datasets] + [(d, "validate") for d in obj.validation_datasets]
    if hasattr(obj, "raw_path"):
        return [(obj, None)]
    inner = getattr(obj, "datasets", None)
    if isinstance(inner, Sequence) and not isinstance(inner, str):
        return [pair for d in inner for pair in _datasets_with_usage(d)]
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [pair for d in obj for pair in _datasets_with_usage(d)]
    raise ValueError(
        f"crop_locations takes a CellMapDataset, CellMapMultiDataset, CellMapDataSplit or a list of "
        f"datasets, not {type(obj).__name__}"
    )


def _raw_overview(path: str, axis: str, projection: str, max_side: int = 256) -> tuple[np.ndarray, list[float], list[float]]:
    """A projection along ``axis`` of the raw volume, read from its finest level with at most
    ``max_side`` voxels per axis (else from the coarsest, resampled to ``max_side``), with
    the world box (lo, hi; z, y, x nm) it covers."""
    import torch

    from .. import _engine

    volume = _engine.Volume(str(path))
    small = [lv for lv in volume.levels if max(int(n) for n in lv["shape"]) <= max_side]
    level = small[0] if small else volume.levels[-1]
    lo, hi = (list(map(float, v)) for v in level["world_box"])
    extent = [h - low for low, h in zip(lo, hi)]
    voxel = [max(float(v), e / max_side) for v, e in zip(level["voxel_size"], extent)]
    shape = [max(1, int(math.ceil(e / v - 1e-6))) for e, v in zip(extent, voxel)]
    centre = [(low + h) / 2 for low, h in zip(lo, hi)]
    data = torch.from_dlpack(volume.read(centre, shape, voxel, pad=True, pad_value=math.nan)).numpy()
    data = np.asarray(data, dtype=np.float32)
    read_lo = [c - n * v / 2 for c, n, v in zip(centre, shape, voxel)]
    read_hi = [c + n * v / 2 for c, n, v in zip(centre, shape, voxel)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN lines give NaN
        reduce = np.nanmax if projection == "max" else np.nanmean
        image = reduce(data, axis=_AXES.index(axis))
    return image, read_lo, read_hi


def crop_locations(
    dataset: Any,
    *,
    axis: str = "z",
    ax: Any = None,
    projection: str = "mean",
    figsize: Optional[Sequence[float]] = None,
) -> "Figure":
    """Where the crops sit inside each raw volume.

    One panel per raw volume (datasets are grouped by raw path): a projection along ``axis``
    of the raw volume (read over its whole box from the finest level with at most 256 voxels
    per axis, else from the coarsest level resampled to 256, so it is cheap), in world
    coordinates (nm), with each crop's box (the dataset's
    ``bounding_box``: raw ∩ annotated labels) drawn as a rectangle labelled with the crop's
    name. The boxes of a data split are coloured by usage (training / validation).

    Args:
        dataset: a ``CellMapDataset`` (one crop), a ``CellMapMultiDataset`` (or subset), a
            ``CellMapDataSplit`` or a list of datasets.
        axis: ``"z"``, ``"y"`` or ``"x"``: the axis projected away.
        ax: one Axes to draw into (one raw volume only), or a sequence of Axes with one per
            raw volume; their figure is returned. Default: a new figure.
        projection: ``"mean"`` or ``"max"``.
        figsize: size of a new figure in inches (default 4 inches per panel, at most 3
            panels per row).

    Returns:
        A :class:`matplotlib.figure.Figure` with one axes per raw volume.

    Raises:
        ValueError: no datasets, an unknown ``axis`` or ``projection``, or too few Axes.
    """
    from matplotlib.patches import Patch, Rectangle

    if axis not in _AXES:
        raise ValueError(f"axis must be 'z', 'y' or 'x', not {axis!r}")
    if projection not in ("mean", "max"):
        raise ValueError(f"projection must be 'mean' or 'max', not {projection!r}")
    size = _check_figsize(figsize)
    pairs = _datasets_with_usage(dataset)
    if not pairs:
        raise ValueError("no datasets to show")
    volumes: dict[str, list[tuple[Any, Optional[str]]]] = {}
    for d, usage in pairs:
        volumes.setdefault(os.fspath(d.raw_path), []).append((d, usage))

    if ax is None:
        columns = min(len(volumes), 3)
        rows = int(math.ceil(len(volumes) / columns))
        fig = _new_figure(size or (4.0 * columns, 4.0 * rows))
        grid = fig.subplots(rows, columns, squeeze=False).ravel()
        for extra in grid[len(volumes):]:
            fig.delaxes(extra)
        panels = list(grid[: len(volumes)])
    else:
        panels = list(ax) if isinstance(ax, Sequence) or isinstance(ax, np.ndarray) else [ax]
        panels = list(np.ravel(np.asarray(panels, dtype=object)))
        if len(panels) < len(volumes):
            raise ValueError(f"{len(volumes)} raw volumes need {len(volumes)} Axes, got {len(panels)}")
        fig = panels[0].get_figure()

    row_axis, column_axis = [a for a in _AXES if a != axis]
    r, c = _AXES.index(row_axis), _AXES.index(column_axis)
    crop_names = short_names([_crop_key(d.target_path) for d, _ in pairs if getattr(d, "target_path", "")])
    usages = {u for _, u in pairs if u is not None}
    for panel, (path, members) in zip(panels, volumes.items()):
        image, lo, hi = _raw_overview(path, axis, projection)
        finite = image[np.isfinite(image)]
        clim = (float(finite.min()), float(finite.max())) if finite.size else None
        _show_image(panel, image, cmap="gray", clim=clim, extent=(lo[c], hi[c], hi[r], lo[r]), ticks=True)
        palette = _colours(len(members))
        for k, (d, usage) in enumerate(members):
            if not getattr(d, "target_path", "") or not getattr(d, "annotated_classes", None):
                continue
            box = d.bounding_box
            (r0, r1), (c0, c1) = box[row_axis], box[column_axis]
            colour: Any = USAGE_COLOURS[usage] if usage in USAGE_COLOURS else palette[k][:3]
            panel.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor=colour, linewidth=1.5))
            panel.annotate(crop_names.get(_crop_key(d.target_path), ""), (c0, r0), xytext=(2, -2),
                           textcoords="offset points", va="top", ha="left", fontsize="x-small", color=colour)
        panel.set_xlim(lo[c], hi[c])
        panel.set_ylim(hi[r], lo[r])
        panel.set_xlabel(f"{column_axis} (nm)")
        panel.set_ylabel(f"{row_axis} (nm)")
        panel.set_title(f"{_volume_name(path)}\n{projection} along {axis}", fontsize="small")
    if usages and ax is None:
        handles = [Patch(fill=False, edgecolor=USAGE_COLOURS[u], label=u) for u in ("train", "validate") if u in usages]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    return fig


# -- sampling_audit --------------------------------------------------------------------------------
def _metadata_frame(metadata: Any) -> "pl.DataFrame":
    """A polars DataFrame of sample metadata (a DataFrame, or per-sample dicts such as a
    batch's ``"__metadata__"``; nested values are dropped)."""
    import polars as pl

    if isinstance(metadata, (pl.DataFrame, pl.LazyFrame)):
        return _require_polars(metadata, "metadata")
    if isinstance(metadata, Sequence) and not isinstance(metadata, str) and all(isinstance(m, Mapping) for m in metadata):
        rows = [{k: v for k, v in m.items() if isinstance(v, (str, int, float, bool)) or v is None} for m in metadata]
        return pl.DataFrame(rows) if rows else pl.DataFrame()
    raise ValueError(
        f"metadata must be a polars DataFrame (or a list of per-sample dicts), not {type(metadata).__name__}"
    )


def _crop_key_column(frame: "pl.DataFrame") -> "pl.Expr":
    """``_crop``: the :func:`_crop_key` of every ``crop`` of ``frame``."""
    import polars as pl

    crops = frame["crop"].cast(pl.String)
    mapping = {c: _crop_key(c) for c in crops.unique().to_list() if c is not None}
    return pl.col("crop").cast(pl.String).replace_strict(mapping, default=None, return_dtype=pl.String).alias("_crop")


def sampling_audit(
    metadata: Any,
    *,
    stats: Any = None,
    figsize: Optional[Sequence[float]] = None,
) -> "Figure":
    """What an epoch sampled, from its per-sample metadata.

    Panels: samples per crop (horizontal bars), where the sample centres fell (``centre_x``
    against ``centre_y``, world nm, coloured by crop), and the distribution of rotation
    angles (a histogram of each ``rotate_*`` column with a non-zero angle). When the metadata
    says which classes each sample's crop annotates (the ``annotated_<class>`` columns of the
    loader's tables) — or, for tables without them, given ``stats`` (the statistics table of the
    datasets sampled; ``crop`` of the metadata is matched to ``crop`` of the table) — a fourth
    panel shows each class's share of the samples' annotations (a sample counts for every class
    its crop annotates) against the uniform share ``1 / classes``. When the metadata is what was
    delivered (``consumed_metadata()``: ``fraction_<class>`` columns), two more panels show the
    mean foreground fraction each class had in the samples whose crop annotates it, and the
    share of samples with no foreground of any class their crop annotates.

    Args:
        metadata: the epoch's sample metadata: a polars DataFrame with columns ``crop``,
            ``centre_y``, ``centre_x`` and optionally ``rotate_z/y/x``, ``annotated_<class>`` and
            ``fraction_<class>`` (``CellMapDataLoader.epoch_metadata()`` or
            ``consumed_metadata()``), or a list of per-sample dicts (a batch's ``"__metadata__"``).
        stats: the polars statistics table (``dataset.stats()`` / ``split.stats()`` /
            ``multi.stats()``), for the per-class panel of metadata without ``annotated_*``.
        figsize: figure size in inches (default ``(15, 4)``; ``(11, 8)`` with the class panel;
            ``(16, 8)`` with the delivered panels).

    Returns:
        A :class:`matplotlib.figure.Figure` with 3 axes (1 row), 4 (2 x 2) with the class
        panel, or 6 (2 x 3) with the delivered panels.

    Raises:
        ValueError: metadata that is not a table, is empty or lacks columns; ``stats`` that
            is not a polars DataFrame, lacks columns or shares no crop with the metadata.
    """
    import polars as pl

    frame = _metadata_frame(metadata)
    size = _check_figsize(figsize)
    if frame.height == 0:
        raise ValueError("metadata is empty: there are no samples to audit")
    _require_columns(frame, ["crop", "centre_y", "centre_x"], "metadata")
    frame = frame.with_columns(_crop_key_column(frame))

    annotations = None
    classes = [name[len("annotated_"):] for name in frame.columns if name.startswith("annotated_")]
    if classes:
        counts = [int((frame[f"annotated_{c}"] == "annotated").sum()) for c in classes]
        annotations = (classes, counts)
    elif stats is not None:
        table = _require_polars(stats, "stats")
        _require_columns(table, ["crop", "class", "annotated"], "stats")
        table = table.with_columns(_crop_key_column(table), pl.col("annotated").fill_null(False))
        class_order = list(dict.fromkeys(table["class"].to_list()))
        annotated = table.filter(pl.col("annotated")).select("_crop", "class").unique()
        if not set(frame["_crop"].unique().to_list()) & set(table["_crop"].unique().to_list()):
            raise ValueError("no crop of the metadata appears in stats: are they of the same datasets?")
        joined = frame.select("_crop").join(annotated, on="_crop", how="inner")
        counts_by_class = dict(joined.group_by("class").agg(pl.len().alias("n")).iter_rows())
        annotations = (class_order, [int(counts_by_class.get(c, 0)) for c in class_order])
    delivered = classes and all(f"fraction_{c}" in frame.columns for c in classes)

    fg_ax = none_ax = None
    if annotations is None:
        fig = _new_figure(size or (15.0, 4.0))
        crop_ax, centre_ax, rotation_ax = fig.subplots(1, 3)
        class_ax = None
    elif not delivered:
        fig = _new_figure(size or (11.0, 8.0))
        (crop_ax, centre_ax), (rotation_ax, class_ax) = fig.subplots(2, 2)
    else:
        fig = _new_figure(size or (16.0, 8.0))
        (crop_ax, centre_ax, rotation_ax), (class_ax, fg_ax, none_ax) = fig.subplots(2, 3)

    per_crop = frame.group_by("_crop", maintain_order=True).agg(pl.len().alias("n"))
    names = short_names(per_crop["_crop"].to_list())
    crops = sorted(names, key=lambda crop: names[crop])
    colours = dict(zip(crops, _colours(len(crops))))
    order = per_crop.sort("n")
    crop_ax.barh([names[c] for c in order["_crop"].to_list()], order["n"].to_list(),
                 color=[colours[c][:3] for c in order["_crop"].to_list()])
    crop_ax.set_xlabel("samples")
    crop_ax.set_title(f"samples per crop ({frame.height} samples)", fontsize="small")

    for crop in crops:
        rows = frame.filter(pl.col("_crop") == crop)
        centre_ax.scatter(rows["centre_x"].to_numpy(), rows["centre_y"].to_numpy(), s=10, color=colours[crop][:3],
                          label=names[crop], alpha=0.8)
    centre_ax.set_xlabel("centre x (nm)")
    centre_ax.set_ylabel("centre y (nm)")
    centre_ax.invert_yaxis()
    centre_ax.set_title("sample centres", fontsize="small")
    if len(crops) <= 12:
        centre_ax.legend(fontsize="x-small", markerscale=1.5)

    present = [f"rotate_{a}" for a in _AXES if f"rotate_{a}" in frame.columns]
    rotation_columns = [name for name in present if frame[name].cast(pl.Float64).fill_null(0.0).abs().max() or 0.0]
    if rotation_columns:
        bins = np.linspace(-180.0, 180.0, 25)
        for name in rotation_columns:
            values = frame[name].cast(pl.Float64).drop_nulls().to_numpy()
            rotation_ax.hist(np.clip(values, -180.0, 180.0), bins=bins, histtype="step", linewidth=1.5, label=name)
        rotation_ax.set_xlim(-180, 180)
        rotation_ax.set_xlabel("angle (degrees)")
        rotation_ax.set_ylabel("samples")
        rotation_ax.legend(fontsize="x-small")
    else:
        note = "no rotation drawn (every angle is 0)" if present else "no rotate_* columns"
        rotation_ax.text(0.5, 0.5, note, ha="center", va="center", transform=rotation_ax.transAxes)
    rotation_ax.set_title("rotation angles", fontsize="small")

    if class_ax is not None and annotations is not None:
        class_order, class_counts = annotations
        total = sum(class_counts)
        shares = [n / total if total else 0.0 for n in class_counts]
        bars = class_ax.bar(class_order, shares, color=[c[:3] for c in _colours(len(class_order))])
        class_ax.bar_label(bars, labels=[str(n) for n in class_counts], fontsize="x-small", padding=1)
        if class_order:
            class_ax.axhline(1.0 / len(class_order), color="black", linestyle="--", linewidth=1,
                             label=f"uniform (1/{len(class_order)})")
            class_ax.legend(fontsize="x-small")
        class_ax.set_ylabel("share of annotated samples")
        class_ax.set_title("samples per class (labels: samples whose crop annotates it)", fontsize="small")
    if fg_ax is not None and none_ax is not None:
        means: list[float] = []
        for c in classes:
            rows = frame.filter(pl.col(f"annotated_{c}") == "annotated")
            values = rows[f"fraction_{c}"].cast(pl.Float64).fill_null(0.0).to_numpy()
            means.append(float(values.mean()) if len(values) else 0.0)
        bars = fg_ax.bar(classes, means, color=[col[:3] for col in _colours(len(classes))])
        fg_ax.bar_label(bars, labels=[f"{m:.1%}" for m in means], fontsize="x-small", padding=1)
        fg_ax.set_ylabel("mean foreground fraction")
        fg_ax.set_title("delivered foreground per class (samples whose crop annotates it)", fontsize="small")
        empty = no_foreground(frame, classes)
        share = float(empty.mean()) if empty.len() else 0.0
        none_bars = none_ax.bar(["some foreground", "no foreground"], [1.0 - share, share], color=["tab:green", "tab:grey"])
        none_ax.bar_label(none_bars, labels=[f"{1.0 - share:.1%}", f"{share:.1%}"], fontsize="x-small", padding=1)
        none_ax.set_ylim(0, 1.05)
        none_ax.set_ylabel("share of samples")
        none_ax.set_title("samples by foreground of the classes their crop annotates", fontsize="small")
    return fig


def no_foreground(metadata: Any, classes: Sequence[str] | None = None) -> Any:
    """Per sample of delivered metadata (``consumed_metadata()``), whether it held no foreground
    of any class its crop annotates (a polars boolean Series): such samples teach the model only
    background. ``classes`` defaults to every class with ``annotated_<class>`` and
    ``foreground_<class>`` columns."""
    import polars as pl

    frame = _metadata_frame(metadata)
    if classes is None:
        classes = [n[len("annotated_"):] for n in frame.columns
                   if n.startswith("annotated_") and f"foreground_{n[len('annotated_'):]}" in frame.columns]
    _require_columns(frame, [f"{k}_{c}" for c in classes for k in ("annotated", "foreground")], "metadata")
    held = [((pl.col(f"annotated_{c}") == "annotated") & (pl.col(f"foreground_{c}") > 0)) for c in classes]
    return frame.select((~pl.any_horizontal(held)) if held else pl.lit(True)).to_series().alias("no_foreground")
