"""Bad input raises a CellMapError subclass that is also the matching builtin, naming the path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from cellmap_data import _engine
from cellmap_data.exceptions import CellMapError, ChunkDecodeError, ConfigError, MetadataError, NotFoundError
from conftest import write_ome_image


def image(tmp_path, **kwargs):
    data = np.arange(32 ** 3, dtype=np.uint16).reshape(32, 32, 32)
    return write_ome_image(tmp_path / "img", [data], [(1, 1, 1)], [(0, 0, 0)], **kwargs)


def test_missing_path_is_file_not_found(tmp_path):
    missing = tmp_path / "nope.zarr" / "raw"
    with pytest.raises(FileNotFoundError) as info:
        _engine.Volume(str(missing))
    assert isinstance(info.value, NotFoundError) and isinstance(info.value, CellMapError)
    assert str(missing) in str(info.value)


def test_group_without_multiscales(tmp_path):
    zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=2)
    with pytest.raises(ValueError) as info:
        _engine.Volume(str(tmp_path / "g"))
    assert isinstance(info.value, MetadataError)
    assert "multiscales" in str(info.value) and str(tmp_path / "g") in str(info.value)


def test_malformed_json(tmp_path):
    path = image(tmp_path)
    (path / ".zattrs").write_text("{not json")
    with pytest.raises(MetadataError, match="malformed JSON") as info:
        _engine.Volume(str(path))
    assert ".zattrs" in str(info.value)


def test_level_listed_but_missing(tmp_path):
    path = image(tmp_path)
    attrs = json.loads((path / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"].append({"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [2, 2, 2]}]})
    (path / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(FileNotFoundError, match="s1"):
        _engine.Volume(str(path))


def test_unknown_codec_names_the_array(tmp_path):
    path = image(tmp_path)
    meta = json.loads((path / "s0" / ".zarray").read_text())
    meta["compressor"] = {"id": "no-such-codec"}
    (path / "s0" / ".zarray").write_text(json.dumps(meta))
    with pytest.raises(MetadataError) as info:
        _engine.Volume(str(path))
    assert "s0" in str(info.value)


def test_corrupt_chunk_raises_on_read_naming_the_chunk(tmp_path):
    path = image(tmp_path)
    chunk = next(p for p in (path / "s0").iterdir() if not p.name.startswith("."))
    chunk.write_bytes(b"definitely not zstd")
    volume = _engine.Volume(str(path))
    with pytest.raises(ChunkDecodeError) as info:
        volume.read([15.5, 15.5, 15.5], [32, 32, 32], [1, 1, 1])
    assert isinstance(info.value, OSError)
    assert "s0" in str(info.value)


def test_bad_read_arguments_are_value_errors(tmp_path):
    volume = _engine.Volume(str(image(tmp_path)))
    with pytest.raises(ConfigError):
        volume.read([0, 0, 0], [0, 4, 4], [1, 1, 1])
    with pytest.raises(ValueError):
        volume.read([0, 0, 0], [4, 4, 4], [1, -1, 1])
    with pytest.raises(ValueError, match="interpolation"):
        volume.read([0, 0, 0], [4, 4, 4], [1, 1, 1], interpolation="cubic")


def test_exception_hierarchy():
    assert issubclass(NotFoundError, FileNotFoundError)
    assert issubclass(MetadataError, ValueError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ChunkDecodeError, OSError)
    assert all(issubclass(c, CellMapError) for c in (NotFoundError, MetadataError, ConfigError, ChunkDecodeError))


def test_batch_arguments_of_unequal_length_are_refused_by_the_engine(tiny_data):
    from cellmap_data import CellMapDataset

    ds = tiny_data.datasets[0]
    crop = ds.crops[0]
    arrays = {"raw": {"shape": (8, 8, 8), "scale": (8.0, 8.0, 8.0)}}
    dataset = CellMapDataset(str(ds.raw_path), f"{crop.path}/[{','.join(crop.classes)}]", crop.classes,
                             input_arrays=arrays, target_arrays={"gt": arrays["raw"]}, pad=True)
    with pytest.raises(ConfigError, match="stream_indices has 1 entries for 2 indices"):
        dataset.read_batch_raw([0, 1], stream_indices=[4])
    with pytest.raises(ConfigError, match="does not hold 4 values"):
        _engine.apply_value_ops("[]", [0.0] * 4, [1, 3])
