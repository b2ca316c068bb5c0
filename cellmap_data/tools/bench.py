"""Throughput benchmarks: ``python -m cellmap_data bench`` (``make bench`` builds release first).

For each configuration the engine's batch stream is timed with a cold cache and with a warm
cache, and compared, in the same run, with the bound it is measured against:

* decode-only time: the time the engine spent decoding the chunks the cold run touched
  (summed over threads, divided by the thread count);
* resample-only time: the warm run, where every chunk is already decoded;
* cold efficiency = (decode-only + resample-only) / cold time (target >= 0.7).

The loader end to end (torch tensors) is timed at 1 and 2 engine threads, with peak RSS, and
the way training scripts build it (``CellMapDataSplit(csv_path=...)`` with the split's default
value transforms) against the same without value transforms, interleaved (target: >= 0.9).
"""

from __future__ import annotations

import json
import os
import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUGMENT = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.5}},
    "transpose": {"axes": ["x", "y"]},
    "rotate": {"axes": {"z": [-180, 180], "y": [-15, 15], "x": [-15, 15]}},
}
BENCH_CLASSES = ["mito", "er", "nuc", "ves"]
# Elastic deformation as connectomics models train with it: control points 40 voxels apart,
# jitter of 2 voxels (8 nm voxels).
ELASTIC = {"control_point_spacing": [320, 320, 320], "jitter_sigma": [16, 16, 16]}
ELASTIC_BOUND = 1.5  # elastic may cost at most this many times the rotated-only time per sample


@dataclass
class Config:
    name: str
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    augment: bool
    batch_size: int = 8
    batches: int = 40
    target: float | None = None  # warm samples/s the issue asks for (2 cores)
    results: dict[str, Any] = field(default_factory=dict)


def default_configs(batches: int) -> list[Config]:
    return [
        Config("3d-64-4cls-plain", (64, 64, 64), (8, 8, 8), False, batches=batches),
        Config("3d-64-4cls-augmented", (64, 64, 64), (8, 8, 8), True, batches=batches, target=300),
        Config("3d-128-4cls-rotated", (128, 128, 128), (8, 8, 8), True, batches=max(4, batches // 4), target=40),
        Config("2d-256-4cls-augmented", (1, 256, 256), (8, 8, 8), True, batches=batches),
    ]


def _generated_once(root: Path, **options: Any) -> Any:
    """Synthetic data (seed 0, ``options`` for :func:`make_synthetic_data`) generated at ``root``
    once and reused afterwards (its description is pickled beside it)."""
    import pickle

    from .synthetic import make_synthetic_data

    description = root / "description.pickle"
    if description.exists():
        try:
            return pickle.loads(description.read_bytes())
        except Exception:  # an older layout: regenerate
            pass
    data = make_synthetic_data(root, seed=0, **options)
    description.write_bytes(pickle.dumps(data))
    return data


def _cache_folder(name: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cellmap-data" / name


def bench_data(directory: Path | None, size: str) -> Any:
    """Generates the benchmark dataset once (deterministic, seed 0) and reuses it afterwards."""
    return _generated_once(Path(directory) if directory else _cache_folder(f"bench-data-{size}"), size=size)


def build_datasets(data: Any, config: Config, location: Callable[[str], str] = str) -> list[Any]:
    """The training crops of the bench data as datasets; ``location`` maps each local path to
    where it is read from (a URL for the remote bench)."""
    from ..dataset import CellMapDataset

    out = []
    for ds in data.datasets:
        for crop in ds.crops:
            if crop.usage != "train":
                continue
            out.append(
                CellMapDataset(
                    location(str(ds.raw_path)), location(crop.target_path), BENCH_CLASSES,
                    {"raw": {"shape": config.shape, "scale": config.scale}},
                    {"gt": {"shape": config.shape, "scale": config.scale}},
                    pad=True, spatial_transforms=AUGMENT if config.augment else None, seed=0,
                )
            )
    return out


def _run_stream(collection: Any, batches: list, threads: int, augment: bool) -> float:
    start = time.perf_counter()
    for batch in collection.stream(batches, threads=threads, prefetch=4, seed=0, epoch=0, augment=augment):
        del batch
    return time.perf_counter() - start


def bench_engine(data: Any, config: Config, threads: int) -> dict[str, Any]:
    """Cold and warm engine throughput for one configuration, with its decode+resample bound."""
    from .. import _engine
    from ..multidataset import CellMapMultiDataset

    multi = CellMapMultiDataset(build_datasets(data, config), BENCH_CLASSES, None, None)
    collection = multi.engine_collection()
    n = config.batches * config.batch_size
    plan = [tuple(p) for p in collection.plan_uniform(n, True, 0, 0)]
    batches = [plan[i:i + config.batch_size] for i in range(0, n, config.batch_size)]
    _engine.clear_cache()
    cold = _run_stream(collection, batches, threads, config.augment)
    stats = _engine.cache_stats()
    decode_only = stats["decode_seconds"] / threads
    warm = min(_run_stream(collection, batches, threads, config.augment) for _ in range(2))
    voxels = n * (1 + len(BENCH_CLASSES)) * config.shape[0] * config.shape[1] * config.shape[2]
    bound = decode_only + warm
    return {
        "samples": n,
        "threads": threads,
        "cold_samples_per_s": n / cold,
        "warm_samples_per_s": n / warm,
        "warm_voxels_per_s": voxels / warm,
        "decode_only_s": decode_only,
        "resample_only_s": warm,
        "cold_s": cold,
        "cold_efficiency": bound / cold,
        "chunks_decoded": stats["misses"],
    }


def bench_loader(data: Any, config: Config, threads: int, batches: int, device: str | None = None) -> dict[str, Any]:
    """The loader end to end: torch tensors delivered per second (on ``device`` when given,
    waiting for the last copy to land), and peak RSS."""
    import torch

    from ..loader import CellMapDataLoader
    from ..multidataset import CellMapMultiDataset

    multi = CellMapMultiDataset(build_datasets(data, config), BENCH_CLASSES, None, None)
    loader = CellMapDataLoader(multi, batch_size=config.batch_size, num_workers=threads,
                               iterations_per_epoch=batches, weighted_sampler=True, seed=0, device=device)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    for _ in loader:  # warm the cache
        pass
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += batch["raw"].shape[0]
    if on_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"threads": threads, "device": device or "cpu", "batches_per_s": batches / elapsed, "samples_per_s": count / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


@dataclass(frozen=True)
class TransformConfig:
    """A public-API training configuration for the value-transform comparison."""

    name: str
    input_shape: tuple[int, int, int]
    input_scale: tuple[float, float, float]
    target_shape: tuple[int, int, int]
    target_scale: tuple[float, float, float]
    augment: bool


def transform_configs() -> list[TransformConfig]:
    return [
        TransformConfig("3d-64-4cls-plain", (64, 64, 64), (8, 8, 8), (64, 64, 64), (8, 8, 8), False),
        TransformConfig("3d-64-4cls-rotated", (64, 64, 64), (8, 8, 8), (64, 64, 64), (8, 8, 8), True),
        TransformConfig("2d-256-4cls", (1, 256, 256), (8, 8, 8), (1, 256, 256), (8, 8, 8), False),
        TransformConfig("3d-128@16-in-64-out", (128, 128, 128), (16, 16, 16), (64, 64, 64), (8, 8, 8), False),
    ]


def public_api_loader(data: Any, config: TransformConfig, threads: int, batches: int, *, defaults: bool = True,
                      raw_transforms: Any = "default", augment: dict[str, Any] | None = None) -> Any:
    """The loader the way training scripts build it: ``CellMapDataSplit(csv_path=...)`` →
    ``train_datasets_combined`` → ``CellMapDataLoader(weighted_sampler=True,
    iterations_per_epoch=...)``, batch 8, with the split's default value transforms
    (``defaults``) or none; ``raw_transforms`` replaces the raw ones; ``augment`` replaces the
    spatial transforms of an augmented config."""
    import warnings

    from ..datasplit import CellMapDataSplit
    from ..loader import CellMapDataLoader

    kwargs: dict[str, Any] = {}
    if not defaults:
        kwargs = {"train_raw_value_transforms": None, "val_raw_value_transforms": None, "target_value_transforms": None}
    if raw_transforms != "default":
        kwargs["train_raw_value_transforms"] = raw_transforms
    split = CellMapDataSplit(
        input_arrays={"input": {"shape": config.input_shape, "scale": config.input_scale}},
        target_arrays={"output": {"shape": config.target_shape, "scale": config.target_scale}},
        classes=BENCH_CLASSES, pad=True, csv_path=data.csv_path,
        spatial_transforms=(augment or AUGMENT) if config.augment else None, **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the iterations_per_epoch note
        return CellMapDataLoader(split.train_datasets_combined, classes=BENCH_CLASSES, batch_size=8, num_workers=threads,
                                 weighted_sampler=True, iterations_per_epoch=batches, is_train=True, seed=0)


def _seconds_per_epoch(loader: Any) -> float:
    start = time.perf_counter()
    for batch in loader:
        del batch
    return time.perf_counter() - start


def _interleaved_samples_per_s(loaders: dict[str, Any], batches: int, repeat: int) -> dict[str, float]:
    """Samples/s of each loader (batches of 8): an epoch each to warm the chunk cache, then
    ``repeat`` epochs interleaved (a, b, a, b, ...) so all see the same machine; medians."""
    for loader in loaders.values():
        _seconds_per_epoch(loader)
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeat):
        for name, loader in loaders.items():
            times[name].append(_seconds_per_epoch(loader))
    return {name: batches * 8 / statistics.median(t) for name, t in times.items()}


def bench_transforms(data: Any, threads: int = 2, batches: int = 20, repeat: int = 3) -> dict[str, Any]:
    """The split's default value transforms against none, through the public API, interleaved
    (identity, defaults, identity, defaults, ...) so both see the same machine; medians.
    Target: defaults >= 0.9 × identity throughput."""
    out: dict[str, Any] = {}
    for config in transform_configs():
        default = public_api_loader(data, config, threads, batches, defaults=True)
        rates = _interleaved_samples_per_s(
            {"identity": public_api_loader(data, config, threads, batches, defaults=False), "defaults": default},
            batches, repeat)
        ident, dflt = rates["identity"], rates["defaults"]
        plan = default.multi.datasets[0].value_transform_plan
        out[config.name] = {"identity_samples_per_s": ident, "defaults_samples_per_s": dflt, "ratio": dflt / ident,
                            "threads": threads, "plan": plan}
    return out


def bench_elastic(data: Any, threads: int = 2, batches: int = 20, repeat: int = 3) -> dict[str, Any]:
    """3D 64³ + 4 classes through the public API with the split's defaults: rotated (the bench's
    augmentation) against rotated + elastic, interleaved; medians. Bound: elastic costs at most
    ``ELASTIC_BOUND`` × the rotated-only time per sample."""
    config = next(c for c in transform_configs() if c.name == "3d-64-4cls-rotated")
    rates = _interleaved_samples_per_s({
        "rotated": public_api_loader(data, config, threads, batches),
        "elastic": public_api_loader(data, config, threads, batches, augment={**AUGMENT, "elastic": ELASTIC}),
    }, batches, repeat)
    rot, ela = rates["rotated"], rates["elastic"]
    return {"rotated_samples_per_s": rot, "elastic_samples_per_s": ela, "cost_ratio": rot / ela, "bound": ELASTIC_BOUND,
            "threads": threads, "elastic": ELASTIC}


def bench_transform_costs(data: Any, threads: int = 2, batches: int = 20, repeat: int = 3) -> dict[str, float]:
    """Per-batch cost (ms) of each standard raw transform run by the engine, over identity, on
    64³ + 4 classes plain, batch 8 (interleaved medians; noise on a shared machine is ± a few ms)."""
    import torchvision.transforms.v2 as T

    from ..transforms import Binarize, GaussianBlur, GaussianNoise, NaNtoNum, RandomContrast, RandomGamma

    config = transform_configs()[0]
    candidates = {
        "ToDtype(float32, scale=True)": T.ToDtype(__import__("torch").float32, scale=True),
        "NaNtoNum(nan=0)": NaNtoNum({"nan": 0, "posinf": None, "neginf": None}),
        "Binarize(0.5)": Binarize(0.5),
        "GaussianNoise(0, 0.1)": GaussianNoise(0.0, 0.1),
        "RandomContrast(0.5, 1.5)": RandomContrast((0.5, 1.5)),
        "RandomGamma(0.5, 1.5)": RandomGamma((0.5, 1.5)),
        "GaussianBlur(3, 1.0, dim=3)": GaussianBlur(3, 1.0, dim=3),
    }
    identity = public_api_loader(data, config, threads, batches, defaults=False)
    loaders = {name: public_api_loader(data, config, threads, batches, defaults=False, raw_transforms=t)
               for name, t in candidates.items()}
    _seconds_per_epoch(identity)
    times: dict[str, list[float]] = {name: [] for name in ["identity", *loaders]}
    for _ in range(repeat):
        times["identity"].append(_seconds_per_epoch(identity))
        for name, loader in loaders.items():
            times[name].append(_seconds_per_epoch(loader))
    base = statistics.median(times["identity"]) / batches
    return {name: 1000 * (statistics.median(times[name]) / batches - base) for name in loaders}


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# RSS moves by a few MB either way between samples whatever the engine does (Python's and
# torch's allocators, the loader's per-batch metadata): allowed on top of the soak's bounds.
SOAK_RSS_JITTER_MB = 8


def growth_between_halves(values: list[float]) -> float:
    """How much a series sampled over a run grew: the median of its second half minus the median
    of its first. Medians, so one sample caught mid-allocation decides nothing, while steady
    growth shows as the difference of the halves."""
    half = len(values) // 2
    return statistics.median(values[-half:]) - statistics.median(values[:half]) if half else 0.0


def bench_soak(data: Any, batches: int = 10_000, threads: int = 2, cache_mb: float = 256, *, batch_size: int = 8,
               shape: tuple[int, int, int] = (32, 32, 32), scale: tuple[float, float, float] = (8, 8, 8),
               warmup: int = 200, every: int = 500, seed: int = 0) -> dict[str, Any]:
    """Memory over a long run: RSS is sampled every ``every`` batches and compared with the bound
    (RSS after ``warmup`` batches + chunk-cache budget + (prefetch + 2) × batch size). The chunk
    cache fills towards its budget as new chunks are touched, so RSS net of the cache's bytes is
    reported too: it should stay flat (growth bound: (prefetch + 2) × batch size), judged by the
    median of the second half of the samples against the median of the first half. Both bounds
    allow ``SOAK_RSS_JITTER_MB`` besides. Augmented
    (mirror, transpose, rotation), class-balanced, one epoch of ``batches`` batches of
    ``batch_size`` patches of ``shape`` at ``scale`` with 4 classes. ``cache_mb`` may be a
    fraction (a budget smaller than one chunk thrashes the cache); the budget in force before is
    restored afterwards."""
    import warnings

    from .. import _engine
    from ..loader import CellMapDataLoader
    from ..multidataset import CellMapMultiDataset

    config = Config(f"soak-3d-{shape[-1]}-4cls-augmented", shape, scale, True, batch_size=batch_size)
    previous_budget = _engine.cache_stats()["budget"]
    budget = max(1, int(cache_mb * 2**20))
    _engine.set_cache_budget(budget)
    _engine.clear_cache()
    try:
        multi = CellMapMultiDataset(build_datasets(data, config), BENCH_CLASSES, None, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the iterations_per_epoch note (batches are counted here)
            loader = CellMapDataLoader(multi, batch_size=config.batch_size, num_workers=threads,
                                       iterations_per_epoch=batches, weighted_sampler=True, seed=seed)
        voxels = shape[0] * shape[1] * shape[2]
        batch_mb = config.batch_size * (1 + len(BENCH_CLASSES)) * voxels * 4 / 2**20
        warmup = min(warmup, batches - 1)
        curve = []
        baseline = None
        peak_cache = 0.0
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            del batch
            if i == warmup:
                baseline = current_rss_mb()
            if i % every == 0 or i == batches - 1 or i == warmup:
                cache = _engine.cache_stats()["bytes"] / 2**20
                peak_cache = max(peak_cache, cache)
                rss = current_rss_mb()
                curve.append((i, round(rss, 1), round(cache, 1), round(rss - cache, 1)))
        elapsed = time.perf_counter() - start
        stats = _engine.cache_stats()
    finally:
        _engine.set_cache_budget(previous_budget)
    baseline = baseline if baseline is not None else curve[0][1]
    slack = (loader.prefetch + 2) * batch_mb + SOAK_RSS_JITTER_MB
    bound = baseline + budget / 2**20 + slack
    after = [point for point in curve if point[0] >= warmup] or curve[-1:]
    peak_after_warmup = max(point[1] for point in after)
    net_growth = growth_between_halves([point[3] for point in after])
    return {"batches": batches, "samples": batches * config.batch_size, "batch_size": config.batch_size,
            "threads": threads, "prefetch": loader.prefetch, "seconds": elapsed, "curve": curve, "warmup_batches": warmup,
            "rss_after_warmup_mb": baseline, "peak_after_warmup_mb": peak_after_warmup, "bound_mb": bound,
            "within_bound": peak_after_warmup <= bound, "cache_budget_mb": budget / 2**20, "batch_mb": batch_mb,
            "peak_cache_mb": peak_cache, "cache_hits": stats["hits"], "cache_misses": stats["misses"],
            "net_of_cache_growth_mb": net_growth, "net_growth_bound_mb": slack,
            "pooled_batch_mb": _engine.pooled_batch_bytes() / 2**20, "live_batch_bytes_after": _engine.live_batch_bytes()}


def run(data_dir: Path | None = None, size: str = "bench", batches: int = 40, threads: list[int] | None = None,
        loader_threads: list[int] | None = None, out: Path | None = None, soak: int = 0, device: str | None = None,
        engine: bool = True, repeat: int = 1, transforms: bool = True) -> dict[str, Any]:
    from .. import _engine

    if not _engine.is_optimized_build():
        print("warning: the extension was built without optimisations (run `make bench`); figures are not representative")
    threads = threads or [os.cpu_count() or 1]
    repeat_transforms = max(3, repeat)
    loader_threads = loader_threads or [1, 2]
    started = time.perf_counter()
    data = bench_data(data_dir, size)
    print(f"data: {data.root} ({time.perf_counter() - started:.1f} s to prepare)")
    report: dict[str, Any] = {"engine": {}, "loader": {}}
    for config in default_configs(batches) if engine else []:
        for t in threads:
            runs = [bench_engine(data, config, t) for _ in range(repeat)]
            # Shared machines are noisy: each figure is the median over the repeats.
            r = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            r["repeats"] = repeat
            report["engine"][f"{config.name}@{t}"] = r
            target = f"  target warm >= {config.target:g}/s: {'met' if r['warm_samples_per_s'] >= config.target else 'MISSED'}" if config.target else ""
            print(
                f"{config.name:<24} threads={t}  cold {r['cold_samples_per_s']:8.1f}/s  warm {r['warm_samples_per_s']:8.1f}/s "
                f"({r['warm_voxels_per_s'] / 1e6:7.1f} Mvox/s)  decode-only {r['decode_only_s']:.2f}s  resample-only {r['resample_only_s']:.2f}s  "
                f"cold {r['cold_s']:.2f}s  efficiency {r['cold_efficiency']:.2f} (bound >= 0.7){target}"
            )
    for config in default_configs(batches)[:2]:
        for t in loader_threads:
            r = bench_loader(data, config, t, batches)
            report["loader"][f"{config.name}@{t}"] = r
            print(f"loader {config.name:<17} threads={t}  {r['batches_per_s']:7.1f} batches/s  {r['samples_per_s']:8.1f} samples/s  peak RSS {r['peak_rss_mb']:.0f} MB")
            if device:
                d = bench_loader(data, config, t, batches, device=device)
                report["loader"][f"{config.name}@{t}@{device}"] = d
                ratio = d["samples_per_s"] / r["samples_per_s"]
                print(f"loader {config.name:<17} threads={t}  {d['samples_per_s']:8.1f} samples/s delivered to {device}: "
                      f"{ratio:.2f} of CPU delivery (bound >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})")
    if transforms:
        t = max(loader_threads)
        results = bench_transforms(data, threads=t, batches=max(5, batches // 2), repeat=repeat_transforms)
        report["transforms"] = results
        for name, r in results.items():
            in_engine = sum(1 for row in r["plan"] if row["where"] == "engine")
            print(f"value transforms {name:<22} threads={t}  identity {r['identity_samples_per_s']:7.1f}/s  split defaults "
                  f"{r['defaults_samples_per_s']:7.1f}/s  ratio {r['ratio']:.2f} (bound >= 0.9: {'met' if r['ratio'] >= 0.9 else 'MISSED'}; "
                  f"{in_engine} op(s) in the engine)")
        e = bench_elastic(data, threads=t, batches=max(5, batches // 2), repeat=repeat_transforms)
        report["elastic"] = e
        print(f"3d-64-4cls rotate + elastic      threads={t}  rotated {e['rotated_samples_per_s']:7.1f}/s  rotated + elastic "
              f"{e['elastic_samples_per_s']:7.1f}/s  cost {e['cost_ratio']:.2f}x the rotated time per sample "
              f"(bound <= {e['bound']:g}: {'met' if e['cost_ratio'] <= e['bound'] else 'MISSED'})")
        costs = bench_transform_costs(data, threads=t, batches=max(5, batches // 2), repeat=repeat_transforms)
        report["transform_costs_ms_per_batch"] = costs
        print("engine cost per batch of 8 (64³ + 4 classes, over identity): " + ", ".join(f"{k} {v:+.1f} ms" for k, v in costs.items()))
    if soak:
        r = bench_soak(data, batches=soak)
        report["soak"] = r
        print(f"soak {r['batches']} batches in {r['seconds']:.0f} s: RSS after warm-up {r['rss_after_warmup_mb']:.0f} MB, "
              f"peak after warm-up {r['peak_after_warmup_mb']:.0f} MB, bound {r['bound_mb']:.0f} MB "
              f"({'within' if r['within_bound'] else 'ABOVE'}); RSS net of the chunk cache grew "
              f"{r['net_of_cache_growth_mb']:.0f} MB (bound {r['net_growth_bound_mb']:.0f} MB: "
              f"{'within' if r['net_of_cache_growth_mb'] <= r['net_growth_bound_mb'] else 'ABOVE'}); "
              f"pooled batch buffers {r['pooled_batch_mb']:.0f} MB; curve (batch, RSS, cache, RSS - cache) {r['curve']}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    return report


# -- reading from an object store ------------------------------------------------------------------

REMOTE_WARM_BOUND = 0.5  # warm remote throughput at 20 ms per request >= this × local warm
REMOTE_COLD_BOUND = 0.8  # cold at 20 ms and 64 in flight >= this × cold with no latency (bandwidth-limited)


def bench_remote(data: Any, latencies: tuple[float, ...] = (0.02, 0.05), in_flight: tuple[int, ...] = (1, 8, 32, 64),
                 threads: int = 2, batches: int = 6) -> dict[str, Any]:
    """The loader (3D 64³ + 4 classes, augmented, split defaults) reading the bench data over a
    loopback HTTP server that waits ``latency`` seconds before each answer, with ``in_flight``
    requests allowed at once, against the same plan read from the local files in the same run.

    Per configuration: cold samples/s (empty decoded cache: every chunk is fetched; the better
    of two passes) and warm
    samples/s (the same epoch again, decoded cache warm). Bounds: warm at 20 ms >= 0.5 × local
    warm; cold at 20 ms with 64 in flight >= 0.8 × cold with no added latency (the server's and
    the engine's own speed: bandwidth, not latency, limits it)."""
    from .. import _engine
    from ..loader import CellMapDataLoader
    from ..multidataset import CellMapMultiDataset
    from ..remote import configure_remote, remote_options
    from .loopback import DirectoryServer

    config = Config("3d-64-4cls-augmented", (64, 64, 64), (8, 8, 8), True, batches=batches)
    root = Path(data.root)

    def passes(datasets: list[Any]) -> tuple[float, float]:
        multi = CellMapMultiDataset(datasets, BENCH_CLASSES, None, None)
        loader = CellMapDataLoader(multi, batch_size=config.batch_size, num_workers=threads, iterations_per_epoch=batches,
                                   weighted_sampler=True, seed=0)
        def one_pass() -> float:
            loader.epoch = 0  # the same epoch every time
            start = time.perf_counter()
            count = sum(batch["raw"].shape[0] for batch in loader)
            return count / (time.perf_counter() - start)

        cold = []
        for _ in range(2):  # the better of two cold passes (the first also opens connections)
            _engine.clear_cache()
            cold.append(one_pass())
        return max(cold), one_pass()

    def served(server: DirectoryServer) -> Callable[[str], str]:
        def url(path: str) -> str:
            head, bracket, tail = path.partition("[")
            return f"{server.url}/{Path(head).relative_to(root).as_posix()}{'/' if head.endswith('/') else ''}{bracket}{tail}"

        return url

    before = remote_options()
    local_cold, local_warm = passes(build_datasets(data, config))
    rows: dict[str, Any] = {}
    try:
        with DirectoryServer(root) as server:
            for latency in (0.0, *latencies):
                for n in in_flight if latency else (max(in_flight),):
                    configure_remote(max_in_flight=n)
                    datasets = build_datasets(data, config, served(server))
                    server.latency = latency
                    server.reset_log()
                    cold, warm = passes(datasets)
                    rows[f"{latency * 1000:g}ms-{n}"] = {
                        "latency_s": latency, "in_flight": n, "cold_samples_per_s": cold, "warm_samples_per_s": warm,
                        "requests": server.count(), "mb_fetched": server.bytes_sent / 1e6, "peak_in_flight": server.max_in_flight,
                        "warm_vs_local": warm / local_warm,
                    }
    finally:
        configure_remote(max_in_flight=before["max_in_flight"])
    no_latency = rows[f"0ms-{max(in_flight)}"]["cold_samples_per_s"]
    for row in rows.values():
        row["cold_vs_no_latency"] = row["cold_samples_per_s"] / no_latency
    return {"local_cold_samples_per_s": local_cold, "local_warm_samples_per_s": local_warm, "threads": threads,
            "samples": batches * config.batch_size, "runs": rows}


# -- sharded data from an object store, build against build --------------------------------------

# One pass of the loader over a sharded split served by a loopback HTTP server with a latency per
# request, through the public API only (so any build can run it). Prints one JSON line: wait per
# batch, requests and bytes the server answered, and a digest of every batch's tensors.
_SHARDED_REMOTE_WORKLOAD = r"""
import hashlib, json, sys, tempfile, time, warnings
from pathlib import Path
import torch
import cellmap_data
from cellmap_data import CellMapDataLoader, CellMapDataSplit
from cellmap_data.tools.loopback import DirectoryServer

root, csv_path, batches, threads, latency = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
augment, classes = json.loads(sys.argv[6]), json.loads(sys.argv[7])
with DirectoryServer(root) as server, tempfile.TemporaryDirectory() as folder:
    remote_csv = Path(folder) / "datasplit.csv"
    remote_csv.write_text(Path(csv_path).read_text().replace(str(root), server.url))
    server.latency = latency
    split = CellMapDataSplit(input_arrays={"input": {"shape": (64, 64, 64), "scale": (8, 8, 8)}},
                             target_arrays={"output": {"shape": (64, 64, 64), "scale": (8, 8, 8)}},
                             classes=classes, pad=True, csv_path=str(remote_csv), spatial_transforms=augment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = CellMapDataLoader(split.train_datasets_combined, classes=classes, batch_size=8, num_workers=threads,
                                   weighted_sampler=True, iterations_per_epoch=batches, is_train=True, seed=0)
    opening_requests = server.count()
    server.reset_log()
    digest = hashlib.sha256()
    waits = []
    asked = time.perf_counter()
    for batch in loader:
        waits.append(time.perf_counter() - asked)
        for key in sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor)):
            digest.update(key.encode())
            digest.update(batch[key].nan_to_num(-1.0).contiguous().numpy().tobytes())
        asked = time.perf_counter()
    ranged = sum(1 for _, _, headers in server.requests if "range" in headers)
    print(json.dumps({"version": cellmap_data.__version__, "file": cellmap_data.__file__, "waits_s": waits,
                      "requests": server.count(), "ranged_requests": ranged, "mb": server.bytes_sent / 1e6,
                      "opening_requests": opening_requests, "digest": digest.hexdigest()}))
"""


def sharded_bench_data(chunks_per_shard: int = 4) -> Any:
    """The bench data (640³ raw, 64³ chunks) written as zarr v3 with shards of
    ``chunks_per_shard``³ chunks, generated once (deterministic) and reused."""
    return _generated_once(_cache_folder(f"bench-data-sharded-{chunks_per_shard}"), size="bench", zarr_format=3,
                           sharded=True, chunks_per_shard=chunks_per_shard)


def _other_build_environment(other: Path | str) -> dict[str, str]:
    """The environment that imports the build of cellmap_data installed in the folder ``other``
    (``pip install --target OTHER WHEEL``) ahead of this one."""
    other = Path(other).resolve()
    if not (other / "cellmap_data").is_dir():
        raise FileNotFoundError(f"{other}: no cellmap_data package installed there (pip install --target {other} WHEEL)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(other), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def bench_remote_sharded(other: Path | None, data: Any, repeat: int = 3, batches: int = 12, threads: int = 2,
                         latency: float = 0.02) -> dict[str, Any]:
    """The loader (64³ input and targets at 8 nm, 4 classes, augmented, batches of 8) reading a
    sharded zarr v3 split from a loopback HTTP server that waits ``latency`` seconds before each
    answer. With ``other`` (a folder holding another build, ``pip install --target OTHER
    WHEEL``), both builds run interleaved in fresh interpreters (cold caches), ``repeat`` times
    each; this build also runs with ``range_gap=0`` (no coalescing). Per run: requests and MB
    per batch (medians), the median wait for a batch, the epoch's time, and whether every run's
    batches are bit-identical (one digest). A build that refuses the data is reported with its
    error."""
    import subprocess
    import sys

    # This build twice: as configured by default, and asking for each byte range on its own
    # (what a sharded read costs without coalescing: one request per inner chunk).
    builds: dict[str, dict[str, str]] = {"this": dict(os.environ), "this, range_gap=0": {**os.environ, "CELLMAP_REMOTE_RANGE_GAP": "0"}}
    if other is not None:
        builds = {"other": _other_build_environment(other), **builds}
    args = [str(data.root), str(data.csv_path), str(batches), str(threads), str(latency), json.dumps(AUGMENT), json.dumps(BENCH_CLASSES)]
    runs: dict[str, list[dict[str, Any]]] = {which: [] for which in builds}
    for _ in range(repeat):
        for which, env in builds.items():
            done = subprocess.run([sys.executable, "-c", _SHARDED_REMOTE_WORKLOAD, *args], env=env, capture_output=True,
                                  text=True, check=False, cwd=str(Path(data.root).parent))
            if done.returncode != 0:
                if which == "this":
                    raise RuntimeError(f"the {which} build's workload failed:\n{done.stderr[-2000:]}")
                # Another build may refuse the data (shards beyond what it reads whole).
                runs[which].append({"error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
                continue
            runs[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {"repeat": repeat, "batches": batches, "threads": threads, "latency_s": latency, "builds": {}}
    for which, results in runs.items():
        if any("error" in r for r in results):
            out["builds"][which] = {"error": next(r["error"] for r in results if "error" in r)}
            continue
        out["builds"][which] = {
            "version": results[0]["version"], "file": results[0]["file"],
            "requests_per_batch": statistics.median(r["requests"] / batches for r in results),
            "ranged_requests_per_batch": statistics.median(r["ranged_requests"] / batches for r in results),
            "mb_per_batch": statistics.median(r["mb"] / batches for r in results),
            "batch_wait_s": statistics.median(statistics.median(r["waits_s"]) for r in results),
            "epoch_s": statistics.median(sum(r["waits_s"]) for r in results),
            "opening_requests": statistics.median(r["opening_requests"] for r in results),
            "digests": sorted({r["digest"] for r in results}),
        }
    out["bit_identical"] = len({d for b in out["builds"].values() for d in b.get("digests", [])}) == 1
    return out


# -- prediction writing over several processes ---------------------------------------------------

# One rank of a prediction job (identity "model", so the figure is the writer's and the input
# reads' cost): builds its writer, waits at a file barrier for the other ranks, writes its tiles,
# closes (each rank builds the downsampled level over its own chunks; rank 0 waits for the others
# and builds the rest), prints one JSON line.
_RANK_WORKLOAD = r"""
import json, os, sys, time
from cellmap_data import CellMapDatasetWriter

raw, out, overlap, rank, world, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
writer = CellMapDatasetWriter(raw, out, ["pred"], {"input": {"shape": (64, 64, 64), "scale": (8, 8, 8)}},
                              {"output": {"shape": (64, 64, 64), "scale": (8, 8, 8)}}, overlap=overlap,
                              downsample_levels=1, rank=rank, world_size=world, exist_ok=True)
tiles = len(writer.writer_indices)
open(os.path.join(barrier, f"ready{rank}"), "w").close()
while len(os.listdir(barrier)) < world:
    time.sleep(0.005)
start = time.time()
for batch in writer.loader(batch_size=4, progress=False):
    writer[batch["idx"]] = {"output": batch["input"]}
writer.close(timeout=600)
print(json.dumps({"rank": rank, "start": start, "end": time.time(), "tiles": tiles, "shape": list(writer.writers["pred"].shape.values())}))
"""


def _rank_results(jobs: list[Any], timeout: float) -> list[dict[str, Any]]:
    """Each rank's JSON line, once all have exited. A rank that fails (or a timeout) stops the
    others, which would otherwise wait for it, and raises with its error output."""
    deadline = time.monotonic() + timeout
    try:
        while any(job.poll() is None for job in jobs):
            failed = next((job for job in jobs if job.poll() not in (None, 0)), None)
            if failed is not None:
                raise RuntimeError(f"writer rank {jobs.index(failed)} failed (exit {failed.returncode}): "
                                   f"{failed.communicate()[1][-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"writer ranks did not finish within {timeout:.0f} s")
            time.sleep(0.02)
        results = []
        for rank, job in enumerate(jobs):
            stdout, stderr = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"writer rank {rank} failed (exit {job.returncode}): {stderr[-3000:]}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        return results
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.communicate()


def bench_writer_ranks(data: Any, processes: tuple[int, ...] = (1, 2), overlaps: tuple[int, ...] = (0, 16),
                       repeat: int = 3, threads_per_process: int | None = None) -> dict[str, Any]:
    """Prediction writing (64³ tiles over the first bench volume, identity model, one 2×
    downsampled level) by 1 and 2 processes, plain and blended: MB/s of output volume from the
    moment every rank is ready to the end of the last rank's close; medians of ``repeat``,
    interleaved. Each process gets ``threads_per_process`` engine threads (default: the cores
    divided by the largest process count), as each rank of a multi-GPU job has its own share of
    the machine; ``"one process, all cores"`` is measured too for reference. Target: 2
    processes >= 1.6 × one process with the same share each."""
    import shutil
    import subprocess
    import sys
    import tempfile

    raw = str(data.datasets[0].raw_path)
    share = threads_per_process or max(1, (os.cpu_count() or 1) // max(processes))
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "CELLMAP_NUM_THREADS")}
    configs = [(p, share) for p in processes] + [(1, os.cpu_count() or 1)]
    times: dict[tuple[int, int, int], list[float]] = {(p, t, o): [] for p, t in configs for o in overlaps}
    volume_mb = 0.0
    tiles: dict[tuple[int, int, int], list[int]] = {}
    for _ in range(repeat):
        for overlap in overlaps:
            for procs, threads in configs:
                env = {**base_env, "CELLMAP_NUM_THREADS": str(threads)}
                root = tempfile.mkdtemp(prefix="cellmap-bench-ranks-")
                try:
                    barrier = os.path.join(root, "barrier")
                    os.mkdir(barrier)
                    output = os.path.join(root, "out.zarr", "pred")
                    jobs = [subprocess.Popen([sys.executable, "-c", _RANK_WORKLOAD, raw, output, str(overlap), str(r), str(procs), barrier],
                                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                            for r in range(procs)]
                    results = _rank_results(jobs, timeout=1200)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
                times[(procs, threads, overlap)].append(seconds)
                tiles[(procs, threads, overlap)] = [r["tiles"] for r in results]
                volume_mb = math.prod(results[0]["shape"]) * 4 / 1e6
    out: dict[str, Any] = {"volume_mb": volume_mb, "repeat": repeat, "threads_per_process": share, "runs": {}}
    for overlap in overlaps:
        one = volume_mb / statistics.median(times[(processes[0], share, overlap)])
        for procs, threads in configs:
            rate = volume_mb / statistics.median(times[(procs, threads, overlap)])
            out["runs"][f"{procs}proc-{threads}thr-overlap{overlap}"] = {
                "processes": procs, "threads_per_process": threads, "overlap": overlap, "mb_per_s": rate,
                "speedup": rate / one, "tiles_per_rank": tiles[(procs, threads, overlap)],
                "seconds": times[(procs, threads, overlap)]}
    return out


# -- one build against another ------------------------------------------------------------------

# Runs in a child interpreter against whichever cellmap_data its sys.path finds, through the
# public API both builds share: the loader the way training scripts build it (split defaults,
# augmentation, class-balanced sampling) and CellMapDatasetWriter-style tiled writing with
# ImageWriter. Prints one JSON line.
_BUILD_WORKLOAD = r"""
import json, os, sys, tempfile, time, warnings
import torch
import cellmap_data
from cellmap_data import CellMapDataLoader, CellMapDataSplit, ImageWriter

csv_path, batches, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
augment = json.loads(sys.argv[4])
classes = json.loads(sys.argv[5])
split = CellMapDataSplit(input_arrays={"input": {"shape": (64, 64, 64), "scale": (8, 8, 8)}},
                         target_arrays={"output": {"shape": (64, 64, 64), "scale": (8, 8, 8)}},
                         classes=classes, pad=True, csv_path=csv_path, spatial_transforms=augment)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    loader = CellMapDataLoader(split.train_datasets_combined, classes=classes, batch_size=8, num_workers=threads,
                               weighted_sampler=True, iterations_per_epoch=batches, is_train=True, seed=0)
for batch in loader:  # warm the chunk cache
    pass
start = time.perf_counter()
for batch in loader:
    pass
loader_s = time.perf_counter() - start

tile, n = 32, 8  # 8^3 tiles of 32^3 voxels (float32) into one image
values = torch.rand(tile, tile, tile)
# A memory-backed folder where there is one: the figure is the writer's own cost, not the disk's.
shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
with tempfile.TemporaryDirectory(dir=shm) as out:
    writer = ImageWriter(f"{out}/pred.zarr/pred/mito", "mito", {"z": 8.0, "y": 8.0, "x": 8.0},
                         {a: [0.0, 8.0 * tile * n] for a in "zyx"}, {a: tile for a in "zyx"}, overwrite=True)
    start = time.perf_counter()
    for z in range(n):
        for y in range(n):
            for x in range(n):
                writer[{"z": (z + 0.5) * tile * 8.0, "y": (y + 0.5) * tile * 8.0, "x": (x + 0.5) * tile * 8.0}] = values
    if hasattr(writer, "close"):
        writer.close()
    writer_s = time.perf_counter() - start
print(json.dumps({"version": cellmap_data.__version__, "file": cellmap_data.__file__,
                  "loader_samples_per_s": batches * 8 / loader_s, "writer_mvoxels_per_s": (tile * n) ** 3 / writer_s / 1e6}))
"""


def compare_builds(other: Path, data: Any, repeat: int = 5, batches: int = 20, threads: int = 2,
                   classes: list[str] | None = None) -> dict[str, Any]:
    """This build against another build of cellmap_data installed in the folder ``other``
    (``pip install --target OTHER old.whl``), on the same data, interleaved (other, this,
    other, this, ...) in fresh interpreters so both see the same machine; medians. Bound: this
    build's throughput >= 0.9 × the other's (within noise of it)."""
    import subprocess
    import sys

    other = Path(other).resolve()
    environments = {"other": _other_build_environment(other), "this": dict(os.environ)}
    args = [str(data.csv_path), str(batches), str(threads), json.dumps(AUGMENT), json.dumps(classes or BENCH_CLASSES)]
    runs: dict[str, list[dict[str, Any]]] = {"other": [], "this": []}
    for _ in range(repeat):
        for which, env in environments.items():
            done = subprocess.run([sys.executable, "-c", _BUILD_WORKLOAD, *args], env=env, capture_output=True,
                                  text=True, check=False, cwd=str(other.parent))
            if done.returncode != 0:
                raise RuntimeError(f"the {which} build's workload failed:\n{done.stderr[-2000:]}")
            runs[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {"repeat": repeat, "batches": batches, "threads": threads}
    for which in runs:
        out[which] = {"version": runs[which][0]["version"], "file": runs[which][0]["file"]}
        for key in ("loader_samples_per_s", "writer_mvoxels_per_s"):
            out[which][key] = statistics.median(r[key] for r in runs[which])
            out[which][key + "_all"] = [round(r[key], 2) for r in runs[which]]
    for key in ("loader_samples_per_s", "writer_mvoxels_per_s"):
        out[key.replace("_per_s", "_ratio")] = out["this"][key] / out["other"][key]
    return out
