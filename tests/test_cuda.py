"""The CUDA delivery path: pinned copies on a side stream, value transforms on the GPU, and
predictions written back from GPU tensors. Every check compares with the CPU path; skipped
without a GPU (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapDatasetWriter, CellMapMultiDataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

AUGMENT = {"mirror": {"axes": {"x": 0.5, "y": 0.5}}, "transpose": {"axes": ["x", "y"]}, "rotate": {"axes": {"z": [-180, 180]}}}


def multi(data, shape=(16, 16, 16)):
    datasets = [
        CellMapDataset(
            str(d.raw_path), crop.target_path, data.classes,
            {"raw": {"shape": shape, "scale": (8, 8, 8)}}, {"gt": {"shape": shape, "scale": (8, 8, 8)}},
            pad=True, spatial_transforms=AUGMENT, seed=3,
        )
        for d in data.datasets for crop in d.crops
    ]
    return CellMapMultiDataset(datasets, data.classes, None, None)


def batches(loader):
    return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]


def assert_same(gpu_batches, cpu_batches):
    assert len(gpu_batches) == len(cpu_batches)
    for g, c in zip(gpu_batches, cpu_batches):
        assert g.keys() == c.keys()
        for key in c:
            if key != "idx":
                assert g[key].device.type == "cuda", key
            torch.testing.assert_close(g[key].cpu(), c[key], rtol=0, atol=0, equal_nan=True)


def test_cuda_batches_equal_cpu_batches_bit_for_bit(tiny_data):
    m = multi(tiny_data)
    kwargs = dict(batch_size=4, iterations_per_epoch=12, seed=11, num_workers=2)
    cpu = batches(CellMapDataLoader(m, **kwargs))
    gpu = batches(CellMapDataLoader(m, device="cuda", **kwargs))
    assert_same(gpu, cpu)


def test_batches_stay_valid_while_later_ones_are_copied(tiny_data):
    """Holding every batch while the side stream fills the next ones must not change them."""
    m = multi(tiny_data)
    loader = CellMapDataLoader(m, batch_size=8, iterations_per_epoch=20, seed=2, device="cuda")
    held = []
    for batch in loader:
        # Queue work on the default stream that reads the batch while the next copy runs.
        held.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        held[-1]["raw_sum"] = batch["raw"].nan_to_num().sum()
    torch.cuda.synchronize()
    cpu = batches(CellMapDataLoader(m, batch_size=8, iterations_per_epoch=20, seed=2))
    for g, c in zip(held, cpu):
        torch.testing.assert_close(g["raw"].cpu(), c["raw"], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(g["raw_sum"].cpu(), c["raw"].nan_to_num().sum())


def test_loader_to_cuda_and_indexing(tiny_data):
    m = multi(tiny_data)
    loader = CellMapDataLoader(m, batch_size=2, iterations_per_epoch=2, seed=4).to("cuda")
    assert all(b["raw"].device.type == "cuda" for b in loader)
    item = loader[[0, 3]]
    reference = CellMapDataLoader(m, batch_size=2, seed=4)[[0, 3]]
    assert item["raw"].device.type == "cuda"
    torch.testing.assert_close(item["raw"].cpu(), reference["raw"], rtol=0, atol=0, equal_nan=True)


def test_value_transforms_on_cuda_match_cpu(tiny_data):
    from cellmap_data.transforms import RandomContrast

    m = multi(tiny_data)
    m.set_raw_value_transforms(RandomContrast())
    kwargs = dict(batch_size=4, iterations_per_epoch=3, seed=8)
    cpu = batches(CellMapDataLoader(m, **kwargs))
    gpu = batches(CellMapDataLoader(m, device="cuda", **kwargs))
    for g, c in zip(gpu, cpu):
        assert g["raw"].device.type == "cuda"
        # Same per-sample draws on both devices; float arithmetic may differ in the last bits.
        torch.testing.assert_close(g["raw"].cpu(), c["raw"], rtol=1e-5, atol=1e-3, equal_nan=True)


def test_gpu_noise_is_reproducible_and_has_the_asked_spread(tiny_data):
    """Noise fields are drawn on the tensor's device (a CUDA generator differs from the CPU's),
    so they are compared with themselves and with the requested standard deviation."""
    from cellmap_data.transforms import GaussianNoise

    m = multi(tiny_data)
    kwargs = dict(batch_size=4, iterations_per_epoch=2, seed=8, device="cuda")
    plain = batches(CellMapDataLoader(m, **kwargs))
    m.set_raw_value_transforms(GaussianNoise(std=3.0))
    first = batches(CellMapDataLoader(m, **kwargs))
    second = batches(CellMapDataLoader(m, **kwargs))
    for a, b, p in zip(first, second, plain):
        torch.testing.assert_close(a["raw"], b["raw"], rtol=0, atol=0, equal_nan=True)
        noise = (a["raw"] - p["raw"])[~p["raw"].isnan()]
        assert abs(noise.std().item() - 3.0) < 0.2 and abs(noise.mean().item()) < 0.2


def test_predictions_written_from_gpu_tensors(tmp_path, tiny_data):
    raw = str(tiny_data.datasets[0].raw_path)
    group = zarr.open_group(raw, mode="r")
    multiscale = group.attrs.asdict()["multiscales"][0]
    voxel = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
    origin = multiscale["datasets"][0]["coordinateTransformations"][1]["translation"]
    # The translation is the corner of voxel 0 (the drop-in frame).
    bounds = {a: [origin[k], origin[k] + 32 * voxel[k]] for k, a in enumerate("zyx")}

    def write(path, device):
        writer = CellMapDatasetWriter(
            raw, str(path), ["mito"], {"input": {"shape": (16, 16, 16), "scale": voxel}},
            {"output": {"shape": (16, 16, 16), "scale": voxel}}, {"output": bounds}, device=device,
        )
        with writer:
            for batch in writer.loader(batch_size=4):
                x = batch["input"].to(device)
                assert x.device.type == torch.device(device).type
                writer[batch["idx"]] = {"output": torch.sigmoid(x.nan_to_num() / 50.0 - 2.0)}
        return zarr.open_group(str(path / "mito"), mode="r")["s0"][...]

    on_gpu = write(tmp_path / "gpu.zarr" / "pred", "cuda")
    on_cpu = write(tmp_path / "cpu.zarr" / "pred", "cpu")
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-6, atol=1e-6)
