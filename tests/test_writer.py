"""Prediction writing: CellMapDatasetWriter and ImageWriter round trips checked with zarr-python
and numpy, blending, concurrency, crash safety and bad input."""

from __future__ import annotations

import json
import re
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cellmap_data import CellMapDatasetWriter, CellMapImage, ImageWriter
from cellmap_data.exceptions import CellMapError, ConfigError, OutputExistsError
from conftest import reference_patch

CLASSES = ["mito", "er"]


def raw_info(data):
    """(raw path, voxel size, lower edge of the raw volume) of the first synthetic dataset."""
    ds = data.datasets[0]
    voxel = list(ds.raw_voxel_size)
    edge = list(ds.raw_translation)  # the corner of voxel 0 (the default coordinate frame)
    return str(ds.raw_path), voxel, edge, list(ds.raw_shape)


def field(z, y, x):
    """The 'prediction' of a class: a known function of world coordinates (nm)."""
    return (0.01 * z + 0.002 * y - 0.0007 * x).astype(np.float32)


def tile_world_axes(writer, idx):
    """Per axis the world coordinates of the output voxel centres of tile ``idx``."""
    centre = writer.get_center(idx)
    tile = writer._tile
    voxel = writer._voxel
    return [centre[a] + (np.arange(n) - (n - 1) / 2) * v for a, n, v in zip("zyx", tile, voxel)]


def predict(writer, indices, n_classes, bias=None):
    """[B, C, *tile] predictions: class c gets field(world) + c (+ a per-tile bias)."""
    out = []
    for i in indices:
        z, y, x = np.meshgrid(*tile_world_axes(writer, int(i)), indexing="ij")
        base = field(z, y, x)
        b = 0.0 if bias is None else bias[int(i)]
        out.append(np.stack([base + c + b for c in range(n_classes)]))
    return torch.from_numpy(np.stack(out).astype(np.float32))


def read_output(path):
    """(values, multiscale dict, zarr format) of the output image at ``path`` via zarr-python."""
    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict()
    if "ome" in attrs:
        multiscale = attrs["ome"]["multiscales"][0]
        assert attrs["ome"]["version"] == "0.5"
    else:
        multiscale = attrs["multiscales"][0]
        assert multiscale["version"] == "0.4"
    return group["s0"][...], multiscale, group.metadata.zarr_format


def expected_from_metadata(values, multiscale, channel):
    transforms = multiscale["datasets"][0]["coordinateTransformations"]
    scale = transforms[0]["scale"]
    translation = transforms[1]["translation"]
    # The translation is the corner of voxel 0: voxel i's centre is half a voxel further.
    axes = [translation[k] + (np.arange(values.shape[k]) + 0.5) * scale[k] for k in range(3)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return field(z, y, x) + channel


def make_writer(tmp_path, data, *, tile=(16, 16, 16), inp=(24, 24, 24), start=(3, 5, 2), extent=(37, 50, 45), name="pred", **kwargs):
    raw, voxel, edge, _ = raw_info(data)
    bounds = {a: [edge[k] + start[k] * voxel[k], edge[k] + (start[k] + extent[k]) * voxel[k]] for k, a in enumerate("zyx")}
    target = tmp_path / "out.zarr" / "recon-1" / name
    kwargs.setdefault("classes", CLASSES)
    classes = kwargs.pop("classes")
    writer = CellMapDatasetWriter(
        raw, str(target), classes,
        {"input": {"shape": inp, "scale": voxel}},
        {"output": {"shape": tile, "scale": voxel}},
        {"output": bounds},
        **kwargs,
    )
    return writer, target, bounds


def write_all(writer, batch_size=4, bias=None):
    n_classes = len(writer.model_classes)
    for batch in writer.loader(batch_size=batch_size):
        writer[batch["idx"]] = {"output": predict(writer, batch["idx"], n_classes, bias)}


# -- tiling ------------------------------------------------------------------------------


def test_tiles_cover_the_whole_bounds_including_the_far_edge(tmp_path, tiny_data):
    writer, _, bounds = make_writer(tmp_path, tiny_data, extent=(37, 50, 45))
    _, voxel, _, _ = raw_info(tiny_data)
    # 37 -> starts 0, 16, 21; 50 -> 0, 16, 32, 34; 45 -> 0, 16, 29
    assert len(writer) == 3 * 4 * 3 == len(writer.writer_indices)
    covered = np.zeros((37, 50, 45), dtype=int)
    for i in writer.writer_indices:
        c = writer.get_center(i)
        start = [round((c[a] - bounds[a][0]) / voxel[k] - 8) for k, a in enumerate("zyx")]
        assert all(s >= 0 and s + 16 <= n for s, n in zip(start, covered.shape)), "tiles stay inside the bounds"
        covered[start[0]:start[0] + 16, start[1]:start[1] + 16, start[2]:start[2] + 16] += 1
    assert covered.min() == 1, "every voxel is covered, the far edge included"
    assert len(writer.blocks) == len(writer)
    assert writer.bounding_box == {a: tuple(bounds[a]) for a in "zyx"}
    writer.close()


def test_loader_batches_and_input_tiles_match_the_raw_volume(tmp_path, tiny_data):
    writer, _, _ = make_writer(tmp_path, tiny_data)
    raw, voxel, edge, _ = raw_info(tiny_data)
    s0 = zarr.open_group(raw, mode="r")["s0"][...]
    loader = writer.loader(batch_size=5)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(len(writer) / 5)
    assert torch.cat([b["idx"] for b in batches]).tolist() == writer.writer_indices
    assert tuple(batches[0]["input"].shape) == (5, 1, 24, 24, 24)
    for i in (0, len(writer) - 1):
        item = writer[i]
        assert int(item["idx"]) == i and tuple(item["input"].shape) == (1, 24, 24, 24)
        c = writer.get_center(i)
        start = [round((c[a] - edge[k]) / voxel[k] - 12) for k, a in enumerate("zyx")]
        ref = reference_patch(s0, start, (24, 24, 24), pad_value=0)  # raw padded with 0
        np.testing.assert_array_equal(item["input"][0].numpy(), ref)
    writer.close()


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_3d_is_exact_with_multiscales_metadata(tmp_path, tiny_data, zarr_format):
    writer, target, bounds = make_writer(tmp_path, tiny_data, zarr_format=zarr_format)
    write_all(writer)
    writer.close()
    _, voxel, _, _ = raw_info(tiny_data)
    for c, cls in enumerate(CLASSES):
        values, multiscale, fmt = read_output(target / cls)
        assert fmt == zarr_format
        assert values.shape == (37, 50, 45) and values.dtype == np.float32
        assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]
        assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in multiscale["axes"])
        assert [d["path"] for d in multiscale["datasets"]] == ["s0"]
        transforms = multiscale["datasets"][0]["coordinateTransformations"]
        assert transforms[0] == {"type": "scale", "scale": voxel}
        # the default (corner) frame: translation = the lower bound, the corner of voxel 0
        assert transforms[1]["translation"] == pytest.approx([bounds[a][0] for a in "zyx"])
        np.testing.assert_array_equal(values, expected_from_metadata(values, multiscale, c))
    # every group from the .zarr root down has group metadata
    for group in (tmp_path / "out.zarr", tmp_path / "out.zarr" / "recon-1", target):
        assert (group / (".zgroup" if zarr_format == 2 else "zarr.json")).is_file()
    assert zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["recon-1/pred/mito/s0"].shape == (37, 50, 45)
    array = zarr.open_array(str(target / "mito" / "s0"), mode="r")
    assert array.chunks == (16, 16, 16)


def test_round_trip_2d_slices(tmp_path, tiny_data):
    writer, target, _ = make_writer(tmp_path, tiny_data, tile=(1, 16, 16), inp=(1, 24, 24), extent=(5, 40, 33))
    assert len(writer) == 5 * 3 * 3
    assert tuple(writer[0]["input"].shape) == (1, 1, 24, 24)
    for batch in writer.loader(batch_size=7):
        assert tuple(batch["input"].shape[1:]) == (1, 1, 24, 24)
        preds = predict(writer, batch["idx"], 2)  # [B, C, 1, 16, 16]
        writer[batch["idx"]] = {"output": preds[:, :, 0]}  # a 2D model's [B, C, 16, 16]
    writer.close()
    for c, cls in enumerate(CLASSES):
        values, multiscale, _ = read_output(target / cls)
        assert values.shape == (5, 40, 33)
        assert zarr.open_array(str(target / cls / "s0"), mode="r").chunks == (1, 16, 16)
        np.testing.assert_array_equal(values, expected_from_metadata(values, multiscale, c))


def test_written_image_reads_back_at_the_right_world_positions(tmp_path, tiny_data):
    writer, target, bounds = make_writer(tmp_path, tiny_data)
    write_all(writer)
    writer.close()
    _, voxel, _, _ = raw_info(tiny_data)
    image = CellMapImage(str(target / "mito"), "mito", voxel, (4, 6, 8))
    assert image.bounding_box == {a: pytest.approx(tuple(bounds[a])) for a in "zyx"}
    centre = {a: bounds[a][0] + 10 * v for a, v in zip("zyx", voxel)}  # a voxel edge: even patch centred on it
    got = image[centre].numpy()
    axes = [centre[a] + (np.arange(n) - (n - 1) / 2) * v for a, n, v in zip("zyx", (4, 6, 8), voxel)]
    np.testing.assert_array_equal(got, field(*np.meshgrid(*axes, indexing="ij")))


def test_channels_follow_model_classes_and_only_classes_are_written(tmp_path, tiny_data):
    writer, target, _ = make_writer(tmp_path, tiny_data, classes=["er", "mito"], model_classes=["nuc", "mito", "er"])
    write_all(writer)  # channel c holds field + c: nuc 0, mito 1, er 2
    writer.close()
    assert not (target / "nuc").exists()
    for cls, channel in (("mito", 1), ("er", 2)):
        values, multiscale, _ = read_output(target / cls)
        np.testing.assert_array_equal(values, expected_from_metadata(values, multiscale, channel))


def test_class_dicts_and_class_keys(tmp_path, tiny_data):
    writer, target, _ = make_writer(tmp_path, tiny_data)
    for n, batch in enumerate(writer.loader(batch_size=3)):
        preds = predict(writer, batch["idx"], 2)
        if n % 2:
            writer[batch["idx"]] = {"idx": batch["idx"], "output": {"mito": preds[:, 0], "er": preds[:, 1]}}
        else:
            writer[batch["idx"]] = {"mito": preds[:, 0], "er": preds[:, 1].numpy(), "__metadata__": {}}
    # a single tile without a batch axis
    writer[0] = {"output": predict(writer, [0], 2)[0]}
    writer.close()
    for c, cls in enumerate(CLASSES):
        values, multiscale, _ = read_output(target / cls)
        np.testing.assert_array_equal(values, expected_from_metadata(values, multiscale, c))


def test_concurrent_writes_from_threads_in_any_order(tmp_path, tiny_data):
    writer, target, _ = make_writer(tmp_path, tiny_data, tile=(8, 8, 8), extent=(30, 33, 29))
    order = np.random.default_rng(0).permutation(len(writer))
    groups = [order[i:i + 5] for i in range(0, len(order), 5)]

    def work(group):
        writer[torch.as_tensor(group)] = {"output": predict(writer, group, 2)}

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, groups))
    assert all(w.stats["pending_chunks"] == 0 for w in writer.writers.values()), "complete chunks are written at once"
    writer.close()
    for c, cls in enumerate(CLASSES):
        values, multiscale, _ = read_output(target / cls)
        np.testing.assert_array_equal(values, expected_from_metadata(values, multiscale, c))


def test_dtype_and_downsampled_levels(tmp_path, tiny_data):
    writer, target, bounds = make_writer(tmp_path, tiny_data, classes=["mito"], dtype="uint8", downsample_levels=1,
                                         extent=(32, 48, 33))
    for batch in writer.loader(batch_size=8):
        writer[batch["idx"]] = {"mito": torch.full((len(batch["idx"]), 16, 16, 16), 200.4)}
    writer.close()
    group = zarr.open_group(str(target / "mito"), mode="r")
    s0, s1 = group["s0"][...], group["s1"][...]
    assert s0.dtype == np.uint8 and (s0 == 200).all()
    assert s1.shape == (16, 24, 17) and (s1 == 200).all()
    datasets = group.attrs["multiscales"][0]["datasets"]
    _, voxel, _, _ = raw_info(tiny_data)
    assert [d["path"] for d in datasets] == ["s0", "s1"]
    s1_transforms = datasets[1]["coordinateTransformations"]
    assert s1_transforms[0]["scale"] == [2 * v for v in voxel]
    # every level's voxel 0 has its corner at the lower bound
    assert s1_transforms[1]["translation"] == pytest.approx([bounds[a][0] for a in "zyx"])


# -- blending ----------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["linear", "gaussian"])
def test_blended_predictions_of_a_smooth_field_are_within_tolerance(tmp_path, tiny_data, blend):
    writer, target, _ = make_writer(tmp_path, tiny_data, overlap=6, blend=blend)
    plain, _, _ = make_writer(tmp_path, tiny_data, name="plain")
    assert len(writer) > len(plain), "overlapping tiles are more numerous"
    plain.close()
    write_all(writer)
    writer.close()
    for c, cls in enumerate(CLASSES):
        values, multiscale, _ = read_output(target / cls)
        np.testing.assert_allclose(values, expected_from_metadata(values, multiscale, c), atol=1e-4)


def test_blending_removes_tile_seams(tmp_path, tiny_data):
    rng = np.random.default_rng(1)
    results = {}
    for overlap in (0, 8):
        writer, target, _ = make_writer(tmp_path, tiny_data, name=f"o{overlap}", classes=["mito"], overlap=overlap,
                                        extent=(16, 64, 64), tile=(16, 16, 16))
        bias = rng.choice([0.0, 1.0], size=len(writer))  # each tile is off by 0 or 1
        write_all(writer, bias=bias)
        writer.close()
        values, multiscale, _ = read_output(target / "mito")
        error = values - expected_from_metadata(values, multiscale, 0)
        results[overlap] = np.abs(np.diff(error, axis=2)).max()
        assert error.min() >= -1e-4 and error.max() <= 1 + 1e-4, "a blend stays within the tiles' range"
    assert results[0] > 0.99, "plain tiling shows the seams"
    assert results[8] < 0.15, f"blended seams are smooth (largest step {results[8]})"


def test_chunks_other_than_the_tile_and_blended_2d(tmp_path, tiny_data):
    for name, kwargs in (("big", {"chunks": (32, 32, 32)}), ("small", {"chunks": (8, 8, 8), "overlap": 4})):
        writer, target, _ = make_writer(tmp_path, tiny_data, name=name, classes=["mito"], **kwargs)
        write_all(writer)
        assert writer.writers["mito"].stats["pending_chunks"] == 0
        writer.close()
        values, multiscale, _ = read_output(target / "mito")
        assert zarr.open_array(str(target / "mito" / "s0"), mode="r").chunks == kwargs["chunks"]
        np.testing.assert_allclose(values, expected_from_metadata(values, multiscale, 0), atol=1e-4)
    writer, target, _ = make_writer(tmp_path, tiny_data, name="flat", tile=(1, 16, 16), inp=(1, 24, 24),
                                    extent=(3, 40, 33), classes=["mito"], overlap=5, blend="gaussian")
    write_all(writer)
    writer.close()
    values, multiscale, _ = read_output(target / "mito")
    np.testing.assert_allclose(values, expected_from_metadata(values, multiscale, 0), atol=1e-4)


# -- ImageWriter -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, named",
    [
        ({"write_voxel_shape": (4, -4, 4)}, "write_voxel_shape [4, -4, 4] must be positive"),
        ({"write_voxel_shape": (4, 0, 4)}, "write_voxel_shape [4, 0, 4] must be positive"),
        ({"chunks": (8, 8, -8)}, "chunks [8, 8, -8] must be positive"),
        ({"scale_level": -1}, "scale_level -1 must be non-negative"),
        ({"downsample_levels": -2}, "downsample_levels -2 must be non-negative"),
        ({"zarr_format": 4}, "zarr_format must be 2 or 3, not 4"),
        ({"overlap": -1}, "overlap [-1, -1, -1] must be non-negative"),
        ({"overlap": 4}, "overlap 4 on axis 'z' must be smaller than the tile"),
        ({"overlap": 1, "blend": "cubic"}, "blend must be 'linear' or 'gaussian', not 'cubic'"),
        ({"compression_level": 99}, "compression_level 99 is not a zstd level"),
    ],
)
def test_writer_options_are_checked_once_by_the_engine_naming_the_option(tmp_path, options, named):
    options = {"write_voxel_shape": (4, 4, 4), **options}
    box = {"z": (0.0, 16.0), "y": (0.0, 16.0), "x": (0.0, 16.0)}
    with pytest.raises(ConfigError, match=re.escape(named)):
        ImageWriter(str(tmp_path / "out.zarr" / "c"), "c", 1.0, box, **options)
    assert not (tmp_path / "out.zarr").exists()


def test_image_writer_centres_batches_and_read_back(tmp_path):
    box = {"z": (0.0, 40.0), "y": (100.0, 180.0), "x": (-40.0, 30.0)}  # 10 x 20 x 14 voxels of (4, 4, 5)
    path = tmp_path / "iw.zarr" / "mito"
    with ImageWriter(str(path), "mito", {"z": 4, "y": 4, "x": 5}, box, {"z": 10, "y": 10, "x": 7}) as writer:
        assert writer.shape == {"z": 10, "y": 20, "x": 14}
        assert writer.translation == {"z": 0.0, "y": 100.0, "x": -40.0}
        writer[{"z": 20.0, "y": 120.0, "x": -22.5}] = torch.ones(10, 10, 7)
        tiles = np.stack([np.full((10, 10, 7), 2.0), np.full((10, 10, 7), 3.0)])
        writer[{"z": [20.0, 20.0], "y": [160.0, 160.0], "x": [-22.5, 12.5]}] = tiles
        back = writer[{"z": [20.0], "y": [160.0], "x": [12.5]}]
        assert tuple(back.shape) == (1, 10, 10, 7) and (back == 3).all()
        assert writer.stats["chunks_written"] == 3
    values = zarr.open_array(str(path / "s0"), mode="r")[...]
    assert (values[:, :10, :7] == 1).all() and (values[:, 10:, :7] == 2).all() and (values[:, 10:, 7:] == 3).all()
    assert (values[:, :10, 7:] == 0).all(), "unwritten voxels keep the fill value"
    assert writer.closed
    with pytest.raises(ConfigError, match="closed"):
        writer[{"z": 20.0, "y": 120.0, "x": -22.5}] = torch.ones(10, 10, 7)


def test_image_writer_partial_tiles_are_clipped_and_flushed_at_close(tmp_path):
    box = {a: (0.0, 10.0) for a in "zyx"}
    path = tmp_path / "clip.zarr" / "c"
    writer = ImageWriter(str(path), "c", 1.0, box, (4, 4, 4), fill_value=-1)
    writer[{"z": 1.0, "y": 9.0, "x": 9.0}] = torch.full((4, 4, 4), 5.0)  # hangs over the edges
    writer.close()
    values = zarr.open_array(str(path / "s0"), mode="r")[...]
    expect = np.full((10, 10, 10), -1.0, dtype=np.float32)
    expect[0:3, 7:10, 7:10] = 5.0
    np.testing.assert_array_equal(values, expect)


# -- crash safety ------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from cellmap_data import _engine  # no torch import: the process starts quickly

    config = {"path": sys.argv[1], "voxel_size": [4.0] * 3, "bounds_lo": [0.0] * 3, "bounds_hi": [1024.0] * 3,
              "write_shape": [64] * 3, "tiling": {"overlap": [0, 0, 0], "blend": "linear"}}
    writer = _engine.ImageWriter(json.dumps(config))
    print("ready", len(writer), flush=True)
    for i in range(len(writer)):
        writer.write_tiles([i], np.random.default_rng(i).random((64, 64, 64), dtype=np.float32))
    print("done", flush=True)
    """
)


def test_killed_mid_write_leaves_no_torn_chunk(tmp_path):
    """SIGKILL a process writing 64 chunks of 1 MB (incompressible) at many moments: every chunk
    file present decodes with zarr-python and holds exactly its tile."""
    script = tmp_path / "kill_writer.py"
    script.write_text(KILL_SCRIPT)
    present_counts = []
    for run, delay in enumerate(np.linspace(0.01, 0.4, 12)):
        path = tmp_path / f"run{run}.zarr" / "c"
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "CELLMAP_NUM_THREADS": "2"})
        assert proc.stdout.readline().startswith("ready")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        array = zarr.open_array(str(path / "s0"), mode="r")  # the metadata is complete
        names = os.listdir(path / "s0")
        chunks = [n for n in names if not n.startswith(".")]
        leftovers = [n for n in names if n.startswith(".") and n not in (".zarray", ".zattrs")]
        assert all(n.endswith(".partial") for n in leftovers), leftovers
        for name in chunks:
            index = tuple(int(v) for v in name.split("."))
            i = (index[0] * 4 + index[1]) * 4 + index[2]
            expect = np.random.default_rng(i).random((64, 64, 64), dtype=np.float32)
            np.testing.assert_array_equal(array.blocks[index], expect, err_msg=f"chunk {name} of run {run}")
        present_counts.append(len(chunks))
    print("chunks present after each kill:", present_counts)
    assert any(0 < n < 64 for n in present_counts), f"no kill landed mid-write: {present_counts}"


# -- bad input ---------------------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path, tiny_data):
    writer, target, _ = make_writer(tmp_path, tiny_data)
    write_all(writer)
    writer.close()
    with pytest.raises(FileExistsError) as info:
        make_writer(tmp_path, tiny_data)
    assert isinstance(info.value, OutputExistsError) and isinstance(info.value, CellMapError)
    assert str(target / "mito") in str(info.value)
    writer, target, _ = make_writer(tmp_path, tiny_data, overwrite=True)
    writer.close()
    values = zarr.open_array(str(target / "mito" / "s0"), mode="r")[...]
    assert (values == 0).all(), "overwrite=True starts from an empty image"


def test_wrong_prediction_shape_names_the_key_and_writes_nothing(tmp_path, tiny_data):
    writer, target, _ = make_writer(tmp_path, tiny_data)
    batch = next(iter(writer.loader(batch_size=2)))
    good = predict(writer, batch["idx"], 2)
    for bad, key in (
        ({"output": good[:, :, :8]}, "'output'"),
        ({"output": good[:, :1]}, "'output'"),
        ({"output": good[:1]}, "'output'"),
        ({"mito": good[:, 0], "er": good[:, 1, :, :4]}, "'er'"),
        ({"output": {"mito": good[:, 0], "er": good[:, 1, :-1]}}, "['er']"),
    ):
        with pytest.raises(ValueError) as info:
            writer[batch["idx"]] = bad
        assert key in str(info.value), str(info.value)
    assert all(w.stats["chunks_written"] == 0 and w.stats["pending_chunks"] == 0 for w in writer.writers.values())
    with pytest.raises(ConfigError, match="'nuc'"):
        writer[batch["idx"]] = {"output": {"nuc": good[:, 0]}}
    with pytest.raises(ConfigError, match="'prediction'"):
        writer[batch["idx"]] = {"prediction": good}
    with pytest.raises(TypeError):
        writer[batch["idx"]] = {"output": 0.5}
    with pytest.raises(TypeError):
        writer[batch["idx"]] = {"mito": torch.tensor(1.0)}
    with pytest.raises(IndexError):
        writer[len(writer)] = {"output": good[:1]}
    assert all(w.stats["chunks_written"] == 0 for w in writer.writers.values())
    writer.close()
    assert not list((target / "mito" / "s0").glob("[0-9]*")), "nothing was written"


def test_bad_configuration_names_the_key_and_creates_nothing(tmp_path, tiny_data):
    raw, voxel, edge, shape = raw_info(tiny_data)
    target = tmp_path / "bad.zarr" / "pred"
    inside = {a: [edge[k], edge[k] + 32 * voxel[k]] for k, a in enumerate("zyx")}
    args = (raw, str(target), ["mito"], {"input": {"shape": (8, 8, 8), "scale": voxel}}, {"output": {"shape": (8, 8, 8), "scale": voxel}})
    outside = dict(inside, x=[edge[2] + 10 * voxel[2], edge[2] + (shape[2] + 5) * voxel[2]])
    with pytest.raises(ConfigError, match=r"target_bounds\['output'\]\['x'\].*outside the raw volume"):
        CellMapDatasetWriter(*args, {"output": outside})
    with pytest.raises(ConfigError, match="'labels'"):
        CellMapDatasetWriter(*args, {"labels": inside})
    with pytest.raises(ConfigError, match="'mito'"):
        CellMapDatasetWriter(*args, {"output": inside}, model_classes=["nuc", "er"])
    with pytest.raises(FileNotFoundError):
        CellMapDatasetWriter(raw + "-missing", *args[1:], {"output": inside})
    with pytest.raises(ConfigError, match="input data"):
        CellMapDatasetWriter(raw, os.path.join(raw, "pred"), *args[2:], {"output": inside})
    assert not (tmp_path / "bad.zarr").exists()


def test_mismatched_model_classes_message(tmp_path, tiny_data):
    raw, voxel, edge, _ = raw_info(tiny_data)
    inside = {a: [edge[k], edge[k] + 32 * voxel[k]] for k, a in enumerate("zyx")}
    with pytest.raises(ConfigError, match="'er'"):
        CellMapDatasetWriter(raw, str(tmp_path / "p"), ["mito", "er"], {"input": {"shape": (8, 8, 8), "scale": voxel}},
                             {"output": {"shape": (8, 8, 8), "scale": voxel}}, {"output": inside}, model_classes=["mito"])


def _read_only_dir(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    try:  # root ignores permission bits; sysfs refuses new files even to root
        (Path("/sys") / "cellmap-probe").mkdir()
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only location available")


def test_read_only_output_path_is_a_permission_error(tmp_path, tiny_data):
    raw, voxel, edge, _ = raw_info(tiny_data)
    inside = {a: [edge[k], edge[k] + 32 * voxel[k]] for k, a in enumerate("zyx")}
    ro = _read_only_dir(tmp_path)
    target = ro / "cellmap-out.zarr" / "pred"
    with pytest.raises(PermissionError) as info:
        CellMapDatasetWriter(raw, str(target), ["mito"], {"input": {"shape": (8, 8, 8), "scale": voxel}},
                             {"output": {"shape": (8, 8, 8), "scale": voxel}}, {"output": inside})
    assert isinstance(info.value, CellMapError)
    assert str(ro) in str(info.value)
    assert not target.exists()
