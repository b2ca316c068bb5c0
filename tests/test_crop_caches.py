"""Label crops held decoded and raw chunks held in the chunk cache change no value: batches read
with the caches on equal batches read with them off (label cache off: every label read decodes
chunks; chunk budget of one byte: every raw chunk is decoded again), bit for bit, over plain,
mirrored, rotated, zoomed and elastic draws, padding, 2D slices and inferred true negatives.
A shortened soak over a 144-crop split shows RSS flat after warm-up within the caches' budgets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapMultiDataset, _engine

CLASSES = ["mito", "er", "nuc", "ves", "pm"]
DRAWS = {
    "plain": None,
    "mirrored and transposed": {"mirror": {"axes": {"x": 0.5, "z": 0.5}}, "transpose": {"axes": ["x", "y"]}},
    "rotated about z": {"mirror": {"axes": {"x": 0.5, "y": 0.5}}, "rotate": {"axes": {"z": [-180, 180]}}},
    "rotated in 3D and zoomed": {"rotate": {"axes": {"z": [-180, 180], "x": [-30, 30]}}, "scale": [0.8, 1.25]},
    "elastic": {"rotate": {"axes": {"z": [-90, 90]}},
                "elastic": {"control_point_spacing": [64, 64, 64], "jitter_sigma": [6, 6, 6]}},
}


def loader_over(data, draw, shape, seed, relations):
    datasets = [
        CellMapDataset(str(d.raw_path), c.target_path, CLASSES, {"raw": {"shape": shape, "scale": (8, 8, 8)}},
                       {"gt": {"shape": shape, "scale": (8, 8, 8)}}, pad=True, spatial_transforms=DRAWS[draw], seed=seed,
                       class_relation_dict=relations)
        for d in data.datasets for c in d.crops
    ]
    multi = CellMapMultiDataset(datasets, CLASSES, None, None)
    return CellMapDataLoader(multi, batch_size=3, iterations_per_epoch=3, weighted_sampler=True, seed=seed, num_workers=2)


def read(loader):
    return [{k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]


@pytest.fixture
def restore_budgets():
    stats = _engine.cache_stats()
    yield
    _engine.set_cache_budget(stats["budget"])
    _engine.set_label_cache_budget(stats["label_budget"])
    _engine.clear_cache()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draw=st.sampled_from(sorted(DRAWS)), shape=st.sampled_from([(12, 12, 12), (1, 24, 24), (20, 6, 9)]),
       seed=st.integers(0, 1000), relations=st.booleans())
def test_cached_and_uncached_reads_give_the_same_batches(tiny_data, restore_budgets, draw, shape, seed, relations):
    relations = {"mito": ["er", "nuc"], "er": ["mito"], "nuc": ["mito"]} if relations else None
    _engine.set_cache_budget(1 << 30)
    _engine.set_label_cache_budget(1 << 30)
    _engine.clear_cache()
    cached = read(loader_over(tiny_data, draw, shape, seed, relations))
    stats = _engine.cache_stats()
    assert stats["label_crops"] > 0 and stats["label_hits"] + stats["label_misses"] > 0, stats
    _engine.set_label_cache_budget(0)
    _engine.set_cache_budget(1)
    _engine.clear_cache()
    uncached = read(loader_over(tiny_data, draw, shape, seed, relations))
    stats = _engine.cache_stats()
    assert stats["label_crops"] == 0 and stats["label_passed"] > 0 and stats["bytes"] < 2**16, stats
    assert len(cached) == len(uncached) == 3
    for a, b in zip(cached, uncached):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=f"{draw}: {key}")


def test_a_held_crop_is_decoded_once_and_counted_against_its_budget(tiny_data, restore_budgets):
    _engine.clear_cache()
    loader = loader_over(tiny_data, "rotated about z", (12, 12, 12), 3, None)
    read(loader)
    first = _engine.cache_stats()
    read(loader)
    second = _engine.cache_stats()
    assert second["label_misses"] == first["label_misses"], "no crop decoded twice"
    assert second["label_hits"] > first["label_hits"]
    assert 0 < first["label_bytes"] <= first["label_budget"]
    # A budget too small for a crop reads its labels chunk by chunk instead.
    _engine.set_label_cache_budget(1024)
    _engine.clear_cache()
    read(loader)
    assert _engine.cache_stats()["label_crops"] == 0 and _engine.cache_stats()["label_passed"] > 0


@pytest.mark.timeout(300)
def test_rss_stays_flat_over_a_144_crop_split(tmp_path_factory, restore_budgets):
    from cellmap_data.tools.bench_crops import CropConfig, soak
    from cellmap_data.tools.synthetic import make_many_crops_data

    data = make_many_crops_data(tmp_path_factory.mktemp("crops"), 144, raw_size=96)
    assert len(data.datasets) == 36
    # Small budgets, so both caches fill and evict during the run.
    _engine.set_cache_budget(16 << 20)
    _engine.set_label_cache_budget(2 << 20)
    _engine.clear_cache()
    config = CropConfig("soak-16", (16, 16, 16), (8, 8, 8), (16, 16, 16), (8, 8, 8), True)
    r = soak(str(data.csv_path), batches=3000, config=config, batch_size=4, every=100, warmup=300)
    described = f"{r}"
    assert r["label_crops"] > 0 and r["label_misses"] > r["label_crops"], "crops were evicted and read again: " + described
    assert r["flat"], "RSS net of the caches kept growing: " + described
    peak_caches = max(p[2] + p[3] for p in r["curve"])
    assert peak_caches <= r["chunk_budget_mb"] + r["label_budget_mb"] + 1, described
    assert not math.isnan(r["peak_rss_mb"])
