"""Figures of (input, target, prediction) for logging training progress."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported lazily: it is slow to import.
    from matplotlib.figure import Figure

__all__ = ["get_fig_dict"]

# NaN voxels are drawn transparent over this background, so they read as grey.
NAN_BACKGROUND = "#b0b0b0"


def _to_numpy(data: Any) -> np.ndarray:
    """A float numpy copy of a tensor (any device) or array."""
    if hasattr(data, "detach"):
        data = data.detach().float().cpu().numpy()
    return np.asarray(data, dtype=np.float32)


def _middle_slice(image: np.ndarray) -> np.ndarray:
    """The middle z slice of a 3-D image; 2-D images as they are."""
    if image.ndim == 3:
        return image[image.shape[0] // 2]
    if image.ndim == 2:
        return image
    raise ValueError(f"expected a 2-D or 3-D image per sample and channel, got {image.shape}")


def _show(
    fig: "Figure",
    ax: Any,
    image: np.ndarray,
    cmap_name: str,
    clim: Optional[Sequence[float]],
    colorbar: bool,
    colorbar_size: float,
) -> None:
    from matplotlib import colormaps

    cmap = colormaps[cmap_name].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    ax.set_facecolor(NAN_BACKGROUND)
    vmin, vmax = (None, None) if clim is None else clim
    shown = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        fig.colorbar(shown, ax=ax, fraction=colorbar_size)


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
    NaN voxels are transparent over a grey background.

    Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot),
    so no GUI backend is needed and nothing is kept open globally.

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
    from matplotlib.figure import Figure

    inputs = _to_numpy(input_data)
    targets = _to_numpy(target_data)
    predictions = _to_numpy(outputs)
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

    rows = inputs.shape[0] if batch_size is None else min(batch_size, inputs.shape[0])
    figures = {}
    for class_index, class_name in enumerate(classes):
        fig = Figure(figsize=(3 * fig_size, rows * fig_size))
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
