"""cellmap_data.presentation.plot: every figure renders (Agg) to a non-blank image of the
documented size and layout, unknown (NaN) voxels look different from background, and bad input
is a ValueError."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
pl = pytest.importorskip("polars")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cellmap_data import CellMapDataLoader, CellMapDataSplit, CellMapDataset, CellMapMultiDataset  # noqa: E402
from cellmap_data.presentation import plot  # noqa: E402
from cellmap_data.utils.figs import get_fig_dict  # noqa: E402

INPUTS = {"input": {"shape": (1, 12, 12), "scale": (8, 8, 8)}}
TARGETS = {"output": {"shape": (1, 8, 8), "scale": (8, 8, 8)}}


# -- helpers ------------------------------------------------------------------------------------
def render(fig: Figure) -> np.ndarray:
    """The figure drawn by Agg, as an RGBA array; it must not be blank."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba()).copy()
    width, height = fig.get_size_inches() * fig.dpi
    assert rgba.shape == (round(height), round(width), 4)
    colours = np.unique(np.ascontiguousarray(rgba).view(np.uint32))
    assert len(colours) > 10, "the figure is blank or uniform"
    return rgba


def panel_pixels(rgba: np.ndarray, ax) -> np.ndarray:
    """The pixels inside an axes (rendered figure, origin at the top)."""
    box = ax.get_window_extent()
    height = rgba.shape[0]
    return rgba[height - int(box.y1) + 2: height - int(box.y0) - 2, int(box.x0) + 2: int(box.x1) - 2]


def rectangles(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def batch_2d(batch_size: int = 3, classes: int = 2, size: int = 16) -> dict:
    generator = torch.Generator().manual_seed(0)
    raw = torch.linspace(0, 1, size).repeat(batch_size, 1, size, 1)
    targets = (torch.rand(batch_size, classes, size, size, generator=generator) > 0.5).float()
    targets[:, -1, : size // 2] = math.nan
    return {"idx": torch.arange(batch_size) + 10, "input": raw, "output": targets}


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(tiny_data):
    """One 2-D dataset per crop of the tiny synthetic data (pad=True), with its usage."""
    out = []
    for synthetic in tiny_data.datasets:
        for crop in synthetic.crops:
            dataset = CellMapDataset(str(synthetic.raw_path), crop.target_path, tiny_data.classes, INPUTS, TARGETS, pad=True)
            out.append((dataset, crop))
    return out


@pytest.fixture(scope="module")
def multi(tiny_data, datasets):
    return CellMapMultiDataset([d for d, _ in datasets], tiny_data.classes, INPUTS, TARGETS)


@pytest.fixture(scope="module")
def stats(multi):
    return multi.stats()


@pytest.fixture(scope="module")
def metadata(datasets):
    """Per-sample metadata of 40 samples drawn from the crops, in the loader's schema."""
    rng = np.random.default_rng(1)
    rows = []
    for k in range(40):
        dataset, _ = datasets[k % len(datasets)]
        i = int(rng.integers(len(dataset)))
        centre = dataset.get_center(i)
        rows.append({
            "dataset": dataset.raw_path, "crop": dataset.target_path, "idx": i,
            **{f"centre_{a}": centre[a] + float(rng.normal(0, 8)) for a in "zyx"},
            "mirror_z": False, "mirror_y": False, "mirror_x": bool(rng.integers(2)),
            "transpose_z": 0, "transpose_y": 1, "transpose_x": 2,
            "rotate_z": float(rng.uniform(-180, 180)), "rotate_y": 0.0, "rotate_x": 0.0,
            "value_seed": int(rng.integers(2**62)),
        })
    return pl.DataFrame(rows)


# -- module -------------------------------------------------------------------------------------
def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, cellmap_data.presentation.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr


def test_public_functions_have_docstrings():
    for name in plot.__all__:
        assert (getattr(plot, name).__doc__ or "").strip(), name


# -- sample_grid --------------------------------------------------------------------------------
def test_sample_grid_of_a_2d_batch_has_a_row_per_sample_and_a_column_per_class():
    fig = plot.sample_grid(batch_2d(3, 2), classes=["mito", "nuc"])
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * 3
    np.testing.assert_allclose(fig.get_size_inches(), [2 * 3, 2 * 3])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input", "mito", "nuc"]
    assert fig.axes[0].get_ylabel() == "sample 10"
    render(fig)


def test_sample_grid_takes_indices_n_figsize_and_combined():
    batch = batch_2d(5, 3)
    fig = plot.sample_grid(batch, [4, 1], figsize=(5, 3), combined=True)
    assert len(fig.axes) == 2 * 2
    np.testing.assert_allclose(fig.get_size_inches(), [5, 3])
    assert fig.axes[0].get_ylabel() == "sample 14"
    render(fig)
    assert len(plot.sample_grid(batch, n=2).axes) == 2 * 4


def test_sample_grid_of_a_3d_batch_shows_the_middle_slice_across_the_axis():
    raw = torch.zeros(2, 1, 5, 6, 7)
    raw[:, :, 2] = 1.0  # the middle z slice
    raw[:, :, :, 3] += 2.0  # the middle y slice
    batch = {"idx": torch.arange(2), "raw": raw, "labels": torch.ones(2, 1, 5, 6, 7)}
    fig = plot.sample_grid(batch)
    shown = np.ma.getdata(fig.axes[0].images[0].get_array())
    assert shown.shape == (6, 7) and np.all(shown[np.arange(6) != 3] == 1.0)
    render(fig)
    fig = plot.sample_grid(batch, slice_axis="y")
    shown = np.ma.getdata(fig.axes[0].images[0].get_array())
    assert shown.shape == (5, 7) and np.all(shown >= 2.0)
    render(fig)


def test_sample_grid_shows_unknown_labels_differently_from_background():
    raw = torch.linspace(0, 1, 16).repeat(1, 1, 16, 1)
    figures = {}
    for name, value in (("zero", 0.0), ("nan", math.nan)):
        fig = plot.sample_grid({"input": raw, "target": torch.full((1, 1, 16, 16), value)}, figsize=(4, 2.4))
        figures[name] = (fig, render(fig))
    (zero_fig, zero), (nan_fig, nan) = figures["zero"], figures["nan"]
    zero_raw, nan_raw = panel_pixels(zero, zero_fig.axes[0]), panel_pixels(nan, nan_fig.axes[0])
    np.testing.assert_array_equal(zero_raw, nan_raw)  # same raw panel
    zero_label, nan_label = panel_pixels(zero, zero_fig.axes[1]), panel_pixels(nan, nan_fig.axes[1])
    # a 0 label draws nothing over the raw (up to the panels' sub-pixel placement)
    size = tuple(min(a, b) for a, b in zip(zero_label.shape, zero_raw.shape))
    crop = (slice(0, size[0]), slice(0, size[1]))
    assert np.abs(zero_label[crop].astype(int) - zero_raw[crop].astype(int)).mean() < 2
    differs = np.any(zero_label != nan_label, axis=-1)
    assert differs.mean() > 0.5
    centre = tuple(s // 2 for s in differs.shape)
    assert not np.array_equal(zero_label[centre], nan_label[centre])


def test_sample_grid_of_a_dataset_reads_its_samples(multi, tiny_data):
    fig = plot.sample_grid(multi, [0, len(multi) - 1], classes=["nuc", "mito"])
    assert len(fig.axes) == 2 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input", "nuc", "mito"]
    render(fig)
    fig = plot.sample_grid(multi, n=2, combined=True)
    assert len(fig.axes) == 2 * 2
    np.testing.assert_allclose(fig.get_size_inches(), [4, 4])
    render(fig)


def test_sample_grid_of_a_3d_dataset(tiny_data):
    synthetic = tiny_data.datasets[0]
    dataset = CellMapDataset(
        str(synthetic.raw_path), synthetic.crops[0].target_path, tiny_data.classes,
        {"input": {"shape": (6, 12, 12), "scale": (8, 8, 8)}}, {"output": {"shape": (6, 12, 12), "scale": (4, 4, 4)}},
        pad=True,
    )
    fig = plot.sample_grid(dataset, n=2, classes=["mito"], slice_axis="x")
    assert len(fig.axes) == 2 * 2
    overlay = fig.axes[1].images[-1]
    left, right, bottom, top = overlay.get_extent()
    assert right - left == pytest.approx(6.0) and bottom - top == pytest.approx(3.0)  # 4 nm over 8 nm
    render(fig)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_grid_of_a_cuda_batch():
    batch = {k: v.cuda() for k, v in batch_2d(2, 2).items()}
    render(plot.sample_grid(batch))


def test_sample_grid_rejects_bad_input(multi):
    with pytest.raises(ValueError, match="unknown class 'golgi'"):
        plot.sample_grid(multi, [0], classes=["golgi"])
    with pytest.raises(ValueError, match="2 channels but 3 classes"):
        plot.sample_grid(batch_2d(2, 2), classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="slice_axis"):
        plot.sample_grid(batch_2d(), slice_axis="t")
    with pytest.raises(ValueError, match="no array 'missing'"):
        plot.sample_grid(batch_2d(), input_key="missing")
    with pytest.raises(ValueError, match="outside the batch"):
        plot.sample_grid(batch_2d(2), [5])
    with pytest.raises(ValueError, match="batch dict or a dataset"):
        plot.sample_grid(42)


# -- class_balance ------------------------------------------------------------------------------
def test_class_balance_bars_are_the_summed_foreground_and_the_annotation_counts(stats, tiny_data):
    fig = plot.class_balance(stats)
    assert len(fig.axes) == 2
    value_ax, count_ax = fig.axes
    expected = stats.filter(pl.col("annotated")).group_by("class").agg(pl.col("foreground_voxels").sum())
    expected = dict(expected.iter_rows())
    heights = [r.get_height() for r in rectangles(value_ax)][: len(tiny_data.classes)]
    assert heights == pytest.approx([expected.get(c, 0.0) for c in tiny_data.classes])
    annotating = [sum(c in crop.classes for crop in tiny_data.crops) for c in tiny_data.classes]
    bars = rectangles(count_ax)
    assert [r.get_height() for r in bars[: len(annotating)]] == annotating
    assert [r.get_height() for r in bars[len(annotating): 2 * len(annotating)]] == [
        len(tiny_data.crops) - n for n in annotating
    ]
    width = max(4.0, 1.5 + 0.6 * len(tiny_data.classes) + 0.12 * len(tiny_data.classes))
    np.testing.assert_allclose(fig.get_size_inches(), [2 * width, 4.0])
    render(fig)


def test_class_balance_by_crop_fraction_log_and_split_table(stats, datasets, tiny_data):
    fig = plot.class_balance(stats, by="crop", value="fraction", log=True, figsize=(9, 3))
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    np.testing.assert_allclose(fig.get_size_inches(), [9, 3])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [c.name for _, c in datasets]
    render(fig)
    split = CellMapDataSplit(INPUTS, TARGETS, tiny_data.classes, True, datasets={
        "train": [d for d, c in datasets if c.usage == "train"],
        "validate": [d for d, c in datasets if c.usage != "train"],
    })
    split_stats = split.stats()
    render(plot.class_balance(split_stats, by="dataset"))
    fig = plot.class_balance(split_stats)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["train", "validate"]
    render(fig)


def test_class_balance_draws_into_given_axes(stats):
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    assert plot.class_balance(stats, ax=ax) is fig
    assert len(fig.axes) == 1 and rectangles(ax)
    render(fig)
    fig = Figure(figsize=(8, 3))
    axes = fig.subplots(1, 2)
    assert plot.class_balance(stats, ax=list(axes)) is fig and len(fig.axes) == 2


def test_class_balance_rejects_bad_input(stats):
    with pytest.raises(ValueError, match="value must be one of"):
        plot.class_balance(stats, value="weights")
    with pytest.raises(ValueError, match="by must be one of"):
        plot.class_balance(stats, by="organelle")
    with pytest.raises(ValueError, match="empty"):
        plot.class_balance(stats.clear())
    with pytest.raises(ValueError, match="polars DataFrame"):
        plot.class_balance(stats.to_dicts())
    with pytest.raises(ValueError, match="lacks the column"):
        plot.class_balance(stats.drop("annotated"))


# -- crop_locations -----------------------------------------------------------------------------
def test_crop_locations_of_one_dataset_draws_its_box(datasets):
    dataset, crop = datasets[0]
    fig = plot.crop_locations(dataset)
    assert len(fig.axes) == 1
    np.testing.assert_allclose(fig.get_size_inches(), [4, 4])
    (box,) = rectangles(fig.axes[0])
    bounds = dataset.bounding_box
    assert box.get_xy() == pytest.approx((bounds["x"][0], bounds["y"][0]))
    assert (box.get_width(), box.get_height()) == pytest.approx(
        (bounds["x"][1] - bounds["x"][0], bounds["y"][1] - bounds["y"][0])
    )
    assert [t.get_text() for t in fig.axes[0].texts] == [crop.name]
    render(fig)


def test_crop_locations_of_a_multi_dataset_has_a_panel_per_raw_volume(multi, tiny_data):
    fig = plot.crop_locations(multi, axis="y", projection="max")
    assert len(fig.axes) == len(tiny_data.datasets)
    for ax, synthetic in zip(fig.axes, tiny_data.datasets):
        assert sorted(t.get_text() for t in ax.texts) == sorted(c.name for c in synthetic.crops)
        assert len(rectangles(ax)) == len(synthetic.crops)
        assert ax.get_xlabel() == "x (nm)" and ax.get_ylabel() == "z (nm)"
    render(fig)


def test_crop_locations_of_a_split_colours_boxes_by_usage(datasets, tiny_data):
    split = CellMapDataSplit(INPUTS, TARGETS, tiny_data.classes, True, datasets={
        "train": [d for d, c in datasets if c.usage == "train"],
        "validate": [d for d, c in datasets if c.usage != "train"],
    })
    fig = plot.crop_locations(split, axis="x")
    colours = {tuple(np.round(r.get_edgecolor()[:3], 3)) for ax in fig.axes for r in rectangles(ax)}
    assert len(colours) == 2
    render(fig)


def test_crop_locations_draws_into_given_axes_and_rejects_bad_input(datasets, multi):
    fig = Figure(figsize=(3, 3))
    ax = fig.subplots()
    assert plot.crop_locations(datasets[0][0], ax=ax) is fig
    render(fig)
    with pytest.raises(ValueError, match="need 2 Axes"):
        plot.crop_locations(multi, ax=ax)
    with pytest.raises(ValueError, match="axis must be"):
        plot.crop_locations(multi, axis="w")
    with pytest.raises(ValueError, match="no datasets"):
        plot.crop_locations([])


# -- sampling_audit -----------------------------------------------------------------------------
def test_sampling_audit_panels(metadata, datasets):
    fig = plot.sampling_audit(metadata)
    assert len(fig.axes) == 3
    np.testing.assert_allclose(fig.get_size_inches(), [15, 4])
    crop_ax, centre_ax, rotation_ax = fig.axes
    assert sum(r.get_width() for r in rectangles(crop_ax)) == metadata.height
    assert sorted(t.get_text() for t in crop_ax.get_yticklabels()) == sorted(c.name for _, c in datasets)
    assert sum(len(c.get_offsets()) for c in centre_ax.collections) == metadata.height
    assert [t.get_text() for t in rotation_ax.get_legend().get_texts()] == ["rotate_z"]  # y and x are all 0
    render(fig)
    fig = plot.sampling_audit(metadata.with_columns(pl.lit(0.0).alias("rotate_z")))
    assert fig.axes[2].get_legend() is None and "every angle is 0" in fig.axes[2].texts[0].get_text()


def test_sampling_audit_with_stats_counts_samples_per_annotated_class(metadata, stats, datasets, tiny_data):
    fig = plot.sampling_audit(metadata, stats=stats)
    assert len(fig.axes) == 4
    np.testing.assert_allclose(fig.get_size_inches(), [11, 8])
    class_ax = fig.axes[3]
    classes_of = {d.target_path: c.classes for d, c in datasets}
    expected = [sum(cls in classes_of[crop] for crop in metadata["crop"]) for cls in tiny_data.classes]
    shares = [r.get_height() for r in rectangles(class_ax)]
    assert shares == pytest.approx([n / sum(expected) for n in expected])
    (uniform,) = class_ax.get_lines()
    assert uniform.get_ydata()[0] == pytest.approx(1 / len(tiny_data.classes))
    render(fig)


def test_sampling_audit_takes_per_sample_dicts(metadata):
    fig = plot.sampling_audit(metadata.to_dicts()[:5])
    assert len(fig.axes) == 3
    render(fig)


def test_sampling_audit_rejects_bad_input(metadata, stats):
    with pytest.raises(ValueError, match="empty"):
        plot.sampling_audit(metadata.clear())
    with pytest.raises(ValueError, match="lacks the column"):
        plot.sampling_audit(metadata.drop("centre_x"))
    with pytest.raises(ValueError, match="polars DataFrame"):
        plot.sampling_audit("metadata.parquet")
    with pytest.raises(ValueError, match="no crop of the metadata"):
        plot.sampling_audit(metadata.with_columns(pl.lit("/elsewhere/crop9").alias("crop")), stats=stats)


# -- the figures of cellmap_data.utils.figs share the drawing ---------------------------------------
def test_get_fig_dict_draws_unknown_voxels_as_sample_grid_does():
    targets = torch.full((1, 1, 8, 8), math.nan)
    fig = get_fig_dict(torch.rand(1, 1, 8, 8), targets, torch.rand(1, 1, 8, 8), ["nuc"], colorbar=False)["nuc"]
    data, stripes = fig.axes[1].images
    assert np.ma.getmaskarray(data.get_array()).all()
    expected = plot._unknown_rgba(np.ones((8, 8), dtype=bool))
    np.testing.assert_array_equal(stripes.get_array(), expected)
    render(fig)


def test_figures_show_as_png_in_a_notebook_without_pyplot(tiny_data):
    """Jupyter displays an object through ``_repr_png_`` when no matplotlib backend registered
    its own hook; the returned figures answer it with a real PNG."""
    from cellmap_data.presentation import plot

    rng = np.random.default_rng(0)
    batch = {"input": torch.from_numpy(rng.random((2, 1, 8, 8), dtype=np.float32)),
             "output": torch.from_numpy((rng.random((2, 2, 8, 8)) > 0.5).astype(np.float32))}
    png = plot.sample_grid(batch, classes=["mito", "er"])._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_sampling_audit_reads_the_plan_s_annotated_columns_without_stats(multi, stats, tiny_data):
    loader = CellMapDataLoader(multi, batch_size=4, iterations_per_epoch=10, weighted_sampler=True, seed=2)
    plan = loader.epoch_metadata()
    fig = plot.sampling_audit(plan)
    assert len(fig.axes) == 4
    shares = [r.get_height() for r in rectangles(fig.axes[3])]
    counts = [int((plan[f"annotated_{c}"] == "annotated").sum()) for c in tiny_data.classes]
    assert shares == pytest.approx([n / sum(counts) for n in counts])
    # The same shares the statistics table gives for these samples (the older way, a join).
    joined = plot.sampling_audit(plan.select(pl.exclude("^annotated_.*$")), stats=stats)
    assert [r.get_height() for r in rectangles(joined.axes[3])] == pytest.approx(shares)
    render(fig)


def test_sampling_audit_of_delivered_samples_shows_their_foreground(multi, tiny_data):
    loader = CellMapDataLoader(multi, batch_size=4, iterations_per_epoch=10, weighted_sampler=True, seed=2)
    for _ in loader:
        pass
    delivered = loader.consumed_metadata()
    fig = plot.sampling_audit(delivered)
    assert len(fig.axes) == 6
    np.testing.assert_allclose(fig.get_size_inches(), [16, 8])
    foreground_ax, none_ax = fig.axes[4], fig.axes[5]
    expected = []
    for c in tiny_data.classes:
        rows = delivered.filter(pl.col(f"annotated_{c}") == "annotated")
        expected.append(float(rows[f"fraction_{c}"].mean()) if rows.height else 0.0)
    assert [r.get_height() for r in rectangles(foreground_ax)] == pytest.approx(expected)
    empty = plot.no_foreground(delivered)
    by_hand = [not any(row[f"annotated_{c}"] == "annotated" and row[f"foreground_{c}"] > 0 for c in tiny_data.classes)
               for row in delivered.iter_rows(named=True)]
    assert empty.to_list() == by_hand
    assert [r.get_height() for r in rectangles(none_ax)] == pytest.approx([1 - np.mean(by_hand), np.mean(by_hand)])
    render(fig)
