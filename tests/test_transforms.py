"""Tests for cellmap_data.transforms (augmentations and per-sample seeding)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from cellmap_data.transforms import (
    Binarize,
    GaussianBlur,
    GaussianNoise,
    NaNtoNum,
    Normalize,
    RandomContrast,
    RandomGamma,
    active_sample_seeds,
    sample_seeds,
)
from cellmap_data.transforms import augment
from cellmap_data.transforms.seeding import next_sample_draw_seeds

RANDOM_TRANSFORMS = {
    "noise": lambda: GaussianNoise(mean=0.0, std=0.5),
    "contrast": lambda: RandomContrast((0.5, 1.5)),
    "gamma": lambda: RandomGamma((0.5, 1.5)),
}


def uint8_range_batch(batch_size: int = 4, seed: int = 0) -> torch.Tensor:
    """A float32 batch [B, 1, 6, 7] of 0..255 values, like raw reaching transforms."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 1, 6, 7), generator=generator).float()


# --------------------------------------------------------------------------
# Import paths
# --------------------------------------------------------------------------


def test_transforms_importable_from_augment_module():
    from cellmap_data.transforms.augment import Binarize as AugmentBinarize
    from cellmap_data.transforms.augment import NaNtoNum as AugmentNaNtoNum

    assert AugmentBinarize is Binarize
    assert AugmentNaNtoNum is NaNtoNum


ALL_TRANSFORMS = {
    "Normalize": lambda: Normalize(),
    "GaussianNoise": lambda: GaussianNoise(std=0.5),
    "RandomContrast": lambda: RandomContrast(),
    "RandomGamma": lambda: RandomGamma(),
    "Binarize": lambda: Binarize(0.5),
    "NaNtoNum": lambda: NaNtoNum({"nan": 0}),
    "GaussianBlur": lambda: GaussianBlur(3, 1.0),
}


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_transform_method_is_an_alias_of_calling_the_transform(name):
    transform = ALL_TRANSFORMS[name]()
    x = torch.rand(1, 8, 8)
    x[0, 0, 0] = math.nan
    torch.manual_seed(7)
    called = transform(x)
    torch.manual_seed(7)
    aliased = transform.transform(x)
    torch.manual_seed(7)
    with_params = transform.transform(x, {})  # torchvision's (inpt, params) form
    torch.testing.assert_close(aliased, called, equal_nan=True)
    torch.testing.assert_close(with_params, called, equal_nan=True)


def test_transform_alias_draws_per_sample_inside_sample_seeds():
    batch = uint8_range_batch()
    with sample_seeds([1, 2, 3, 4]):
        called = RandomContrast()(batch)
    with sample_seeds([1, 2, 3, 4]):
        aliased = RandomContrast().transform(batch)
    torch.testing.assert_close(aliased, called)


def test_binarize_transform_gives_hand_computed_values():
    x = torch.tensor([0.2, 0.5, 0.7, math.nan])
    out = Binarize(0.5).transform(x)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0, math.nan]), equal_nan=True)


def test_all_transforms_are_nn_modules():
    transforms = [
        Normalize(),
        GaussianNoise(),
        RandomContrast(),
        RandomGamma(),
        Binarize(),
        NaNtoNum({"nan": 0}),
        GaussianBlur(),
    ]
    assert all(isinstance(transform, torch.nn.Module) for transform in transforms)


# --------------------------------------------------------------------------
# Normalize
# --------------------------------------------------------------------------


def test_normalize_default_maps_0_255_to_unit_interval():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    torch.testing.assert_close(Normalize()(x), torch.tensor([0.0, 0.2, 1.0]))


def test_normalize_applies_shift_before_scale():
    x = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(Normalize(shift=-1, scale=0.5)(x), torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------
# GaussianNoise
# --------------------------------------------------------------------------


def test_gaussian_noise_has_requested_mean_and_std():
    torch.manual_seed(0)
    x = torch.full((1_000_000,), 10.0)
    noise = GaussianNoise(mean=0.5, std=2.0)(x) - x
    # Standard errors: std/sqrt(n) = 0.002 for the mean, ~0.0014 for the std.
    assert abs(noise.mean().item() - 0.5) < 0.01
    assert abs(noise.std().item() - 2.0) < 0.01


def test_gaussian_noise_is_not_clamped():
    torch.manual_seed(0)
    noisy = GaussianNoise(std=1.0)(torch.zeros(10_000))
    assert noisy.min() < 0 and noisy.max() > 1


def test_gaussian_noise_keeps_float_dtype_and_promotes_integers():
    assert GaussianNoise()(torch.zeros(4, dtype=torch.float64)).dtype == torch.float64
    assert GaussianNoise()(torch.zeros(4, dtype=torch.uint8)).dtype == torch.float32


def test_gaussian_noise_batched_has_requested_std_per_sample():
    x = torch.zeros(3, 100_000)
    with sample_seeds([1, 2, 3]):
        noise = GaussianNoise(mean=-1.0, std=0.3)(x)
    assert torch.allclose(noise.mean(dim=1), torch.full((3,), -1.0), atol=0.01)
    assert torch.allclose(noise.std(dim=1), torch.full((3,), 0.3), atol=0.01)


# --------------------------------------------------------------------------
# RandomContrast
# --------------------------------------------------------------------------


def recovered_contrast_ratio(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Solve out = r*x + (1-r)*mean for r, per sample of a [B, N] batch."""
    mean = x.mean(dim=1, keepdim=True)
    return ((out - mean) / (x - mean)).mean(dim=1)


def test_random_contrast_ratio_stays_within_range():
    # Values near 0.5 in [0, 1] never reach the clamp for ratios up to 1.5.
    x = torch.linspace(0.4, 0.6, 21).repeat(200, 1)
    x[:, 10] += 0.001  # keep every voxel away from the mean
    with sample_seeds(range(200)):
        out = RandomContrast((0.7, 1.2))(x)
    ratios = recovered_contrast_ratio(x, out)
    assert ratios.min() >= 0.7 - 1e-4 and ratios.max() <= 1.2 + 1e-4
    assert ratios.max() - ratios.min() > 0.3  # the range is actually explored


def test_random_contrast_clamps_unit_interval_data_to_unit_interval():
    x = torch.tensor([0.0, 0.05, 0.95, 1.0])
    out = RandomContrast((3.0, 3.0))(x)
    assert out.min() == 0.0 and out.max() == 1.0


def test_random_contrast_keeps_0_255_float_data_in_0_255():
    x = torch.tensor([0.0, 100.0, 150.0, 250.0])
    out = RandomContrast((1.5, 1.5))(x)
    mean = x.mean()
    expected = (1.5 * x - 0.5 * mean).clamp(0, 255)
    torch.testing.assert_close(out, expected)
    assert out.max() == 255.0


def test_random_contrast_integer_input_keeps_dtype_and_dtype_range():
    x = torch.tensor([0, 100, 200, 250], dtype=torch.uint8)
    out = RandomContrast((2.0, 2.0))(x)
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 62, 255, 255]  # mean 137.5 -> 2x - 137.5, clamped


def test_random_contrast_turns_nan_into_zero_and_ignores_it_in_mean():
    x = torch.tensor([0.2, math.nan, 0.6])
    out = RandomContrast((0.5, 0.5))(x)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.0, 0.5]))


def test_random_contrast_uses_per_sample_mean_in_batches():
    x = torch.tensor([[0.0, 0.2], [0.8, 1.0]])
    with sample_seeds([0, 1]):
        out = RandomContrast((0.0, 0.0))(x)  # ratio 0 -> each sample's mean
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.1], [0.9, 0.9]]))


def test_random_contrast_rejects_inverted_range():
    with pytest.raises(ValueError):
        RandomContrast((1.5, 0.5))


# --------------------------------------------------------------------------
# RandomGamma
# --------------------------------------------------------------------------


def test_random_gamma_exponent_stays_within_range():
    x = torch.linspace(0.05, 0.95, 19).repeat(200, 1)
    with sample_seeds(range(200)):
        out = RandomGamma((0.6, 1.3))(x)
    gammas = (out.log() / x.log()).mean(dim=1)
    assert gammas.min() >= 0.6 - 1e-4 and gammas.max() <= 1.3 + 1e-4
    assert gammas.max() - gammas.min() > 0.3


def test_random_gamma_scales_0_255_data_through_unit_interval():
    x = torch.tensor([0.0, 51.0, 127.5, 255.0])
    out = RandomGamma((2.0, 2.0))(x)
    torch.testing.assert_close(out, (x / 255) ** 2 * 255)


def test_random_gamma_maps_integer_input_to_unit_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    out = RandomGamma((1.0, 1.0))(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 1.0]))


def test_random_gamma_turns_nan_into_zero():
    out = RandomGamma((0.5, 0.5))(torch.tensor([0.25, math.nan]))
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0]))


# --------------------------------------------------------------------------
# nominal_upper_bound
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maximum", "bound"), [(0.7, 1.0), (1.0, 1.0), (1.5, 255.0), (255.0, 255.0), (300.0, 65535.0)]
)
def test_nominal_upper_bound_picks_smallest_standard_range(maximum, bound):
    x = torch.tensor([0.0, maximum, math.nan])
    assert augment.nominal_upper_bound(x).item() == bound


def test_nominal_upper_bound_is_infinite_beyond_uint16_range():
    assert math.isinf(augment.nominal_upper_bound(torch.tensor([1e6])).item())


# --------------------------------------------------------------------------
# Binarize and NaNtoNum
# --------------------------------------------------------------------------


def test_binarize_thresholds_strictly_above():
    out = Binarize(threshold=0.5)(torch.tensor([0.2, 0.5, 0.7]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0]))


def test_binarize_keeps_nan():
    out = Binarize()(torch.tensor([math.nan, 2.0, -1.0]))
    assert math.isnan(out[0].item()) and out[1:].tolist() == [1.0, 0.0]


def test_binarize_keeps_float_dtype():
    assert Binarize()(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64
    assert Binarize()(torch.zeros(2, dtype=torch.uint8)).dtype == torch.float32


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(math.nan)), min_size=1, max_size=64
    ),
    threshold=st.floats(-10, 10),
)
def test_binarize_output_is_nan_exactly_where_input_is_nan_else_binary(values, threshold):
    x = torch.tensor(values, dtype=torch.float64)
    out = Binarize(threshold)(x)
    assert torch.equal(torch.isnan(out), torch.isnan(x))
    finite = ~torch.isnan(x)
    assert torch.equal(out[finite], (x[finite] > threshold).double())


def test_nan_to_num_replaces_nan_and_keeps_infinities_by_default_params():
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    out = NaNtoNum({"nan": 0, "posinf": None, "neginf": None})(x)
    big = torch.finfo(torch.float32).max
    assert out.tolist() == [0.0, big, -big, 1.0]


def test_nan_to_num_uses_custom_replacements():
    x = torch.tensor([math.nan, math.inf, -math.inf])
    out = NaNtoNum({"nan": -1.0, "posinf": 5.0, "neginf": -5.0})(x)
    assert out.tolist() == [-1.0, 5.0, -5.0]


# --------------------------------------------------------------------------
# GaussianBlur
# --------------------------------------------------------------------------


def scipy_blur(array: np.ndarray, kernel_size: int, sigma: float, dim: int) -> np.ndarray:
    """scipy reference: nearest borders, truncated to the same kernel radius."""
    radius = kernel_size // 2
    sigmas = [0.0] * (array.ndim - dim) + [sigma] * dim
    return ndimage.gaussian_filter(array, sigmas, mode="nearest", truncate=radius / sigma)


@pytest.mark.parametrize(("kernel_size", "sigma"), [(3, 0.5), (5, 1.0), (7, 2.0), (9, 1.3)])
def test_gaussian_blur_2d_matches_scipy(kernel_size, sigma):
    image = np.random.default_rng(0).random((2, 3, 12, 15))
    blurred = GaussianBlur(kernel_size, sigma, dim=2, channels=3)(torch.from_numpy(image))
    np.testing.assert_allclose(blurred.numpy(), scipy_blur(image, kernel_size, sigma, 2), atol=1e-12)


@pytest.mark.parametrize(("kernel_size", "sigma"), [(3, 0.7), (5, 1.0), (7, 1.5)])
def test_gaussian_blur_3d_matches_scipy(kernel_size, sigma):
    volume = np.random.default_rng(1).random((2, 1, 6, 9, 8))
    blurred = GaussianBlur(kernel_size, sigma, dim=3)(torch.from_numpy(volume))
    np.testing.assert_allclose(blurred.numpy(), scipy_blur(volume, kernel_size, sigma, 3), atol=1e-12)


def test_gaussian_blur_kernel_larger_than_image_matches_scipy():
    image = np.random.default_rng(2).random((3, 4))
    blurred = GaussianBlur(9, 2.0, dim=2)(torch.from_numpy(image))
    np.testing.assert_allclose(blurred.numpy(), scipy_blur(image, 9, 2.0, 2), atol=1e-12)


def test_gaussian_blur_same_result_for_spatial_channel_and_batch_layouts():
    volume = torch.rand(5, 6, 7)
    blur = GaussianBlur(5, 1.0, dim=3)
    expected = blur(volume)
    torch.testing.assert_close(blur(volume[None]), expected[None])
    torch.testing.assert_close(blur(volume[None, None]), expected[None, None])


def test_gaussian_blur_keeps_shape_and_float32_dtype():
    x = torch.rand(2, 1, 9, 10)
    out = GaussianBlur(5, 1.0)(x)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_gaussian_blur_leaves_constant_image_unchanged():
    x = torch.full((1, 8, 8), 3.0)
    torch.testing.assert_close(GaussianBlur(7, 3.0)(x), x)


# The reference library asserts on these arguments; users match on its exact messages.
ODD_KERNEL_MESSAGE = "Kernel size should be an odd number."
DIM_MESSAGE = "Only 2D or 3D Gaussian blur is supported."


@pytest.mark.parametrize("kernel_size", [4, 2, 0, -2])
def test_gaussian_blur_rejects_even_kernel_size_with_the_reference_assertion(kernel_size):
    with pytest.raises(AssertionError) as error:
        GaussianBlur(kernel_size=kernel_size)
    assert str(error.value) == ODD_KERNEL_MESSAGE


@pytest.mark.parametrize("dim", [1, 4, 0])
def test_gaussian_blur_rejects_unsupported_dim_with_the_reference_assertion(dim):
    with pytest.raises(AssertionError) as error:
        GaussianBlur(dim=dim)
    assert str(error.value) == DIM_MESSAGE


def test_gaussian_blur_checks_dim_before_kernel_size_like_the_reference():
    with pytest.raises(AssertionError) as error:
        GaussianBlur(kernel_size=4, dim=4)
    assert str(error.value) == DIM_MESSAGE


def test_gaussian_blur_argument_errors_are_also_value_errors():
    with pytest.raises(ValueError, match="odd"):
        GaussianBlur(kernel_size=4)
    with pytest.raises(ValueError, match="2D or 3D"):
        GaussianBlur(dim=1)


def test_gaussian_blur_rejects_negative_odd_kernel_size():
    with pytest.raises(AssertionError, match="positive odd"):
        GaussianBlur(kernel_size=-1)


@pytest.mark.parametrize("kernel_size", [3.0, "3", True])
def test_gaussian_blur_rejects_non_integer_kernel_size(kernel_size):
    with pytest.raises(TypeError):
        GaussianBlur(kernel_size=kernel_size)


def test_gaussian_blur_accepts_numpy_integer_kernel_size():
    assert GaussianBlur(kernel_size=np.int64(5)).kernel_size == 5


@pytest.mark.parametrize(("keyword", "value"), [("sigma", 0.0), ("sigma", -1.0), ("channels", 0)])
def test_gaussian_blur_rejects_non_positive_sigma_and_channels(keyword, value):
    with pytest.raises(ValueError):
        GaussianBlur(**{keyword: value})


def test_gaussian_blur_rejects_input_with_too_few_axes():
    with pytest.raises(ValueError):
        GaussianBlur(dim=3)(torch.rand(4, 4))


# --------------------------------------------------------------------------
# sample_seeds: batch vs single consistency and reproducibility
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_batch_result_equals_each_sample_transformed_alone(name):
    transform = RANDOM_TRANSFORMS[name]()
    batch = uint8_range_batch()
    seeds = [11, 22, 33, 44]
    with sample_seeds(seeds):
        batched = transform(batch)
    for index, seed in enumerate(seeds):
        with sample_seeds([seed]):
            alone = transform(batch[index : index + 1])
        assert torch.equal(batched[index : index + 1], alone)


def test_batch_equals_single_for_a_composed_pipeline():
    pipeline = torch.nn.Sequential(
        RandomContrast(), GaussianNoise(std=2.0), RandomGamma(), GaussianBlur(3, 1.0)
    )
    batch = uint8_range_batch()
    seeds = torch.tensor([5, 6, 7, 8])
    with sample_seeds(seeds):
        batched = pipeline(batch)
    for index in range(4):
        with sample_seeds(seeds[index : index + 1]):
            alone = pipeline(batch[index : index + 1])
        # Convolution kernels may sum in a batch-size-dependent order: allow ~1 ulp.
        torch.testing.assert_close(batched[index : index + 1], alone, rtol=1e-6, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(seeds=st.lists(st.integers(-(2**63), 2**64 - 1), min_size=1, max_size=5))
def test_batch_equals_single_for_any_seeds(seeds):
    batch = uint8_range_batch(len(seeds))
    transform = GaussianNoise(std=1.0)
    with sample_seeds(seeds):
        batched = transform(batch)
    for index, seed in enumerate(seeds):
        with sample_seeds([seed]):
            assert torch.equal(transform(batch[index : index + 1]), batched[index : index + 1])


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_same_seeds_give_identical_outputs(name):
    batch = uint8_range_batch()
    with sample_seeds([1, 2, 3, 4]):
        first = RANDOM_TRANSFORMS[name]()(batch)
    torch.manual_seed(123)  # the global RNG must not matter
    with sample_seeds([1, 2, 3, 4]):
        second = RANDOM_TRANSFORMS[name]()(batch)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_different_seeds_give_different_outputs(name):
    batch = uint8_range_batch(1).expand(4, -1, -1, -1).contiguous()
    with sample_seeds([1, 2, 3, 4]):
        out = RANDOM_TRANSFORMS[name]()(batch)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(out[i], out[j])


def test_salt_gives_independent_streams():
    batch = torch.zeros(2, 100)
    with sample_seeds([1, 2], salt="raw"):
        raw_noise = GaussianNoise()(batch)
    with sample_seeds([1, 2], salt="other"):
        other_noise = GaussianNoise()(batch)
    assert not torch.equal(raw_noise, other_noise)


def test_successive_calls_in_one_block_draw_differently():
    batch = torch.zeros(1, 100)
    noise = GaussianNoise()
    with sample_seeds([7]):
        first, second = noise(batch), noise(batch)
    assert not torch.equal(first, second)


def test_outside_sample_seeds_global_rng_drives_the_draw():
    x = torch.rand(3, 8, 8)
    torch.manual_seed(42)
    first = GaussianNoise()(x)
    torch.manual_seed(42)
    assert torch.equal(GaussianNoise()(x), first)


def test_outside_sample_seeds_one_parameter_for_the_whole_patch():
    x = torch.linspace(0.05, 0.95, 19).repeat(3, 1)
    out = RandomGamma((0.5, 1.5))(x)
    gammas = (out.log() / x.log()).mean(dim=1)
    torch.testing.assert_close(gammas, gammas[:1].expand(3))


def test_sample_seeds_rejects_batch_size_mismatch():
    with sample_seeds([1, 2, 3]), pytest.raises(ValueError, match="3 seeds"):
        GaussianNoise()(torch.zeros(2, 5))


def test_sample_seeds_rejects_zero_dim_tensor():
    with sample_seeds([1]), pytest.raises(ValueError, match="sample axis"):
        GaussianNoise()(torch.tensor(1.0))


def test_sample_seeds_rejects_empty_and_non_integer_seeds():
    with pytest.raises(ValueError):
        with sample_seeds([]):
            pass
    with pytest.raises(TypeError):
        with sample_seeds([1.5]):
            pass
    with pytest.raises(ValueError):
        with sample_seeds(torch.zeros(2, 2, dtype=torch.long)):
            pass


def test_sample_seeds_accepts_tensor_and_numpy_seeds():
    with sample_seeds(torch.tensor([3, 4])) as seeds:
        assert seeds == (3, 4)
    with sample_seeds(np.array([3, 4], dtype=np.int64)) as seeds:
        assert seeds == (3, 4)


def test_sample_seeds_nested_block_shadows_and_restores_outer():
    with sample_seeds([1, 2]):
        with sample_seeds([9]):
            assert active_sample_seeds() == (9,)
        assert active_sample_seeds() == (1, 2)
    assert active_sample_seeds() is None


def test_sample_seeds_state_is_per_thread():
    seen_in_thread = []
    with sample_seeds([1, 2]):
        thread = threading.Thread(target=lambda: seen_in_thread.append(active_sample_seeds()))
        thread.start()
        thread.join()
    assert seen_in_thread == [None]


def test_deterministic_transforms_do_not_consume_draws():
    with sample_seeds([1]):
        Binarize()(torch.zeros(1, 3))
        GaussianBlur()(torch.zeros(1, 4, 4))
        assert next_sample_draw_seeds(1) is not None
    with sample_seeds([1]):
        direct = next_sample_draw_seeds(1)
    with sample_seeds([1]):
        Normalize()(torch.zeros(1, 3))
        assert next_sample_draw_seeds(1) == direct


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_random_transforms_accept_empty_batches(name):
    empty = torch.zeros(2, 0, 4)
    with sample_seeds([1, 2]):
        assert RANDOM_TRANSFORMS[name]()(empty).shape == empty.shape


# --------------------------------------------------------------------------
# torchvision composition
# --------------------------------------------------------------------------


def test_to_dtype_with_scale_leaves_float32_0_255_data_unchanged():
    T = pytest.importorskip("torchvision.transforms.v2")
    x = torch.tensor([0.0, 17.0, 255.0])
    assert torch.equal(T.ToDtype(torch.float32, scale=True)(x), x)


def test_composes_with_torchvision_compose():
    T = pytest.importorskip("torchvision.transforms.v2")
    pipeline = T.Compose(
        [T.ToDtype(torch.float32, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})]
    )
    out = pipeline(torch.tensor([1.0, math.nan, 200.0]))
    assert out.tolist() == [1.0, 0.0, 200.0]


def test_torchvision_compose_of_random_transforms_respects_sample_seeds():
    T = pytest.importorskip("torchvision.transforms.v2")
    pipeline = T.Compose([RandomContrast(), GaussianNoise(), Binarize(128.0)])
    batch = uint8_range_batch()
    with sample_seeds([1, 2, 3, 4]):
        first = pipeline(batch)
    with sample_seeds([1, 2, 3, 4]):
        assert torch.equal(pipeline(batch), first)


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_random_transforms_run_on_cuda_and_keep_device(name):
    batch = uint8_range_batch().cuda()
    with sample_seeds([1, 2, 3, 4]):
        out = RANDOM_TRANSFORMS[name]()(batch)
    assert out.device == batch.device
    with sample_seeds([1, 2, 3, 4]):
        assert torch.equal(RANDOM_TRANSFORMS[name]()(batch), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_parameters_are_identical_on_cpu_and_cuda():
    batch = uint8_range_batch()
    with sample_seeds([1, 2, 3, 4]):
        on_cpu = RandomContrast()(batch)
    with sample_seeds([1, 2, 3, 4]):
        on_cuda = RandomContrast()(batch.cuda())
    torch.testing.assert_close(on_cuda.cpu(), on_cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gaussian_blur_on_cuda_matches_cpu():
    x = torch.rand(2, 1, 6, 7, 8)
    blur = GaussianBlur(5, 1.0, dim=3)
    torch.testing.assert_close(blur(x.cuda()).cpu(), blur(x))


# -- in place on an owned batch ----------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: NaNtoNum({"nan": 0, "posinf": None, "neginf": None}),
        lambda: Normalize(),
        lambda: Binarize(100.0),
        lambda: GaussianNoise(0.0, 2.0),
        lambda: RandomContrast((0.5, 1.5)),
        lambda: RandomGamma((0.5, 1.5)),
    ],
    ids=["NaNtoNum", "Normalize", "Binarize", "GaussianNoise", "RandomContrast", "RandomGamma"],
)
def test_owned_batches_are_transformed_in_place_with_the_same_numbers(make):
    from cellmap_data.transforms.augment._common import owned_batch

    generator = torch.Generator().manual_seed(3)
    batch = torch.rand(3, 1, 5, 6, 7, generator=generator) * 255
    batch[0, 0, 0, 0, 0] = float("nan")
    batch[1, 0, 1, 1, 1] = float("inf")
    transform = make()
    untouched = batch.clone()
    with sample_seeds([1, 2, 3]):
        expected = transform(batch)
    torch.testing.assert_close(batch, untouched, equal_nan=True)  # a tensor not declared owned is left alone
    owned = batch.clone()
    with owned_batch(owned), sample_seeds([1, 2, 3]):
        result = transform(owned)
    assert result.data_ptr() == owned.data_ptr(), "the owned batch is reused, not copied"
    torch.testing.assert_close(result, expected, equal_nan=True, rtol=1e-6, atol=1e-4)
