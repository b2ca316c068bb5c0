"""Many-crop benchmark: ``python -m cellmap_data bench --crops 6,48,144,400`` (in ``make bench``).

A training split of N label crops over N/4 volumes (``synthetic.make_many_crops_data``: two
rendered 512³ volumes at 8 nm, 64³ chunks, blosc-zstd, four ~150³ crops each, the other volumes
hard-linked copies) is read the way training scripts read it: ``CellMapDataSplit(csv_path=...)``
with the split's default value transforms → ``CellMapDataLoader(train_datasets_combined,
weighted_sampler=True, batch_size=8)``, 64³ raw + 4 classes at 8 nm, mirrored, transposed and
rotated about z. Each measurement runs in a fresh process and prints:

* samples/s after a warm-up (the loader's steady state), time to the first batch (from building
  the loader, the split already built), peak RSS;
* decoded bytes per sample, chunk-cache hit rate, label-crop cache use;
* the decode-bound floor those imply: decoded bytes per sample ÷ the single-core decode rate
  measured in the same process, times the engine threads.

With ``--reference PYTHON`` (the interpreter of a separate virtual environment where the reference
``cellmap-data`` release is installed; never a dependency of this project) the same split and
configuration are read through the reference's public API in its own process, interleaved with
this project's runs (ours, reference, ours, reference, ...), and the ratio is printed beside the
target. The reference's ``num_workers=2`` worker processes stand against two engine threads.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bench import TransformConfig, growth_between_halves

CROP_COUNTS = (6, 48, 144, 400)
CLASSES = ["mito", "er", "nuc", "ves"]
# Mirror and transpose in the plane, rotation about z: the configuration the crop table uses.
ROTATED = {"mirror": {"axes": {"x": 0.5, "y": 0.5}}, "transpose": {"axes": ["x", "y"]},
           "rotate": {"axes": {"z": [-180, 180]}}}


@dataclass(frozen=True)
class CropConfig(TransformConfig):
    """One loader configuration (input and target specs, augmentation) with the ratio to the
    reference the issue asks for (None: no ratio target) or an absolute samples/s target."""

    ratio_target: float | None = None
    samples_per_s_target: float | None = None


MAIN = CropConfig("3d-64-4cls-rotated", (64, 64, 64), (8, 8, 8), (64, 64, 64), (8, 8, 8), True)
# The head-to-head configurations at 6 crops, with their targets (ratio to the reference).
HEAD_TO_HEAD = (
    CropConfig("3d-64-4cls-plain", (64, 64, 64), (8, 8, 8), (64, 64, 64), (8, 8, 8), False, ratio_target=20),
    CropConfig("3d-64-4cls-rotated", (64, 64, 64), (8, 8, 8), (64, 64, 64), (8, 8, 8), True, ratio_target=25),
    CropConfig("2d-256-4cls", (1, 256, 256), (8, 8, 8), (1, 256, 256), (8, 8, 8), False, ratio_target=40),
    CropConfig("3d-128@16-in-64-out", (128, 128, 128), (16, 16, 16), (64, 64, 64), (8, 8, 8), False, ratio_target=25),
)
BIG = CropConfig("3d-128-4cls-rotated", (128, 128, 128), (8, 8, 8), (128, 128, 128), (8, 8, 8), True,
                 samples_per_s_target=150)
# Ratio targets of the crop table: at 144 crops >= 20x the reference, no size below 15x.
RATIO_AT_144, RATIO_ANY = 20.0, 15.0
FIRST_BATCH_AT_400 = 0.5  # seconds, after the split is built


def crops_data(crops: int, directory: Path | None = None) -> Any:
    """The many-crop split of ``crops`` crops (rendered once under ~/.cache, then linked)."""
    from .synthetic import make_many_crops_data

    root = Path(directory) if directory else (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cellmap-data" / "bench-crops")
    return make_many_crops_data(root, crops)


# -- one measurement, in its own process ----------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_ours(csv: str, config: CropConfig, warmup: int, batches: int, threads: int) -> dict[str, Any]:
    """This project's loader built as training scripts build it; see the module docstring."""
    import warnings

    from .. import _engine
    from ..datasplit import CellMapDataSplit
    from ..loader import CellMapDataLoader

    started = time.perf_counter()
    split = CellMapDataSplit(
        input_arrays={"input": {"shape": config.input_shape, "scale": config.input_scale}},
        target_arrays={"output": {"shape": config.target_shape, "scale": config.target_scale}},
        classes=CLASSES, pad=True, csv_path=csv, spatial_transforms=ROTATED if config.augment else None,
    )
    train = split.train_datasets_combined
    split_s = time.perf_counter() - started
    _engine.clear_cache()
    before = _engine.cache_stats()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the iterations_per_epoch note
        loader = CellMapDataLoader(train, classes=CLASSES, batch_size=8, num_workers=threads, weighted_sampler=True,
                                   iterations_per_epoch=1 + warmup + batches, is_train=True, seed=0)
    it = iter(loader)
    next(it)
    first_batch_s = time.perf_counter() - started
    for _ in range(warmup):
        next(it)
    warm = _engine.cache_stats()
    cpu_before = time.process_time()
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    after = _engine.cache_stats()
    samples = 8 * batches
    decoded = after.get("decoded_bytes", 0) - warm.get("decoded_bytes", 0)
    decode_ns = 1e9 * (after["decode_seconds"] - warm["decode_seconds"])
    total_decoded = after.get("decoded_bytes", 0) - before.get("decoded_bytes", 0)
    total_ns = 1e9 * (after["decode_seconds"] - before["decode_seconds"])
    hits, misses = after["hits"] - warm["hits"], after["misses"] - warm["misses"]
    # The single-core decode rate of this run (bytes decoded per second of one thread decoding).
    rate = total_decoded / (total_ns / 1e9) if total_ns else float("nan")
    per_sample = decoded / samples
    floor = threads * rate / per_sample if per_sample else float("inf")
    return {
        "samples_per_s": samples / seconds, "cpu_ms_per_sample": 1000 * cpu / samples,
        "first_batch_s": first_batch_s, "split_s": split_s,
        "peak_rss_mb": _peak_rss_mb(), "decoded_bytes_per_sample": per_sample, "decode_mb_per_s_one_core": rate / 1e6,
        "decode_floor_samples_per_s": floor, "hit_rate": hits / max(1, hits + misses),
        "cache_mb": after["bytes"] / 2**20, "cache_budget_mb": after["budget"] / 2**20,
        "label_cache_mb": after.get("label_bytes", 0) / 2**20, "label_budget_mb": after.get("label_budget", 0) / 2**20,
        "datasets": len(train.datasets), "threads": threads, "decode_s_per_sample": decode_ns / 1e9 / samples,
    }


# The reference side: its public API only, run by its own interpreter (it is never imported here).
REFERENCE_SCRIPT = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
from cellmap_data import CellMapDataLoader, CellMapDataSplit
args = json.loads(sys.argv[1])
c = args["config"]
started = time.perf_counter()
split = CellMapDataSplit(
    input_arrays={"input": {"shape": tuple(c["input_shape"]), "scale": tuple(c["input_scale"])}},
    target_arrays={"output": {"shape": tuple(c["target_shape"]), "scale": tuple(c["target_scale"])}},
    classes=args["classes"], pad=True, csv_path=args["csv"],
    spatial_transforms=args["augment"] if c["augment"] else None,
)
train = split.train_datasets_combined
split_s = time.perf_counter() - started
started = time.perf_counter()
# The reference counts iterations_per_epoch in samples with its weighted sampler.
loader = CellMapDataLoader(train, classes=args["classes"], batch_size=8, num_workers=args["threads"],
                           weighted_sampler=True, iterations_per_epoch=8 * (1 + args["warmup"] + args["batches"]),
                           is_train=True)
it = iter(loader.loader)
next(it)
first_batch_s = time.perf_counter() - started
for _ in range(args["warmup"]):
    next(it)
started = time.perf_counter()
for _ in range(args["batches"]):
    next(it)
seconds = time.perf_counter() - started
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
print(json.dumps({"samples_per_s": 8 * args["batches"] / seconds, "first_batch_s": first_batch_s, "split_s": split_s,
                  "peak_rss_mb": rss}))
"""


def _run_child(command: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_ours(csv: str, config: CropConfig, warmup: int, batches: int, threads: int, timeout: float = 1800) -> dict[str, Any]:
    args = json.dumps({"csv": csv, "config": asdict(config), "warmup": warmup, "batches": batches, "threads": threads})
    return _run_child([sys.executable, "-m", "cellmap_data.tools.bench_crops", args], timeout)


def run_reference(python: str, csv: str, config: CropConfig, warmup: int, batches: int, threads: int,
                  timeout: float = 3600) -> dict[str, Any]:
    args = json.dumps({"csv": csv, "config": asdict(config), "warmup": warmup, "batches": batches, "threads": threads,
                       "classes": CLASSES, "augment": ROTATED})
    # Isolated (-I): neither the working folder nor PYTHONPATH may put this project's package in
    # front of the reference's.
    return _run_child([python, "-I", "-c", REFERENCE_SCRIPT, args], timeout)


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def compare(csv: str, config: CropConfig, *, reference: str | None, repeat: int, threads: int,
            warmup: int = 40, batches: int = 120, ref_warmup: int = 3, ref_batches: int = 15) -> dict[str, Any]:
    """``repeat`` interleaved rounds (ours, reference) in fresh processes; medians. This project's
    loader is measured after ``warmup`` batches (its caches filled: the steady state of a training
    run); the reference has no cache to warm and runs at its steady rate from the start."""
    ours, theirs = [], []
    for _ in range(repeat):
        ours.append(run_ours(csv, config, warmup, batches, threads))
        if reference:
            theirs.append(run_reference(reference, csv, config, ref_warmup, ref_batches, threads))
    out: dict[str, Any] = {"ours": _median_of(ours)}
    if theirs:
        out["reference"] = _median_of(theirs)
        out["ratio"] = out["ours"]["samples_per_s"] / out["reference"]["samples_per_s"]
    return out


# -- memory over a long run ------------------------------------------------------------------------
SOAK_SLACK_MB = 600  # the bound: chunk-cache budget + label-cache budget + this
# Python's and torch's allocators move RSS by a few tens of MB either way between samples
# whatever the engine does; growth beyond this (plus the batches in flight) is a leak.
RSS_JITTER_MB = 32


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(csv: str, batches: int = 10_000, *, config: CropConfig = MAIN, threads: int = 2, batch_size: int = 8,
         every: int = 500, warmup: int | None = None) -> dict[str, Any]:
    """RSS against batches read over one long epoch of the many-crop loader (public API, split
    defaults), in this process: sampled every ``every`` batches with the two caches' bytes. The
    bound is the chunk-cache budget + the label-cache budget + ``SOAK_SLACK_MB``; after warm-up
    RSS net of the caches' bytes must stay flat: the median of the second half of the samples
    may exceed the median of the first half by at most the batches in flight (prefetch + 2
    batches) plus ``RSS_JITTER_MB`` (:func:`~cellmap_data.tools.bench.growth_between_halves`)."""
    import warnings

    from .. import _engine
    from ..datasplit import CellMapDataSplit
    from ..loader import CellMapDataLoader

    split = CellMapDataSplit(
        input_arrays={"input": {"shape": config.input_shape, "scale": config.input_scale}},
        target_arrays={"output": {"shape": config.target_shape, "scale": config.target_scale}},
        classes=CLASSES, pad=True, csv_path=csv, spatial_transforms=ROTATED if config.augment else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the iterations_per_epoch note
        loader = CellMapDataLoader(split.train_datasets_combined, classes=CLASSES, batch_size=batch_size,
                                   num_workers=threads, weighted_sampler=True, iterations_per_epoch=batches, seed=0)
    warmup = min(batches - 1, warmup if warmup is not None else max(every, batches // 10))
    curve: list[tuple[int, float, float, float, float]] = []
    started = time.perf_counter()
    for i, batch in enumerate(loader):
        del batch
        if i % every == 0 or i == batches - 1 or i == warmup:
            stats = _engine.cache_stats()
            rss, chunks, labels = _rss_mb(), stats["bytes"] / 2**20, stats["label_bytes"] / 2**20
            curve.append((i, round(rss, 1), round(chunks, 1), round(labels, 1), round(rss - chunks - labels, 1)))
    seconds = time.perf_counter() - started
    stats = _engine.cache_stats()
    voxels = [int(v) for v in config.input_shape]
    batch_mb = batch_size * (1 + len(CLASSES)) * voxels[0] * voxels[1] * voxels[2] * 4 / 2**20
    bound = stats["budget"] / 2**20 + stats["label_budget"] / 2**20 + SOAK_SLACK_MB
    growth = growth_between_halves([p[4] for p in curve if p[0] >= warmup])
    slack = (loader.prefetch + 2) * batch_mb + RSS_JITTER_MB
    return {"batches": batches, "seconds": seconds, "curve": curve, "warmup": warmup,
            "peak_rss_mb": max(p[1] for p in curve), "bound_mb": bound, "within_bound": max(p[1] for p in curve) <= bound,
            "net_of_caches_growth_mb": growth, "growth_bound_mb": slack, "flat": growth <= slack,
            "chunk_budget_mb": stats["budget"] / 2**20, "label_budget_mb": stats["label_budget"] / 2**20,
            "label_crops": stats["label_crops"], "label_misses": stats["label_misses"]}


def run(crop_counts: tuple[int, ...] = CROP_COUNTS, *, reference: str | None = None, repeat: int = 1, threads: int = 2,
        head_to_head: bool = True, data_dir: Path | None = None, batches: int = 120) -> dict[str, Any]:
    """The crop table (and, with ``head_to_head``, the 6-crop configurations), printed with their
    targets; returns the figures."""
    report: dict[str, Any] = {"crops": {}, "head_to_head": {}}
    print(f"many-crop split, {MAIN.name}, batch 8, {threads} engine threads; reference: {reference or 'not measured'}")
    print(f"{'crops':>6} {'samples/s':>10} {'ref':>7} {'ratio':>7} {'target':>7} {'first batch':>11} {'peak RSS':>9} "
          f"{'MB/sample':>9} {'hit rate':>8} {'floor':>8}")
    for n in crop_counts:
        data = crops_data(n, data_dir)
        # About two passes over the split's crops before measuring: the caches' steady state.
        warmup = max(40, 2 * n)
        r = compare(str(data.csv_path), MAIN, reference=reference, repeat=repeat, threads=threads, batches=batches,
                    warmup=warmup)
        report["crops"][n] = r
        o = r["ours"]
        target = RATIO_AT_144 if n == 144 else RATIO_ANY
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else "-"
        ref = f"{r['reference']['samples_per_s']:.1f}" if "reference" in r else "-"
        first = f"{o['first_batch_s']:.2f} s" + (f" (<= {FIRST_BATCH_AT_400})" if n == 400 else "")
        print(f"{n:>6} {o['samples_per_s']:>10.0f} {ref:>7} {ratio:>7} {'>=' + str(int(target)) + 'x':>7} {first:>11} "
              f"{o['peak_rss_mb'] / 1024:>7.2f} G {o['decoded_bytes_per_sample'] / 1e6:>9.2f} {o['hit_rate']:>8.2f} "
              f"{o['decode_floor_samples_per_s']:>8.0f}")
    if head_to_head:
        data = crops_data(6, data_dir)
        print(f"\nhead to head at 6 crops, {threads} engine threads")
        for config in (*HEAD_TO_HEAD, BIG):
            r = compare(str(data.csv_path), config, reference=reference if config.ratio_target else None,
                        repeat=repeat, threads=threads, batches=max(30, batches // (4 if config is BIG else 1)))
            report["head_to_head"][config.name + ("" if config.ratio_target else "-absolute")] = r
            o = r["ours"]
            if config.ratio_target:
                ratio = f"{r['ratio']:.1f}x (target >= {config.ratio_target:g}x)" if "ratio" in r else "reference not measured"
                ref = f", reference {r['reference']['samples_per_s']:.1f}" if "reference" in r else ""
                print(f"  {config.name:<22} {o['samples_per_s']:7.0f} samples/s{ref}: {ratio}")
            else:
                print(f"  {config.name:<22} {o['samples_per_s']:7.0f} samples/s (target >= {config.samples_per_s_target:g})")
    return report


def _config_from(fields: dict[str, Any]) -> CropConfig:
    """A configuration from its JSON form (lists back to tuples)."""
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return CropConfig(**values)


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    result = measure_ours(request["csv"], _config_from(request["config"]), request["warmup"], request["batches"],
                          request["threads"])
    print(json.dumps(result))
