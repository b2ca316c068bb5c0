"""Reading from object stores, against real servers on loopback that the tests start: an HTTP
server over a generated dataset (with latency and injected faults) and moto's S3 endpoint.
Remote reads must equal local reads bit for bit; faults end in bounded retries and an error
naming the URL and status, never a hang or silently empty data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapImage, _engine, configure_remote
from cellmap_data.exceptions import NotFoundError, PermissionDeniedError, StorageError
from cellmap_data.remote import groups_exist, remote_options
from conftest import write_ome_image
from remote_servers import DirectoryServer, http_server_factory, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(120, method="thread")

VOXEL = (4.0, 4.0, 4.0)
ARRAYS = dict(input_arrays={"raw": {"shape": (8, 8, 8), "scale": VOXEL}},
              target_arrays={"gt": {"shape": (8, 8, 8), "scale": VOXEL}})
ROTATE = {"mirror": {"x": 0.5}, "rotate": {"z": [-40, 40]}}


@pytest.fixture(autouse=True)
def restore_remote_options():
    before = remote_options()
    _engine.clear_cache()
    yield
    configure_remote(
        endpoint_url=before["endpoint_url"] or "", anonymous="auto" if before["anonymous"] is None else before["anonymous"],
        max_in_flight=before["max_in_flight"], timeout=before["timeout"], retries=before["retries"],
        disk_cache=before["disk_cache"] or "", disk_cache_bytes=before["disk_cache_bytes"], range_gap=before["range_gap"],
    )


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    """A 32³ raw image (8³ chunks, values never 0) and a crop of two classes over all of it."""
    root = tmp_path_factory.mktemp("remote") / "data.zarr"
    raw = (np.arange(32 ** 3) % 251 + 1).astype(np.float32).reshape(32, 32, 32)
    grid = np.indices((32, 32, 32)).sum(axis=0)
    write_ome_image(root / "raw", [raw, raw[::2, ::2, ::2]], [VOXEL, (8.0, 8.0, 8.0)], [(2.0,) * 3, (4.0,) * 3], chunks=(8, 8, 8))
    write_ome_image(root / "crop" / "mito", [(grid % 3 == 0).astype(np.uint8)], [VOXEL], [(2.0,) * 3], chunks=(8, 8, 8))
    write_ome_image(root / "crop" / "er", [(grid % 5 == 0).astype(np.uint8)], [VOXEL], [(2.0,) * 3], chunks=(8, 8, 8))
    return root


def dataset(raw: str, crop: str, **kwargs) -> CellMapDataset:
    kwargs.setdefault("spatial_transforms", None)
    return CellMapDataset(raw, f"{crop}/[mito,er]", ["mito", "er", "nuc"], pad=False, seed=7, **ARRAYS, **kwargs)


def assert_same_samples(a: CellMapDataset, b: CellMapDataset, indices=range(0, 40, 7)) -> None:
    for i in indices:
        x, y = a[i], b[i]
        assert torch.equal(x["raw"], y["raw"]), i
        assert torch.equal(x["gt"].nan_to_num(-1), y["gt"].nan_to_num(-1)), i


def served(server: DirectoryServer, path: Path) -> str:
    return f"{server.url}/{path.relative_to(server.root).as_posix()}"


@pytest.mark.parametrize("transforms", [None, ROTATE], ids=["axis-aligned", "rotated"])
def test_http_reads_equal_local_reads(crop, http_server_factory, transforms):
    server = http_server_factory(crop.parent)
    remote = dataset(served(server, crop / "raw"), served(server, crop / "crop"), spatial_transforms=transforms)
    local = dataset(str(crop / "raw"), str(crop / "crop"), spatial_transforms=transforms)
    assert remote.raw_path.startswith("http://")
    assert_same_samples(remote, local)
    # Opening and reading never list: every request names a file.
    assert server.count() > 0
    assert all(not path.endswith("/") and "list" not in path for _, path, _ in server.requests), server.requests


def test_training_batches_from_http_equal_local_batches(crop, http_server_factory):
    server = http_server_factory(crop.parent, latency=0.005)

    def batches(raw: str, labels: str) -> list[dict]:
        loader = CellMapDataLoader(dataset(raw, labels, spatial_transforms=ROTATE), batch_size=4, num_workers=2,
                                   iterations_per_epoch=3, seed=11)
        return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]

    remote = batches(served(server, crop / "raw"), served(server, crop / "crop"))
    local = batches(str(crop / "raw"), str(crop / "crop"))
    assert len(remote) == len(local) == 3
    for r, l in zip(remote, local):
        assert r.keys() == l.keys()
        for key in l:
            assert torch.equal(r[key].nan_to_num(-1), l[key].nan_to_num(-1)), key


def test_a_batch_requests_its_chunks_together(crop, http_server_factory):
    server = http_server_factory(crop.parent)
    remote = dataset(served(server, crop / "raw"), served(server, crop / "crop"), spatial_transforms=ROTATE)
    server.latency = 0.1
    server.reset_log()
    started = time.perf_counter()
    loader = CellMapDataLoader(remote, batch_size=8, num_workers=1, iterations_per_epoch=1, seed=3)
    next(iter(loader))
    elapsed = time.perf_counter() - started
    chunk_requests = server.count(method="GET", pattern=r"/s0/\d+\.\d+\.\d+$")
    # One engine thread: chunk by chunk this would take chunks × 0.1 s.
    assert chunk_requests >= 8
    assert server.max_in_flight >= 8, server.max_in_flight
    assert elapsed < chunk_requests * 0.1 / 2, (elapsed, chunk_requests)


def write_sharded_crop(root: Path, raw_shards: int, label_shards: int) -> Path:
    """The same voxels as ``crop`` in zarr v3 shards (raw: inner chunks of 8³, labels of 16³)."""
    raw = (np.arange(32 ** 3) % 251 + 1).astype(np.float32).reshape(32, 32, 32)
    grid = np.indices((32, 32, 32)).sum(axis=0)
    raw_sharding = dict(zarr_format=3, chunks=(8, 8, 8), shards=(raw_shards,) * 3)
    label_sharding = dict(zarr_format=3, chunks=(16, 16, 16), shards=(label_shards,) * 3)
    write_ome_image(root / "raw", [raw, raw[::2, ::2, ::2]], [VOXEL, (8.0, 8.0, 8.0)], [(2.0,) * 3, (4.0,) * 3], **raw_sharding)
    write_ome_image(root / "crop" / "mito", [(grid % 3 == 0).astype(np.uint8)], [VOXEL], [(2.0,) * 3], **label_sharding)
    write_ome_image(root / "crop" / "er", [(grid % 5 == 0).astype(np.uint8)], [VOXEL], [(2.0,) * 3], **label_sharding)
    return root


@pytest.fixture(scope="module")
def sharded_crop(tmp_path_factory) -> Path:
    """Shards far larger than the data (raw 256³ float32, labels 512³ uint8, 64 and 128 MiB
    decoded): read remotely by inner chunk."""
    return write_sharded_crop(tmp_path_factory.mktemp("remote-sharded") / "data.zarr", 256, 512)


@pytest.fixture(scope="module")
def small_shard_crop(tmp_path_factory) -> Path:
    """Shards of 2x2x2 inner chunks (16 KiB of raw): read remotely a whole shard at a time."""
    return write_sharded_crop(tmp_path_factory.mktemp("remote-small-shards") / "data.zarr", 16, 32)


@pytest.mark.parametrize("source", ["sharded_crop", "small_shard_crop"])
def test_sharded_batches_from_http_equal_local_unsharded_batches(crop, source, http_server_factory, request):
    sharded = request.getfixturevalue(source)
    server = http_server_factory(sharded.parent)
    remote = dataset(served(server, sharded / "raw"), served(server, sharded / "crop"), spatial_transforms=ROTATE)
    local = dataset(str(crop / "raw"), str(crop / "crop"), spatial_transforms=ROTATE)
    assert_same_samples(remote, local)

    def batches(source: CellMapDataset) -> list[dict]:
        loader = CellMapDataLoader(source, batch_size=4, num_workers=2, iterations_per_epoch=3, seed=11)
        return list(loader)

    for r, l in zip(batches(remote), batches(local), strict=True):
        assert torch.equal(r["raw"], l["raw"])
        assert torch.equal(r["gt"].nan_to_num(-1), l["gt"].nan_to_num(-1))


RAW = (np.arange(32 ** 3) % 251 + 1).astype(np.float32).reshape(32, 32, 32)


def shard_requests(server: DirectoryServer, key: str) -> tuple[list[str], list[str], list[str]]:
    """The index reads (suffix ranges), byte-range reads and whole reads of one shard."""
    ranges = [(headers.get("range") or "") for _, path, headers in server.requests if path.endswith(key)]
    return ([r for r in ranges if r.startswith("bytes=-")], [r for r in ranges if r.startswith("bytes=") and "=-" not in r],
            [r for r in ranges if not r])


@pytest.mark.parametrize("range_gap, range_requests", [(None, 1), (0, 8)], ids=["coalesced", "one-per-inner-chunk"])
def test_a_read_asks_for_the_inner_chunks_of_a_shard_together(sharded_crop, http_server_factory, range_gap, range_requests):
    if range_gap is not None:
        configure_remote(range_gap=range_gap)
    server = http_server_factory(sharded_crop.parent)
    image = CellMapImage(served(server, sharded_crop / "raw"), "raw", VOXEL, (16, 16, 16))
    server.reset_log()
    # Voxels [0, 16) x [0, 16) x [16, 32): 8 inner chunks of the one 256³ shard.
    np.testing.assert_array_equal(image[{"z": 32.0, "y": 32.0, "x": 96.0}].numpy(), RAW[:16, :16, 16:])
    index, ranged, whole = shard_requests(server, "/raw/s0/c/0/0/0")
    # One read of the shard's index, then its 8 inner chunks: one coalesced range, or 8 ranges.
    assert (len(index), len(ranged), len(whole)) == (1, range_requests, 0), server.requests
    server.reset_log()
    np.testing.assert_array_equal(image[{"z": 32.0, "y": 32.0, "x": 96.0}].numpy(), RAW[:16, :16, 16:])
    assert server.count(method="GET") == 0, "read again from the decoded cache"


def test_a_small_remote_shard_is_read_whole_in_one_request(small_shard_crop, http_server_factory):
    server = http_server_factory(small_shard_crop.parent)
    image = CellMapImage(served(server, small_shard_crop / "raw"), "raw", VOXEL, (16, 16, 16))
    server.reset_log()
    np.testing.assert_array_equal(image[{"z": 32.0, "y": 32.0, "x": 96.0}].numpy(), RAW[:16, :16, 16:])
    assert shard_requests(server, "/raw/s0/c/0/0/1") == ([], [], [""])
    assert server.count(method="GET", pattern=r"/raw/s0/c/") == 1, server.requests


def test_image_and_group_checks_from_urls(crop, http_server_factory):
    server = http_server_factory(crop.parent)
    image = CellMapImage(served(server, crop / "raw"), "raw", VOXEL, (8, 8, 8))
    local = CellMapImage(str(crop / "raw"), "raw", VOXEL, (8, 8, 8))
    centre = {"z": 40.0, "y": 60.0, "x": 70.0}
    assert torch.equal(image[centre], local[centre])
    urls = [served(server, crop / "crop" / c) for c in ("mito", "er", "nuc", "ves", "nope")]
    server.reset_log()
    assert groups_exist(urls) == [True, True, False, False, False]
    assert server.max_in_flight >= 2, "asked together"
    assert server.count(pattern="/$") == 0
    # The first node is asked for each format's documents, the others for the one found there
    # (a node without it for all of them again).
    assert server.count(pattern="/crop/er/") == 1
    assert server.count(pattern="/crop/nope/") == 1 + 4


def test_s3_reads_anonymous_and_signed(crop, s3_server, monkeypatch, tmp_path):
    s3_server.create_bucket("cellmap-public")
    s3_server.make_public("cellmap-public")
    s3_server.upload_directory(crop.parent, "cellmap-public", "datasets")
    s3_server.create_bucket("cellmap-private")
    s3_server.upload_directory(crop.parent, "cellmap-private", "datasets")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(crop.parent / "no-such-credentials"))
    configure_remote(endpoint_url=s3_server.endpoint, anonymous="auto")
    local = dataset(str(crop / "raw"), str(crop / "crop"), spatial_transforms=ROTATE)
    public = dataset("s3://cellmap-public/datasets/data.zarr/raw", "s3://cellmap-public/datasets/data.zarr/crop",
                     spatial_transforms=ROTATE)
    assert_same_samples(public, local)
    # Without credentials a private bucket is refused at once, naming the URL and the status.
    with pytest.raises(PermissionDeniedError, match=r"s3://cellmap-private/datasets/data\.zarr/.*403"):
        dataset("s3://cellmap-private/datasets/data.zarr/raw", "s3://cellmap-private/datasets/data.zarr/crop")
    # With keys in the shared credentials file (a profile), requests are signed.
    credentials = tmp_path / "credentials"
    credentials.write_text("[cellmap]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "cellmap")
    configure_remote(endpoint_url=s3_server.endpoint, anonymous="auto")
    from_profile = dataset("s3://cellmap-private/datasets/data.zarr/raw", "s3://cellmap-private/datasets/data.zarr/crop")
    assert_same_samples(from_profile, dataset(str(crop / "raw"), str(crop / "crop")), indices=[0, 9])
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-credentials"))
    # With credentials from the environment, requests are signed.
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    configure_remote(endpoint_url="", anonymous="auto")  # AWS_ENDPOINT_URL from the environment
    private = dataset("s3://cellmap-private/datasets/data.zarr/raw", "s3://cellmap-private/datasets/data.zarr/crop",
                      spatial_transforms=ROTATE)
    assert_same_samples(private, local)
    with pytest.raises(NotFoundError, match=r"s3://cellmap-private/datasets/nothing.zarr/raw"):
        dataset("s3://cellmap-private/datasets/nothing.zarr/raw", "s3://cellmap-private/datasets/data.zarr/crop")


def test_missing_group_and_class_are_immediate_errors(crop, http_server_factory):
    server = http_server_factory(crop.parent)
    with pytest.raises(NotFoundError, match=r"http://127\.0\.0\.1:\d+/data\.zarr/nope"):
        dataset(server.url + "/data.zarr/nope", served(server, crop / "crop"))
    with pytest.raises(NotFoundError, match=r"crop/vesicle.*class 'vesicle'"):
        CellMapDataset(served(server, crop / "raw"), served(server, crop / "crop") + "/[mito,vesicle]", ["mito"], **ARRAYS)


def test_server_errors_are_retried_then_read(crop, http_server_factory):
    server = http_server_factory(crop.parent)
    configure_remote(retries=3, timeout=5)
    remote = dataset(served(server, crop / "raw"), served(server, crop / "crop"))
    local = dataset(str(crop / "raw"), str(crop / "crop"))
    server.add_fault(r"/raw/s0/0\.0\.0$", "status", times=2, status=503)
    server.add_fault(r"/crop/mito/s0/0\.0\.0$", "reset", times=1)
    server.reset_log()
    assert_same_samples(remote, local, indices=[0])
    assert server.count(pattern=r"/raw/s0/0\.0\.0$") == 3, "two 503 answers, then the chunk"
    assert server.count(pattern=r"/crop/mito/s0/0\.0\.0$") == 2, "a reset connection, then the chunk"


def test_bodies_cut_short_are_requested_again_and_never_decoded(crop, http_server_factory):
    # The answer announces the whole chunk, sends half of it and closes the connection: the
    # chunk is requested again (with the retry budget of resets and 5xx), never decoded short.
    server = http_server_factory(crop.parent)
    configure_remote(retries=3, timeout=5)
    remote = dataset(served(server, crop / "raw"), served(server, crop / "crop"), spatial_transforms=ROTATE)
    local = dataset(str(crop / "raw"), str(crop / "crop"), spatial_transforms=ROTATE)
    server.add_fault(r"/raw/s0/0\.0\.0$", "truncate", times=2)
    server.add_fault(r"/crop/er/s0/0\.0\.0$", "truncate", times=1)
    server.reset_log()
    assert_same_samples(remote, local, indices=[0, 7])
    assert server.count(pattern=r"/raw/s0/0\.0\.0$") == 3, "two bodies cut short, then the chunk"
    assert server.count(pattern=r"/crop/er/s0/0\.0\.0$") == 2


@pytest.mark.parametrize("source", ["crop", "sharded_crop"], ids=["chunks", "byte-ranges-of-shards"])
def test_batches_through_a_server_misbehaving_at_random_equal_local_batches(crop, source, http_server_factory, request):
    # An object store over a long run: 503 answers, connections reset before the answer, slow
    # answers and bodies cut short, at random on a fifth of the requests. Every batch still
    # equals the local one (nothing is decoded short, nothing is lost), whole chunks or byte
    # ranges of shards alike.
    served_root = request.getfixturevalue(source)
    server = http_server_factory(served_root.parent)
    configure_remote(retries=8, timeout=5)

    def batches(raw: str, labels: str) -> list[dict]:
        loader = CellMapDataLoader(dataset(raw, labels, spatial_transforms=ROTATE), batch_size=4, num_workers=2,
                                   iterations_per_epoch=4, seed=5)
        return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]

    local = batches(str(crop / "raw"), str(crop / "crop"))
    server.add_random_faults(0.2, seed=3)
    remote = batches(served(server, served_root / "raw"), served(server, served_root / "crop"))
    assert server.random_faults_served >= 5, "the run met faults"
    assert len(remote) == len(local) == 4
    for r, l in zip(remote, local):
        assert r.keys() == l.keys()
        for key in l:
            assert torch.equal(r[key].nan_to_num(-1), l[key].nan_to_num(-1)), key


@pytest.mark.parametrize("fault", ["status", "reset", "stall", "truncate"])
def test_persistent_faults_end_in_an_error_naming_the_url(crop, http_server_factory, fault):
    server = http_server_factory(crop.parent)
    configure_remote(retries=2, timeout=0.5)
    remote = dataset(served(server, crop / "raw"), served(server, crop / "crop"))
    server.add_fault(r"/raw/s0/\d+\.\d+\.\d+$", fault, status=500, seconds=5.0)
    started = time.perf_counter()
    with pytest.raises(StorageError, match=r"http://127\.0\.0\.1:\d+/data\.zarr/raw/s0/\d+\.\d+\.\d+") as caught:
        remote[0]
    elapsed = time.perf_counter() - started
    assert isinstance(caught.value, OSError)
    if fault == "status":
        assert "500" in str(caught.value)
    # Bounded: (retries + 1) tries of at most the timeout each, plus backoff.
    assert elapsed < 6, elapsed


def test_forbidden_is_not_retried(crop, http_server_factory):
    server = http_server_factory(crop.parent)
    configure_remote(retries=3)
    remote = dataset(served(server, crop / "raw"), served(server, crop / "crop"))
    server.add_fault(r"/raw/s0/\d+\.\d+\.\d+$", "status", status=403)
    server.reset_log()
    with pytest.raises(PermissionDeniedError, match=r"/data\.zarr/raw/s0/.*403"):
        remote[0]
    assert server.count(pattern=r"/raw/s0/0\.0\.0$") == 1


def test_read_error_policy_applies_to_remote_reads(crop, http_server_factory):
    server = http_server_factory(crop.parent)
    configure_remote(retries=0, timeout=2)
    remote = dataset(served(server, crop / "raw"), served(server, crop / "crop"))
    server.add_fault(r"/raw/s0/0\.\d+\.\d+$", "status", status=500)
    loader = CellMapDataLoader(remote, batch_size=4, num_workers=2, iterations_per_epoch=6, seed=7, on_read_error="skip",
                               return_metadata=True)
    with pytest.warns(Warning, match=r"raw/s0/0\.\d+\.\d+.*500"):
        batches = list(loader)
    assert len(batches) == 6 and all(torch.isfinite(b["raw"]).all() and (b["raw"] != 0).all() for b in batches)
    assert loader.stats()["skipped"] > 0


def test_disk_cache_serves_chunks_without_the_server(crop, http_server_factory, tmp_path):
    server = http_server_factory(crop.parent)
    configure_remote(disk_cache=tmp_path / "cache", disk_cache_bytes=1 << 30, retries=0, timeout=1)
    first = dataset(served(server, crop / "raw"), served(server, crop / "crop"))
    local = dataset(str(crop / "raw"), str(crop / "crop"))
    assert_same_samples(first, local)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.name == "0.0.0" for p in cached), cached
    # Chunks come from the disk now (the decoded cache is emptied; the server refuses chunks).
    _engine.clear_cache()
    server.add_fault(r"/s0/\d+\.\d+\.\d+$", "status", status=500)
    server.reset_log()
    assert_same_samples(first, local)
    assert server.count(pattern=r"/s0/\d+\.\d+\.\d+$") == 0


def test_disk_cache_serves_shard_indexes_and_inner_chunks_without_the_server(sharded_crop, crop, http_server_factory, tmp_path):
    server = http_server_factory(sharded_crop.parent)
    configure_remote(disk_cache=tmp_path / "cache", disk_cache_bytes=1 << 30, retries=0, timeout=1)
    local = dataset(str(crop / "raw"), str(crop / "crop"))
    assert_same_samples(dataset(served(server, sharded_crop / "raw"), served(server, sharded_crop / "crop")), local)
    # A new dataset (its shard indexes not yet read) in an emptied decoded cache, with every
    # shard refused by the server: indexes and inner chunks come from the disk.
    _engine.clear_cache()
    server.add_fault(r"/c/\d+/\d+/\d+$", "status", status=500)
    server.reset_log()
    assert_same_samples(dataset(served(server, sharded_crop / "raw"), served(server, sharded_crop / "crop")), local)
    assert server.count(pattern=r"/c/\d+/\d+/\d+$") == 0


@pytest.mark.parametrize("variable, value", [("CELLMAP_REMOTE_TIMEOUT", "soon"), ("CELLMAP_REMOTE_IN_FLIGHT", "0"),
                                             ("CELLMAP_REMOTE_ANONYMOUS", "perhaps")])
def test_a_bad_environment_value_is_an_error_naming_its_variable(variable, value):
    # Read in a fresh process: the environment is read once, when the options are first needed.
    code = ("from cellmap_data.exceptions import ConfigError\nfrom cellmap_data.remote import remote_options\n"
            "try:\n    remote_options()\nexcept ConfigError as e:\n    print('refused:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, variable: value}, capture_output=True,
                            text=True, check=True)
    assert result.stdout.startswith("refused:") and variable in result.stdout, result.stdout + result.stderr


def test_bad_urls_and_options_are_refused():
    from cellmap_data.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"'\.\.'"):
        CellMapImage("s3://bucket/a/../b", "raw", VOXEL, (8, 8, 8))
    with pytest.raises(ConfigError, match="max_in_flight"):
        configure_remote(max_in_flight=0)
    with pytest.raises(ConfigError, match="timeout"):
        configure_remote(timeout=-1)
    options = configure_remote(max_in_flight=7, disk_cache="")
    assert options["max_in_flight"] == 7 and options["disk_cache"] is None
    assert os.environ.get("CELLMAP_REMOTE_IN_FLIGHT") is None


@pytest.mark.parametrize("overlap", [0, 2], ids=["plain", "blended"])
def test_predictions_written_to_s3_equal_a_local_write(crop, s3_server, monkeypatch, tmp_path, overlap):
    import zarr

    from cellmap_data import CellMapDatasetWriter

    bucket = f"predictions-{overlap}"
    s3_server.create_bucket(bucket)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    configure_remote(endpoint_url="", anonymous="auto")

    def write(target: str, **options) -> None:
        writer = CellMapDatasetWriter(str(crop / "raw"), target, ["mito", "er"],
                                      {"input": {"shape": (8, 8, 8), "scale": VOXEL}},
                                      {"output": {"shape": (8, 8, 8), "scale": VOXEL}}, overlap=overlap, downsample_levels=1,
                                      **options)
        with writer:
            for batch in writer.loader(batch_size=4):
                x = batch["input"]
                writer[batch["idx"]] = {"output": torch.cat([torch.sigmoid(x / 100.0), torch.cos(x / 30.0)], dim=1)}

    write(f"s3://{bucket}/out.zarr/pred")
    write(str(tmp_path / "local.zarr" / "pred"))
    keys = s3_server.keys(bucket)
    assert "out.zarr/pred/mito/.zattrs" in keys and any(k.startswith("out.zarr/pred/er/s1/") for k in keys)
    s3_server.download_prefix(bucket, "out.zarr", tmp_path / "downloaded.zarr")
    for cls in ("mito", "er"):
        got = zarr.open_group(str(tmp_path / "downloaded.zarr" / "pred" / cls), mode="r")
        want = zarr.open_group(str(tmp_path / "local.zarr" / "pred" / cls), mode="r")
        assert got.attrs.asdict() == want.attrs.asdict()
        for level in ("s0", "s1"):
            np.testing.assert_array_equal(got[level][...], want[level][...])
        # And read back through the engine from the bucket itself.
        image = CellMapImage(f"s3://{bucket}/out.zarr/pred/{cls}", cls, VOXEL, (8, 8, 8))
        centre = {"z": 50.0, "y": 30.0, "x": 70.0}
        local = CellMapImage(str(tmp_path / "local.zarr" / "pred" / cls), cls, VOXEL, (8, 8, 8))
        assert torch.equal(image[centre], local[centre])
    # An existing remote output is refused unless overwrite or exist_ok says otherwise.
    from cellmap_data.exceptions import OutputExistsError

    with pytest.raises(OutputExistsError, match=f"s3://{bucket}/out.zarr/pred/mito"):
        write(f"s3://{bucket}/out.zarr/pred")
    # overwrite=True clears the old image first (one listing, deletes in bulk): a stale object
    # under it is gone and the new image equals the local one.
    s3_server.client().put_object(Bucket=bucket, Key="out.zarr/pred/mito/s0/stale", Body=b"old")
    write(f"s3://{bucket}/out.zarr/pred", overwrite=True)
    keys = s3_server.keys(bucket)
    assert "out.zarr/pred/mito/s0/stale" not in keys and "out.zarr/pred/mito/.zattrs" in keys
    image = CellMapImage(f"s3://{bucket}/out.zarr/pred/mito", "mito", VOXEL, (8, 8, 8))
    local = CellMapImage(str(tmp_path / "local.zarr" / "pred" / "mito"), "mito", VOXEL, (8, 8, 8))
    assert torch.equal(image[{"z": 50.0, "y": 30.0, "x": 70.0}], local[{"z": 50.0, "y": 30.0, "x": 70.0}])


def test_datasplit_csv_rows_may_be_urls(tiny_data, http_server_factory, tmp_path):
    from cellmap_data import CellMapDataSplit

    server = http_server_factory(tiny_data.root)
    local_csv = Path(tiny_data.csv_path).read_text()
    remote_csv = tmp_path / "remote.csv"
    remote_csv.write_text(local_csv.replace(str(tiny_data.root), server.url))
    arrays = dict(input_arrays={"in": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
                  target_arrays={"out": {"shape": (8, 8, 8), "scale": (8, 8, 8)}})
    local = CellMapDataSplit(classes=list(tiny_data.classes), pad=True, csv_path=str(tiny_data.csv_path), **arrays)
    remote = CellMapDataSplit(classes=list(tiny_data.classes), pad=True, csv_path=str(remote_csv), **arrays)
    assert [d.raw_path.startswith("http://") for d in remote.train_datasets] == [True] * len(local.train_datasets)
    for r, l in zip(remote.validation_datasets, local.validation_datasets):
        x, y = r[0], l[0]
        assert torch.equal(x["in"], y["in"]) and torch.equal(x["out"].nan_to_num(-1), y["out"].nan_to_num(-1))
    assert remote.class_counts == local.class_counts


def test_inspect_and_stats_on_the_command_line_read_urls(tiny_data, http_server_factory, capsys):
    from cellmap_data.cli import main

    server = http_server_factory(tiny_data.root)
    dataset0 = tiny_data.datasets[0]
    crop0 = dataset0.crops[0]
    raw_url = f"{server.url}/{Path(dataset0.raw_path).relative_to(tiny_data.root).as_posix()}"
    head, _, classes = crop0.target_path.partition("[")
    template_url = f"{server.url}/{Path(head).relative_to(tiny_data.root).as_posix()}/[{classes}"

    assert main(["inspect", raw_url]) == 0
    out = capsys.readouterr().out
    assert raw_url in out and "s0" in out and "zstd" in out
    assert main(["stats", template_url]) == 0
    remote_table = capsys.readouterr().out
    assert main(["stats", crop0.target_path]) == 0
    local_table = capsys.readouterr().out
    # The same table; only the source named in it differs.
    assert remote_table.replace(server.url, str(tiny_data.root)) == local_table
    # A crop group URL without its classes would need a listing: refused with what to pass.
    assert main(["stats", template_url.partition("[")[0]]) != 0
    assert "[class,...]" in capsys.readouterr().err
