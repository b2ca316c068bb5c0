"""Memory soaks: long augmented runs whose RSS after warm-up must stay under a bound computed in
the same run from the configured chunk-cache budget and the batch buffers
(:func:`cellmap_data.tools.bench.bench_soak`).

The 2 000-sample soaks run with the normal suite; the 100 000-sample soak is marked ``slow`` and
runs only when asked for (see docs/testing.md)::

    .venv/bin/python -m pytest -m slow tests/test_soak.py
"""

from __future__ import annotations

import pytest

from cellmap_data.tools.bench import bench_soak

# One configuration for all soaks: 32^3 patches at 4 nm (the s0 level of the isotropic
# datasets), mirror + transpose + rotation, 4 classes, class-balanced, batches of 2 (a common
# 3D batch size; per-batch overheads weigh most there), 2 engine threads.
SOAK = {"batch_size": 2, "shape": (32, 32, 32), "scale": (4, 4, 4), "threads": 2}
CACHE_MB = 8  # smaller than the chunks the run touches (~11 MB): the cache fills and evicts


@pytest.fixture(scope="module")
def soak_data(tmp_path_factory):
    """Two synthetic datasets of 192^3 raw voxels (32^3 chunks): enough distinct chunks that an
    8 MB cache fills and evicts during a soak."""
    from cellmap_data.tools.synthetic import make_synthetic_data

    return make_synthetic_data(tmp_path_factory.mktemp("soak"), size=(192, 192, 192), seed=0)


def _describe(r: dict) -> str:
    return (f"{r['samples']} samples ({r['batches']} batches of {r['batch_size']}) in {r['seconds']:.1f} s; "
            f"cache budget {r['cache_budget_mb']:.3f} MB (peak held {r['peak_cache_mb']:.1f} MB, "
            f"{r['cache_misses']} misses / {r['cache_hits']} hits); batch {r['batch_mb']:.2f} MB, prefetch {r['prefetch']}; "
            f"RSS after warm-up {r['rss_after_warmup_mb']:.1f} MB, peak after {r['peak_after_warmup_mb']:.1f} MB, "
            f"bound {r['bound_mb']:.1f} MB; RSS net of the cache grew {r['net_of_cache_growth_mb']:.1f} MB "
            f"(bound {r['net_growth_bound_mb']:.1f} MB); curve (batch, RSS, cache, RSS - cache) {r['curve']}")


def _check(r: dict, batches: int) -> None:
    """The run completed, delivered every batch, and RSS stayed bounded: the peak after warm-up
    under warm-up RSS + cache budget + (prefetch + 2) batches, and RSS net of the cache's bytes
    grew by less than (prefetch + 2) batches (flat: nothing accumulates per batch)."""
    print(_describe(r))
    assert r["batches"] == batches and r["curve"][-1][0] == batches - 1, _describe(r)
    assert r["peak_cache_mb"] <= r["cache_budget_mb"] + 1e-6, _describe(r)
    assert r["within_bound"], "RSS after warm-up exceeded the bound: " + _describe(r)
    assert r["net_of_cache_growth_mb"] <= r["net_growth_bound_mb"], "RSS net of the chunk cache kept growing: " + _describe(r)


@pytest.mark.timeout(180)
def test_soak_2000_augmented_samples_stays_bounded(soak_data):
    batches = 2000 // SOAK["batch_size"]
    r = bench_soak(soak_data, batches=batches, cache_mb=CACHE_MB, warmup=batches // 5, every=batches // 20, **SOAK)
    _check(r, batches)


@pytest.mark.timeout(180)
def test_soak_with_a_cache_smaller_than_one_batch_thrashes_but_stays_bounded(soak_data):
    # The decoded chunks one batch touches, measured: one batch read into an empty, large cache.
    one = bench_soak(soak_data, batches=1, cache_mb=1024, warmup=0, every=1, **SOAK)
    one_batch_mb = one["peak_cache_mb"]
    assert one_batch_mb > 0.1, _describe(one)
    budget_mb = one_batch_mb / 4
    batches = 2000 // SOAK["batch_size"]
    r = bench_soak(soak_data, batches=batches, cache_mb=budget_mb, warmup=batches // 5, every=batches // 20, **SOAK)
    print(f"one batch touches {one_batch_mb:.2f} MB of decoded chunks; cache budget {budget_mb:.2f} MB")
    # Thrashing: most chunk reads decode again.
    assert r["cache_misses"] > r["cache_hits"], _describe(r)
    _check(r, batches)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_100000_augmented_samples_stays_bounded(soak_data):
    batches = 100_000 // SOAK["batch_size"]
    r = bench_soak(soak_data, batches=batches, cache_mb=CACHE_MB, warmup=1000, every=1000, **SOAK)
    _check(r, batches)
