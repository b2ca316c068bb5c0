"""Tests for cellmap_data.utils."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cellmap_data.utils import (
    add_multiscale_metadata_levels,
    array_has_singleton_dim,
    box_intersection,
    box_shape,
    box_union,
    create_multiscale_metadata,
    expand_scale,
    fig_to_image,
    find_level,
    generate_base_multiscales_metadata,
    get_fig_dict,
    get_image_dict,
    get_image_grid,
    get_image_grid_numpy,
    get_sliced_shape,
    is_array_2D,
    longest_common_substring,
    min_redundant_inds,
    permute_singleton_dimension,
    split_target_path,
    torch_max_value,
    write_metadata,
)

# --------------------------------------------------------------------------
# split_target_path
# --------------------------------------------------------------------------


def test_split_target_path_replaces_class_list_with_label_placeholder():
    path = "/d/x.zarr/recon-1/labels/groundtruth/crop234/[ecs,mito]"
    assert split_target_path(path) == (
        "/d/x.zarr/recon-1/labels/groundtruth/crop234/{label}",
        ["ecs", "mito"],
    )


def test_split_target_path_keeps_suffix_after_class_list():
    assert split_target_path("/d/crop/[a,b]/s0") == ("/d/crop/{label}/s0", ["a", "b"])


def test_split_target_path_strips_whitespace_around_names():
    assert split_target_path("/d/[ ecs , mito ]")[1] == ["ecs", "mito"]


def test_split_target_path_template_formats_to_class_paths():
    template, classes = split_target_path("/d/crop/[a,b]/s0")
    assert [template.format(label=name) for name in classes] == ["/d/crop/a/s0", "/d/crop/b/s0"]


def test_split_target_path_without_brackets_uses_last_component():
    assert split_target_path("/d/x.zarr/crop1/mito") == ("/d/x.zarr/crop1/mito", ["mito"])
    assert split_target_path("/d/x.zarr/crop1/mito/")[1] == ["mito"]


@pytest.mark.parametrize(
    "path",
    [
        "/d/[a,b",  # unbalanced
        "/d/a,b]",  # unbalanced
        "/d/[a,[b]]",  # nested
        "/d/]a,b[",  # reversed
        "/d/[a]/[b]",  # two groups
        "/d/[]",  # empty list
        "/d/[a,,b]",  # empty name
        "/d/[a, ]",  # blank name
    ],
)
def test_split_target_path_rejects_malformed_brackets_naming_the_path(path):
    with pytest.raises(ValueError, match="target path") as error:
        split_target_path(path)
    assert path in str(error.value)


# --------------------------------------------------------------------------
# is_array_2D and array_has_singleton_dim
# --------------------------------------------------------------------------

SPECS = {
    "raw": {"shape": [64, 64], "scale": [8, 8]},
    "labels": {"shape": [1, 64, 64], "scale": [8, 8, 8]},
    "volume": {"shape": [32, 32, 32], "scale": [8, 8, 8]},
}


def test_is_array_2D_for_single_spec():
    assert is_array_2D(SPECS["raw"]) is True
    assert is_array_2D(SPECS["labels"]) is False


def test_is_array_2D_for_dict_of_specs_returns_per_array_dict():
    assert is_array_2D(SPECS) == {"raw": True, "labels": False, "volume": False}


def test_is_array_2D_applies_summary():
    assert is_array_2D(SPECS, summary=any) is True
    assert is_array_2D(SPECS, summary=all) is False


@pytest.mark.parametrize("info", [None, {}])
def test_no_arrays_are_neither_2d_nor_singleton(info):
    assert is_array_2D(info) is False
    assert is_array_2D(info, summary=any) is False
    assert array_has_singleton_dim(info) is False
    assert array_has_singleton_dim(info, summary=False) is False


def test_is_array_2D_rejects_non_mapping():
    with pytest.raises(TypeError):
        is_array_2D([64, 64])


def test_array_has_singleton_dim_for_single_spec():
    assert array_has_singleton_dim(SPECS["labels"]) is True
    assert array_has_singleton_dim(SPECS["volume"]) is False


def test_array_has_singleton_dim_summary_true_means_any():
    assert array_has_singleton_dim(SPECS) is True
    assert array_has_singleton_dim({"v": SPECS["volume"]}) is False


def test_array_has_singleton_dim_applies_callable_summary():
    assert array_has_singleton_dim(SPECS, summary=all) is False


def test_array_has_singleton_dim_without_summary_returns_dict():
    assert array_has_singleton_dim(SPECS, summary=False) == {
        "raw": False,
        "labels": True,
        "volume": False,
    }


def test_array_named_shape_in_dict_of_specs_is_not_mistaken_for_a_spec():
    specs = {"shape": {"shape": [4, 4], "scale": [1, 1]}}
    assert is_array_2D(specs) == {"shape": True}


# --------------------------------------------------------------------------
# get_sliced_shape and permute_singleton_dimension
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("axis", "expected"), [(0, [1, 64, 32]), (1, [64, 1, 32]), (2, [64, 32, 1])]
)
def test_get_sliced_shape_inserts_singleton_into_2d_shape(axis, expected):
    assert get_sliced_shape((64, 32), axis) == expected


@pytest.mark.parametrize(
    ("axis", "expected"), [(0, [1, 64, 32]), (1, [64, 1, 32]), (2, [64, 32, 1])]
)
def test_get_sliced_shape_moves_singleton_of_3d_shape(axis, expected):
    assert get_sliced_shape([64, 32, 1], axis) == expected
    assert get_sliced_shape([1, 64, 32], axis) == expected


def test_get_sliced_shape_returns_list():
    assert isinstance(get_sliced_shape((1, 4, 4), 0), list)


@pytest.mark.parametrize(
    ("shape", "axis"), [([4, 4, 4], 0), ([4], 0), ([1, 2, 3, 4], 0), ([4, 4], 3), ([4, 4], -1)]
)
def test_get_sliced_shape_rejects_bad_input(shape, axis):
    with pytest.raises(ValueError):
        get_sliced_shape(shape, axis)


def test_permute_singleton_dimension_expands_2d_shape_and_scale_in_place():
    specs = {"raw": {"shape": [64, 32], "scale": [4, 4]}}
    assert permute_singleton_dimension(specs, 1) is None
    assert specs == {"raw": {"shape": [64, 1, 32], "scale": [4, 4, 4]}}


def test_permute_singleton_dimension_moves_scale_with_singleton_axis():
    spec = {"shape": [1, 64, 32], "scale": [40, 4, 8]}
    permute_singleton_dimension(spec, 2)
    assert spec == {"shape": [64, 32, 1], "scale": [4, 8, 40]}


def test_permute_singleton_dimension_handles_nested_dicts_and_missing_scale():
    specs = {"inputs": {"raw": {"shape": [8, 8]}}, "targets": {"gt": {"shape": [8, 8], "scale": [2, 2]}}}
    permute_singleton_dimension(specs, 0)
    assert specs == {
        "inputs": {"raw": {"shape": [1, 8, 8]}},
        "targets": {"gt": {"shape": [1, 8, 8], "scale": [2, 2, 2]}},
    }


@pytest.mark.parametrize(
    ("scale", "expected"),
    [([4, 8], [4, 4, 8]), ((2.0, 3.0), [2.0, 2.0, 3.0]), ([1, 2, 3], [1, 2, 3]), ([5], [5])],
)
def test_expand_scale_repeats_the_first_value_of_a_2d_scale(scale, expected):
    expanded = expand_scale(scale)
    assert expanded == expected and isinstance(expanded, list)


def test_expand_scale_returns_a_new_list():
    scale = [1, 2, 3]
    assert expand_scale(scale) is not scale


def test_permute_singleton_dimension_scale_matches_shape_length():
    spec = {"shape": [16, 16], "scale": [3.0, 3.0]}
    permute_singleton_dimension(spec, 2)
    assert len(spec["scale"]) == len(spec["shape"]) == 3


# --------------------------------------------------------------------------
# longest_common_substring and torch_max_value
# --------------------------------------------------------------------------


def test_longest_common_substring_finds_shared_run():
    assert longest_common_substring("/data/jrc_hela-2.zarr/raw", "/data/jrc_hela-3.zarr/raw") == (
        "/data/jrc_hela-"
    )


def test_longest_common_substring_empty_when_nothing_shared():
    assert longest_common_substring("abc", "xyz") == ""


def test_longest_common_substring_does_not_ignore_frequent_characters():
    a = "x" * 300 + "needle"
    b = "y" * 300 + "x" * 250
    assert longest_common_substring(a, b) == "x" * 250


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.uint8, 255),
        (torch.int8, 127),
        (torch.int16, 32767),
        (torch.int32, 2**31 - 1),
        (torch.int64, 2**63 - 1),
        (torch.float32, 1),
        (torch.float16, 1),
        (torch.float64, 1),
        (torch.bool, True),
    ],
)
def test_torch_max_value(dtype, expected):
    assert torch_max_value(dtype) == expected


def test_torch_max_value_rejects_complex():
    with pytest.raises(TypeError):
        torch_max_value(torch.complex64)


# --------------------------------------------------------------------------
# min_redundant_inds
# --------------------------------------------------------------------------


def test_min_redundant_inds_blocks_of_n_are_permutations():
    indices = min_redundant_inds(5, 13)
    assert indices.dtype == torch.long and indices.shape == (13,)
    assert sorted(indices[:5].tolist()) == list(range(5))
    assert sorted(indices[5:10].tolist()) == list(range(5))
    assert len(set(indices[10:].tolist())) == 3


@given(n=st.integers(1, 50), k=st.integers(0, 200))
def test_min_redundant_inds_counts_differ_by_at_most_one(n, k):
    counts = torch.bincount(min_redundant_inds(n, k), minlength=n)
    assert counts.max() - counts.min() <= 1 and counts.sum() == k


def test_min_redundant_inds_with_replacement_draws_independently():
    indices = min_redundant_inds(1000, 1000, replacement=True, rng=torch.Generator().manual_seed(0))
    assert indices.min() >= 0 and indices.max() <= 999
    # A permutation block would have no repeats; independent draws almost surely do.
    assert len(set(indices.tolist())) < 1000


def test_min_redundant_inds_rng_keyword_is_reproducible():
    first = min_redundant_inds(10, 25, rng=torch.Generator().manual_seed(3))
    second = min_redundant_inds(10, 25, rng=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_min_redundant_inds_accepts_generator_as_third_positional_argument():
    old_form = min_redundant_inds(10, 25, torch.Generator().manual_seed(3))
    new_form = min_redundant_inds(10, 25, replacement=False, rng=torch.Generator().manual_seed(3))
    assert torch.equal(old_form, new_form)


def test_min_redundant_inds_rejects_generator_given_twice():
    generator = torch.Generator()
    with pytest.raises(TypeError):
        min_redundant_inds(4, 4, generator, rng=generator)


def test_min_redundant_inds_rejects_empty_range():
    with pytest.raises(ValueError):
        min_redundant_inds(0, 5)


def test_min_redundant_inds_zero_samples_is_empty():
    assert min_redundant_inds(4, 0).shape == (0,)


# --------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------


def test_box_intersection_of_overlapping_boxes():
    a = {"z": (0, 10), "y": (0, 10)}
    b = {"z": (5, 20), "y": (-5, 3)}
    assert box_intersection(a, b) == {"z": (5, 10), "y": (0, 3)}


def test_box_intersection_none_when_disjoint_or_touching():
    assert box_intersection({"x": (0, 1)}, {"x": (2, 3)}) is None
    assert box_intersection({"x": (0, 1)}, {"x": (1, 3)}) is None


def test_box_union_is_bounding_box():
    assert box_union({"x": (0, 1), "y": (5, 6)}, {"x": (3, 4), "y": (-1, 0)}) == {
        "x": (0, 4),
        "y": (-1, 6),
    }


def test_box_intersection_skips_axes_missing_from_one_box():
    a = {"z": (0, 10), "y": (0, 10), "x": (0, 10)}
    b = {"y": (5, 20), "x": (-5, 3)}
    assert box_intersection(a, b) == {"y": (5, 10), "x": (0, 3)}
    assert box_intersection(b, a) == {"y": (5, 10), "x": (0, 3)}


def test_box_intersection_none_without_shared_axes():
    assert box_intersection({"x": (0, 1)}, {"y": (0, 1)}) is None
    assert box_intersection({}, {}) is None


def test_box_intersection_none_when_disjoint_on_a_shared_axis_only():
    assert box_intersection({"x": (0, 1), "y": (0, 5)}, {"x": (3, 4), "z": (0, 5)}) is None


def test_box_union_keeps_axes_present_in_one_box_only():
    union = box_union({"z": (0, 1), "x": (0, 2)}, {"x": (1, 5), "y": (-3, 3)})
    assert union == {"z": (0, 1), "x": (0, 5), "y": (-3, 3)}
    assert list(union) == ["z", "x", "y"]  # a's axes first, then b's others


def test_box_shape_with_dict_and_sequence_scale():
    box = {"z": (0.0, 64.0), "y": (8.0, 40.0)}
    assert box_shape(box, {"z": 8.0, "y": 4.0}) == {"z": 8, "y": 8}
    assert box_shape(box, [8.0, 4.0]) == {"z": 8, "y": 8}


def test_box_shape_rounds_away_float_noise():
    assert box_shape({"x": (0.0, 0.3)}, [0.1]) == {"x": 3}


def test_box_shape_is_at_least_one_voxel_per_axis():
    assert box_shape({"x": (5.0, 5.0), "y": (4.0, 0.0), "z": (0.0, 1.0)}, [8.0, 8.0, 8.0]) == {
        "x": 1,
        "y": 1,
        "z": 1,
    }


def test_box_shape_rejects_mismatched_or_non_positive_scale():
    with pytest.raises(ValueError):
        box_shape({"x": (0, 1)}, [1, 1])
    with pytest.raises(ValueError):
        box_shape({"x": (0, 1)}, {"y": 1})
    with pytest.raises(ValueError):
        box_shape({"x": (0, 1)}, [0])


# --------------------------------------------------------------------------
# get_fig_dict
# --------------------------------------------------------------------------


def render_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_get_fig_dict_2d_returns_one_rendering_figure_per_class():
    inputs = torch.rand(2, 1, 16, 16)
    targets = torch.randint(0, 2, (2, 2, 16, 16)).float()
    outputs = torch.rand(2, 2, 16, 16)
    figures = get_fig_dict(inputs, targets, outputs, ["ecs", "mito"])
    assert list(figures) == ["ecs", "mito"]
    for figure in figures.values():
        assert render_png(figure).startswith(b"\x89PNG")


def test_get_fig_dict_has_a_row_per_sample_and_three_columns():
    inputs = torch.rand(3, 1, 8, 8)
    targets = torch.rand(3, 1, 8, 8)
    figure = get_fig_dict(inputs, targets, targets, ["mito"], colorbar=False)["mito"]
    assert len(figure.axes) == 9
    assert figure.axes[1].get_title() == "Target: mito"


def test_get_fig_dict_limits_rows_to_batch_size():
    data = torch.rand(4, 1, 8, 8)
    figure = get_fig_dict(data, data, data, ["a"], batch_size=2, colorbar=False)["a"]
    assert len(figure.axes) == 6


def test_get_fig_dict_3d_shows_middle_slice_and_renders_nan():
    inputs = torch.zeros(1, 1, 5, 8, 8)
    inputs[:, :, 2] = 1.0  # only the middle slice is bright
    targets = torch.full((1, 1, 5, 8, 8), math.nan)
    figure = get_fig_dict(inputs, targets, torch.rand(1, 1, 5, 8, 8), ["nuc"], clim=(0, 1))["nuc"]
    shown_input = figure.axes[0].images[0].get_array()
    assert np.all(shown_input == 1.0)
    assert np.ma.getmaskarray(figure.axes[1].images[0].get_array()).all()  # NaN target masked
    assert len(render_png(figure)) > 0


def test_get_fig_dict_rejects_class_count_mismatch():
    data = torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError, match="classes"):
        get_fig_dict(data[:, :1], data, data, ["only_one"])


def test_get_fig_dict_squeezes_a_singleton_axis_of_a_slice():
    inputs = torch.zeros(1, 1, 6, 1, 8)  # a y-slice: (z, 1, x) per sample
    inputs[0, 0, :, 0, :] = torch.arange(8.0)
    figure = get_fig_dict(inputs, inputs, inputs, ["a"], colorbar=False)["a"]
    shown = np.asarray(figure.axes[0].images[0].get_array())
    np.testing.assert_array_equal(shown, np.tile(np.arange(8.0), (6, 1)))


# --------------------------------------------------------------------------
# get_image_grid, get_image_grid_numpy, get_image_dict, fig_to_image
# --------------------------------------------------------------------------


def shown_array(ax) -> np.ndarray:
    return np.ma.getdata(ax.images[0].get_array())


def test_get_image_grid_has_full_fov_raw_and_a_gt_and_prediction_column_per_class():
    inputs = torch.rand(2, 1, 16, 16)
    targets = torch.rand(2, 3, 16, 16)
    figure = get_image_grid(inputs, targets, targets, ["ecs", "mito", "nuc"])
    assert len(figure.axes) == 2 * (2 + 2 * 3)
    titles = [ax.get_title() for ax in figure.axes[:8]]
    assert titles == ["Full FOV", "Raw", "GT ecs", "Pred. ecs", "GT mito", "Pred. mito", "GT nuc", "Pred. nuc"]


def test_get_image_grid_panels_show_the_data():
    inputs = torch.rand(1, 1, 8, 8)
    targets = torch.rand(1, 2, 8, 8)
    outputs = torch.rand(1, 2, 8, 8)
    axes = get_image_grid(inputs, targets, outputs, ["a", "b"]).axes
    np.testing.assert_allclose(shown_array(axes[0]), inputs[0, 0].numpy())
    np.testing.assert_allclose(shown_array(axes[4]), targets[0, 1].numpy())
    np.testing.assert_allclose(shown_array(axes[5]), outputs[0, 1].numpy())


def test_get_image_grid_raw_panel_is_the_centred_output_window_of_the_input():
    inputs = torch.arange(20 * 24, dtype=torch.float32).reshape(1, 1, 20, 24)
    outputs = torch.rand(1, 1, 8, 12)
    axes = get_image_grid(inputs, outputs, outputs, ["a"]).axes
    # (20 - 8) // 2 = 6 rows and (24 - 12) // 2 = 6 columns are cut on each side
    np.testing.assert_allclose(shown_array(axes[1]), inputs[0, 0, 6:14, 6:18].numpy())
    (outline,) = axes[0].patches
    assert (outline.get_width(), outline.get_height()) == (12, 8)
    assert outline.get_xy() == (5.5, 5.5)  # pixel edges: centre of pixel 6 minus half a pixel


def test_get_image_grid_shows_middle_z_slice_of_3d_data_and_limits_rows():
    inputs = torch.zeros(3, 1, 5, 8, 8)
    inputs[:, :, 2] = 1.0
    figure = get_image_grid(inputs, inputs, inputs, ["a"], batch_size=2)
    assert len(figure.axes) == 2 * 4
    assert np.all(shown_array(figure.axes[0]) == 1.0)


def test_get_image_grid_size_follows_fig_size():
    data = torch.rand(2, 1, 8, 8)
    figure = get_image_grid(data, data, data, ["a"], fig_size=2)
    np.testing.assert_allclose(figure.get_size_inches(), [2 * 4, 2 * 2])


def test_fig_to_image_renders_rgba_pixels_of_the_figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 1), dpi=50, facecolor="red")
    image = fig_to_image(figure)
    assert image.dtype == np.uint8 and image.shape == (50, 100, 4)
    assert np.all(image == np.array([255, 0, 0, 255], dtype=np.uint8))


def test_fig_to_image_closes_a_pyplot_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(1, 1), dpi=20)
    number = figure.number
    assert fig_to_image(figure).shape == (20, 20, 4)
    assert not plt.fignum_exists(number)


def test_get_image_grid_numpy_is_the_grid_rendered():
    import matplotlib

    data = torch.rand(2, 2, 8, 8)
    image = get_image_grid_numpy(data[:, :1], data, data, ["a", "b"], fig_size=1)
    dpi = matplotlib.rcParams["figure.dpi"]
    assert image.dtype == np.uint8
    assert image.shape == (round(2 * dpi), round(6 * dpi), 4)


def test_get_image_dict_renders_one_image_per_class():
    import matplotlib

    data = torch.rand(2, 2, 8, 8)
    images = get_image_dict(data[:, :1], data, data, ["a", "b"], fig_size=1, colorbar=False)
    dpi = matplotlib.rcParams["figure.dpi"]
    assert list(images) == ["a", "b"]
    for image in images.values():
        # get_fig_dict: 3 panels of fig_size inches per row, one row per sample
        assert image.dtype == np.uint8 and image.shape == (round(2 * dpi), round(3 * dpi), 4)
        assert image[..., 3].min() == 255  # opaque


def test_image_helpers_reject_class_count_mismatch():
    data = torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError, match="classes"):
        get_image_grid(data[:, :1], data, data, ["only_one"])


# --------------------------------------------------------------------------
# OME-NGFF multiscales metadata
# --------------------------------------------------------------------------

AXES_ZYX = [
    {"name": "z", "type": "space", "unit": "nanometer"},
    {"name": "y", "type": "space", "unit": "nanometer"},
    {"name": "x", "type": "space", "unit": "nanometer"},
]


def test_generate_base_multiscales_metadata_is_ome_ngff_0_4():
    attrs = generate_base_multiscales_metadata(
        "/data/jrc_hela-2.zarr/recon-1/em/fibsem-uint8", 0, [8, 8, 8], [0, 4, 2], "nanometer", ["z", "y", "x"]
    )
    assert attrs == {
        "multiscales": [
            {
                "axes": AXES_ZYX,
                "coordinateTransformations": [{"scale": [1.0, 1.0, 1.0], "type": "scale"}],
                "datasets": [
                    {
                        "coordinateTransformations": [
                            {"scale": [8, 8, 8], "type": "scale"},
                            {"translation": [0, 4, 2], "type": "translation"},
                        ],
                        "path": "s0",
                    }
                ],
                "name": "/recon-1/em/fibsem-uint8",
                "version": "0.4",
            }
        ]
    }


def test_generate_base_multiscales_metadata_keeps_a_name_without_zarr_and_numbers_the_level():
    attrs = generate_base_multiscales_metadata("raw", 2, (4.0, 4.0), (0.0, 0.0), "nanometer", ("y", "x"))
    multiscale = attrs["multiscales"][0]
    assert multiscale["name"] == "raw"
    assert multiscale["datasets"][0]["path"] == "s2"
    assert multiscale["coordinateTransformations"] == [{"scale": [1.0, 1.0], "type": "scale"}]


def test_generate_base_multiscales_metadata_is_json_ready_for_numpy_values():
    attrs = generate_base_multiscales_metadata(
        "a.zarr/b", 0, np.array([8.0, 8.0, 8.0]), np.zeros(3), "nanometer", ["z", "y", "x"]
    )
    assert json.loads(json.dumps(attrs)) == attrs


def test_generate_base_multiscales_metadata_rejects_length_mismatch():
    with pytest.raises(ValueError, match="axes"):
        generate_base_multiscales_metadata("a", 0, [8, 8], [0, 0, 0], "nanometer", ["z", "y", "x"])


def level_transforms(attrs: dict) -> dict[str, tuple[list, list]]:
    """{path: (scale, translation)} of every level."""
    result = {}
    for dataset in attrs["multiscales"][0]["datasets"]:
        by_type = {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}
        result[dataset["path"]] = (by_type["scale"], by_type["translation"])
    return result


def test_add_multiscale_metadata_levels_doubles_voxels_and_shifts_by_half_voxels():
    attrs = generate_base_multiscales_metadata("img", 0, [4, 8, 8], [10, 0, 0], "nanometer", ["z", "y", "x"])
    returned = add_multiscale_metadata_levels(attrs, 0, 3)
    assert returned is attrs  # in place
    # Level n: voxel 2**n * base; the first voxel's centre moves by (2**n - 1) / 2 base voxels.
    assert level_transforms(attrs) == {
        "s0": ([4, 8, 8], [10, 0, 0]),
        "s1": ([8, 16, 16], [12.0, 4.0, 4.0]),
        "s2": ([16, 32, 32], [16.0, 12.0, 12.0]),
        "s3": ([32, 64, 64], [24.0, 28.0, 28.0]),
    }


def test_add_multiscale_metadata_levels_counts_from_the_base_level():
    attrs = generate_base_multiscales_metadata("img", 1, [8, 8, 8], [4, 4, 4], "nanometer", ["z", "y", "x"])
    add_multiscale_metadata_levels(attrs, 1, 2)
    assert level_transforms(attrs) == {
        "s1": ([8, 8, 8], [4, 4, 4]),
        "s2": ([16, 16, 16], [8.0, 8.0, 8.0]),
        "s3": ([32, 32, 32], [16.0, 16.0, 16.0]),
    }


def test_add_multiscale_metadata_levels_zero_levels_adds_nothing():
    attrs = generate_base_multiscales_metadata("img", 0, [8, 8, 8], [0, 0, 0], "nanometer", ["z", "y", "x"])
    add_multiscale_metadata_levels(attrs, 0, 0)
    assert list(level_transforms(attrs)) == ["s0"]


def test_create_multiscale_metadata_equals_base_plus_levels():
    created = create_multiscale_metadata("x.zarr/img", [8, 8, 8], [0, 0, 0], "nanometer", ["z", "y", "x"], 0, 2)
    expected = add_multiscale_metadata_levels(
        generate_base_multiscales_metadata("x.zarr/img", 0, [8, 8, 8], [0, 0, 0], "nanometer", ["z", "y", "x"]), 0, 2
    )
    assert created == expected
    assert list(level_transforms(created)) == ["s0", "s1", "s2"]


def test_create_multiscale_metadata_writes_json_to_out_path(tmp_path):
    out = tmp_path / "img" / ".zattrs"
    created = create_multiscale_metadata(
        "x.zarr/img", [8, 8, 8], [0, 0, 0], "nanometer", ["z", "y", "x"], levels_to_add=1, out_path=str(out)
    )
    assert json.loads(out.read_text()) == created
    assert level_transforms(created)["s1"] == ([16, 16, 16], [4.0, 4.0, 4.0])


def test_write_metadata_writes_indented_json_and_into_a_group_directory(tmp_path):
    attrs = {"multiscales": [{"version": "0.4"}]}
    file = tmp_path / "attrs.json"
    write_metadata(attrs, file)
    assert file.read_text() == json.dumps(attrs, indent=4)
    group = tmp_path / "group"
    group.mkdir()
    write_metadata(attrs, group)
    assert json.loads((group / ".zattrs").read_text()) == attrs


def write_group(path, levels, axes=AXES_ZYX, zarr_format=2):
    """A multiscale group with OME-NGFF metadata only (levels: [(path, scale)])."""
    path.mkdir(parents=True)
    multiscale = {
        "axes": axes,
        "datasets": [
            {"path": name, "coordinateTransformations": [{"type": "scale", "scale": scale}]} for name, scale in levels
        ],
        "version": "0.4",
    }
    if zarr_format == 2:
        (path / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        (path / ".zattrs").write_text(json.dumps({"multiscales": [multiscale]}))
    else:
        metadata = {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5", "multiscales": [multiscale]}}}
        (path / "zarr.json").write_text(json.dumps(metadata))
    return str(path)


PYRAMID = [("s0", [4, 4, 4]), ("s1", [8, 8, 8]), ("s2", [16, 16, 16]), ("s3", [32, 32, 32])]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ({"z": 4, "y": 4, "x": 4}, "s0"),  # exact match
        ({"z": 2, "y": 2, "x": 2}, "s0"),  # finer than every level: the finest
        ({"z": 7.9, "y": 7.9, "x": 7.9}, "s0"),  # never coarser than requested
        ({"z": 8, "y": 8, "x": 8}, "s1"),
        ({"z": 20, "y": 20, "x": 20}, "s2"),
        ({"z": 1000, "y": 1000, "x": 1000}, "s3"),  # coarser than every level: the coarsest
        ({"z": 8, "y": 32, "x": 32}, "s1"),  # the finest axis decides
    ],
)
def test_find_level_picks_the_coarsest_level_not_coarser_than_the_target(tmp_path, target, expected):
    assert find_level(write_group(tmp_path / "img", PYRAMID), target) == expected


def test_find_level_on_anisotropic_levels_compares_every_axis(tmp_path):
    levels = [("s0", [3.24, 4, 4]), ("s1", [6.48, 8, 8]), ("s2", [12.96, 16, 16])]
    group = write_group(tmp_path / "img", levels)
    assert find_level(group, {"z": 8, "y": 8, "x": 8}) == "s1"
    assert find_level(group, {"z": 6, "y": 16, "x": 16}) == "s0"


def test_find_level_ignores_float_noise_in_stored_scales(tmp_path):
    levels = [("s0", [4, 4, 4]), ("s1", [8.000000000001, 8, 8])]
    assert find_level(write_group(tmp_path / "img", levels), {"z": 8, "y": 8, "x": 8}) == "s1"


def test_find_level_skips_non_spatial_axes(tmp_path):
    axes = [{"name": "c", "type": "channel"}] + AXES_ZYX
    levels = [("s0", [1, 4, 4, 4]), ("s1", [1, 8, 8, 8])]
    assert find_level(write_group(tmp_path / "img", levels, axes=axes), {"z": 8, "y": 8, "x": 8}) == "s1"


def test_find_level_reads_zarr_v3_ome_metadata(tmp_path):
    group = write_group(tmp_path / "img", PYRAMID, zarr_format=3)
    assert find_level(group, {"z": 16, "y": 16, "x": 16}) == "s2"


def test_find_level_accepts_a_scale_sequence_in_axis_order(tmp_path):
    assert find_level(write_group(tmp_path / "img", PYRAMID), [8, 8, 8]) == "s1"


def test_find_level_on_metadata_written_by_create_multiscale_metadata(tmp_path):
    group = tmp_path / "out.zarr" / "img"
    create_multiscale_metadata(str(group), [4, 4, 4], [0, 0, 0], "nanometer", ["z", "y", "x"], 0, 3,
                               out_path=group / ".zattrs")
    assert find_level(str(group), {"z": 17, "y": 17, "x": 17}) == "s2"


def test_find_level_on_a_group_written_by_zarr_python(tmp_path):
    zarr = pytest.importorskip("zarr")
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="w", zarr_format=2)
    image = root.create_group("img")
    image.attrs.update(create_multiscale_metadata("d.zarr/img", [4, 4, 4], [0, 0, 0], "nanometer", ["z", "y", "x"], 0, 2))
    assert find_level(str(tmp_path / "d.zarr" / "img"), {"z": 9, "y": 9, "x": 9}) == "s1"


def test_find_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_level(str(tmp_path / "missing"), {"z": 8, "y": 8, "x": 8})
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="multiscales"):
        find_level(str(tmp_path / "plain"), {"z": 8, "y": 8, "x": 8})
    with pytest.raises(KeyError):
        find_level(write_group(tmp_path / "img", PYRAMID), {"y": 8, "x": 8})
