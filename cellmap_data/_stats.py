"""Class counts, class weights and Polars statistics of datasets.

The engine does the counting: for every annotated (crop, class) label volume it takes the
foreground count from CellMap's ``complement_counts`` metadata when the label array carries it,
else from the count cache, else by scanning the label level chosen for the training voxel size
in parallel over its chunks (and caches the result). Counts are in *training-resolution*
voxels (the first target array's voxel size). User data is never written to.

The count cache lives in ``$CELLMAP_CACHE_DIR/counts`` when that variable is set, else
``$XDG_CACHE_HOME/cellmap-data/counts``, else ``~/.cache/cellmap-data/counts``; every function
takes ``cache_dir=`` (a folder, or ``False`` to neither read nor write the cache).

Functions take one ``CellMapDataset``, a sequence of them, or anything with a ``datasets``
attribute (a multi-dataset).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from . import _engine

__all__ = [
    "CLASS_WEIGHT_CAP",
    "class_counts",
    "class_weights",
    "crop_class_matrix",
    "default_cache_dir",
    "label_counts",
    "stats",
    "stats_for",
    "training_voxel_size",
]

#: Largest class weight; also the weight of a class annotated somewhere with no foreground.
CLASS_WEIGHT_CAP: float = float(_engine.CLASS_WEIGHT_CAP)

#: A progress bar appears when a count is still scanning after this many seconds.
PROGRESS_DELAY_S = 0.5


# -- datasets → engine entries ------------------------------------------------------------------
def _datasets(obj: Any) -> list[Any]:
    if hasattr(obj, "datasets") and not hasattr(obj, "target_template"):
        return list(obj.datasets)
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if hasattr(obj, "target_template"):
        return [obj]
    return list(obj)


def training_voxel_size(dataset: Any) -> list[float]:
    """Voxel size (z, y, x nm) counts are expressed in: the first target array's (else the
    first input array's) scale."""
    specs = dataset._targets or dataset._inputs
    return [float(v) for v in specs[0]["scale"]]


def _crop_label(dataset: Any) -> str:
    template = dataset.target_template or ""
    if "{label}" in template:
        prefix = template.split("{label}", 1)[0].rstrip("/\\")
        return prefix or template
    return os.path.dirname(template) or str(dataset.target_path)


def _label_path(dataset: Any, cls: str) -> str | None:
    if cls in dataset.annotated_classes and dataset.target_template:
        return dataset.target_template.format(label=cls)
    return None


def _entries(datasets: Iterable[Any]) -> list[tuple[str, str, str, str | None, list[float]]]:
    entries = []
    for ds in datasets:
        voxel_size = training_voxel_size(ds)
        crop = _crop_label(ds)
        for cls in ds.classes:
            entries.append((str(ds.raw_path), crop, cls, _label_path(ds, cls), voxel_size))
    return entries


def _cache_kwargs(cache_dir: Any) -> dict[str, Any]:
    if cache_dir is False:
        return {"use_cache": False}
    if cache_dir is None or cache_dir is True:
        return {}
    return {"cache_dir": os.fspath(cache_dir)}


def default_cache_dir() -> str | None:
    """The count cache folder used when ``cache_dir`` is not given (None: no cache)."""
    folder = _engine.default_count_cache_dir()
    return None if folder is None else os.fspath(folder)


# -- running an engine count with a progress bar ---------------------------------------------------
def _run_counting(call: Callable[..., Any], *args: Any, progress: bool, desc: str, **kwargs: Any) -> Any:
    """Runs ``call(*args, progress=handle, **kwargs)`` (which releases the GIL) on a helper
    thread while this thread draws a tqdm bar of scanned chunks; Ctrl-C cancels the count."""
    handle = _engine.CountProgress()
    if not progress:
        return call(*args, progress=handle, **kwargs)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = call(*args, progress=handle, **kwargs)
        except BaseException as error:  # re-raised on the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=work, name="cellmap-counts", daemon=True)
    start = time.monotonic()
    thread.start()
    bar = None
    try:
        while thread.is_alive():
            thread.join(0.1)
            total = handle.total
            if bar is None and total and time.monotonic() - start >= PROGRESS_DELAY_S and thread.is_alive():
                from tqdm.auto import tqdm

                bar = tqdm(total=total, desc=desc, unit="chunk", dynamic_ncols=True)
            if bar is not None:
                bar.total = handle.total
                bar.update(handle.done - bar.n)
    except KeyboardInterrupt:
        handle.cancel()
        thread.join()
        raise
    finally:
        if bar is not None:
            bar.total = handle.total
            bar.update(handle.done - bar.n)
            bar.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _to_polars(record_batch: Any) -> pl.DataFrame:
    import pyarrow as pa

    return pl.from_arrow(pa.record_batch(record_batch))  # type: ignore[return-value]


# -- public functions ---------------------------------------------------------------------------
def label_counts(
    path: str | os.PathLike[str],
    voxel_size: Sequence[float],
    *,
    cache_dir: Any = None,
    use_metadata: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Counts of one label group (``.../crop1/mito``) at the training ``voxel_size`` (z, y, x
    nm): ``foreground``, ``total`` (training-resolution voxels), ``level`` used, ``source``
    (``metadata``, ``metadata_s0``, ``cache`` or ``scan``), ``fraction``, ``weight``, ..."""
    return _run_counting(
        _engine.label_counts,
        os.fspath(path),
        [float(v) for v in voxel_size],
        progress=progress,
        desc=f"counting {os.path.basename(os.fspath(path))}",
        use_metadata=use_metadata,
        **_cache_kwargs(cache_dir),
    )


def stats_for(
    datasets: Any,
    *,
    cache_dir: Any = None,
    use_metadata: bool = True,
    progress: bool = True,
) -> pl.DataFrame:
    """One row per (dataset, crop, class) of every dataset: ``dataset`` (raw path), ``crop``,
    ``class``, ``annotated``, ``label_path``, ``level``, ``count_source``, ``voxel_size_*``,
    ``shape_*`` and world box ``box_lo_*`` / ``box_hi_*`` of the label level used,
    ``train_voxel_size_*``, ``foreground_voxels`` and ``total_voxels`` (training resolution),
    ``fraction`` and ``weight`` (background / foreground per crop, capped at :data:`CLASS_WEIGHT_CAP` so a
    crop without foreground stays plottable; ``class_weights`` gives the loss weights).
    Unannotated classes have zero counts and null geometry, fraction and weight."""
    entries = _entries(_datasets(datasets))
    batch = _run_counting(
        _engine.class_stats,
        entries,
        progress=progress,
        desc="counting labels",
        use_metadata=use_metadata,
        **_cache_kwargs(cache_dir),
    )
    return _to_polars(batch)


def stats(dataset: Any, **kwargs: Any) -> pl.DataFrame:
    """:func:`stats_for` of one dataset (see there for the columns)."""
    return stats_for(dataset, **kwargs)


def class_counts(dataset: Any, **kwargs: Any) -> dict[str, dict[str, float]]:
    """``{"totals": {class: foreground voxels}, "totals_total": {class: voxels}}`` summed over
    the crops, in training-resolution voxels; a class no crop annotates counts 0 and 0."""
    datasets = _datasets(dataset)
    classes: list[str] = []
    for ds in datasets:
        classes.extend(c for c in ds.classes if c not in classes)
    totals = {c: 0.0 for c in classes}
    totals_total = {c: 0.0 for c in classes}
    df = stats_for(datasets, **kwargs)
    if df.height:
        sums = df.group_by("class").agg(pl.col("foreground_voxels").sum(), pl.col("total_voxels").sum())
        for cls, fg, total in sums.iter_rows():
            totals[cls] = float(fg)
            totals_total[cls] = float(total)
    return {"totals": totals, "totals_total": totals_total}


def class_weights(counts: Mapping[str, Any], capped: bool = False) -> dict[str, float]:
    """``{class: background / foreground}`` from :func:`class_counts` output (background =
    total − foreground).

    By default these are the reference library's numbers, which training scripts feed to
    ``BCEWithLogitsLoss(pos_weight=...)``: ``background / max(foreground, 1)``, so a class
    annotated but never present gets its whole background count and a class never annotated
    gets 0. With ``capped=True``: at most :data:`CLASS_WEIGHT_CAP`, the cap for a class with
    background but no foreground, and 1 for a class never annotated."""
    totals = counts["totals"]
    totals_total = counts.get("totals_total", {})
    if capped:
        return {c: float(_engine.class_weight(float(fg), float(totals_total.get(c, 0.0)))) for c, fg in totals.items()}
    out = {}
    for c, fg in totals.items():
        background = max(float(totals_total.get(c, 0.0)) - float(fg), 0.0)
        out[c] = background / max(float(fg), 1.0)
    return out


def crop_class_matrix(dataset: Any) -> np.ndarray:
    """bool ``[n_datasets, n_classes]`` (``[1, n_classes]`` for one dataset): whether each
    dataset's crop annotates each of its classes (regardless of how much foreground)."""
    datasets = _datasets(dataset)
    if not datasets:
        return np.zeros((0, 0), dtype=bool)
    classes = list(datasets[0].classes)
    return np.array([[c in ds.annotated_classes for c in classes] for ds in datasets], dtype=bool).reshape(
        len(datasets), len(classes)
    )


class ClassWeights:
    """``class_weights`` and ``get_class_weights`` of a dataset-like object with ``class_counts``
    (mixed into the dataset classes)."""

    class_counts: Any

    @property
    def class_weights(self) -> dict[str, float]:
        """Per-class loss weights, background / max(foreground, 1) summed over the crops (the
        reference library's numbers; 0 for a class never annotated). See
        :meth:`get_class_weights` for the capped form."""
        return self.get_class_weights()

    def get_class_weights(self, capped: bool = False) -> dict[str, float]:
        """:attr:`class_weights`, or with ``capped=True`` at most ``CLASS_WEIGHT_CAP`` (also the
        weight of a class without foreground) and 1 for a class never annotated."""
        return class_weights(self.class_counts, capped=capped)
