"""Figures of (input, target, prediction) for logging training progress.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot),
so no GUI backend is needed and nothing is kept open globally; matplotlib is
imported only when a figure is made.
"""

from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from cellmap_data.presentation.plot import UNKNOWN_BACKGROUND, _new_figure, _plane, _show_image, _to_numpy

if TYPE_CHECKING:  # matplotlib is imported lazily: it is slow to import.
    from matplotlib.figure import Figure

__all__ = [
    "fig_to_image",
    "get_fig_dict",
    "get_image_dict",
    "get_image_grid",
    "get_image_grid_numpy",
]

# NaN voxels are drawn as grey stripes over this background (cellmap_data.presentation.plot draws them).
NAN_BACKGROUND = UNKNOWN_BACKGROUND
# Outline of the output's field of view drawn on the full input.
FOV_EDGE_COLOUR = "red"


def _middle_slice(image: np.ndarray) -> np.ndarray:
    """A 2-D plane of one sample's channel: singleton axes dropped, then the middle z slice.

    ``(y, x)`` is returned as is, ``(1, y, x)`` and ``(z, 1, x)`` lose their singleton axis,
    and a 3-D ``(z, y, x)`` gives ``image[z // 2]`` (:func:`cellmap_data.presentation.plot._plane`).

    Raises:
        ValueError: fewer than 2 or more than 3 non-singleton axes.
    """
    return _plane(image, "z", "zyx")


def _show(
    fig: "Figure",
    ax: Any,
    image: np.ndarray,
    cmap_name: Optional[str],
    clim: Optional[Sequence[float]],
    colorbar: bool,
    colorbar_size: float,
) -> None:
    """Draw ``image`` on ``ax`` with the shared NaN-aware display of :mod:`cellmap_data.presentation.plot`
    (NaN voxels striped grey), no ticks, optional colour bar."""
    _show_image(ax, image, cmap=cmap_name, clim=clim, colorbar=colorbar, colorbar_size=colorbar_size)


def _batch_arrays(input_data: Any, target_data: Any, outputs: Any, classes: Sequence[str],
                  batch_size: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(inputs, targets, predictions) as float numpy arrays, checked against each other and
    ``classes``, and the number of rows to draw (at most ``batch_size``)."""
    inputs, targets, predictions = _to_numpy(input_data), _to_numpy(target_data), _to_numpy(outputs)
    _check_batch(inputs, targets, predictions, classes)
    rows = inputs.shape[0] if batch_size is None else min(batch_size, inputs.shape[0])
    return inputs, targets, predictions, rows


def _check_batch(inputs: np.ndarray, targets: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> None:
    """Raise ValueError unless the three arrays are batches with one channel per class."""
    if targets.ndim < 4 or predictions.ndim < 4 or inputs.ndim < 4:
        raise ValueError("inputs, targets and outputs must be [B, C, (z,) y, x]")
    if not (inputs.shape[0] == targets.shape[0] == predictions.shape[0]):
        raise ValueError(
            f"batch sizes differ: input {inputs.shape[0]}, target {targets.shape[0]}, "
            f"output {predictions.shape[0]}"
        )
    for name, array in (("target", targets), ("output", predictions)):
        if array.shape[1] != len(classes):
            raise ValueError(
                f"{name} has {array.shape[1]} channels but {len(classes)} classes were given"
            )


def _centre_window(full_shape: Sequence[int], window_shape: Sequence[int]) -> tuple[slice, slice, int, int]:
    """Row/column slices of the centred ``window_shape`` region of a ``full_shape`` plane.

    Also returns the window's top-left corner ``(row, column)``.  Axes where
    the window is not smaller than the plane are taken whole.
    """
    slices = []
    corner = []
    for full, window in zip(full_shape, window_shape):
        offset = (full - window) // 2
        if offset <= 0:
            slices.append(slice(0, full))
            corner.append(0)
        else:
            slices.append(slice(offset, offset + window))
            corner.append(offset)
    return slices[0], slices[1], corner[0], corner[1]


def get_image_grid(
    input_data: Any,
    target_data: Any,
    outputs: Any,
    classes: Sequence[str],
    batch_size: Optional[int] = None,
    fig_size: float = 3,
    clim: Optional[Sequence[float]] = None,
    cmap: Optional[str] = None,
) -> "Figure":
    """One figure showing every sample's input, and target and prediction for every class.

    One row per sample (the first ``batch_size`` samples, all by default) and
    ``2 + 2 * len(classes)`` columns: "Full FOV" (the input's first channel,
    with the prediction's field of view outlined in red), "Raw" (the input
    cropped to that centred field of view), then "GT <class>" and
    "Pred. <class>" for each class.  3-D data shows its middle z slice;
    NaN voxels are drawn as grey stripes (as in :mod:`cellmap_data.presentation.plot`).

    Args:
        input_data: ``[B, C_in, (z,) y, x]`` tensor or array.
        target_data: ``[B, C, (z,) y, x]``, channel ``i`` is ``classes[i]``.
        outputs: predictions, same layout as ``target_data``.
        classes: class names, one per target channel.
        batch_size: maximum number of samples (rows) to show.
        fig_size: size in inches of each panel.
        clim: colour limits of every panel (auto per panel if None).
        cmap: colour map of the target and prediction panels (matplotlib's
            default if None); inputs are shown in grey.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Raises:
        ValueError: inconsistent batch sizes or channel counts.
    """
    from matplotlib.patches import Rectangle

    inputs, targets, predictions, rows = _batch_arrays(input_data, target_data, outputs, classes, batch_size)
    columns = 2 + 2 * len(classes)
    fig = _new_figure((fig_size * columns, fig_size * rows), layout="tight")
    axes = fig.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        full = _middle_slice(inputs[row, 0])
        window_shape = full.shape
        for class_index, class_name in enumerate(classes):
            target = _middle_slice(targets[row, class_index])
            prediction = _middle_slice(predictions[row, class_index])
            window_shape = prediction.shape
            for column, image, title in (
                (2 + 2 * class_index, target, f"GT {class_name}"),
                (3 + 2 * class_index, prediction, f"Pred. {class_name}"),
            ):
                _show(fig, axes[row, column], image, cmap, clim, False, 0.0)
                axes[row, column].set_title(title)
        rows_slice, columns_slice, top, left = _centre_window(full.shape, window_shape)
        _show(fig, axes[row, 0], full, "gray", clim, False, 0.0)
        axes[row, 0].set_title("Full FOV")
        axes[row, 0].add_patch(
            Rectangle(
                (left - 0.5, top - 0.5),
                columns_slice.stop - columns_slice.start,
                rows_slice.stop - rows_slice.start,
                edgecolor=FOV_EDGE_COLOUR,
                facecolor="none",
            )
        )
        _show(fig, axes[row, 1], full[rows_slice, columns_slice], "gray", clim, False, 0.0)
        axes[row, 1].set_title("Raw")
    return fig


def fig_to_image(fig: "Figure") -> np.ndarray:
    """Render a figure to an RGBA image: a ``uint8`` array ``[height, width, 4]``.

    The figure is rendered at its own dpi, so ``height, width`` are its size
    in inches times ``fig.dpi``.  A figure managed by pyplot is closed
    afterwards (freeing it, as the reference library does); other figures are
    left alone.
    """
    from PIL import Image

    with io.BytesIO() as buffer:
        fig.savefig(buffer, format="png", dpi=fig.dpi)
        buffer.seek(0)
        with Image.open(buffer) as png:
            image = np.array(png.convert("RGBA"), dtype=np.uint8)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and getattr(fig.canvas, "manager", None) is not None:
        pyplot.close(fig)
    return image


def get_image_grid_numpy(
    input_data: Any,
    target_data: Any,
    outputs: Any,
    classes: Sequence[str],
    batch_size: Optional[int] = None,
    fig_size: float = 3,
    clim: Optional[Sequence[float]] = None,
    cmap: Optional[str] = None,
) -> np.ndarray:
    """:func:`get_image_grid` rendered by :func:`fig_to_image`: an RGBA ``uint8`` array.

    Arguments are those of :func:`get_image_grid`; the result has shape
    ``[height, width, 4]``.
    """
    return fig_to_image(
        get_image_grid(
            input_data, target_data, outputs, classes,
            batch_size=batch_size, fig_size=fig_size, clim=clim, cmap=cmap,
        )
    )


def get_fig_dict(
    input_data: Any,
    target_data: Any,
    outputs: Any,
    classes: Sequence[str],
    batch_size: Optional[int] = None,
    fig_size: float = 3,
    clim: Optional[Sequence[float]] = None,
    colorbar: bool = True,
    colorbar_size: float = 0.1,
    gt_clim: Optional[Sequence[float]] = (0, 1),
) -> dict[str, "Figure"]:
    """One figure per class comparing input, target and prediction.

    Each figure has one row per sample (the first ``batch_size`` samples, all
    by default) and three columns: input (first channel), target and
    prediction for that class.  For 3-D data the middle z slice is shown.
    NaN voxels are drawn as grey stripes (as in :mod:`cellmap_data.presentation.plot`).

    Args:
        input_data: ``[B, C_in, (z,) y, x]`` tensor or array.
        target_data: ``[B, C, (z,) y, x]``, channel ``i`` is ``classes[i]``.
        outputs: predictions, same layout as ``target_data``.
        classes: class names, one per target channel.
        batch_size: maximum number of samples (rows) to show.
        fig_size: size in inches of each panel.
        clim: colour limits of the prediction panels (auto if None).
        colorbar: draw a colour bar next to each panel.
        colorbar_size: fraction of a panel's width given to its colour bar.
        gt_clim: colour limits of the target panels.

    Raises:
        ValueError: inconsistent batch sizes or channel counts.
    """
    inputs, targets, predictions, rows = _batch_arrays(input_data, target_data, outputs, classes, batch_size)
    figures = {}
    for class_index, class_name in enumerate(classes):
        fig = _new_figure((3 * fig_size, rows * fig_size), layout=None)
        axes = fig.subplots(rows, 3, squeeze=False)
        for row in range(rows):
            panels = (
                (_middle_slice(inputs[row, 0]), "gray", None, "Input"),
                (_middle_slice(targets[row, class_index]), "viridis", gt_clim, "Target"),
                (_middle_slice(predictions[row, class_index]), "viridis", clim, "Prediction"),
            )
            for column, (image, cmap_name, limits, title) in enumerate(panels):
                ax = axes[row, column]
                _show(fig, ax, image, cmap_name, limits, colorbar, colorbar_size)
                if row == 0:
                    ax.set_title(title if column == 0 else f"{title}: {class_name}")
            axes[row, 0].set_ylabel(f"sample {row}")
        figures[class_name] = fig
    return figures


def get_image_dict(
    input_data: Any,
    target_data: Any,
    outputs: Any,
    classes: Sequence[str],
    batch_size: Optional[int] = None,
    fig_size: float = 3,
    clim: Optional[Sequence[float]] = None,
    colorbar: bool = True,
) -> dict[str, np.ndarray]:
    """:func:`get_fig_dict`'s figures rendered by :func:`fig_to_image`.

    Returns ``{class: uint8 RGBA array [height, width, 4]}``, one image per
    class; the arguments are those of :func:`get_fig_dict`.

    Raises:
        ValueError: inconsistent batch sizes or channel counts.
    """
    figures = get_fig_dict(
        input_data, target_data, outputs, classes,
        batch_size=batch_size, fig_size=fig_size, clim=clim, colorbar=colorbar,
    )
    return {name: fig_to_image(figure) for name, figure in figures.items()}
