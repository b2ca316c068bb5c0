"""``cellmap_data.describe``: the engine's record of a zarr node, checked against zarr-python's
reading of the same files (local and over a loopback HTTP server)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import zarr

from cellmap_data.describe import describe
from cellmap_data.exceptions import MetadataError
from conftest import write_ome_image
from remote_servers import http_server_factory  # noqa: F401


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_an_image_group_and_its_levels_as_zarr_python_reads_them(tmp_path, zarr_format):
    data = np.arange(20 * 24 * 28, dtype=np.uint16).reshape(20, 24, 28)
    path = write_ome_image(tmp_path / "img", [data, data[::2, ::2, ::2]], [(8, 4, 4), (16, 8, 8)], [(4, 2, 2), (8, 4, 4)],
                           zarr_format=zarr_format, chunks=(8, 8, 8))
    group = describe(path)
    assert (group.kind, group.zarr_format, group.is_image, group.array) == ("group", zarr_format, True, None)
    assert group.multiscale.version == ("0.4" if zarr_format == 2 else "0.5")
    assert [(a.name, a.kind, a.unit, a.spatial) for a in group.multiscale.axes] == [(n, "space", "nanometer", True) for n in "zyx"]
    stored = zarr.open_group(str(path), mode="r").attrs.asdict()
    entries = (stored["multiscales"] if zarr_format == 2 else stored["ome"]["multiscales"])[0]["datasets"]
    for level, entry in zip(group.multiscale.levels, entries, strict=True):
        scale, translation = (t[t["type"]] for t in entry["coordinateTransformations"])
        assert (level.path, list(level.scale), list(level.translation)) == (entry["path"], scale, translation)
        array = describe(path / level.path)
        reference = zarr.open_array(str(path / level.path), mode="r")
        assert array.kind == "array" and not array.is_image
        assert array.array.shape == reference.shape and array.array.chunks == reference.chunks
        assert array.array.inner_chunks is None and array.array.data_type == str(reference.dtype)
        assert "zstd" in [c.name for c in array.array.codecs]


def test_a_sharded_array_names_its_shards_inner_chunks_and_inner_codecs(tmp_path):
    path = write_ome_image(tmp_path / "img", [np.zeros((40, 40, 40), np.uint8)], [(1, 1, 1)], [(0, 0, 0)], zarr_format=3,
                           chunks=(8, 8, 8), shards=(16, 16, 16))
    reference = zarr.open_array(str(path / "s0"), mode="r")
    layout = describe(path / "s0").array
    assert layout.chunks == reference.shards and layout.inner_chunks == reference.chunks
    [sharding] = layout.codecs
    stored = json.loads((path / "s0" / "zarr.json").read_text())["codecs"][0]
    assert sharding.name == stored["name"] == "sharding_indexed"
    assert [c.name for c in sharding.inner] == [c["name"] for c in stored["configuration"]["codecs"]]
    assert sharding.configuration == {"index_location": stored["configuration"]["index_location"]}


def test_places_without_zarr_metadata_and_broken_metadata(tmp_path):
    assert describe(tmp_path / "missing").kind is None
    (tmp_path / "plain").mkdir()
    assert describe(tmp_path / "plain").kind is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(MetadataError, match="zarr.json"):
        describe(bad)
    group = zarr.open_group(str(tmp_path / "group"), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": ["z", "y", "x"], "datasets": []}]
    described = describe(tmp_path / "group")
    assert (described.kind, described.is_image, described.multiscale) == ("group", False, None)
    assert "datasets is empty" in described.multiscale_error and ".zattrs" in described.multiscale_error
    group.attrs.put({"cellmap": {"annotation": {"class_name": "mito"}}})
    plain = describe(tmp_path / "group")
    assert (plain.multiscale, plain.multiscale_error) == (None, None)
    assert plain.attributes == {"cellmap": {"annotation": {"class_name": "mito"}}}


def test_a_url_is_described_as_its_folder_is(tmp_path, http_server_factory):
    path = write_ome_image(tmp_path / "data.zarr" / "img", [np.ones((16, 16, 16), np.float32)], [(4, 4, 4)], [(2, 2, 2)],
                           zarr_format=3, chunks=(8, 8, 8), shards=(16, 16, 16))
    server = http_server_factory(tmp_path)
    for node in (path, path / "s0"):
        url = f"{server.url}/{node.relative_to(tmp_path).as_posix()}"
        assert describe(url) == replace(describe(node), location=url)
