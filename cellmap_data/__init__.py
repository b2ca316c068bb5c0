"""cellmap_data: training patches from OME-NGFF electron-microscopy volumes for PyTorch.

A Rust engine reads, resamples and augments patches a whole batch at a time (no worker
processes, no pickling, a bounded chunk cache); this package keeps the public API of the
``cellmap-data`` library so existing training scripts run unchanged.

Public classes are imported lazily so that ``import cellmap_data`` (and the ``synth`` command)
stays quick.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cellmap_data._lazy import lazy_attributes

try:
    __version__ = version("cellmap-data")
except PackageNotFoundError:  # running from a source tree
    __version__ = "uninstalled"

_LAZY = {
    # Each name from the module where the reference library defines it.
    "CellMapDatasetWriter": ".dataset_writer",
    "ImageWriter": ".image_writer",
    "CellMapImage": ".image",
    "EmptyImage": ".empty_image",
    "CellMapDataset": ".dataset",
    "CellMapError": ".exceptions",
    "CellMapMultiDataset": ".multidataset",
    "CellMapSubset": ".multidataset",
    "CellMapDataLoader": ".dataloader",
    "CellMapDataSplit": ".datasplit",
    "ClassBalancedSampler": ".sampler",
    "CellMapIterableDataset": ".loader",
    "set_coordinate_frame": "._config",
    "get_coordinate_frame": "._config",
    "configure_remote": ".remote",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
