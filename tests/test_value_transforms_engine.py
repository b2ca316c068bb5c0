"""Value transforms the engine runs give the numbers of the torch transforms (issue 22).

A dataset splits its value transforms (:mod:`cellmap_data.transforms.plan`): the transforms the
engine knows run as engine ops on every patch, identities are skipped, the rest stays in torch.
The tests here hold the engine to the *independent* torch implementations: the project's
transform classes and torchvision's, called directly on torch tensors. Nothing is compared with
the engine's own earlier output.

1. same numbers: engine ops (through ``_engine.apply_value_ops``) equal the torch transform on
   random patches, NaN (and, where meaningful, +-inf) included;
2. random ops: reproducible per (value_seed, stream), varying with them, with the requested
   distribution;
3. real reads through the public API (datasets, loader) equal torch applied to plain reads;
4. the plan shows where every transform runs and wastes no work;
5. foreign transforms keep the reference library's meaning (per sample, reference shapes,
   reproducible, global RNG untouched); per-class target transforms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmap_data import CellMapDataLoader, CellMapDataset, _engine
from cellmap_data.datasplit import default_raw_transforms, default_target_transforms
from cellmap_data.transforms.augment import (
    Binarize,
    GaussianBlur,
    GaussianNoise,
    NaNtoNum,
    Normalize,
    RandomContrast,
    RandomGamma,
)
from cellmap_data.transforms.plan import plan_value_transforms

ENGINE, SKIPPED = "engine", "skipped (identity)"
TORCH_BATCH, TORCH_SAMPLE = "torch (whole batch)", "torch (per sample)"
SPATIAL = {"rotate": {"axes": {"z": [-30, 30]}}, "mirror": {"axes": {"x": 0.5}}}

# Value ranges of float patches: normalised, uint8-range, signed, uint16-range and beyond.
RANGES = [(0.0, 1.0), (0.0, 255.0), (-1.0, 1.0), (-255.0, 255.0), (0.0, 65535.0), (0.0, 1e5), (-1e5, 1e5)]


# -- helpers ------------------------------------------------------------------------------------
def run_engine(transform, x: torch.Tensor, *, binary: bool = False, value_seed: int = 0, stream: int = 0) -> torch.Tensor:
    """``transform`` planned as a dataset plans it, its engine ops applied to the sample tensor
    ``x`` by the engine. Asserts that nothing was left for torch."""
    plan = plan_value_transforms(transform, binary=binary)
    assert plan.torch_rest is None, plan.describe()
    out = _engine.apply_value_ops(json.dumps(plan.engine_ops), x.reshape(-1).tolist(), list(x.shape),
                                  value_seed=value_seed, stream=stream)
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape)


def magnitude(*tensors) -> float:
    """The largest finite magnitude (below 1e30, i.e. not a float32-max replacement) of the
    tensors, at least 1: the scale of float32 rounding errors."""
    m = 1.0
    for t in tensors:
        a = np.abs(np.asarray(t, dtype=np.float64))
        a = a[np.isfinite(a) & (a < 1e30)]
        if a.size:
            m = max(m, float(a.max()))
    return m


def assert_same_numbers(actual, expected, scale: float | None = None) -> None:
    """Equal within float32 rounding; NaN (and +-inf) exactly where expected has them."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg="NaN positions differ")
    scale = magnitude(e) if scale is None else scale
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)


def torch_per_sample(transform, batch: torch.Tensor) -> torch.Tensor:
    """``transform`` called on each sample of ``batch`` on its own (the reference's per-patch call)."""
    return torch.stack([transform(sample.clone()) for sample in batch])


@st.composite
def patches(draw, *, nan: bool = True, inf: bool = False, ranges=RANGES) -> torch.Tensor:
    """A float32 sample tensor ``(1, z, y, x)`` or ``(C, y, x)`` (each axis at most 10) with values
    from one of ``ranges``; optionally some (or all) NaN and some +-inf."""
    if draw(st.booleans()):
        shape = (1, *(draw(st.integers(1, 10)) for _ in range(3)))
    else:
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    lo, hi = draw(st.sampled_from(ranges))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.uniform(lo, hi, size=shape).astype(np.float32)
    if draw(st.booleans()):  # the ends of the range themselves
        x.flat[0], x.flat[-1] = hi, lo
    if nan:
        x[rng.random(shape) < draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))] = np.nan
    if inf:
        mask = rng.random(shape) < draw(st.sampled_from([0.0, 0.05, 0.2]))
        x[mask] = rng.choice(np.array([np.inf, -np.inf], dtype=np.float32), size=int(mask.sum()))
    return torch.from_numpy(x)


@st.composite
def labels(draw) -> torch.Tensor:
    """A label sample tensor of 0, 1 and NaN (unknown), as the engine delivers targets."""
    shape = (draw(st.integers(1, 6)), *(draw(st.integers(1, 8)) for _ in range(3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.choice(np.array([0.0, 1.0, np.nan], dtype=np.float32), size=shape, p=[0.5, 0.3, 0.2])
    return torch.from_numpy(x)


# -- 1. same numbers as the torch transforms ----------------------------------------------------
NAN_TO_NUM_PARAMS = [
    {"nan": 0, "posinf": None, "neginf": None},
    {"nan": 0},
    {},
    {"nan": None},
    {"nan": -1.5, "posinf": 7.0, "neginf": -7.0},
    {"posinf": 1e3},
    {"nan": 255, "neginf": 0},
]


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True, inf=True), params=st.sampled_from(NAN_TO_NUM_PARAMS))
def test_nan_to_num_in_the_engine_equals_torch_nan_to_num(x, params):
    t = NaNtoNum(params)
    assert plan_value_transforms(t).describe() == [(repr(t), ENGINE)]
    assert_same_numbers(run_engine(t, x), t(x.clone()), scale=magnitude(x))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True, inf=True), threshold=st.sampled_from([0.0, 0.5, -1.0, 1.0, 100.0, 1e-3, 0.1]))
def test_binarize_in_the_engine_equals_torch_binarize(x, threshold):
    x.view(-1)[:: max(1, x.numel() // 3)] = threshold  # voxels exactly at the threshold stay 0
    assert_same_numbers(run_engine(Binarize(threshold), x), Binarize(threshold)(x.clone()))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True, inf=True), shift=st.sampled_from([0.0, -128.0, 1.5, 1e3]),
       scale=st.sampled_from([1 / 255, 1.0, -2.0, 0.01, 1 / 65535]))
def test_project_normalize_in_the_engine_equals_torch(x, shift, scale):
    t = Normalize(shift=shift, scale=scale)
    assert_same_numbers(run_engine(t, x), t(x.clone()), scale=magnitude(x) * max(1.0, abs(scale)) + abs(shift))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True, inf=True), mean=st.sampled_from([0.0, 0.5, 127.5, -3.0]),
       std=st.sampled_from([1.0, 0.25, 64.0, 1e-3]), v2=st.booleans())
def test_torchvision_normalize_with_one_mean_and_std_in_the_engine_equals_torchvision(x, mean, std, v2):
    t = (T.Normalize if v2 else T1.Normalize)([mean], [std])
    assert plan_value_transforms(t).describe() == [(repr(t), ENGINE)]
    expected = t(x.clone())
    assert_same_numbers(run_engine(t, x), expected, scale=magnitude(expected))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True), kernel_size=st.sampled_from([1, 3, 5, 7]),
       sigma=st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0]), dim=st.sampled_from([2, 3]))
def test_gaussian_blur_in_the_engine_equals_torch_blur(x, kernel_size, sigma, dim):
    t = GaussianBlur(kernel_size, sigma, dim=dim)
    assert_same_numbers(run_engine(t, x), t(x.clone()), scale=magnitude(x))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True), ratio=st.sampled_from([0.0, 0.5, 0.8, 1.0, 1.2, 2.0, 3.0]))
def test_random_contrast_with_a_fixed_ratio_in_the_engine_equals_torch(x, ratio):
    # Outside sample_seeds the torch transform treats its input as one patch, as the engine
    # treats each sample.
    t = RandomContrast((ratio, ratio))
    assert_same_numbers(run_engine(t, x), t(x.clone()), scale=magnitude(x))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True), gamma=st.sampled_from([0.1, 0.5, 1.0, 1.5, 2.0, 3.0]))
def test_random_gamma_with_a_fixed_exponent_in_the_engine_equals_torch(x, gamma):
    t = RandomGamma((gamma, gamma))
    assert_same_numbers(run_engine(t, x), t(x.clone()), scale=magnitude(x))


@settings(max_examples=20, deadline=None)
@given(x=patches(nan=True), mean=st.sampled_from([0.0, 0.5, -2.0]))
def test_gaussian_noise_without_spread_adds_exactly_its_mean(x, mean):
    t = GaussianNoise(mean, 0.0)
    assert_same_numbers(run_engine(t, x, value_seed=4), t(x.clone()))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True, inf=True))
def test_the_split_default_raw_pipeline_in_the_engine_equals_torch(x):
    t = default_raw_transforms()
    rows = plan_value_transforms(t).describe()
    assert [w for _, w in rows] == [SKIPPED, ENGINE] and rows[0][0].startswith("ToDtype")
    expected = t(x.clone())
    assert not torch.isnan(expected).any()
    assert_same_numbers(run_engine(t, x), expected, scale=magnitude(x))


@settings(max_examples=30, deadline=None)
@given(y=labels())
def test_the_split_default_target_pipeline_on_labels_is_skipped_and_changes_nothing(y):
    t = default_target_transforms()
    plan = plan_value_transforms(t, binary=True)
    assert [w for _, w in plan.describe()] == [SKIPPED, SKIPPED] and plan.is_identity
    assert_same_numbers(run_engine(t, y, binary=True), t(y.clone()))
    assert_same_numbers(y, t(y.clone()))


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True, inf=True))
def test_the_split_default_target_pipeline_on_other_values_binarizes_in_the_engine(x):
    t = default_target_transforms()
    assert [w for _, w in plan_value_transforms(t, binary=False).describe()] == [SKIPPED, ENGINE]
    assert_same_numbers(run_engine(t, x, binary=False), t(x.clone()))


def test_a_composition_keeps_its_order_of_operations():
    x = torch.tensor([[[0.0, 40.0, 90.0], [160.0, float("nan"), 255.0]]])  # (1, 2, 3)
    first = T.Compose([Normalize(shift=-100.0, scale=0.01), RandomContrast((1.2, 1.2)), NaNtoNum({"nan": 0})])
    second = T.Compose([RandomContrast((1.2, 1.2)), Normalize(shift=-100.0, scale=0.01), NaNtoNum({"nan": 0})])
    a, b = run_engine(first, x), run_engine(second, x)
    assert_same_numbers(a, first(x.clone()))
    assert_same_numbers(b, second(x.clone()))
    assert not torch.allclose(a, b)  # the two orders really differ


def _deterministic_transforms():
    """Strategies of engine-known transforms whose result does not depend on a random draw."""
    return st.one_of(
        st.sampled_from(NAN_TO_NUM_PARAMS).map(NaNtoNum),
        st.sampled_from([0.0, 0.5, 100.0]).map(Binarize),
        st.tuples(st.sampled_from([0.0, -100.0]), st.sampled_from([1 / 255, 2.0])).map(lambda p: Normalize(*p)),
        st.sampled_from([(0.5, 0.25), (127.5, 64.0)]).map(lambda p: T.Normalize([p[0]], [p[1]])),
        st.tuples(st.sampled_from([3, 5]), st.sampled_from([0.5, 1.5]), st.sampled_from([2, 3])).map(
            lambda p: GaussianBlur(p[0], p[1], dim=p[2])),
        st.sampled_from([0.5, 1.2, 2.0]).map(lambda r: RandomContrast((r, r))),
        st.sampled_from([0.5, 2.0]).map(lambda g: RandomGamma((g, g))),
        st.just(T.ToDtype(torch.float32, scale=True)),
    )


@settings(max_examples=30, deadline=None)
@given(x=patches(nan=True), steps=st.lists(_deterministic_transforms(), min_size=1, max_size=4))
def test_any_composition_of_engine_known_transforms_equals_torch_compose(x, steps):
    t = T.Compose(steps)
    expected = t(x.clone())
    assert_same_numbers(run_engine(t, x), expected, scale=magnitude(x, expected))


# -- 2. random transforms: distribution and reproducibility --------------------------------------
def _engine_ops(transform) -> str:
    return json.dumps(plan_value_transforms(transform).engine_ops)


def test_gaussian_noise_is_reproducible_per_seed_and_stream_and_varies_with_either():
    ops, x = _engine_ops(GaussianNoise(0.0, 1.0)), [0.0] * 256

    def draw(seed: int, stream: int) -> list[float]:
        return _engine.apply_value_ops(ops, x, [1, 16, 16], value_seed=seed, stream=stream)

    assert draw(11, 0) == draw(11, 0)
    assert draw(11, 0) != draw(12, 0)
    assert draw(11, 0) != draw(11, 1)


def test_gaussian_noise_has_the_requested_mean_and_std_and_is_added_to_the_data():
    n, mean, std = 100_000, 0.3, 2.0
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, n).astype(np.float32)
    out = np.asarray(_engine.apply_value_ops(_engine_ops(GaussianNoise(mean, std)), x.tolist(), [1, 1, n], value_seed=5))
    noise = out - x
    # Five standard errors: the mean of n draws has sd std/sqrt(n), their std about std/sqrt(2n).
    assert abs(noise.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)
    # independent of the data it is added to
    assert abs(np.corrcoef(noise, x)[0, 1]) < 5 / math.sqrt(n)


def test_gaussian_noise_draws_differ_per_sample_and_centre_on_the_mean():
    ops = _engine_ops(GaussianNoise(-1.0, 0.5))
    means = [np.mean(_engine.apply_value_ops(ops, [0.0] * 64, [1, 8, 8], value_seed=s)) for s in range(200)]
    # 200 samples of 64 voxels: the grand mean has sd 0.5/sqrt(12800)
    assert abs(np.mean(means) + 1.0) < 5 * 0.5 / math.sqrt(200 * 64)
    assert len(set(means)) == 200


# Data in [0.4, 0.6] (nominal range [0, 1]) with a known mean: no contrast in [0.5, 1.5] clamps.
_CONTRAST_DATA = np.linspace(0.4, 0.6, 21, dtype=np.float32)


def _recovered_ratio(out: np.ndarray) -> float:
    """The ratio r of ``r·x + (1 − r)·mean(x)`` that turned _CONTRAST_DATA into ``out``; asserts
    that one r explains every voxel."""
    x = _CONTRAST_DATA.astype(np.float64)
    m = x.mean()
    ratios = (out[[0, 1, -2, -1]] - m) / (x[[0, 1, -2, -1]] - m)
    assert np.ptp(ratios) < 1e-4, ratios
    ratio = float(ratios.mean())
    np.testing.assert_allclose(out, ratio * x + (1 - ratio) * m, atol=1e-6)
    return ratio


def test_random_contrast_draws_one_ratio_per_sample_uniformly_in_its_range_reproducibly():
    low, high = 0.5, 1.5
    ops, x = _engine_ops(RandomContrast((low, high))), _CONTRAST_DATA.tolist()
    ratios = []
    for seed in range(300):
        out = np.asarray(_engine.apply_value_ops(ops, x, [1, 1, 21], value_seed=seed))
        assert out.tolist() == _engine.apply_value_ops(ops, x, [1, 1, 21], value_seed=seed)
        ratios.append(_recovered_ratio(out))
    ratios = np.array(ratios)
    assert ((ratios >= low - 1e-4) & (ratios <= high + 1e-4)).all()
    assert len(np.unique(ratios.round(6))) > 290
    width = high - low
    assert ratios.min() < low + 0.05 * width and ratios.max() > high - 0.05 * width
    assert abs(ratios.mean() - (low + high) / 2) < 5 * width / math.sqrt(12 * len(ratios))
    # another stream (another array of the same sample) draws independently
    other = _recovered_ratio(np.asarray(_engine.apply_value_ops(ops, x, [1, 1, 21], value_seed=0, stream=1)))
    assert other != ratios[0]


def test_random_gamma_draws_one_exponent_per_sample_in_its_range_reproducibly():
    low, high = 0.5, 2.0
    x = np.linspace(0.05, 0.95, 19, dtype=np.float32)
    ops = _engine_ops(RandomGamma((low, high)))
    gammas = []
    for seed in range(300):
        out = np.asarray(_engine.apply_value_ops(ops, x.tolist(), [1, 1, 19], value_seed=seed))
        assert out.tolist() == _engine.apply_value_ops(ops, x.tolist(), [1, 1, 19], value_seed=seed)
        g = np.log(out) / np.log(x.astype(np.float64))  # data in [0, 1]: out = x ** gamma
        assert np.ptp(g) < 1e-3, g
        gammas.append(float(g.mean()))
    gammas = np.array(gammas)
    assert ((gammas >= low - 1e-3) & (gammas <= high + 1e-3)).all()
    assert len(np.unique(gammas.round(5))) > 290
    width = high - low
    assert gammas.min() < low + 0.05 * width and gammas.max() > high - 0.05 * width
    assert abs(gammas.mean() - (low + high) / 2) < 5 * width / math.sqrt(12 * len(gammas))


def test_random_ops_of_one_pipeline_draw_independently_by_position():
    # The same op twice in one pipeline: the second draws from its own stream, not a repeat.
    x = [0.0] * 1024
    once = _engine.apply_value_ops(_engine_ops(GaussianNoise(0.0, 1.0)), x, [1, 32, 32], value_seed=3)
    twice = _engine.apply_value_ops(_engine_ops(T.Compose([GaussianNoise(0.0, 1.0), GaussianNoise(0.0, 1.0)])),
                                    x, [1, 32, 32], value_seed=3)
    second = np.asarray(twice) - np.asarray(once)
    assert not np.allclose(second, once)
    assert abs(np.std(second) - 1.0) < 5 / math.sqrt(2 * 1024)


# -- 3. real reads through the public API -------------------------------------------------------
@pytest.fixture(scope="module")
def crop(tiny_data):
    """The first training crop (annotates mito, er, nuc, ves; not ecs, pm)."""
    ds = tiny_data.datasets[0]
    return tiny_data, ds, ds.crops[0]


# An input reaching past the raw volume's edge (y starts at 0 there): every sample's raw has NaN
# padding (pad=True), for NaNtoNum to act on.
PADDED_INPUT = (8, 40, 8)


def make_dataset(crop, raw=None, target=None, *, shape=(8, 8, 8), input_shape=None, spatial=None, seed=7,
                 **kwargs) -> CellMapDataset:
    tiny_data, ds, c = crop
    scale = list(c.voxel_size)
    return CellMapDataset(
        str(ds.raw_path), c.target_path, tiny_data.classes, {"input": {"shape": input_shape or shape, "scale": scale}},
        {"output": {"shape": shape, "scale": scale}}, pad=True, spatial_transforms=spatial,
        raw_value_transforms=raw, target_value_transforms=target, seed=seed, **kwargs,
    )


def _indices(ds) -> list[int]:
    n = len(ds)
    return [0, 1, n // 3, n // 2, n - 2, n - 1]


@pytest.mark.parametrize("spatial", [None, SPATIAL], ids=["plain", "augmented"])
def test_split_defaults_on_real_reads_equal_torch_on_untransformed_reads(crop, spatial):
    defaults = make_dataset(crop, default_raw_transforms(), default_target_transforms(), input_shape=PADDED_INPUT,
                            spatial=spatial)
    plain = make_dataset(crop, None, None, input_shape=PADDED_INPUT, spatial=spatial)
    raw_t, target_t = default_raw_transforms(), default_target_transforms()
    padded = 0
    for i in _indices(plain):
        got, read = defaults[i], plain[i]
        padded += bool(torch.isnan(read["input"]).any())
        assert_same_numbers(got["input"], raw_t(read["input"].clone()))
        assert_same_numbers(got["output"], target_t(read["output"].clone()))
        assert not torch.isnan(got["input"]).any()
    assert padded, "no sample reached the NaN padding: the test would not see NaNtoNum work"


def test_an_all_engine_raw_and_target_pipeline_on_real_reads_equals_torch_per_sample(crop):
    raw_t = T.Compose([Normalize(), GaussianBlur(3, 1.0, dim=3), RandomContrast((1.3, 1.3)), NaNtoNum({"nan": 0})])
    target_t = T.Compose([T.ToDtype(torch.float32), GaussianBlur(3, 0.8, dim=3), Binarize(0.5)])
    ds = make_dataset(crop, raw_t, target_t, spatial=SPATIAL)
    assert [r["where"] for r in ds.value_transform_plan] == [ENGINE] * 4 + [SKIPPED, ENGINE, ENGINE]
    plain = make_dataset(crop, None, None, spatial=SPATIAL)
    indices = _indices(plain)
    got, read = ds.get_batch(indices), plain.get_batch(indices)
    assert torch.isnan(read["input"]).any()  # rotated past the raw volume: NaN through blur and contrast
    assert_same_numbers(got["input"], torch_per_sample(raw_t, read["input"]))
    assert_same_numbers(got["output"], torch_per_sample(target_t, read["output"]))


def test_an_engine_pipeline_on_2d_reads_equals_torch_per_sample(crop):
    raw_t = T.Compose([GaussianBlur(5, 1.5, dim=2), RandomGamma((0.7, 0.7)), Normalize()])
    ds = make_dataset(crop, raw_t, None, shape=(1, 16, 16))
    plain = make_dataset(crop, None, None, shape=(1, 16, 16))
    indices = _indices(plain)
    got, read = ds.get_batch(indices), plain.get_batch(indices)
    assert got["input"].shape == (len(indices), 1, 16, 16)
    assert_same_numbers(got["input"], torch_per_sample(raw_t, read["input"]))


@pytest.mark.parametrize("spatial", [None, SPATIAL], ids=["plain", "augmented"])
def test_loader_batches_with_split_defaults_equal_torch_on_untransformed_batches(crop, spatial):
    raw_t, target_t = default_raw_transforms(), default_target_transforms()
    loaders = [
        CellMapDataLoader(make_dataset(crop, r, t, input_shape=PADDED_INPUT, spatial=spatial), batch_size=4,
                          num_workers=2, iterations_per_epoch=3, seed=21)
        for r, t in ((default_raw_transforms(), default_target_transforms()), (None, None))
    ]
    pairs = list(zip(*loaders))
    assert len(pairs) == 3
    for got, read in pairs:
        assert torch.equal(got["idx"], read["idx"])  # same seed: same samples
        assert got["input"].shape == (4, 1, *PADDED_INPUT) and torch.isnan(read["input"]).any()
        assert_same_numbers(got["input"], torch_per_sample(raw_t, read["input"]))
        assert_same_numbers(got["output"], torch_per_sample(target_t, read["output"]))


# -- 4. no wasted work, visible -----------------------------------------------------------------
def _rows(ds) -> list[tuple[str, str, str]]:
    return [(r["arrays"], r["transform"], r["where"]) for r in ds.value_transform_plan]


def test_plan_of_the_split_defaults_skips_identities_and_runs_nan_to_num_in_the_engine(crop):
    ds = make_dataset(crop, default_raw_transforms(), default_target_transforms())
    rows = _rows(ds)
    assert [(a, w) for a, _, w in rows] == [("raw", SKIPPED), ("raw", ENGINE), ("targets", SKIPPED), ("targets", SKIPPED)]
    assert rows[0][1].startswith("ToDtype") and rows[1][1].startswith("NaNtoNum")
    assert rows[2][1].startswith("ToDtype") and rows[3][1].startswith("Binarize")


def test_binarize_after_noise_is_not_an_identity_and_runs_in_the_engine(crop):
    ds = make_dataset(crop, None, T.Compose([GaussianNoise(0.0, 0.2), Binarize(0.5)]))
    assert [w for a, _, w in _rows(ds) if a == "targets"] == [ENGINE, ENGINE]
    assert set(torch.unique(ds[0]["output"][2:]).tolist()) <= {0.0, 1.0}  # annotated classes


@pytest.mark.parametrize("threshold, where", [(0.0, SKIPPED), (0.5, SKIPPED), (0.99, SKIPPED), (1.0, ENGINE), (-0.5, ENGINE)])
def test_binarize_on_labels_is_skipped_exactly_when_it_cannot_change_0_1_nan(threshold, where):
    # 0 > t and 1 > t keep 0 and 1 only for 0 <= t < 1.
    assert plan_value_transforms(Binarize(threshold), binary=True).describe()[0][1] == where
    y = torch.tensor([0.0, 1.0, float("nan")])
    changes = not torch.equal(Binarize(threshold)(y).nan_to_num(7), y.nan_to_num(7))
    assert changes == (where == ENGINE)


def test_compact_targets_keep_target_transforms_in_torch_with_the_same_numbers(crop):
    compact = make_dataset(crop, default_raw_transforms(), default_target_transforms(), compact_targets=True)
    rows = _rows(compact)
    assert [w for a, _, w in rows if a == "raw"] == [SKIPPED, ENGINE]
    assert all(w.startswith("torch") for a, _, w in rows if a == "targets")
    full = make_dataset(crop, default_raw_transforms(), default_target_transforms())
    indices = _indices(full)
    a, b = compact.get_batch(indices), full.get_batch(indices)
    assert_same_numbers(a["input"], b["input"])
    assert_same_numbers(a["output"], b["output"])


def test_a_subclass_of_a_known_transform_is_not_mistaken_for_it():
    class Shifted(NaNtoNum):
        def forward(self, x):
            return super().forward(x) + 1

    plan = plan_value_transforms(T.Compose([Normalize(), Shifted({"nan": 0})]))
    assert [w for _, w in plan.describe()] == [ENGINE, TORCH_BATCH]


# -- 5. foreign transforms keep the reference's meaning ------------------------------------------
class RandomOffset:
    """A user's own random transform: ``x + U(0, 1)`` from torch's global RNG, one draw per call.
    Records the shape of every call, the drawn offset and the largest value it saw."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.offsets: list[float] = []
        self.maxima: list[float] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        offset = torch.rand(())
        self.shapes.append(tuple(x.shape))
        self.offsets.append(float(offset))
        self.maxima.append(float(x.nan_to_num(-math.inf).max()))
        return x + offset


BATCH = [0, 5, 700, 1400]


@pytest.mark.parametrize("shape", [(1, 16, 16), (8, 8, 8)], ids=["2d", "3d"])
def test_a_foreign_random_transform_is_called_per_sample_on_the_reference_shape(crop, shape):
    offset = RandomOffset()
    ds = make_dataset(crop, offset, None, shape=shape, seed=3)
    assert _rows(ds)[0][2] == TORCH_SAMPLE
    plain = make_dataset(crop, None, None, shape=shape, seed=3)
    state = torch.get_rng_state()
    got = ds.get_batch(BATCH)
    assert torch.equal(torch.get_rng_state(), state), "get_batch changed torch's global RNG state"
    assert offset.shapes == [shape] * len(BATCH)
    assert len(set(offset.offsets)) == len(BATCH), "samples of one batch shared a draw"
    read = plain.get_batch(BATCH)["input"]
    for i, drawn in enumerate(offset.offsets):
        assert_same_numbers(got["input"][i], read[i] + drawn)


@pytest.mark.parametrize("shape", [(1, 16, 16), (8, 8, 8)], ids=["2d", "3d"])
def test_a_foreign_random_transform_is_reproducible_per_seed_and_per_sample(crop, shape):
    first, second, other = RandomOffset(), RandomOffset(), RandomOffset()
    a = make_dataset(crop, first, None, shape=shape, seed=3).get_batch(BATCH)
    b = make_dataset(crop, second, None, shape=shape, seed=3).get_batch(BATCH)
    assert torch.equal(a["input"], b["input"]) and first.offsets == second.offsets
    make_dataset(crop, other, None, shape=shape, seed=4).get_batch(BATCH)
    assert other.offsets != first.offsets  # another seed, other draws
    # a sample's draw does not depend on the batch it is read in
    alone = RandomOffset()
    single = make_dataset(crop, alone, None, shape=shape, seed=3)[BATCH[2]]
    assert torch.equal(single["input"], a["input"][2]) and alone.offsets == [first.offsets[2]]


def test_engine_prefix_then_foreign_transform_equals_the_whole_compose_per_sample(crop):
    offset = RandomOffset()
    pipeline = T.Compose([Normalize(), NaNtoNum({"nan": 0, "posinf": None, "neginf": None}), offset])
    ds = make_dataset(crop, pipeline, None, seed=9)
    assert [w for _, _, w in _rows(ds)] == [ENGINE, ENGINE, TORCH_SAMPLE]
    got = ds.get_batch(BATCH)["input"]
    assert offset.shapes == [(8, 8, 8)] * len(BATCH)
    assert max(offset.maxima) <= 1.0  # the foreign transform saw normalised values
    assert len(set(offset.offsets)) == len(BATCH)
    read = make_dataset(crop, None, None, seed=9).get_batch(BATCH)["input"]
    replay = iter(offset.offsets)  # torch's whole Compose, per sample, with the drawn offsets
    expected = torch_per_sample(T.Compose([Normalize(), NaNtoNum({"nan": 0}), lambda x: x + next(replay)]), read)
    assert_same_numbers(got, expected)


def test_a_foreign_target_transform_is_called_per_sample_and_per_class(crop):
    offset = RandomOffset()
    ds = make_dataset(crop, None, offset, seed=2)
    n_classes = len(ds.classes)
    got = ds.get_batch(BATCH[:2])["output"]
    assert offset.shapes == [(8, 8, 8)] * (2 * n_classes)
    assert len(set(offset.offsets)) == 2 * n_classes
    read = make_dataset(crop, seed=2).get_batch(BATCH[:2])["output"]
    drawn = torch.tensor(offset.offsets).reshape(2, n_classes, 1, 1, 1)
    assert_same_numbers(got, read + drawn)


def test_loader_gives_each_sample_its_own_draw_of_a_foreign_transform_reproducibly(crop):
    batches = []
    for _ in range(2):
        offset = RandomOffset()
        loader = CellMapDataLoader(make_dataset(crop, offset, None, seed=5), batch_size=4, num_workers=2,
                                   iterations_per_epoch=2, seed=5)
        batches.append([b["input"] for b in loader])
        assert offset.shapes == [(8, 8, 8)] * 8 and len(set(offset.offsets)) == 8
    for a, b in zip(*batches):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 16, 16), (8, 8, 8)], ids=["2d", "3d"])
def test_per_class_target_transforms_run_in_the_engine_and_equal_torch_per_class(crop, shape):
    per_class = {
        "mito": T.Compose([GaussianBlur(3, 1.0, dim=3), Binarize(0.5)]),
        "er": Normalize(shift=1.0, scale=2.0),
        "ecs": NaNtoNum({"nan": -1}),  # not annotated: all NaN
        "ves": RandomContrast((1.5, 1.5)),
    }
    ds = make_dataset(crop, None, per_class, shape=shape)
    rows = _rows(ds)
    assert all(w == ENGINE for a, _, w in rows if a.startswith("targets")), rows
    assert {a for a, _, _ in rows} == {"targets[mito]", "targets[er]", "targets[ecs]", "targets[ves]"}
    plain = make_dataset(crop, None, None, shape=shape)
    indices = _indices(plain)
    got, read = ds.get_batch(indices)["output"], plain.get_batch(indices)["output"]
    for c, name in enumerate(ds.classes):
        t = per_class.get(name, lambda x: x)
        # the reference calls each class's transform on that class's patch, of the array's shape
        expected = torch.stack([t(sample[c].reshape(shape).clone()).reshape(sample[c].shape) for sample in read])
        assert_same_numbers(got[:, c], expected)
    assert (got[:, ds.classes.index("ecs")] == -1).all()


def test_a_3d_blur_of_2d_targets_blurs_each_class_on_its_own(crop):
    blur = GaussianBlur(3, 1.0, dim=3)
    ds = make_dataset(crop, None, blur, shape=(1, 16, 16))
    read = make_dataset(crop, shape=(1, 16, 16)).get_batch(BATCH)["output"]
    got = ds.get_batch(BATCH)["output"]
    expected = torch.stack([
        torch.stack([blur(sample[c].reshape(1, 16, 16)).reshape(16, 16) for c in range(sample.shape[0])])
        for sample in read
    ])
    assert_same_numbers(got, expected)


def test_a_contrast_of_targets_is_taken_about_each_class_mean(crop):
    contrast = RandomContrast((0.5, 0.5))  # a fixed ratio: only the mean decides
    ds = make_dataset(crop, None, contrast)
    indices = list(range(0, len(ds), 1000))
    read = make_dataset(crop).get_batch(indices)["output"]
    got = ds.get_batch(indices)["output"]
    expected = torch.stack([torch.stack([contrast(channel.clone()) for channel in sample]) for sample in read])
    assert_same_numbers(got, expected)
