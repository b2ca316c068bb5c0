"""Tests for cellmap_data.utils."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cellmap_data.utils import (
    array_has_singleton_dim,
    box_intersection,
    box_shape,
    box_union,
    get_fig_dict,
    get_sliced_shape,
    is_array_2D,
    longest_common_substring,
    min_redundant_inds,
    permute_singleton_dimension,
    split_target_path,
    torch_max_value,
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


def test_boxes_with_different_axes_are_rejected():
    with pytest.raises(ValueError):
        box_intersection({"x": (0, 1)}, {"y": (0, 1)})
    with pytest.raises(ValueError):
        box_union({"x": (0, 1)}, {"y": (0, 1)})


def test_box_shape_with_dict_and_sequence_scale():
    box = {"z": (0.0, 64.0), "y": (8.0, 40.0)}
    assert box_shape(box, {"z": 8.0, "y": 4.0}) == {"z": 8, "y": 8}
    assert box_shape(box, [8.0, 4.0]) == {"z": 8, "y": 8}


def test_box_shape_rounds_away_float_noise():
    assert box_shape({"x": (0.0, 0.3)}, [0.1]) == {"x": 3}


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
