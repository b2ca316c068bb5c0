"""The bad-input matrix (issue 18): every way a dataset can be broken, and what each one raises.

Each case asserts the exception class (the hierarchy of :mod:`cellmap_data.exceptions`: every
class is a :class:`CellMapError` *and* the builtin a caller would catch) and that the message
names the path, key or chunk involved. Faults that the metadata reveals are raised when the
dataset is built; faults inside a chunk on the first batch that touches the chunk, through
``dataset[i]`` and through :class:`CellMapDataLoader` (engine threads), naming the chunk and the
sample. Nothing may panic ("internal engine error"), abort, hang or quietly return zeros; and
paths with spaces and non-ASCII characters must simply work.

The timeouts use pytest-timeout's ``thread`` method: a hang inside the engine (GIL released,
waiting on a lock) would never return to the interpreter for the ``signal`` method to act on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapDataSplit
from cellmap_data.exceptions import (
    CellMapError,
    ChunkDecodeError,
    ConfigError,
    MetadataError,
    NotFoundError,
    PermissionDeniedError,
)
from conftest import write_ome_image

pytestmark = pytest.mark.timeout(60, method="thread")

VOXEL = (4.0, 4.0, 4.0)
EDGE = 16  # voxels per axis of the raw image and of the crop (one chunk each)
ARRAYS = dict(
    input_arrays={"raw": {"shape": (8, 8, 8), "scale": VOXEL}},
    target_arrays={"gt": {"shape": (8, 8, 8), "scale": VOXEL}},
)
#: Words that would mean the engine panicked or lost the cause instead of reporting it.
PANIC_WORDS = ("internal engine error", "panicked", "PanicException")

ROOT_SKIP = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: the operating system ignores file permissions, so access is never denied",
)


# -- test data ---------------------------------------------------------------------------------
@dataclass
class Layout:
    """One CellMap-layout container: a raw image and one crop with the class ``mito``."""

    root: Path
    raw: Path  # .../data.zarr/raw (OME-NGFF multiscale group, level s0)
    crop: Path  # .../data.zarr/crop
    label: Path  # .../data.zarr/crop/mito

    @property
    def target_path(self) -> str:
        return f"{self.crop}/[mito]"

    def dataset(self, **kwargs) -> CellMapDataset:
        options = dict(ARRAYS, pad=False)
        options.update(kwargs)
        return CellMapDataset(str(self.raw), self.target_path, ["mito"], **options)


def raw_values() -> np.ndarray:
    # 1..255, never 0: a read that quietly returns zeros cannot pass for the data.
    return (np.arange(EDGE ** 3) % 255 + 1).astype(np.uint8).reshape(EDGE, EDGE, EDGE)


def label_values() -> np.ndarray:
    return (np.arange(EDGE ** 3).reshape(EDGE, EDGE, EDGE) % 3 == 0).astype(np.uint8)


def write_layout(root: Path, zarr_format: int = 2, raw: np.ndarray | None = None, label_centre=(2.0, 2.0, 2.0),
                 raw_name: str = "raw") -> Layout:
    """Raw and crop cover the same 64 nm cube (voxel 0 centred at 2 nm), each one chunk."""
    container = root / "data.zarr"
    raw_path = write_ome_image(container / raw_name, [raw_values() if raw is None else raw], [VOXEL], [(2.0, 2.0, 2.0)],
                               chunks=(EDGE,) * 3, zarr_format=zarr_format)
    label = write_ome_image(container / "crop" / "mito", [label_values()], [VOXEL], [label_centre],
                            chunks=(EDGE,) * 3, zarr_format=zarr_format)
    return Layout(root=root, raw=raw_path, crop=container / "crop", label=label)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[int, Path]:
    """One good layout per zarr format, written once; tests break a copy."""
    out = {}
    for fmt in (2, 3):
        root = tmp_path_factory.mktemp(f"pristine-v{fmt}")
        write_layout(root, zarr_format=fmt)
        out[fmt] = root
    return out


def copy_layout(pristine, tmp_path: Path, zarr_format: int = 2) -> Layout:
    root = tmp_path / "layout"
    shutil.copytree(pristine[zarr_format], root)
    container = root / "data.zarr"
    return Layout(root=root, raw=container / "raw", crop=container / "crop", label=container / "crop" / "mito")


@pytest.fixture
def layout(pristine, tmp_path) -> Layout:
    return copy_layout(pristine, tmp_path)


@pytest.fixture
def layout_v3(pristine, tmp_path) -> Layout:
    return copy_layout(pristine, tmp_path, 3)


def chunk_file(array: Path) -> Path:
    """The one chunk of a one-chunk array (v2 ``0.0.0`` or v3 ``c/0/0/0``)."""
    v2 = array / "0.0.0"
    return v2 if v2.exists() else array / "c" / "0" / "0" / "0"


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


# -- assertions --------------------------------------------------------------------------------
def check(info: pytest.ExceptionInfo, cls: type, *needles: str) -> str:
    """The error is a ``cls`` (so also a CellMapError) naming every needle; not a panic."""
    error = info.value
    message = str(error)
    assert isinstance(error, cls), f"expected {cls.__name__}, got {type(error).__name__}: {message}"
    assert isinstance(error, CellMapError), f"{type(error).__name__} is not a CellMapError: {message}"
    for word in PANIC_WORDS:
        assert word not in message, f"the engine panicked instead of reporting the fault: {message}"
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not named in: {message}"
    return message


SAMPLE_NOTE = re.compile(r"\(reading sample (\d+) of dataset '([^']*)' centred at z=[-0-9.e]+, y=[-0-9.e]+, x=[-0-9.e]+ nm\)")


def check_chunk_error(info, cls, array: Path, dataset: CellMapDataset, sample: int | None) -> None:
    """A chunk fault names the array, the chunk and the sample being read."""
    message = check(info, cls, str(array), "chunk")
    note = SAMPLE_NOTE.search(message)
    assert note, f"the message does not name the sample being read: {message}"
    assert note.group(2) == dataset.raw_path, message
    if sample is not None:
        assert int(note.group(1)) == sample, message


def read_through_item(dataset: CellMapDataset):
    return dataset[0]


def read_through_loader(dataset: CellMapDataset):
    loader = CellMapDataLoader(dataset, batch_size=4, num_workers=2, is_train=False)
    for batch in loader:
        return batch
    raise AssertionError("the loader yielded no batch")


READERS = [pytest.param(read_through_item, id="dataset[i]"), pytest.param(read_through_loader, id="loader")]


# == paths ===================================================================================
def test_missing_raw_path(layout):
    missing = layout.root / "data.zarr" / "no-such-raw"
    with pytest.raises(FileNotFoundError) as info:
        CellMapDataset(str(missing), layout.target_path, ["mito"], pad=False, **ARRAYS)
    check(info, NotFoundError, str(missing))


def test_missing_raw_path_in_a_split_is_reported(layout):
    missing = str(layout.root / "data.zarr" / "no-such-raw")
    rows = {"train": [{"raw": missing, "gt": layout.target_path}]}
    with pytest.warns(UserWarning, match=re.escape(missing)), pytest.raises(ValueError) as info:
        CellMapDataSplit(classes=["mito"], pad=False, dataset_dict=rows, **ARRAYS)
    check(info, ConfigError, missing, "no usable training dataset")


def test_missing_class_folder_listed_in_the_template(layout):
    target = f"{layout.crop}/[mito,er]"  # er has no folder
    with pytest.raises(FileNotFoundError) as info:
        CellMapDataset(str(layout.raw), target, ["mito", "er"], pad=False, **ARRAYS)
    check(info, NotFoundError, str(layout.crop / "er"), "'er'")


def test_missing_class_folder_not_requested_still_fails(layout):
    # The template lists 'er' though only 'mito' is requested: a typo in a CSV must still fail.
    with pytest.raises(FileNotFoundError) as info:
        CellMapDataset(str(layout.raw), f"{layout.crop}/[mito,er]", ["mito"], pad=False, **ARRAYS)
    check(info, NotFoundError, str(layout.crop / "er"))


def test_missing_class_folder_in_a_csv_row(layout, tmp_path):
    csv = tmp_path / "split.csv"
    good = layout.target_path
    bad = f"{layout.crop}/[mito,golgi]"
    csv.write_text(f'"train","{layout.raw}","{good}"\n"validate","{layout.raw}","{bad}"\n')
    with pytest.warns(UserWarning, match="golgi"):
        split = CellMapDataSplit(classes=["mito", "golgi"], pad=False, csv_path=str(csv), **ARRAYS)
    assert len(split.train_datasets) == 1 and not split.validation_datasets
    (skipped,) = split.skipped_rows
    assert str(layout.crop / "golgi") in skipped["reason"]


# == group metadata ============================================================================
def test_raw_group_without_multiscales(layout):
    (layout.raw / ".zattrs").write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError) as info:
        layout.dataset()
    check(info, MetadataError, str(layout.raw), "multiscales")


def test_label_group_without_multiscales(layout):
    (layout.label / ".zattrs").unlink()
    with pytest.raises(ValueError) as info:
        layout.dataset()
    check(info, MetadataError, str(layout.label), "multiscales")


def test_v3_group_without_multiscales(layout_v3):
    edit_json(layout_v3.raw / "zarr.json", lambda meta: {**meta, "attributes": {}})
    with pytest.raises(ValueError) as info:
        layout_v3.dataset()
    check(info, MetadataError, str(layout_v3.raw), "multiscales")


MULTISCALE_OK = {"axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                 "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": list(VOXEL)}]}]}


@pytest.mark.parametrize("text, needle", [
    pytest.param("{not json", ".zattrs", id="invalid-json"),
    pytest.param("", ".zattrs", id="empty-file"),
    pytest.param("[1, 2, 3]", ".zattrs", id="a-list"),
    pytest.param(json.dumps({"multiscales": "s0"}), "multiscales", id="multiscales-a-string"),
    pytest.param(json.dumps({"multiscales": []}), "multiscales", id="multiscales-empty"),
    pytest.param(json.dumps({"multiscales": [{**MULTISCALE_OK, "datasets": 5}]}), "datasets", id="datasets-a-number"),
    pytest.param(json.dumps({"multiscales": [{**MULTISCALE_OK, "datasets": []}]}), "datasets", id="datasets-empty"),
    pytest.param(json.dumps({"multiscales": [{**MULTISCALE_OK, "datasets": [{"path": 5}]}]}), "path", id="path-a-number"),
    pytest.param(json.dumps({"multiscales": [{**MULTISCALE_OK, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": "four"}]}]}]}), "scale", id="scale-a-string"),
    pytest.param(json.dumps({"multiscales": [{**MULTISCALE_OK, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 4.0]}]}]}]}), "scale", id="scale-too-short"),
])
def test_malformed_zattrs(layout, text, needle):
    (layout.raw / ".zattrs").write_text(text)
    with pytest.raises(ValueError) as info:
        layout.dataset()
    check(info, MetadataError, str(layout.raw), needle)


def test_malformed_label_zattrs(layout):
    (layout.label / ".zattrs").write_text('{"multiscales": [')
    with pytest.raises(ValueError) as info:
        layout.dataset()
    check(info, MetadataError, str(layout.label), ".zattrs")


@pytest.mark.parametrize("text, needle", [
    pytest.param("{not json", "zarr.json", id="invalid-json"),
    pytest.param(json.dumps([1, 2]), "zarr.json", id="a-list"),
    pytest.param(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"ome": "0.5"}}), "OME", id="ome-a-string"),
    pytest.param(json.dumps({"zarr_format": 3, "node_type": "group",
                             "attributes": {"ome": {"version": "0.5", "multiscales": {"datasets": []}}}}), "multiscales",
                 id="multiscales-a-dict"),
])
def test_malformed_group_zarr_json(layout_v3, text, needle):
    (layout_v3.raw / "zarr.json").write_text(text)
    with pytest.raises(ValueError) as info:
        layout_v3.dataset()
    check(info, MetadataError, str(layout_v3.raw), needle)


# == array metadata ============================================================================
@pytest.mark.parametrize("change, needle", [
    pytest.param(lambda m: "{not json", ".zarray", id="invalid-json"),
    pytest.param(lambda m: json.dumps([16, 16, 16]), ".zarray", id="a-list"),
    pytest.param(lambda m: json.dumps({**m, "shape": "big"}), "shape", id="shape-a-string"),
    pytest.param(lambda m: json.dumps({k: v for k, v in m.items() if k != "dtype"}), "dtype", id="no-dtype"),
    pytest.param(lambda m: json.dumps({**m, "chunks": [16, 16]}), "chunk", id="chunks-wrong-length"),
    pytest.param(lambda m: json.dumps({**m, "chunks": [0, 16, 16]}), "chunk", id="chunks-zero"),
])
def test_malformed_zarray(layout, change, needle):
    path = layout.raw / "s0" / ".zarray"
    path.write_text(change(json.loads(path.read_text())))
    with pytest.raises(ValueError) as info:
        layout.dataset()
    check(info, MetadataError, str(layout.raw / "s0"), needle)


@pytest.mark.parametrize("change, needle", [
    pytest.param(lambda m: "{not json", "zarr.json", id="invalid-json"),
    pytest.param(lambda m: json.dumps({"zarr_format": 3, "node_type": "array"}), "zarr.json", id="missing-keys"),
    pytest.param(lambda m: json.dumps({**m, "shape": [16, 16]}), "s0", id="shape-vs-chunks"),
    pytest.param(lambda m: json.dumps({**m, "data_type": "float128"}), "float128", id="unknown-data-type"),
])
def test_malformed_array_zarr_json(layout_v3, change, needle):
    path = layout_v3.raw / "s0" / "zarr.json"
    path.write_text(change(json.loads(path.read_text())))
    with pytest.raises(ValueError) as info:
        layout_v3.dataset()
    check(info, MetadataError, str(layout_v3.raw / "s0"), needle)


def test_multiscales_naming_a_missing_level(layout):
    def add_level(attrs):
        attrs["multiscales"][0]["datasets"].append(
            {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [8.0, 8.0, 8.0]}]})
        return attrs

    edit_json(layout.raw / ".zattrs", add_level)
    with pytest.raises(FileNotFoundError) as info:
        layout.dataset()
    check(info, NotFoundError, str(layout.raw / "s1"))


def test_level_arrays_with_inconsistent_ndim(tmp_path):
    levels = [raw_values(), raw_values()[0, ::2, ::2]]  # s1 is 2D
    raw = write_ome_image(tmp_path / "data.zarr" / "raw", levels, [VOXEL, (8.0, 8.0, 8.0)], [(2, 2, 2), (4, 4, 4)],
                          chunks=(EDGE,) * 3)
    label = write_ome_image(tmp_path / "data.zarr" / "crop" / "mito", [label_values()], [VOXEL], [(2, 2, 2)], chunks=(EDGE,) * 3)
    with pytest.raises(ValueError) as info:
        CellMapDataset(str(raw), f"{label.parent}/[mito]", ["mito"], pad=False, **ARRAYS)
    check(info, MetadataError, str(raw), "s1")


def test_2d_array_for_a_3d_request(tmp_path):
    raw = write_ome_image(tmp_path / "data.zarr" / "raw", [raw_values()[0]], [VOXEL[1:]], [(2, 2)], chunks=(EDGE,) * 2,
                          axes=("y", "x"))
    label = write_ome_image(tmp_path / "data.zarr" / "crop" / "mito", [label_values()], [VOXEL], [(2, 2, 2)], chunks=(EDGE,) * 3)
    with pytest.raises(ValueError) as info:
        CellMapDataset(str(raw), f"{label.parent}/[mito]", ["mito"], pad=False, **ARRAYS)
    check(info, MetadataError, str(raw), "axes")


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_], ids=["complex64", "bool"])
def test_unsupported_raw_dtype(tmp_path, dtype):
    layout = write_layout(tmp_path, raw=(raw_values() % 2).astype(dtype))
    with pytest.raises(ValueError) as info:
        layout.dataset()
    # The message says which data type was found, not only which ones would do.
    check(info, MetadataError, str(layout.raw / "s0"), np.dtype(dtype).name)


def test_unknown_codec_id_v2(layout):
    edit_json(layout.raw / "s0" / ".zarray", lambda m: {**m, "compressor": {"id": "no-such-codec"}})
    with pytest.raises(ValueError) as info:
        layout.dataset()
    check(info, MetadataError, str(layout.raw / "s0"), "no-such-codec")


def test_unknown_codec_name_v3(layout_v3):
    edit_json(layout_v3.label / "s0" / "zarr.json",
              lambda m: {**m, "codecs": [*m["codecs"], {"name": "no-such-codec", "configuration": {}}]})
    with pytest.raises(ValueError) as info:
        layout_v3.dataset()
    check(info, MetadataError, str(layout_v3.label / "s0"), "no-such-codec")


@pytest.mark.parametrize("scale", [[0.0, 4.0, 4.0], [4.0, -4.0, 4.0]], ids=["zero", "negative"])
def test_non_positive_voxel_size_in_metadata(layout, scale):
    def set_scale(attrs):
        attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = scale
        return attrs

    edit_json(layout.raw / ".zattrs", set_scale)
    with pytest.raises(ValueError) as info:
        layout.dataset()
    check(info, MetadataError, str(layout.raw), "scale")


def test_non_positive_voxel_size_in_label_metadata_v3(layout_v3):
    def set_scale(meta):
        meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [4.0, 4.0, 0.0]
        return meta

    edit_json(layout_v3.label / "zarr.json", set_scale)
    with pytest.raises(ValueError) as info:
        layout_v3.dataset()
    check(info, MetadataError, str(layout_v3.label), "scale")


@ROOT_SKIP
@pytest.mark.parametrize("which", [".zattrs", "s0/.zarray"])
def test_permission_denied_on_metadata(layout, which):
    path = layout.raw / which
    path.chmod(0)
    try:
        with pytest.raises(PermissionError) as info:
            layout.dataset()
        check(info, PermissionDeniedError, str(layout.raw))
    finally:
        path.chmod(0o644)


# == chunks: raised on the first batch touching the chunk ==========================================
def truncate(chunk: Path) -> None:
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])


def empty(chunk: Path) -> None:
    chunk.write_bytes(b"")


def garble(chunk: Path) -> None:
    """Same length, different bytes (the frame header included)."""
    data = chunk.read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    chunk.write_bytes(bytes(a ^ b ^ 0x5A for a, b in zip(data, noise)))
    assert len(chunk.read_bytes()) == len(data)


def make_directory(chunk: Path) -> None:
    chunk.unlink()
    chunk.mkdir()
    (chunk / "stray").write_bytes(b"x")


CHUNK_FAULTS = [
    pytest.param(truncate, ChunkDecodeError, id="truncated"),
    pytest.param(empty, ChunkDecodeError, id="zero-bytes"),
    pytest.param(garble, ChunkDecodeError, id="corrupted-same-length"),
    pytest.param(make_directory, ChunkDecodeError, id="directory"),
]


@pytest.mark.parametrize("fault, cls", CHUNK_FAULTS)
@pytest.mark.parametrize("read", READERS)
def test_raw_chunk_fault(layout, fault, cls, read):
    dataset = layout.dataset()  # the metadata is fine: building succeeds
    fault(chunk_file(layout.raw / "s0"))
    with pytest.raises(OSError) as info:
        read(dataset)
    check_chunk_error(info, cls, layout.raw / "s0", dataset, 0 if read is read_through_item else None)


@pytest.mark.parametrize("fault, cls", [CHUNK_FAULTS[0], CHUNK_FAULTS[2]])
@pytest.mark.parametrize("read", READERS)
def test_label_chunk_fault(layout, fault, cls, read):
    dataset = layout.dataset()
    fault(chunk_file(layout.label / "s0"))
    with pytest.raises(OSError) as info:
        read(dataset)
    check_chunk_error(info, cls, layout.label / "s0", dataset, 0 if read is read_through_item else None)


@pytest.mark.parametrize("read", READERS)
def test_v3_chunk_truncated(layout_v3, read):
    dataset = layout_v3.dataset()
    truncate(chunk_file(layout_v3.raw / "s0"))
    with pytest.raises(OSError) as info:
        read(dataset)
    check_chunk_error(info, ChunkDecodeError, layout_v3.raw / "s0", dataset, 0 if read is read_through_item else None)


def test_v3_checksummed_chunk_with_one_flipped_byte(tmp_path):
    """A crc32c codec makes a one-byte flip in the payload detectable: it must be detected."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    container = tmp_path / "data.zarr"
    raw = write_ome_image(container / "raw", [raw_values()], [VOXEL], [(2, 2, 2)], chunks=(EDGE,) * 3, zarr_format=3)
    label = write_ome_image(container / "crop" / "mito", [label_values()], [VOXEL], [(2, 2, 2)], chunks=(EDGE,) * 3, zarr_format=3)
    # Rewrite s0 uncompressed with a checksum.
    group = zarr.open_group(str(raw), mode="r+")
    del group["s0"]
    array = group.create_array("s0", shape=(EDGE,) * 3, chunks=(EDGE,) * 3, dtype="uint8", serializer=BytesCodec(),
                               compressors=[Crc32cCodec()], fill_value=0)
    array[...] = raw_values()
    dataset = CellMapDataset(str(raw), f"{label.parent}/[mito]", ["mito"], pad=False, **ARRAYS)
    chunk = chunk_file(raw / "s0")
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(OSError) as info:
        dataset[0]
    check_chunk_error(info, ChunkDecodeError, raw / "s0", dataset, 0)


@ROOT_SKIP
@pytest.mark.parametrize("read", READERS)
def test_permission_denied_on_a_chunk(layout, read):
    dataset = layout.dataset()
    chunk = chunk_file(layout.raw / "s0")
    chunk.chmod(0)
    try:
        with pytest.raises(PermissionError) as info:
            read(dataset)
        check_chunk_error(info, PermissionDeniedError, layout.raw / "s0", dataset, 0 if read is read_through_item else None)
    finally:
        chunk.chmod(0o644)


def test_a_missing_chunk_is_the_fill_value_not_an_error(layout):
    """The zarr rule, for contrast: an absent chunk file is the fill value (here 0)."""
    dataset = layout.dataset()
    chunk_file(layout.raw / "s0").unlink()
    assert torch.equal(dataset[0]["raw"], torch.zeros_like(dataset[0]["raw"]))


# == geometry ===================================================================================
@pytest.mark.parametrize("pad", [False, True], ids=["pad=False", "pad=True"])
def test_crop_outside_the_raw_volume(tmp_path, pad):
    layout = write_layout(tmp_path, label_centre=(10_002.0, 2.0, 2.0))  # 10 µm away along z
    with pytest.raises(ValueError) as info:
        layout.dataset(pad=pad)
    check(info, ConfigError, str(layout.raw), str(layout.label), "overlap")


def test_patch_bigger_than_every_crop_without_padding(layout):
    big = {"raw": {"shape": (32, 8, 8), "scale": VOXEL}}  # 128 nm along z; the crop spans 64 nm
    with pytest.raises(ValueError) as info:
        CellMapDataset(str(layout.raw), layout.target_path, ["mito"], input_arrays=big, target_arrays=ARRAYS["target_arrays"],
                       pad=False)
    check(info, ConfigError, "'raw'", "along z", layout.target_path)


def test_patch_bigger_than_every_crop_in_a_split(layout):
    rows = {"train": [{"raw": str(layout.raw), "gt": layout.target_path}]}
    big = {"raw": {"shape": (32, 8, 8), "scale": VOXEL}}
    with pytest.warns(UserWarning, match=re.escape(layout.target_path)), pytest.raises(ValueError) as info:
        CellMapDataSplit(input_arrays=big, target_arrays=ARRAYS["target_arrays"], classes=["mito"], pad=False, dataset_dict=rows)
    check(info, ConfigError, "no usable training dataset", layout.target_path)


# == the datasplit CSV ============================================================================
def split_from(csv: Path) -> CellMapDataSplit:
    return CellMapDataSplit(classes=["mito"], pad=False, csv_path=str(csv), **ARRAYS)


def test_empty_csv(tmp_path):
    csv = tmp_path / "empty.csv"
    csv.write_text("")
    with pytest.raises(ValueError) as info:
        split_from(csv)
    check(info, ConfigError, str(csv), "no rows")


def test_csv_of_comments_only(tmp_path):
    csv = tmp_path / "comments.csv"
    csv.write_text("# usage, raw, gt\n\n")
    with pytest.raises(ValueError) as info:
        split_from(csv)
    check(info, ConfigError, str(csv), "no rows")


def test_missing_csv(tmp_path):
    csv = tmp_path / "missing.csv"
    with pytest.raises(FileNotFoundError) as info:
        split_from(csv)
    check(info, NotFoundError, str(csv))


def test_csv_with_a_bad_usage(layout, tmp_path):
    csv = tmp_path / "bad usage.csv"
    csv.write_text(f'"train","{layout.raw}","{layout.target_path}"\n"testing","{layout.raw}","{layout.target_path}"\n')
    with pytest.raises(ValueError) as info:
        split_from(csv)
    check(info, ConfigError, f"{csv}:2", "'testing'")


@pytest.mark.parametrize("row", ['"train","{raw}"', '"train","{raw}","{gt}","extra"', '"train","a","b","c","d","e"'],
                         ids=["2-columns", "4-columns", "6-columns"])
def test_csv_with_a_wrong_column_count(layout, tmp_path, row):
    csv = tmp_path / "columns.csv"
    csv.write_text(row.format(raw=layout.raw, gt=layout.target_path) + "\n")
    with pytest.raises(ValueError) as info:
        split_from(csv)
    check(info, ConfigError, f"{csv}:1", "columns")


# == array specs and the spatial-transform config ======================================================
BAD_SPECS = [
    pytest.param({"shape": (8, float("nan"), 8), "scale": VOXEL}, id="shape-nan"),
    pytest.param({"shape": (8, float("inf"), 8), "scale": VOXEL}, id="shape-inf"),
    pytest.param({"shape": (8, "eight", 8), "scale": VOXEL}, id="shape-string"),
    pytest.param({"shape": (8, 8, 8), "scale": (4.0, float("nan"), 4.0)}, id="scale-nan"),
    pytest.param({"shape": (8, 8, 8), "scale": (4.0, float("inf"), 4.0)}, id="scale-inf"),
    pytest.param({"shape": (8, 8, 8), "scale": (4.0, "four", 4.0)}, id="scale-string"),
    pytest.param({"shape": (8, 8, 8), "scale": (4.0, 0.0, 4.0)}, id="scale-zero"),
    pytest.param({"shape": (8, -8, 8), "scale": VOXEL}, id="shape-negative"),
    pytest.param({"shape": "888", "scale": VOXEL}, id="shape-a-string"),
    pytest.param({"shape": (8, 8, 8)}, id="no-scale"),
]


@pytest.mark.parametrize("spec", BAD_SPECS)
@pytest.mark.parametrize("which", ["input_arrays", "target_arrays"])
def test_bad_array_spec(layout, spec, which):
    arrays = dict(ARRAYS)
    arrays[which] = {"bad_array": spec}
    with pytest.raises(ValueError) as info:
        CellMapDataset(str(layout.raw), layout.target_path, ["mito"], pad=False, **arrays)
    check(info, ConfigError, "'bad_array'")


@pytest.mark.parametrize("config, key", [
    pytest.param({"mirror": {"axes": {"x": float("nan")}}}, "mirror", id="mirror-nan"),
    pytest.param({"mirror": {"axes": {"x": float("inf")}}}, "mirror", id="mirror-inf"),
    pytest.param({"mirror": {"axes": {"x": "often"}}}, "mirror", id="mirror-string"),
    pytest.param({"mirror": {"axes": {"x": 1.5}}}, "mirror", id="mirror-probability-above-1"),
    pytest.param({"rotate": {"axes": {"z": [float("-inf"), 10]}}}, "rotate", id="rotate-inf"),
    pytest.param({"rotate": {"axes": {"z": float("nan")}}}, "rotate", id="rotate-nan"),
    pytest.param({"rotate": {"axes": {"z": "lots"}}}, "rotate", id="rotate-string"),
    pytest.param({"rotate": {"axes": {"z": ["a", "b"]}}}, "rotate", id="rotate-strings"),
    pytest.param({"transpose": {"axes": ["x", "q"]}}, "transpose", id="transpose-unknown-axis"),
    pytest.param({"transpose": {"axes": [1, 2]}}, "transpose", id="transpose-numbers"),
    pytest.param({"mirror": "yes"}, "mirror", id="mirror-a-string"),
    pytest.param({"warp": {"x": 1}}, "warp", id="unknown-transform"),
])
def test_bad_spatial_transform_config(layout, config, key):
    with pytest.raises(ValueError) as info:
        layout.dataset(spatial_transforms=config)
    check(info, ConfigError, key)


def test_bad_spatial_transform_config_in_a_split(layout):
    rows = {"train": [{"raw": str(layout.raw), "gt": layout.target_path}]}
    with pytest.raises(ValueError) as info, pytest.warns(UserWarning):
        CellMapDataSplit(classes=["mito"], pad=False, dataset_dict=rows, spatial_transforms={"rotate": {"axes": {"z": [float("nan"), 1]}}},
                         **ARRAYS)
    check(info, ConfigError, "rotate")


# == paths that must work ==========================================================================
WEIRD_NAMES = ["my data ✓/ünïcødé zarr.zarr", "日本語 データ/スペース 入り.zarr", "  leading and trailing  /a b.zarr"]


@pytest.mark.parametrize("name", WEIRD_NAMES, ids=["spaces-accents", "cjk", "edge-spaces"])
def test_unicode_and_spaces_in_paths_work(pristine, tmp_path, name):
    plain = copy_layout(pristine, tmp_path / "plain")
    weird_root = tmp_path / name.split("/")[0]
    container = weird_root / name.split("/")[1]
    shutil.copytree(plain.root / "data.zarr", container)
    (container / "raw").rename(container / "raw ëm ✓")
    (container / "crop").rename(container / "crop 1 ñ")
    raw, target = container / "raw ëm ✓", f"{container / 'crop 1 ñ'}/[mito]"

    expected = plain.dataset()[0]
    dataset = CellMapDataset(str(raw), target, ["mito"], pad=False, **ARRAYS)
    assert len(dataset) == len(plain.dataset())
    got = dataset[0]
    assert torch.equal(got["raw"], expected["raw"]) and torch.equal(got["gt"], expected["gt"])
    assert got["raw"].gt(0).all()  # the raw values are never 0: real data came back

    # ... and through a CSV (five columns, with the container and the dataset split) and the loader.
    csv = weird_root / "split ✓.csv"
    csv.write_text(f'"train","{container}","raw ëm ✓","{container}","crop 1 ñ/[mito]"\n')
    split = CellMapDataSplit(classes=["mito"], pad=False, csv_path=str(csv), **ARRAYS)
    assert len(split.train_datasets) == 1 and not split.skipped_rows
    batch = next(iter(CellMapDataLoader(split.train_datasets[0], batch_size=2, is_train=False)))
    assert batch["raw"].shape == (2, 1, 8, 8, 8) and batch["raw"].gt(0).all()
