"""EM defect augmentations: missing sections, misalignment (slips), defect stripes.

Every applied result is checked against a reference written here with numpy from the draws the
transform reports (``draws()``), never against the transform's own earlier output:

1. each transform equals its numpy reference on random batches (NaN included), in both modes
   (one patch, seeded batch), and keeps shapes and dtypes; prob 0 is the identity;
2. draws are reproducible, differ between seeds, do not depend on the batch a sample is in, and
   are replayed by ``draws()`` (salt and call number, or a key);
3. keyed misalignment moves raw and labels alike (labels stay label values, NaN at borders),
   also when the label patch is smaller than the raw patch;
4. parameter checks name the parameter;
5. through ``CellMapDataset`` / ``CellMapDataLoader`` on synthetic data: the transforms run on
   whole batches, equal the references built from each sample's recorded ``value_seed``, and the
   same seed gives the same batches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmap_data import CellMapDataLoader, CellMapDataset
from cellmap_data.exceptions import ConfigError
from cellmap_data.transforms import DefectStripes, GaussianNoise, Misalign, MissingSections, sample_seeds
from cellmap_data.transforms.augment._common import owned_batch

RANGES = [(0.0, 1.0), (0.0, 255.0), (-1.0, 1.0), (0.0, 65535.0), (0.0, 1e5)]
SEEDS = st.integers(0, 2**40)


# -- numpy references ---------------------------------------------------------------------------
def ref_fill(x: np.ndarray, draws: list[dict], fill: float) -> np.ndarray:
    """Sections listed in ``draws`` set to ``fill`` (x: [B, C, z, y, x])."""
    out = x.copy()
    for b, drawn in enumerate(draws):
        for z in drawn["sections"]:
            out[b, :, z] = fill
    return out


def ref_drop(x: np.ndarray, draws: list[dict]) -> np.ndarray:
    """Sections listed in ``draws`` deleted, the rest moved up, the last kept one repeated."""
    out = x.copy()
    depth = x.shape[2]
    for b, drawn in enumerate(draws):
        kept = np.delete(x[b], drawn["sections"], axis=1)
        tail = np.repeat(kept[:, -1:], depth - kept.shape[1], axis=1)
        out[b] = np.concatenate([kept, tail], axis=1)
    return out


def ref_shift(a: np.ndarray, dy: int, dx: int, fill: Any) -> np.ndarray:
    """``a[..., y, x]`` moved by (dy, dx): edge-padded window, or np.roll with borders filled."""
    height, width = a.shape[-2:]
    if fill == "edge":
        py, px = abs(dy), abs(dx)
        padded = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(py, py), (px, px)], mode="edge")
        return padded[..., py - dy: py - dy + height, px - dx: px - dx + width]
    out = np.roll(a, (dy, dx), axis=(-2, -1))
    if dy > 0:
        out[..., :dy, :] = fill
    elif dy < 0:
        out[..., dy:, :] = fill
    if dx > 0:
        out[..., :, :dx] = fill
    elif dx < 0:
        out[..., :, dx:] = fill
    return out


def ref_misalign(x: np.ndarray, draws: list[dict], fill: Any) -> np.ndarray:
    out = x.copy()
    for b, drawn in enumerate(draws):
        if drawn["sections"]:
            z = drawn["sections"]
            out[b][:, z] = ref_shift(x[b][:, z], *drawn["shift"], fill)
    return out


def ref_value_range(sample: np.ndarray) -> tuple[float, float]:
    """(top, bottom) of a sample's value range: 1, 255 or 65535 (else its magnitude)."""
    finite = sample[~np.isnan(sample)]
    magnitude = float(np.abs(finite).max()) if finite.size else -math.inf
    top = next((c for c in (1.0, 255.0, 65535.0) if magnitude <= c), magnitude)
    bottom = -top if finite.size and finite.min() < 0 else 0.0
    return top, bottom


def ref_stripes(x: np.ndarray, draws: list[dict]) -> np.ndarray:
    out = x.copy()
    height, width = x.shape[-2:]
    for b, drawn in enumerate(draws):
        top, bottom = ref_value_range(x[b])
        for stripe in drawn["stripes"]:
            cy, cx = stripe["centre"]
            theta = math.radians(stripe["angle"])
            rows = np.arange(height)[:, None] - cy
            columns = np.arange(width)[None, :] - cx
            inside = np.abs(rows * math.cos(theta) - columns * math.sin(theta)) <= stripe["width"] / 2
            s = stripe["strength"]
            target = np.float32(top if s > 0 else bottom)
            section = x[b, :, stripe["section"]]
            changed = section + np.float32(abs(s)) * (target - section)
            out[b, :, stripe["section"]] = np.where(inside, changed, section)
    return out


def assert_same(actual: torch.Tensor, expected: np.ndarray, exact: bool = True) -> None:
    a = actual.detach().cpu().numpy()
    assert a.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(expected), err_msg="NaN positions differ")
    if exact:
        np.testing.assert_array_equal(a, expected)
    else:
        scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
        np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-6 * scale, equal_nan=True)


@st.composite
def batches(draw, *, min_depth: int = 1, nan: bool = True) -> torch.Tensor:
    """A float32 batch [B, C, z, y, x] (or [B, C, y, x]) with values from one of RANGES and some NaN."""
    spatial = (draw(st.integers(min_depth, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    if min_depth <= 1 and draw(st.booleans()):
        spatial = spatial[1:]
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 2)), *spatial)
    lo, hi = draw(st.sampled_from(RANGES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.uniform(lo, hi, size=shape).astype(np.float32)
    if nan:
        x[rng.random(shape) < draw(st.sampled_from([0.0, 0.1, 1.0]))] = np.nan
    return torch.from_numpy(x)


def as_sections(x: torch.Tensor) -> np.ndarray:
    """A batch as numpy [B, C, z, y, x] (2-D batches get a z of 1)."""
    a = x.numpy()
    return a if a.ndim == 5 else a[:, :, None]


def run(transform, x: torch.Tensor, seeds, salt: str = "raw") -> torch.Tensor:
    with sample_seeds(seeds, salt=salt):
        return transform(x)


def spatial_of(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[2:])


# -- 1. equal to the numpy references -------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(x=batches(), prob=st.sampled_from([0.0, 0.3, 0.7, 1.0]), fill=st.sampled_from([0.0, -1.0, 255.0, math.nan]),
       seed=SEEDS)
def test_missing_sections_fill_equals_the_numpy_reference(x, prob, fill, seed):
    t = MissingSections(prob, "fill", fill)
    seeds = [seed + i for i in range(x.shape[0])]
    out = run(t, x.clone(), seeds)
    draws = t.draws(seeds, spatial_of(x), salt="raw")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_same(out, ref_fill(as_sections(x), draws, fill).reshape(x.shape))
    depth = as_sections(x).shape[2]
    for drawn in draws:
        assert len(drawn["sections"]) <= depth - 1  # one section always survives
        assert drawn["sections"] == sorted(set(drawn["sections"]))


@settings(max_examples=25, deadline=None)
@given(x=batches(), prob=st.sampled_from([0.0, 0.3, 0.7, 1.0]), seed=SEEDS)
def test_missing_sections_drop_equals_the_numpy_reference(x, prob, seed):
    t = MissingSections(prob, "drop")
    seeds = [seed + i for i in range(x.shape[0])]
    out = run(t, x.clone(), seeds)
    draws = t.draws(seeds, spatial_of(x), salt="raw")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_same(out, ref_drop(as_sections(x), draws).reshape(x.shape))


def test_missing_sections_drop_moves_the_following_sections_up_by_hand():
    x = torch.arange(5.0).reshape(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2).contiguous()
    t = MissingSections(0.4, "drop")
    seed = next(s for s in range(1000) if t.draws([s], (5, 2, 2), salt="raw")[0]["sections"] == [1])
    out = run(t, x, [seed])
    assert out[0, 0, :, 0, 0].tolist() == [0.0, 2.0, 3.0, 4.0, 4.0]


@settings(max_examples=30, deadline=None)
@given(x=batches(), probs=st.sampled_from([(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.2, 0.3)]),
       max_shift=st.sampled_from([1, 3, (0, 2), (12, 1)]), fill=st.sampled_from(["edge", 0.0, math.nan]), seed=SEEDS)
def test_misalign_equals_np_roll_and_slicing_references(x, probs, max_shift, fill, seed):
    t = Misalign(*probs, max_shift=max_shift, fill=fill)
    seeds = [seed + i for i in range(x.shape[0])]
    out = run(t, x.clone(), seeds)
    draws = t.draws(seeds, spatial_of(x), salt="raw")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_same(out, ref_misalign(as_sections(x), draws, fill).reshape(x.shape))
    reach = (max_shift, max_shift) if isinstance(max_shift, int) else max_shift
    depth = as_sections(x).shape[2]
    for drawn in draws:
        if drawn["kind"] is None:
            assert drawn["sections"] == [] and drawn["shift"] is None
            continue
        dy, dx = drawn["shift"]
        assert (dy, dx) != (0, 0) and abs(dy) <= reach[0] and abs(dx) <= reach[1]
        expected = [drawn["section"]] if drawn["kind"] == "slip" else list(range(drawn["section"], depth))
        assert drawn["sections"] == expected
        assert drawn["kind"] == "slip" or drawn["section"] >= 1  # the first section never moves


def test_misalign_kinds_and_shifts_follow_their_probabilities():
    t = Misalign(0.3, 0.2, max_shift=(1, 2))
    draws = t.draws(list(range(3000)), (10, 4, 4))
    kinds = [d["kind"] for d in draws]
    for kind, p in (("slip", 0.3), ("translation", 0.2), (None, 0.5)):
        share = kinds.count(kind) / len(kinds)
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / len(kinds)), (kind, share)
    shifts = {d["shift"] for d in draws if d["shift"] is not None}
    assert shifts == {(dy, dx) for dy in (-1, 0, 1) for dx in (-2, -1, 0, 1, 2)} - {(0, 0)}
    sections = [d["section"] for d in draws if d["kind"] == "slip"]
    assert set(sections) == set(range(10))


@settings(max_examples=30, deadline=None)
@given(x=batches(), prob=st.sampled_from([0.0, 0.5, 1.0]),
       strength=st.sampled_from([(-0.8, 0.8), (-1.0, -1.0), (0.5, 1.0)]),
       width=st.sampled_from([(1.0, 4.0), (0.5, 0.5), (3.0, 20.0)]), seed=SEEDS)
def test_defect_stripes_equal_the_numpy_reference(x, prob, strength, width, seed):
    t = DefectStripes(prob, width_range=width, strength_range=strength)
    seeds = [seed + i for i in range(x.shape[0])]
    out = run(t, x.clone(), seeds)
    draws = t.draws(seeds, spatial_of(x), salt="raw")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_same(out, ref_stripes(as_sections(x), draws).reshape(x.shape), exact=False)
    assert torch.equal(torch.isnan(out), torch.isnan(x))  # NaN stays NaN, nothing new is NaN


def test_a_full_strength_dark_stripe_is_a_black_band_along_its_angle():
    x = torch.full((1, 1, 1, 9, 9), 200.0)
    t = DefectStripes(1.0, width_range=(1.0, 1.0), angle_range=(0.0, 0.0), strength_range=(-1.0, -1.0))
    out = run(t, x, [4])
    row = round(t.draws([4], (1, 9, 9), salt="raw")[0]["stripes"][0]["centre"][0])
    expected = torch.full((9, 9), 200.0)
    expected[row] = 0.0
    assert torch.equal(out[0, 0, 0], expected)


@pytest.mark.parametrize("make", [
    lambda: MissingSections(0.0), lambda: MissingSections(0.0, "drop"), lambda: Misalign(0.0, 0.0),
    lambda: DefectStripes(0.0),
], ids=["fill", "drop", "misalign", "stripes"])
def test_probability_zero_is_the_identity(make):
    x = torch.rand(3, 2, 5, 6, 7) * 255
    x[0, 0, 1, 2, 3] = math.nan
    assert_same(run(make(), x.clone(), [1, 2, 3]), x.numpy())
    assert_same(make()(x[0].clone()), x[0].numpy())


@pytest.mark.parametrize("make", [
    lambda: MissingSections(1.0), lambda: MissingSections(1.0, "drop"), lambda: Misalign(0.5, 0.5),
], ids=["fill", "drop", "misalign"])
@pytest.mark.parametrize("shape", [(4, 1, 6, 7), (4, 1, 1, 6, 7)], ids=["2d", "z1"])
def test_a_single_section_is_never_lost_or_shifted(make, shape):
    x = torch.rand(shape)
    assert torch.equal(run(make(), x.clone(), [1, 2, 3, 4]), x)


def test_stripes_act_on_2d_batches():
    x = torch.rand(6, 1, 12, 12)
    t = DefectStripes(1.0, strength_range=(0.5, 1.0))
    out = run(t, x.clone(), range(6))
    assert_same(out, ref_stripes(as_sections(x), t.draws(range(6), (12, 12), salt="raw"))[:, :, 0], exact=False)
    assert not torch.equal(out, x)


def test_integer_input_keeps_its_dtype_unless_the_fill_needs_floats():
    x = torch.randint(0, 3, (2, 1, 4, 5, 5), dtype=torch.int64)
    assert run(MissingSections(1.0), x, [1, 2]).dtype == torch.int64
    assert run(MissingSections(1.0, fill_value=math.nan), x, [1, 2]).dtype == torch.float32
    assert run(Misalign(1.0, 0.0), x, [1, 2]).dtype == torch.int64
    nan_filled = run(Misalign(1.0, 0.0, fill=math.nan), x, [1, 2])
    assert nan_filled.dtype == torch.float32 and torch.isnan(nan_filled).any()
    assert run(DefectStripes(1.0), x.to(torch.uint8), [1, 2]).dtype == torch.float32


@pytest.mark.parametrize("make", [
    lambda: MissingSections(0.5), lambda: MissingSections(0.5, "drop"), lambda: Misalign(0.5, 0.5),
    lambda: DefectStripes(0.5),
], ids=["fill", "drop", "misalign", "stripes"])
def test_one_patch_outside_sample_seeds_draws_from_the_global_rng(make):
    x = torch.rand(1, 6, 8, 8)  # [C, z, y, x]
    torch.manual_seed(5)
    first = make()(x.clone())
    torch.manual_seed(5)
    assert torch.equal(make()(x.clone()), first)
    assert make()(x[0].clone()).shape == x[0].shape  # [z, y, x]


@pytest.mark.parametrize("make", [
    lambda: MissingSections(0.5), lambda: Misalign(0.5, 0.5), lambda: DefectStripes(0.5),
], ids=["fill", "misalign", "stripes"])
def test_owned_batches_are_changed_in_place_with_the_same_numbers(make):
    batch = torch.rand(3, 1, 5, 6, 7) * 255
    batch[0, 0, 0, 0, 0] = math.nan
    untouched = batch.clone()
    expected = run(make(), batch, [1, 2, 3])
    assert torch.equal(batch.nan_to_num(-1), untouched.nan_to_num(-1))  # not owned: left alone
    owned = batch.clone()
    with owned_batch(owned):
        result = run(make(), owned, [1, 2, 3])
    assert result.data_ptr() == owned.data_ptr()
    torch.testing.assert_close(result, expected, equal_nan=True)


# -- 2. reproducible, per sample, replayable ------------------------------------------------------
TRANSFORMS = {
    "fill": lambda: MissingSections(0.4),
    "drop": lambda: MissingSections(0.4, "drop"),
    "misalign": lambda: Misalign(0.4, 0.4, max_shift=2),
    "stripes": lambda: DefectStripes(0.4),
    "keyed": lambda: Misalign(0.4, 0.4, key="k"),
}


@settings(max_examples=20, deadline=None)
@given(x=batches(min_depth=3), name=st.sampled_from(sorted(TRANSFORMS)), seeds=st.lists(SEEDS, min_size=1, max_size=3))
def test_a_sample_gets_the_same_result_alone_as_in_any_batch(x, name, seeds):
    x = x[:1].expand(len(seeds), *x.shape[1:]).clone()  # one patch, several seeds
    t = TRANSFORMS[name]()
    whole = run(t, x.clone(), seeds)
    for i, seed in enumerate(seeds):
        alone = run(t, x[i: i + 1].clone(), [seed])
        assert torch.equal(alone.nan_to_num(-7), whole[i: i + 1].nan_to_num(-7))
    assert torch.equal(run(t, x.clone(), seeds).nan_to_num(-7), whole.nan_to_num(-7))  # same seeds, same output


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_different_seeds_draw_differently(name):
    t = TRANSFORMS[name]()
    draws = t.draws(list(range(40)), (8, 16, 16), salt="raw")
    assert len({repr(d) for d in draws}) > 20
    x = torch.rand(1, 1, 8, 16, 16).expand(40, 1, 8, 16, 16).contiguous()
    out = run(t, x, list(range(40)))
    assert len({out[i].numpy().tobytes() for i in range(40)}) > 10


def test_draws_replay_each_transform_of_a_pipeline_by_salt_and_call_number():
    missing, noise, misalign, stripes = MissingSections(0.3), GaussianNoise(0.0, 0.0), Misalign(0.5, 0.5), DefectStripes(0.5)
    pipeline = T.Compose([missing, noise, misalign, stripes])  # noise is call 1
    x = torch.rand(4, 1, 6, 9, 9) * 255
    seeds, shape = [11, 12, 13, 14], (6, 9, 9)
    out = run(pipeline, x.clone(), seeds, salt="target2")
    expected = ref_fill(x.numpy(), missing.draws(seeds, shape, salt="target2", call_number=0), 0.0)
    expected = ref_misalign(expected, misalign.draws(seeds, shape, salt="target2", call_number=2), "edge")
    expected = ref_stripes(expected, stripes.draws(seeds, shape, salt="target2", call_number=3))
    assert_same(out, expected, exact=False)
    assert missing.draws(seeds, shape, salt="raw") != missing.draws(seeds, shape, salt="target2")


def test_keyed_draws_ignore_salt_and_call_number_and_differ_by_key():
    x = torch.rand(8, 1, 6, 9, 9)
    seeds = list(range(100, 108))
    first = Misalign(0.5, 0.5, key="slip")
    with sample_seeds(seeds, salt="raw"):
        GaussianNoise(0.0, 0.0)(x)  # takes call number 0
        late = first(x.clone())
    early = run(Misalign(0.5, 0.5, key="slip"), x.clone(), seeds, salt="target3")
    assert torch.equal(late, early)
    assert first.draws(seeds, (6, 9, 9)) == first.draws(seeds, (6, 9, 9), salt="other", call_number=7)
    assert first.draws(seeds, (6, 9, 9)) != Misalign(0.5, 0.5, key="other").draws(seeds, (6, 9, 9))
    assert first.draws(seeds, (6, 9, 9)) != Misalign(0.5, 0.5).draws(seeds, (6, 9, 9))


# -- 3. raw and labels misaligned alike -----------------------------------------------------------
def _labels(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.choice(np.array([0.0, 1.0, np.nan], dtype=np.float32), size=shape, p=[0.5, 0.4, 0.1])


def _raw_of(labels: np.ndarray) -> np.ndarray:
    """Raw that is a known function of the labels (first class), so shifts can be compared."""
    return np.where(np.isnan(labels), 7.0, labels * 100.0 + 20.0).astype(np.float32)


def _per_class(transform, labels: torch.Tensor, seeds) -> torch.Tensor:
    """As a dataset runs target transforms: one block per class, salt ``target{c}``."""
    return torch.stack([run(transform, labels[:, c: c + 1].clone(), seeds, f"target{c}")[:, 0]
                        for c in range(labels.shape[1])], dim=1)


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, depth=st.integers(2, 6), size=st.integers(3, 9), max_shift=st.sampled_from([1, 3, (2, 0)]))
def test_keyed_misalignment_moves_raw_and_every_label_class_alike(seed, depth, size, max_shift):
    rng = np.random.default_rng(seed)
    labels = _labels(rng, (4, 3, depth, size, size))
    labels[:, 1:] = labels[:, :1]  # all classes alike, so they can be compared with each other
    raw = _raw_of(labels[:, :1])
    raw_t = Misalign(0.5, 0.5, max_shift=max_shift, key="slip")
    seeds = [seed + i for i in range(4)]
    raw_out = run(raw_t, torch.from_numpy(raw), seeds).numpy()
    label_out = _per_class(raw_t.for_labels(), torch.from_numpy(labels), seeds).numpy()
    draws = raw_t.draws(seeds, (depth, size, size))
    np.testing.assert_array_equal(label_out, ref_misalign(labels, draws, np.nan))
    np.testing.assert_array_equal(raw_out, ref_misalign(raw, draws, "edge"))
    assert set(np.unique(label_out[~np.isnan(label_out)]).tolist()) <= {0.0, 1.0}
    known = ~np.isnan(label_out[:, :1])
    np.testing.assert_array_equal(raw_out[known], _raw_of(label_out[:, :1])[known])
    for c in (1, 2):
        np.testing.assert_array_equal(label_out[:, c], label_out[:, 0])


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, kind=st.sampled_from([(1.0, 0.0), (0.0, 1.0)]))
def test_a_smaller_centred_label_patch_sees_the_slip_of_its_raw_with_frame_sections(seed, kind):
    # raw: 8 sections of 10x10; labels: the centred 4 sections of 8x8 (starting at raw (2, 1, 1)).
    rng = np.random.default_rng(seed)
    full_labels = _labels(rng, (3, 1, 8, 10, 10))
    raw = _raw_of(full_labels)
    labels = full_labels[:, :, 2:6, 1:9, 1:9].copy()
    raw_t = Misalign(*kind, max_shift=2, frame_sections=8, key=5)
    seeds = [seed, seed + 1, seed + 2]
    raw_out = run(raw_t, torch.from_numpy(raw), seeds).numpy()
    label_out = _per_class(raw_t.for_labels(), torch.from_numpy(labels), seeds).numpy()
    known = ~np.isnan(label_out)
    window = raw_out[:, :, 2:6, 1:9, 1:9]
    np.testing.assert_array_equal(window[known], _raw_of(label_out)[known])
    raw_draws, label_draws = raw_t.draws(seeds, (8, 10, 10)), raw_t.draws(seeds, (4, 8, 8))
    for r, lab in zip(raw_draws, label_draws):
        assert (r["kind"], r["shift"]) == (lab["kind"], lab["shift"]) and lab["section"] == r["section"] - 2
        assert lab["sections"] == [z - 2 for z in r["sections"] if 2 <= z < 6]
    np.testing.assert_array_equal(label_out, ref_misalign(labels, label_draws, np.nan))


def test_for_labels_needs_a_key_and_keeps_every_draw_parameter():
    with pytest.raises(ConfigError, match="key"):
        Misalign().for_labels()
    m = Misalign(0.1, 0.2, max_shift=(3, 1), frame_sections=12, key="s")
    labels = m.for_labels()
    assert (labels.slip_prob, labels.translation_prob, labels.max_shift, labels.frame_sections, labels.key) == (
        0.1, 0.2, (3, 1), 12, "s")
    assert math.isnan(labels.fill) and m.for_labels(-100.0).fill == -100.0


# -- 4. parameter checks --------------------------------------------------------------------------
@pytest.mark.parametrize("make, name", [
    (lambda: MissingSections(prob=1.5), "prob"),
    (lambda: MissingSections(prob=True), "prob"),
    (lambda: MissingSections(mode="skip"), "mode"),
    (lambda: MissingSections(fill_value="zero"), "fill_value"),
    (lambda: MissingSections(key=1.5), "key"),
    (lambda: Misalign(slip_prob=-0.1), "slip_prob"),
    (lambda: Misalign(translation_prob=2), "translation_prob"),
    (lambda: Misalign(0.6, 0.6), "slip_prob + translation_prob"),
    (lambda: Misalign(max_shift=0), "max_shift"),
    (lambda: Misalign(max_shift=1.5), "max_shift"),
    (lambda: Misalign(max_shift=(1, 2, 3)), "max_shift"),
    (lambda: Misalign(max_shift=(-1, 2)), "max_shift"),
    (lambda: Misalign(fill="reflect"), "fill"),
    (lambda: Misalign(frame_sections=0), "frame_sections"),
    (lambda: Misalign(frame_sections=2.0), "frame_sections"),
    (lambda: DefectStripes(prob=-1), "prob"),
    (lambda: DefectStripes(width_range=(0.0, 2.0)), "width_range"),
    (lambda: DefectStripes(width_range=(3.0, 2.0)), "width_range"),
    (lambda: DefectStripes(angle_range=(0.0, math.inf)), "angle_range"),
    (lambda: DefectStripes(angle_range=5), "angle_range"),
    (lambda: DefectStripes(strength_range=(-1.5, 0.0)), "strength_range"),
])
def test_bad_parameters_raise_config_error_naming_the_parameter(make, name):
    with pytest.raises(ConfigError) as error:
        make()
    assert name in str(error.value)
    assert isinstance(error.value, ValueError)


def test_bad_shapes_are_refused_with_the_shape():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        Misalign()(torch.rand(5))
    with pytest.raises(ValueError, match="MissingSections"):
        run(MissingSections(), torch.rand(2, 1, 1, 2, 3, 4), [1, 2])
    with pytest.raises(ConfigError, match="shape"):
        DefectStripes().draws([1], (2, 3, 4, 5))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_the_transforms_are_modules_that_move_like_modules(name):
    t = TRANSFORMS[name]()
    assert isinstance(t, torch.nn.Module)
    assert t.to("cpu") is t and t.to(torch.float64) is t  # nn.Module's own machinery still works
    x = torch.rand(2, 1, 4, 5, 5)
    with sample_seeds([1, 2]):
        called = t(x.clone())
    with sample_seeds([1, 2]):
        assert torch.equal(t.transform(x.clone()), called)


def test_reprs_show_every_parameter():
    assert repr(MissingSections(0.1, "drop", 3.0, key="a")) == "MissingSections(prob=0.1, mode='drop', fill_value=3.0, key='a')"
    assert repr(Misalign(0.1, 0.2, 3)) == (
        "Misalign(slip_prob=0.1, translation_prob=0.2, max_shift=(3, 3), fill='edge', frame_sections=None, key=None)")
    assert repr(DefectStripes(0.2, (1, 2), (0, 45), (-1, 0))) == (
        "DefectStripes(prob=0.2, width_range=(1.0, 2.0), angle_range=(0.0, 45.0), strength_range=(-1.0, 0.0), key=None)")


# -- 5. through the datasets and the loader -------------------------------------------------------
@pytest.fixture(scope="module")
def crop(tiny_data):
    ds = tiny_data.datasets[0]
    return tiny_data, ds, ds.crops[0]


def make_dataset(crop, raw=None, target=None, *, shape=(8, 8, 8), seed=7) -> CellMapDataset:
    tiny_data, ds, c = crop
    scale = list(c.voxel_size)
    return CellMapDataset(
        str(ds.raw_path), c.target_path, tiny_data.classes, {"input": {"shape": shape, "scale": scale}},
        {"output": {"shape": shape, "scale": scale}}, pad=True, raw_value_transforms=raw,
        target_value_transforms=target, seed=seed,
    )


def defect_pipeline() -> tuple[T.Compose, Misalign]:
    misalign = Misalign(0.5, 0.5, max_shift=2, key="slip")
    raw = T.Compose([MissingSections(0.2), misalign, DefectStripes(0.3)])
    return raw, misalign


def expected_batch(raw_t: T.Compose, misalign: Misalign, plain: dict, seeds: list[int], shape) -> tuple[np.ndarray, np.ndarray]:
    missing, _, stripes = raw_t.transforms
    raw = ref_fill(plain["input"].numpy(), missing.draws(seeds, shape, salt="raw", call_number=0), 0.0)
    raw = ref_misalign(raw, misalign.draws(seeds, shape), "edge")
    raw = ref_stripes(raw, stripes.draws(seeds, shape, salt="raw", call_number=2))
    labels = ref_misalign(plain["output"].numpy(), misalign.draws(seeds, shape), np.nan)
    return raw, labels


def test_the_plan_runs_the_defects_on_whole_batches(crop):
    raw_t, misalign = defect_pipeline()
    ds = make_dataset(crop, raw_t, misalign.for_labels())
    assert {r["where"] for r in ds.value_transform_plan} == {"torch (whole batch)"}


def test_loader_batches_equal_the_references_from_the_recorded_seeds_and_repeat_per_seed(crop):
    runs = []
    for _ in range(2):
        raw_t, misalign = defect_pipeline()
        loader = CellMapDataLoader(make_dataset(crop, raw_t, misalign.for_labels()), batch_size=4, num_workers=2,
                                   iterations_per_epoch=3, seed=21, return_metadata=True)
        runs.append(list(loader))
    plain = list(CellMapDataLoader(make_dataset(crop), batch_size=4, num_workers=2, iterations_per_epoch=3, seed=21,
                                   return_metadata=True))
    changed = shifted = 0
    for got, again, read in zip(*runs, plain):
        assert torch.equal(got["idx"], read["idx"])
        assert torch.equal(got["input"].nan_to_num(-1), again["input"].nan_to_num(-1))
        assert torch.equal(got["output"].nan_to_num(-1), again["output"].nan_to_num(-1))
        seeds = [m["value_seed"] for m in got["__metadata__"]]
        assert seeds == [m["value_seed"] for m in read["__metadata__"]]
        raw, labels = expected_batch(raw_t, misalign, read, seeds, (8, 8, 8))
        assert_same(got["input"], raw, exact=False)
        assert_same(got["output"], labels)
        values = got["output"].numpy()
        assert set(np.unique(values[~np.isnan(values)]).tolist()) <= {0.0, 1.0}
        changed += int(not torch.equal(got["input"].nan_to_num(-1), read["input"].nan_to_num(-1)))
        shifted += sum(bool(d["sections"]) for d in misalign.draws(seeds, (8, 8, 8)))
    assert changed and shifted, "no batch was changed: the test would not see the transforms work"


def test_a_dataset_sample_alone_equals_the_same_sample_in_a_batch(crop):
    raw_t, misalign = defect_pipeline()
    ds = make_dataset(crop, raw_t, misalign.for_labels(), seed=3)
    indices = [0, 5, 40, len(ds) - 1]
    batch = ds.get_batch(indices)
    single = ds[indices[2]]
    assert torch.equal(single["input"].nan_to_num(-1), batch["input"][2].nan_to_num(-1))
    assert torch.equal(single["output"].nan_to_num(-1), batch["output"][2].nan_to_num(-1))


def test_2d_dataset_patches_get_stripes_and_keep_their_sections(crop):
    stripes = DefectStripes(1.0)
    pipeline = T.Compose([MissingSections(1.0), Misalign(1.0, 0.0), stripes])
    ds, plain = make_dataset(crop, pipeline, shape=(1, 16, 16)), make_dataset(crop, shape=(1, 16, 16))
    indices = [0, 1, 2]
    got, read = ds.get_batch(indices, return_metadata=True), plain.get_batch(indices)
    assert got["input"].shape == (3, 1, 16, 16)
    seeds = [m["value_seed"] for m in got["__metadata__"]]
    expected = ref_stripes(as_sections(read["input"]), stripes.draws(seeds, (16, 16), salt="raw", call_number=2))
    assert_same(got["input"], expected[:, :, 0], exact=False)


# -- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_on_cuda_the_draws_and_results_are_those_of_the_cpu(name):
    x = torch.rand(4, 1, 6, 9, 9) * 255
    x[0, 0, 0, 0, 0] = math.nan
    on_cpu = run(TRANSFORMS[name](), x.clone(), [1, 2, 3, 4])
    on_cuda = run(TRANSFORMS[name](), x.cuda(), [1, 2, 3, 4])
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, equal_nan=True)
