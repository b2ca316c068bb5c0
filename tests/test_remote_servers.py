"""The loopback test servers of remote_servers.py, checked with urllib, http.client and boto3 only."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from email.message import Message
from pathlib import Path
from typing import Callable

import pytest

from remote_servers import DirectoryServer, MotoS3Server, http_server_factory, s3_server  # noqa: F401

DATA = bytes(range(256)) * 4  # 1024 bytes


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A served root with a file, a nested file and a directory, beside a file outside it."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "data.bin").write_bytes(DATA)
    (root / "sub" / "a.txt").write_bytes(b"nested")
    (root / "with space.txt").write_bytes(b"spaced")
    (tmp_path / "secret.txt").write_bytes(b"outside the root")
    return root


@pytest.fixture
def server(site: Path, http_server_factory: Callable[..., DirectoryServer]) -> DirectoryServer:  # noqa: F811
    return http_server_factory(site)


def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes, Message]:
    """(status, body, headers); HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), error.headers


def raw_status(server: DirectoryServer, path: str) -> int:
    """Status for a request target sent verbatim (urllib would not send `..` segments as is)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# ----------------------------------------------------------------------------- HTTP server


def test_get_whole_file_over_keep_alive(server: DirectoryServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(2):  # the same connection serves both: HTTP/1.1 keep-alive
            conn.request("GET", "/data.bin")
            response = conn.getresponse()
            assert response.status == 200 and response.version == 11
            assert response.getheader("Content-Length") == str(len(DATA))
            assert response.read() == DATA and not response.will_close
    finally:
        conn.close()
    assert fetch(f"{server.url}/sub/a.txt")[:2] == (200, b"nested")
    assert fetch(f"{server.url}/with%20space.txt")[:2] == (200, b"spaced")  # URL-decoded


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=10-19", 10, 20),
    ("bytes=1000-", 1000, 1024),
    ("bytes=-24", 1000, 1024),
    ("bytes=1000-5000", 1000, 1024),  # clipped to the file
    ("bytes=-5000", 0, 1024),
])
def test_range(server: DirectoryServer, header: str, start: int, end: int) -> None:
    status, body, headers = fetch(f"{server.url}/data.bin", headers={"Range": header})
    assert status == 206 and body == DATA[start:end]
    assert headers["Content-Range"] == f"bytes {start}-{end - 1}/1024"
    assert headers["Content-Length"] == str(end - start)


@pytest.mark.parametrize("header", ["bytes=1024-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range(server: DirectoryServer, header: str) -> None:
    status, _, headers = fetch(f"{server.url}/data.bin", headers={"Range": header})
    assert status == 416 and headers["Content-Range"] == "bytes */1024"


def test_head(server: DirectoryServer) -> None:
    status, body, headers = fetch(f"{server.url}/data.bin", method="HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == "1024" and headers["ETag"] and headers["Last-Modified"]


@pytest.mark.parametrize("path", ["/missing.bin", "/sub", "/sub/", "/", "/sub/missing/deeper"])
def test_missing_files_and_directories_are_404(server: DirectoryServer, path: str) -> None:
    assert fetch(server.url + path)[0] == 404
    assert fetch(server.url + path, method="HEAD")[0] == 404


@pytest.mark.parametrize("path", ["/../secret.txt", "/%2e%2e/secret.txt", "/sub/..%2f..%2fsecret.txt"])
def test_paths_cannot_escape_the_root(server: DirectoryServer, path: str) -> None:
    assert raw_status(server, path) == 403


def test_latency(server: DirectoryServer) -> None:
    server.latency = 0.2
    start = time.monotonic()
    assert fetch(f"{server.url}/data.bin")[0] == 200
    assert time.monotonic() - start >= 0.2


def test_status_fault_then_normal(server: DirectoryServer) -> None:
    server.add_fault(r"data\.bin", "status", times=2, status=503)
    assert fetch(f"{server.url}/sub/a.txt")[0] == 200  # not matching: unaffected
    assert [fetch(f"{server.url}/data.bin")[0] for _ in range(3)] == [503, 503, 200]
    server.add_fault("a.txt", "status", status=500)  # times=None: every request
    assert [fetch(f"{server.url}/sub/a.txt")[0] for _ in range(3)] == [500, 500, 500]
    server.clear_faults()
    assert fetch(f"{server.url}/sub/a.txt")[0] == 200


def test_reset_fault(server: DirectoryServer) -> None:
    server.add_fault("data", "reset", times=2)
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        fetch(f"{server.url}/data.bin")
    # A real RST, not an orderly close: the peer's recv fails instead of reading EOF.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /data.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)
    assert fetch(f"{server.url}/data.bin")[:2] == (200, DATA)


def test_stall_fault(server: DirectoryServer) -> None:
    server.add_fault("data", "stall", times=1, seconds=0.3)
    start = time.monotonic()
    assert fetch(f"{server.url}/data.bin")[:2] == (200, DATA)
    assert time.monotonic() - start >= 0.3
    server.add_fault("data", "stall", times=1, seconds=30)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        fetch(f"{server.url}/data.bin", timeout=0.2)  # a client timeout fires first


def test_truncate_fault_announces_the_whole_body_and_sends_half(server: DirectoryServer) -> None:
    server.add_fault("data", "truncate", times=1)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/data.bin")
    answer = connection.getresponse()
    assert answer.status == 200 and int(answer.getheader("Content-Length")) == len(DATA)
    with pytest.raises(http.client.IncompleteRead) as caught:
        answer.read()
    assert caught.value.partial == DATA[: len(DATA) // 2]
    connection.close()
    assert fetch(f"{server.url}/data.bin")[:2] == (200, DATA)


def test_unknown_fault_action_is_refused(server: DirectoryServer) -> None:
    with pytest.raises(ValueError):
        server.add_fault("x", "explode")  # type: ignore[arg-type]


def test_request_log(server: DirectoryServer) -> None:
    fetch(f"{server.url}/data.bin", headers={"X-Test": "yes", "Range": "bytes=0-1"})
    fetch(f"{server.url}/sub/a.txt", method="HEAD")
    fetch(f"{server.url}/missing")
    (method, path, headers), *rest = server.requests
    assert (method, path) == ("GET", "/data.bin")
    assert headers["x-test"] == "yes" and headers["range"] == "bytes=0-1"
    assert [(m, p) for m, p, _ in rest] == [("HEAD", "/sub/a.txt"), ("GET", "/missing")]
    assert server.count() == 3 and server.count("GET") == 2 and server.count("head") == 1
    assert server.count(pattern=r"\.(bin|txt)$") == 2 and server.count("GET", "^/sub") == 0
    # Sequential requests; a handler may still be finishing the previous answer's bookkeeping
    # when the next request arrives.
    assert 1 <= server.max_in_flight <= 2
    server.reset_log()
    assert server.requests == [] and server.count() == 0 and server.max_in_flight == 0


def test_max_in_flight_under_concurrency(server: DirectoryServer) -> None:
    server.latency = 0.2
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(fetch(f"{server.url}/data.bin")[0]))
        for _ in range(8)
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 8 and server.count("GET") == 8
    assert server.max_in_flight >= 4
    assert time.monotonic() - start < 8 * 0.2  # served concurrently, not one after another


def test_stop_is_prompt_despite_stalls_and_idle_connections(site: Path) -> None:
    server = DirectoryServer(site).start()
    server.add_fault("data", "stall", seconds=30)
    errors: list[BaseException] = []

    def slow_client() -> None:
        try:
            fetch(f"{server.url}/data.bin", timeout=10)
        except (ConnectionError, urllib.error.URLError) as error:
            errors.append(error)

    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    idle.connect()  # an open keep-alive connection, no request on it
    sleeping = threading.Thread(target=slow_client)
    sleeping.start()
    while server.count() == 0:
        time.sleep(0.01)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 1.5
    sleeping.join(2)
    assert not sleeping.is_alive() and len(errors) == 1  # dropped without an answer
    idle.close()


def test_context_manager(site: Path) -> None:
    with DirectoryServer(site) as server:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.root == site.resolve()
        assert fetch(f"{server.url}/data.bin")[0] == 200
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        fetch(f"{server.url}/data.bin", timeout=1)


# ----------------------------------------------------------------------------- moto S3


def unique_bucket() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def test_s3_upload_list_download(s3_server: MotoS3Server, tmp_path: Path) -> None:  # noqa: F811
    source = tmp_path / "src"
    (source / "img.zarr" / "s0" / "c" / "0").mkdir(parents=True)
    files = {
        "img.zarr/zarr.json": b"{}",
        "img.zarr/s0/zarr.json": b'{"shape": [1]}',
        "img.zarr/s0/c/0/0": b"\x00\x01\x02",
    }
    for rel, content in files.items():
        (source / rel).write_bytes(content)
    bucket = unique_bucket()
    s3_server.create_bucket(bucket)
    uploaded = s3_server.upload_directory(source, bucket, "data/")
    expected = sorted(f"data/{rel}" for rel in files)
    assert sorted(uploaded) == expected and s3_server.keys(bucket) == expected
    assert s3_server.keys(bucket, "data/img.zarr/s0/") == expected[:2]

    target = tmp_path / "dst"
    downloaded = s3_server.download_prefix(bucket, "data/img.zarr", target)
    assert sorted(downloaded) == sorted(target / rel.removeprefix("img.zarr/") for rel in files)
    for rel, content in files.items():
        assert (target / rel.removeprefix("img.zarr/")).read_bytes() == content


def test_s3_anonymous_get_needs_make_public(s3_server: MotoS3Server) -> None:  # noqa: F811
    bucket = unique_bucket()
    s3_server.create_bucket(bucket)
    s3_server.client().put_object(Bucket=bucket, Key="a/b.bin", Body=DATA)
    url = f"{s3_server.endpoint}/{bucket}/a/b.bin"
    assert fetch(url)[0] == 403  # unsigned and private
    s3_server.make_public(bucket)
    assert fetch(url)[:2] == (200, DATA)
    status, body, headers = fetch(url, headers={"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, DATA[10:20], "bytes 10-19/1024")
    assert fetch(url, method="HEAD")[0] == 200
    assert fetch(f"{s3_server.endpoint}/{bucket}/a/missing")[0] == 404
    status, body, _ = fetch(f"{s3_server.endpoint}/{bucket}?list-type=2&prefix=a/")
    assert status == 200 and b"<Key>a/b.bin</Key>" in body


def test_s3_env(s3_server: MotoS3Server) -> None:  # noqa: F811
    env = s3_server.env()
    assert env == {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
