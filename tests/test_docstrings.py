"""Every public class and function of the Python package, and every public method or property
of those classes, has a docstring (the API reference is generated from them)."""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any, Iterator

import pytest

import cellmap_data

PUBLIC_MODULES = ["cellmap_data", "cellmap_data.transforms", "cellmap_data.transforms.augment",
                  "cellmap_data.transforms.seeding", "cellmap_data.transforms.plan", "cellmap_data.utils",
                  "cellmap_data.presentation.plot", "cellmap_data.presentation.display",
                  "cellmap_data.presentation.formatting", "cellmap_data.batches",
                  "cellmap_data.exceptions",
                  # the reference's module layout (REFERENCE_API §1.1)
                  "cellmap_data.dataloader", "cellmap_data.dataset", "cellmap_data.dataset_writer",
                  "cellmap_data.datasplit", "cellmap_data.empty_image", "cellmap_data.image",
                  "cellmap_data.image_writer", "cellmap_data.multidataset", "cellmap_data.sampler",
                  "cellmap_data.utils.figs", "cellmap_data.utils.geometry", "cellmap_data.utils.metadata",
                  "cellmap_data.utils.misc"] + [
                  f"cellmap_data.transforms.augment.{m}" for m in
                  ("binarize", "gaussian_blur", "gaussian_noise", "nan_to_num", "normalize", "random_contrast", "random_gamma",
                   "missing_sections", "misalign", "defect_stripes")]


def _public_objects() -> Iterator[tuple[str, Any]]:
    seen: set[int] = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        yield module_name, module
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                # modules are walked on their own; constants and type aliases carry no docstring
                continue
            seen.add(id(obj))
            yield f"{module_name}.{name}", obj
            if inspect.isclass(obj):
                yield from _public_members(f"{module_name}.{name}", obj)


def _public_members(prefix: str, cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties the package defines on ``cls`` (not those it inherits
    from torch or the standard library)."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("cellmap_data"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                yield f"{prefix}.{name}", member


PUBLIC = list(_public_objects())


def test_walk_finds_the_reference_names():
    names = {name.rsplit(".", 1)[-1] for name, _ in PUBLIC}
    for expected in ["CellMapDataset", "CellMapMultiDataset", "CellMapDataLoader", "CellMapDataSplit",
                     "CellMapDatasetWriter", "CellMapImage", "EmptyImage", "ImageWriter", "CellMapSubset",
                     "ClassBalancedSampler", "split_target_path", "min_redundant_inds", "NaNtoNum", "Binarize",
                     "set_spatial_transforms", "verify", "to"]:
        assert expected in names


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_has_docstring(name, obj):
    doc = obj.__doc__ if isinstance(obj, (property, ModuleType)) else inspect.getdoc(obj)
    if inspect.isclass(obj) and doc is not None and obj.__doc__ is None:
        doc = None  # inherited from a base class: not this class's own
    assert doc and doc.strip(), f"{name} has no docstring"
