"""Loopback servers for remote-store tests: a plain HTTP directory server and a moto S3 endpoint.

Not a test module.  Tests import it by name (``tests/`` is on ``sys.path`` under pytest's default
"prepend" import mode, as for ``conftest``)::

    from remote_servers import DirectoryServer, MotoS3Server
    from remote_servers import http_server_factory, s3_server  # noqa: F401  (fixtures)

``DirectoryServer`` (from ``cellmap_data.tools.loopback``, which the bench's remote mode uses too)
serves a local folder over HTTP/1.1 (GET with single byte ranges, HEAD) from a
``ThreadingHTTPServer`` on 127.0.0.1, with settable latency, fault injection (error status,
connection reset, stall) and a thread-safe request log including the peak number of requests in
flight.

``MotoS3Server`` runs moto's S3 implementation as a real HTTP endpoint (``ThreadedMotoServer``) on
127.0.0.1 and is only ever used through that HTTP API (boto3 or plain HTTP), never through moto's
in-process ``mock_aws``.  Notes on its behaviour (moto 5.x):

* Anonymous (unsigned) requests reach the S3 backend, but moto enforces access control on them:
  an unsigned ``GET {endpoint}/{bucket}/{key}`` answers 403 until the bucket is public.  A
  ``public-read`` *bucket ACL* only opens listing, not object reads (as on AWS);
  ``make_public(bucket)`` therefore sets a bucket policy granting everyone ``s3:GetObject``,
  ``s3:ListBucket`` and ``s3:HeadObject`` (moto checks unsigned HEAD against that made-up action,
  where AWS uses ``s3:GetObject``), after which unsigned GET (ranges included), HEAD and
  ``?list-type=2`` listings work, also for objects uploaded later.
* Signed requests are not verified (moto's default): the fixed ``testing`` credentials do.
* moto's backend state is global to the process: every ``MotoS3Server`` in one process sees the
  same buckets.  Give buckets unique names per test.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator

import pytest

from cellmap_data.tools.loopback import DirectoryServer, FaultAction, RequestRecord

__all__ = ["DirectoryServer", "FaultAction", "RequestRecord", "MotoS3Server", "http_server_factory", "s3_server"]


# ----------------------------------------------------------------------------- S3 (moto)


class MotoS3Server:
    """moto's S3 as a real HTTP endpoint on 127.0.0.1 (an OS-chosen port); see the module notes.

    Sets nothing in ``os.environ``: pass credentials explicitly, or apply ``env()`` with
    ``monkeypatch``."""

    region = "us-east-1"
    access_key_id = "testing"
    secret_access_key = "testing"

    def __init__(self) -> None:
        self._moto: Any = None
        self._client: Any = None
        self.endpoint = ""

    def start(self) -> MotoS3Server:
        if self._moto is None:
            from moto.server import ThreadedMotoServer  # imported late: slow, and S3-only

            # werkzeug logs every request at INFO to a stderr handler it adds itself.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            # Port 0: the OS picks a free port when the server binds, so no other process can
            # take it between choosing and binding.
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._moto.start()
            host, port = self._moto.get_host_and_port()
            self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._moto is not None:
            self._moto.stop()
            # ThreadedMotoServer.stop() leaves the listening socket open; close it.
            server = getattr(self._moto, "_server", None)
            if server is not None:
                server.server_close()
            self._moto = None
            self._client = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment variables pointing an S3 client (object_store, boto3) at this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self) -> Any:
        """A new boto3 S3 client bound to this endpoint, with explicit credentials."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            # Path style: virtual hosts (bucket.127.0.0.1) do not resolve.
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def _s3(self) -> Any:
        if self._client is None:
            self._client = self.client()
        return self._client

    def create_bucket(self, name: str) -> None:
        self._s3().create_bucket(Bucket=name)

    def make_public(self, bucket: str) -> None:
        """Lets unsigned requests read objects and list the bucket (a bucket policy; see notes)."""
        import json

        policy = {
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": "*",
                # moto checks unsigned HEAD against "s3:HeadObject" (AWS uses s3:GetObject).
                "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            }],
        }
        self._s3().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def upload_directory(self, local_dir: str | os.PathLike[str], bucket: str, prefix: str = "") -> list[str]:
        """Uploads every file under ``local_dir`` to ``prefix/<relative path>``; returns the keys."""
        local = Path(local_dir)
        base = prefix.strip("/")
        keys = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            key = f"{base}/{rel}" if base else rel
            self._s3().upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def download_prefix(self, bucket: str, prefix: str, local_dir: str | os.PathLike[str]) -> list[Path]:
        """Downloads every object under the folder ``prefix`` into ``local_dir``; returns the files."""
        base = prefix.strip("/")
        folder = f"{base}/" if base else ""
        local = Path(local_dir)
        files = []
        for key in self.keys(bucket, folder):
            target = local / key[len(folder):]
            target.parent.mkdir(parents=True, exist_ok=True)
            self._s3().download_file(bucket, key, str(target))
            files.append(target)
        return files

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` starting with ``prefix`` (a plain S3 prefix), sorted."""
        paginator = self._s3().get_paginator("list_objects_v2")
        return sorted(
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def http_server_factory() -> Iterator[Callable[..., DirectoryServer]]:
    """``start(root, latency=0.0) -> DirectoryServer``, started; all are stopped at teardown."""
    servers: list[DirectoryServer] = []

    def start(root: str | os.PathLike[str], latency: float = 0.0) -> DirectoryServer:
        server = DirectoryServer(root, latency=latency).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    """One moto S3 endpoint per importing test module, kept for the session (state is shared)."""
    with MotoS3Server() as server:
        yield server
