"""Every public name of the reference ``cellmap-data`` library imports from the module where the
reference defines it, not only from the package root (REFERENCE_API section 1.1).

Scripts and the reference's own tests write ``from cellmap_data.dataloader import
CellMapDataLoader`` or ``from cellmap_data.utils.misc import split_target_path``; the list below
is the reference release's module layout, written down here so that the test does not depend on
this package's own ``__all__`` lists.
"""

from __future__ import annotations

import importlib

import pytest

# module -> public names the reference (2026.3.20.1935) defines there
REFERENCE_MODULES: dict[str, list[str]] = {
    "cellmap_data": [
        "CellMapDataLoader", "CellMapDataset", "CellMapDatasetWriter", "CellMapDataSplit", "CellMapImage",
        "ImageWriter", "CellMapMultiDataset", "EmptyImage", "ClassBalancedSampler", "__version__",
    ],
    "cellmap_data.dataloader": ["CellMapDataLoader"],
    "cellmap_data.dataset": ["CellMapDataset"],
    "cellmap_data.dataset_writer": ["CellMapDatasetWriter"],
    "cellmap_data.datasplit": ["CellMapDataSplit"],
    "cellmap_data.empty_image": ["EmptyImage"],
    "cellmap_data.image": ["CellMapImage"],
    "cellmap_data.image_writer": ["ImageWriter"],
    "cellmap_data.multidataset": ["CellMapMultiDataset"],
    "cellmap_data.sampler": ["ClassBalancedSampler"],
    "cellmap_data.transforms": [
        "augment", "GaussianNoise", "RandomContrast", "RandomGamma", "NaNtoNum", "Binarize", "GaussianBlur",
    ],
    "cellmap_data.transforms.augment": [
        "GaussianNoise", "RandomContrast", "RandomGamma", "NaNtoNum", "Binarize", "GaussianBlur",
    ],
    "cellmap_data.transforms.augment.binarize": ["Binarize"],
    "cellmap_data.transforms.augment.gaussian_blur": ["GaussianBlur"],
    "cellmap_data.transforms.augment.gaussian_noise": ["GaussianNoise"],
    "cellmap_data.transforms.augment.nan_to_num": ["NaNtoNum"],
    "cellmap_data.transforms.augment.random_contrast": ["RandomContrast"],
    "cellmap_data.transforms.augment.random_gamma": ["RandomGamma"],
    "cellmap_data.utils.figs": [
        "fig_to_image", "get_fig_dict", "get_image_dict", "get_image_grid", "get_image_grid_numpy",
    ],
    "cellmap_data.utils.geometry": ["box_intersection", "box_shape", "box_union"],
    "cellmap_data.utils.metadata": [
        "add_multiscale_metadata_levels", "create_multiscale_metadata", "find_level",
        "generate_base_multiscales_metadata", "write_metadata",
    ],
    "cellmap_data.utils.misc": [
        "array_has_singleton_dim", "expand_scale", "get_sliced_shape", "is_array_2D", "longest_common_substring",
        "min_redundant_inds", "permute_singleton_dimension", "split_target_path", "torch_max_value",
    ],
}
# What the reference's cellmap_data.utils re-exports (everything of figs, geometry, metadata and
# misc except misc.expand_scale, which this package re-exports too).
REFERENCE_UTILS_NAMES = [
    name for module in ("figs", "geometry", "metadata", "misc") for name in REFERENCE_MODULES[f"cellmap_data.utils.{module}"]
]
# Import paths the segmentation-challenge toolbox uses (REFERENCE_API section 1.1).
TOOLBOX_IMPORTS = [
    ("cellmap_data.transforms.augment", "NaNtoNum"),
    ("cellmap_data.transforms.augment", "Binarize"),
    ("cellmap_data.utils", "get_fig_dict"),
    ("cellmap_data.utils", "longest_common_substring"),
    ("cellmap_data.utils", "array_has_singleton_dim"),
    ("cellmap_data.utils", "is_array_2D"),
    ("cellmap_data.utils", "permute_singleton_dimension"),
]
# Where this package keeps the code (older import paths of this package, kept working).
HOME_MODULES = {
    "CellMapDataLoader": "cellmap_data.loader",
    "ClassBalancedSampler": "cellmap_data.loader",
    "CellMapDatasetWriter": "cellmap_data.writer",
    "ImageWriter": "cellmap_data.writer",
    "EmptyImage": "cellmap_data.image",
    "get_fig_dict": "cellmap_data.utils.figures",
    "split_target_path": "cellmap_data.utils.paths",
    "min_redundant_inds": "cellmap_data.utils.sampling",
    "is_array_2D": "cellmap_data.utils.shapes",
}

PAIRS = [(module, name) for module, names in REFERENCE_MODULES.items() for name in names]


@pytest.mark.parametrize(("module_name", "name"), PAIRS, ids=[f"{m}:{n}" for m, n in PAIRS])
def test_name_imports_from_its_reference_module(module_name, name):
    namespace: dict = {}
    exec(f"from {module_name} import {name}", namespace)
    assert namespace[name] is not None


@pytest.mark.parametrize(("module_name", "name"), PAIRS, ids=[f"{m}:{n}" for m, n in PAIRS])
def test_name_is_the_same_object_as_from_the_package_root_or_subpackage(module_name, name):
    value = getattr(importlib.import_module(module_name), name)
    if name == "augment":
        assert value is importlib.import_module("cellmap_data.transforms.augment")
        return
    if module_name.startswith("cellmap_data.utils"):
        root = importlib.import_module("cellmap_data.utils")
    elif module_name.startswith("cellmap_data.transforms"):
        root = importlib.import_module("cellmap_data.transforms")
    else:
        root = importlib.import_module("cellmap_data")
    assert getattr(root, name) is value


@pytest.mark.parametrize("module_name", sorted(REFERENCE_MODULES))
def test_star_import_of_each_module_gives_its_reference_names(module_name):
    namespace: dict = {}
    exec(f"from {module_name} import *", namespace)
    missing = [name for name in REFERENCE_MODULES[module_name] if name not in namespace and name != "__version__"]
    assert not missing, f"'from {module_name} import *' lacks {missing}"


@pytest.mark.parametrize("name", REFERENCE_UTILS_NAMES)
def test_utils_re_exports_every_helper(name):
    import cellmap_data.utils as utils

    assert name in utils.__all__
    assert callable(getattr(utils, name))


@pytest.mark.parametrize("module", ["figs", "geometry", "metadata", "misc"])
def test_utils_re_exports_everything_its_submodules_export(module):
    import cellmap_data.utils as utils

    submodule = importlib.import_module(f"cellmap_data.utils.{module}")
    for name in submodule.__all__:
        if name == "Box":  # a type alias, not a helper
            continue
        assert getattr(utils, name) is getattr(submodule, name), f"cellmap_data.utils.{name}"


@pytest.mark.parametrize(("module_name", "name"), TOOLBOX_IMPORTS, ids=[f"{m}:{n}" for m, n in TOOLBOX_IMPORTS])
def test_toolbox_import_lines_work(module_name, name):
    assert getattr(importlib.import_module(module_name), name) is not None


@pytest.mark.parametrize("name", sorted(HOME_MODULES))
def test_older_import_paths_of_this_package_still_work(name):
    value = getattr(importlib.import_module(HOME_MODULES[name]), name)
    assert value is getattr(importlib.import_module("cellmap_data.utils" if name[0].islower() else "cellmap_data"), name)


def test_normalize_and_nominal_upper_bound_stay_importable_from_augment():
    from cellmap_data.transforms import Normalize
    from cellmap_data.transforms.augment import Normalize as AugmentNormalize, nominal_upper_bound

    assert AugmentNormalize is Normalize and callable(nominal_upper_bound)


def test_augment_is_a_package_with_one_module_per_transform():
    augment = importlib.import_module("cellmap_data.transforms.augment")
    assert hasattr(augment, "__path__")  # a package, not a single module
    for module_name, names in REFERENCE_MODULES.items():
        if module_name.startswith("cellmap_data.transforms.augment."):
            (name,) = names
            assert getattr(importlib.import_module(module_name), name).__module__ == module_name


def test_thin_reference_modules_reject_unknown_names():
    dataloader = importlib.import_module("cellmap_data.dataloader")
    with pytest.raises(AttributeError):
        dataloader.NotAName  # noqa: B018
    assert "CellMapDataLoader" in dir(dataloader)
