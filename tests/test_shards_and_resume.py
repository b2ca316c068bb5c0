"""Equal rank shards with exact lengths for every sampler form, padding marked in the metadata,
mid-epoch resume through state_dict / load_state_dict, and the rest of the reference's
loader-side contract (generic ClassBalancedSampler datasets, device fallback, image axes,
out-of-bounds log records)."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapImage, CellMapMultiDataset, ClassBalancedSampler
from cellmap_data.exceptions import ConfigError, DeviceFallbackWarning

AUGMENT = {"mirror": {"axes": {"x": 0.5}}, "rotate": {"axes": {"z": [-180, 180]}}}


@pytest.fixture(scope="module")
def multi(tiny_data):
    datasets = [
        CellMapDataset(str(d.raw_path), c.target_path, tiny_data.classes, {"raw": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
                       {"gt": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, pad=True, spatial_transforms=AUGMENT, seed=5)
        for d in tiny_data.datasets for c in d.crops
    ]
    return CellMapMultiDataset(datasets, tiny_data.classes, None, None)


class IndicesWithoutLength:
    """An iterable of indices with no ``__len__`` (e.g. a user's generator-backed sampler)."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)


def forms(multi: CellMapMultiDataset, n: int) -> dict[str, Callable[[], dict[str, Any]]]:
    """Loader arguments of every sampler form over about ``n`` samples (the plain forms plan the
    whole multi-dataset or ``n`` batches)."""
    picked = list(range(0, 3 * n, 3))
    return {
        "iterations": lambda: {"dataset": multi, "iterations_per_epoch": n},
        "uniform": lambda: {"dataset": torch.utils.data.Subset(multi, picked)},
        "weighted": lambda: {"dataset": multi, "weighted_sampler": True, "iterations_per_epoch": n},
        "validation tiles": lambda: {"dataset": torch.utils.data.Subset(multi, picked), "is_train": False},
        "Sampler": lambda: {"dataset": multi, "sampler": torch.utils.data.SequentialSampler(range(n))},
        "RandomSampler": lambda: {"dataset": multi, "sampler": torch.utils.data.RandomSampler(
            multi, num_samples=n, generator=torch.Generator().manual_seed(1))},
        "iterable without len": lambda: {"dataset": multi, "sampler": IndicesWithoutLength(picked)},
        "callable": lambda: {"dataset": multi, "sampler": lambda: iter(picked)},
        "class-balanced": lambda: {"dataset": multi, "sampler": ClassBalancedSampler(multi, samples_per_epoch=n, seed=2)},
    }


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), world=st.integers(1, 4), batch_size=st.integers(1, 5), drop_last=st.booleans(),
       form=st.sampled_from(["iterations", "uniform", "weighted", "validation tiles", "Sampler", "RandomSampler",
                             "iterable without len", "callable", "class-balanced"]))
def test_every_rank_reads_len_batches_and_together_the_unsharded_plan(multi, n, world, batch_size, drop_last, form):
    make = forms(multi, n)[form]

    def loader(rank: int, size: int, **extra: Any) -> CellMapDataLoader:
        kwargs = {**make(), **extra}
        return CellMapDataLoader(kwargs.pop("dataset"), batch_size=batch_size, seed=4, rank=rank, world_size=size,
                                 drop_last=drop_last, **kwargs)

    plans = []
    for rank in range(world):
        it = loader(rank, world)
        plan = it.plan_epoch(0)
        assert len(plan) == len(it), f"rank {rank}"
        plans.append(plan)
    assert len({len(p) for p in plans}) == 1, "every rank reads as many batches"
    # The whole epoch in one process: iterations count per rank, so one rank reads world times as many.
    whole_kwargs = {"iterations_per_epoch": n * world} if form in ("iterations", "weighted") else {}
    whole = [s for b in loader(0, 1, **whole_kwargs).plan_epoch(0) for s in b] if not drop_last else None
    read = [s for p in plans for b in p for s in b]
    streams = [s[2] for s in read]
    originals = sorted(set(read), key=lambda s: s[2])
    repeats = len(read) - len(originals)
    shape = loader(0, world).epoch_shape(0)
    if drop_last:
        assert repeats == 0 and all(s[2] < shape["per_rank"] * world for s in read)
        assert all(len(b) == batch_size for p in plans for b in p)
    else:
        assert originals == whole, "the ranks' union is the unsharded plan"
        assert repeats == shape["padding"] == shape["per_rank"] * world - len(whole)
        assert set(streams[len(originals):]) <= set(streams)


def test_an_explicit_random_sampler_sets_len(multi):
    sampler = torch.utils.data.RandomSampler(multi, num_samples=16)
    loader = CellMapDataLoader(multi, batch_size=2, sampler=sampler, num_workers=1)
    batches = [b["idx"].tolist() for b in loader]
    assert len(loader) == len(batches) == 8
    # len(), the plan and the metadata describe the epoch that was read (one draw per epoch).
    assert loader.consumed_metadata()["idx"].len() == 16


def test_padding_is_marked_in_the_epoch_table_and_in_each_batch(multi):
    tiles = torch.utils.data.Subset(multi, list(range(7)))
    for rank in range(3):
        loader = CellMapDataLoader(tiles, batch_size=2, is_train=False, rank=rank, world_size=3, return_metadata=True)
        table = loader.epoch_metadata()
        # 7 tiles, 3 per rank: the padded plan is [0..6, 0, 1] and rank r takes positions r, r+3, r+6.
        assert table["padding"].to_list() == [False, False, rank > 0]
        delivered = [m["padding"] for b in loader for m in b["__metadata__"]]
        assert delivered == table["padding"].to_list()


def test_repeats_fill_the_last_ranks_share_from_the_start(multi):
    tiles = torch.utils.data.Subset(multi, list(range(7)))
    shares = [CellMapDataLoader(tiles, batch_size=5, is_train=False, rank=r, world_size=3).epoch_metadata()
              for r in range(3)]
    assert [s.height for s in shares] == [3, 3, 3]
    padded = [row for s in shares for row in s.iter_rows(named=True) if row["padding"]]
    # Positions 7 and 8 of the padded plan repeat positions 0 and 1 (the first samples of ranks 0
    # and 1), draws included.
    first = [shares[0].row(0, named=True), shares[1].row(0, named=True)]
    assert [(p["idx"], p["value_seed"]) for p in padded] == [(f["idx"], f["value_seed"]) for f in first]


# -- resuming ----------------------------------------------------------------------------------------
def collect(loader: CellMapDataLoader, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["iterations", "weighted", "RandomSampler", "validation tiles"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_resumed_loader_delivers_what_an_uninterrupted_one_does(multi, form, rank):
    def make() -> CellMapDataLoader:
        kwargs: dict[str, Any] = {"iterations": {"iterations_per_epoch": 5},
                                  "weighted": {"iterations_per_epoch": 5, "weighted_sampler": True},
                                  "RandomSampler": {"sampler": torch.utils.data.RandomSampler(
                                      multi, num_samples=17, generator=torch.Generator().manual_seed(8))},
                                  "validation tiles": {"is_train": False}}[form]
        dataset = torch.utils.data.Subset(multi, list(range(0, 51, 3))) if form == "validation tiles" else multi
        return CellMapDataLoader(dataset, batch_size=3, seed=9, rank=rank, world_size=2, num_workers=2, **kwargs)

    torch.manual_seed(0)
    reference = make()
    epochs = [collect(reference), collect(reference)]
    for stop in (2, len(epochs[0])):
        torch.manual_seed(0)
        first = make()
        collect(first, limit=stop)
        state = first.state_dict()
        assert (state["epoch"], state["batches_delivered"]) == ((0, stop) if stop < len(epochs[0]) else (1, 0))
        torch.manual_seed(123)  # the restored run must not depend on the global RNG
        second = make()
        second.load_state_dict(state)
        rest = collect(second)
        if stop < len(epochs[0]):
            assert_same(rest, epochs[0][stop:])
            assert_same(collect(second), epochs[1])
        else:
            assert_same(rest, epochs[1])


def test_a_sampler_drawing_from_the_global_rng_resumes_its_epoch_exactly(multi):
    def make() -> CellMapDataLoader:
        return CellMapDataLoader(multi, batch_size=3, sampler=torch.utils.data.RandomSampler(multi, num_samples=17))

    torch.manual_seed(0)
    reference = collect(make())
    torch.manual_seed(0)
    first = make()
    collect(first, limit=2)
    torch.manual_seed(99)
    second = make()
    second.load_state_dict(first.state_dict())
    assert_same(collect(second), reference[2:])


def test_set_epoch_keeps_a_restored_position_of_that_epoch_only(multi):
    loader = CellMapDataLoader(multi, batch_size=2, iterations_per_epoch=4, seed=1)
    loader.load_state_dict({"epoch": 3, "batches_delivered": 2, "seed": 1, "batch_size": 2})
    loader.set_epoch(3)  # what Lightning does before iterating
    assert len(collect(loader)) == 2 and loader.state_dict()["epoch"] == 4
    loader.load_state_dict({"epoch": 3, "batches_delivered": 2, "seed": 1, "batch_size": 2})
    loader.set_epoch(5)
    assert len(collect(loader)) == 4


def test_a_state_from_another_batch_size_or_not_a_loader_state_is_refused(multi):
    loader = CellMapDataLoader(multi, batch_size=2, iterations_per_epoch=4)
    with pytest.raises(ConfigError, match="batch_size=3"):
        loader.load_state_dict({"epoch": 0, "batches_delivered": 1, "seed": 1, "batch_size": 3})
    with pytest.raises(ConfigError, match="not a CellMapDataLoader state"):
        loader.load_state_dict({"steps": 4})


def test_torchdata_stateful_protocol(multi):
    from lightning_fabric.utilities.types import _Stateful

    assert isinstance(CellMapDataLoader(multi, batch_size=2, iterations_per_epoch=2), _Stateful)


# -- the reference's loader-side contract --------------------------------------------------------------
class Crops(torch.utils.data.ConcatDataset):
    """A dataset of the user's own: crops of 5, 3 and 4 samples, with a crop-class matrix."""

    def __init__(self) -> None:
        super().__init__([torch.utils.data.TensorDataset(torch.arange(n)) for n in (5, 3, 4)])

    def get_crop_class_matrix(self) -> np.ndarray:
        return np.array([[True, False], [True, False], [False, True]])


def test_class_balanced_sampler_takes_any_dataset_with_a_crop_class_matrix():
    sampler = ClassBalancedSampler(Crops(), samples_per_epoch=400, seed=3)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 400 and all(0 <= i < 12 for i in indices)
    rare = sum(i >= 8 for i in indices)  # the only crop annotating class 1
    assert 180 <= rare <= 220, rare
    assert indices != list(sampler), "the epoch advances at every iteration"
    sampler.set_epoch(0)
    assert list(sampler) == indices

    class PerSample(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def get_crop_class_matrix(self) -> np.ndarray:
            return np.eye(4, 2, dtype=bool) | np.eye(4, 2, k=-2, dtype=bool)

    assert set(ClassBalancedSampler(PerSample(), 50)) <= {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="get_crop_class_matrix"):
        ClassBalancedSampler(torch.utils.data.TensorDataset(torch.arange(3)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_falls_back_to_the_cpu_with_one_warning(multi, tiny_data, tmp_path):
    import cellmap_data._config as config
    from cellmap_data import CellMapDatasetWriter

    config._FELL_BACK.clear()
    with pytest.warns(DeviceFallbackWarning, match="cuda"):
        loader = CellMapDataLoader(multi, batch_size=2, iterations_per_epoch=1, device="cuda")
    assert next(iter(loader))["raw"].device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeviceFallbackWarning)  # once per process
        loader.to("cuda")
        writer = CellMapDatasetWriter(str(tiny_data.datasets[0].raw_path), str(tmp_path / "o.zarr" / "o"), ["mito"],
                                      {"raw": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
                                      {"pred": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, device="cuda")
        assert next(iter(writer.loader(batch_size=2, device="cuda")))["raw"].device.type == "cpu"


def test_image_axes_are_a_list_of_names(tiny_data):
    image = CellMapImage(str(tiny_data.datasets[0].raw_path), "raw", (8, 8, 8), (4, 4, 4))
    assert image.axes == ["z", "y", "x"]
    assert CellMapImage(str(tiny_data.datasets[0].raw_path), "raw", (8, 8), (4, 4), axis_order="yx").axes == ["y", "x"]


def test_a_read_outside_the_image_is_logged_and_warned(tiny_data, caplog):
    image = CellMapImage(str(tiny_data.datasets[0].raw_path), "raw", (8, 8, 8), (4, 4, 4), pad=True, pad_value=0)
    with caplog.at_level(logging.WARNING, logger="cellmap_data"), pytest.warns(RuntimeWarning, match="outside"):
        patch = image[{"z": -1e6, "y": 0.0, "x": 0.0}]
    assert torch.all(patch == 0)
    assert any("out-of-bounds" in r.getMessage() and r.name == "cellmap_data.image" for r in caplog.records)
    assert not math.isnan(float(patch.sum()))
