"""A loopback HTTP server over a local folder, with latency and faults on demand: the remote
mode of the bench reads through it, and the remote-store tests use it to inject faults.

It serves files over HTTP/1.1 (GET with a single byte range, HEAD; never a directory listing)
from a ``ThreadingHTTPServer`` on 127.0.0.1, sleeps ``latency`` seconds before each answer, can
answer chosen requests with an error status, a connection reset, a stall or a body cut short,
and keeps a thread-safe log of the requests, the bytes sent and the peak number of requests in
flight.
"""

from __future__ import annotations

import email.utils
import os
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = ["DirectoryServer", "FaultAction", "RequestRecord"]

FaultAction = Literal["status", "reset", "stall", "truncate"]
RequestRecord = tuple[str, str, dict[str, str]]

# How long stop() waits for handler threads to wind down (sleeps are interrupted at once).
_STOP_GRACE_S = 1.0


# ----------------------------------------------------------------------------- HTTP server


@dataclass
class _Fault:
    pattern: re.Pattern[str]
    action: FaultAction
    remaining: int | None  # None: every matching request
    status: int
    seconds: float


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its DirectoryServer and tracks open connections."""

    daemon_threads = True  # handler threads never keep the interpreter alive
    owner: DirectoryServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that give up (timeouts, resets) and our own shutdown raise connection errors in
        # handler threads; they are expected here, so keep test output quiet.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real object stores do
    server: _Server

    # -- connection bookkeeping, so stop() can unblock threads idling on keep-alive sockets

    def setup(self) -> None:
        super().setup()
        self.server.owner._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._connection_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log replaces stderr chatter

    # -- methods

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def _handle(self, method: str) -> None:
        owner = self.server.owner
        headers = {k.lower(): v for k, v in self.headers.items()}
        fault = owner._begin_request(method, self.path, headers)
        self._in_flight = True
        try:
            # Latency first, for every request, faulted ones included.
            if not owner._sleep(owner.latency):
                return self._drop()
            if fault is not None:
                if fault.action == "reset":
                    return self._reset()
                if fault.action == "stall":
                    if not owner._sleep(fault.seconds):
                        return self._drop()
                elif fault.action == "truncate":
                    return self._serve_file(method, truncate=True)
                else:
                    return self._send(fault.status, f"injected fault: {fault.status}\n".encode(), method)
            self._serve_file(method)
        finally:
            self._answered()

    def _answered(self) -> None:
        """Ends this request's count of requests in flight, before its answer goes out: a client
        that has its answer never sees the request still counted."""
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            self.server.owner._end_request()

    # -- responses

    def _serve_file(self, method: str, truncate: bool = False) -> None:
        root = self.server.owner.root
        url_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if "\x00" in url_path:
            return self._send(400, b"bad path\n", method)
        target = (root / url_path.lstrip("/")).resolve()
        if target != root and root not in target.parents:
            return self._send(403, b"forbidden\n", method)
        if not target.is_file():  # missing, or a directory: never list
            return self._send(404, b"not found\n", method)

        stat = target.stat()
        size = stat.st_size
        extra = {
            "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
            "ETag": f'"{stat.st_mtime_ns:x}-{size:x}"',
            "Accept-Ranges": "bytes",
        }
        status, start, end = 200, 0, size  # [start, end)
        byte_range = _parse_range(self.headers.get("Range"), size)
        if byte_range == "unsatisfiable":
            extra["Content-Range"] = f"bytes */{size}"
            return self._send(416, b"range not satisfiable\n", method, extra)
        if byte_range is not None:
            status, (start, end) = 206, byte_range
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body = b""
        if method != "HEAD":
            with open(target, "rb") as f:
                f.seek(start)
                body = f.read(end - start)
        self._send(status, body, method, extra, length=end - start, content_type="application/octet-stream",
                   truncate=truncate)

    def _send(
        self,
        status: int,
        body: bytes,
        method: str,
        extra: dict[str, str] | None = None,
        *,
        length: int | None = None,
        content_type: str = "text/plain",
        truncate: bool = False,
    ) -> None:
        self._answered()
        if status in (204, 304) or status < 200:
            body = b""  # these statuses carry no body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD" and body:
            if truncate:
                # The full Content-Length, half the bytes, then the connection closes.
                body = body[: len(body) // 2]
                self.close_connection = True
            self.server.owner._sent(len(body))  # counted first, like the request's end above
            self.wfile.write(body)
            if truncate:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

    def _reset(self) -> None:
        """Aborts the connection with a TCP RST and no response at all."""
        self._answered()
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The rfile/wfile wrappers hold references that would defer the real close (and a later
        # shutdown(SHUT_WR) would send a FIN first); close them all now so the RST goes out.
        self.rfile.close()
        self.wfile.close()
        self.connection.close()

    def _drop(self) -> None:
        """The server is stopping while this request slept: close without answering."""
        self._answered()
        self.close_connection = True


def _parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """A single ``bytes=`` range as [start, end), ``"unsatisfiable"``, or None to serve it all.

    Malformed or multi-range headers are ignored (RFC 9110 lets a server do so)."""
    if header is None:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    if last != "" and int(last) < start:
        return None  # invalid syntax: ignore
    if start >= size:
        return "unsatisfiable"
    end = size if last == "" else min(int(last) + 1, size)
    return start, end


class DirectoryServer:
    """Serves ``root`` read-only over HTTP/1.1 on 127.0.0.1 (an OS-chosen port).

    Use as a context manager (or ``start()``/``stop()``).  ``latency`` (seconds) may be changed at
    any time; faults are added with ``add_fault``.  Paths in the request log and the fault and
    ``count`` patterns are the request targets as the client sent them (percent-encoded, query
    string included)."""

    def __init__(self, root: str | os.PathLike[str], *, latency: float = 0.0) -> None:
        self.root = Path(root).resolve()
        self.latency = latency
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # wakes every sleeping handler on stop()
        self._faults: list[_Fault] = []
        self._random_faults: tuple[float, tuple[FaultAction, ...], re.Pattern[str], random.Random, int, float] | None = None
        self._random_faults_served = 0
        self._log: list[RequestRecord] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._bytes_sent = 0
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._thread: threading.Thread | None = None
        # Bound here so that `url` is known before start().
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle

    def start(self) -> DirectoryServer:
        if self._thread is None:
            # A short poll interval keeps shutdown() quick.
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"DirectoryServer:{self.port}", daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving within about a second, even with requests sleeping in latency or stalls."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()  # only valid while serve_forever runs
            self._thread.join()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            try:  # unblocks handlers waiting for the next keep-alive request
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        deadline = time.monotonic() + _STOP_GRACE_S
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> DirectoryServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults

    def add_fault(
        self,
        pattern: str,
        action: FaultAction,
        times: int | None = None,
        status: int = 503,
        seconds: float = 5.0,
    ) -> None:
        """Affects the next ``times`` requests (None: all) whose path matches ``pattern`` (re.search).

        ``"status"`` answers ``status`` with a short body; ``"reset"`` aborts the TCP connection
        with no response; ``"stall"`` waits ``seconds`` and then answers normally; ``"truncate"``
        answers with the full ``Content-Length`` but only half the body, then closes the
        connection (a body cut short).  When several faults match, the earliest added one still
        in force applies (one fault per request)."""
        if action not in ("status", "reset", "stall", "truncate"):
            raise ValueError(f"unknown fault action {action!r}")
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), action, times, status, seconds))

    def add_random_faults(
        self,
        probability: float,
        actions: tuple[FaultAction, ...] = ("status", "reset", "stall", "truncate"),
        pattern: str = r".",
        seed: int = 0,
        status: int = 503,
        seconds: float = 0.2,
    ) -> None:
        """Faults each request whose path matches ``pattern`` with ``probability``, the action
        drawn from ``actions`` (as :meth:`add_fault` describes them), from a generator seeded
        with ``seed``: an object store misbehaving at random over a long run. Faults added with
        :meth:`add_fault` still apply first."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], not {probability}")
        unknown = set(actions) - {"status", "reset", "stall", "truncate"}
        if unknown or not actions:
            raise ValueError(f"unknown or no fault actions {sorted(unknown) or actions!r}")
        with self._lock:
            self._random_faults = (probability, tuple(actions), re.compile(pattern), random.Random(seed), status, seconds)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._random_faults = None

    # -- request log

    @property
    def requests(self) -> list[RequestRecord]:
        """(method, path, lowercased headers) of every request since the last reset, in order."""
        with self._lock:
            return list(self._log)

    def count(self, method: str | None = None, pattern: str | None = None) -> int:
        """How many logged requests have this method and a path matching ``pattern`` (re.search)."""
        regex = None if pattern is None else re.compile(pattern)
        return sum(
            1 for m, path, _ in self.requests
            if (method is None or m == method.upper()) and (regex is None or regex.search(path))
        )

    @property
    def max_in_flight(self) -> int:
        """Peak number of requests handled at once (latency sleep included) since the last reset."""
        with self._lock:
            return self._max_in_flight

    @property
    def bytes_sent(self) -> int:
        """Response body bytes sent since the last :meth:`reset_log`."""
        with self._lock:
            return self._bytes_sent

    def _sent(self, n: int) -> None:
        with self._lock:
            self._bytes_sent += n

    def reset_log(self) -> None:
        with self._lock:
            self._bytes_sent = 0
            self._log.clear()
            self._max_in_flight = self._in_flight

    # -- used by handler threads

    def _begin_request(self, method: str, path: str, headers: dict[str, str]) -> _Fault | None:
        with self._lock:
            self._log.append((method, path, headers))
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            for fault in self._faults:
                if fault.remaining != 0 and fault.pattern.search(path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
            if self._random_faults is not None:
                probability, actions, pattern, rng, status, seconds = self._random_faults
                if pattern.search(path) and rng.random() < probability:
                    self._random_faults_served += 1
                    return _Fault(pattern, rng.choice(actions), 1, status, seconds)
        return None

    @property
    def random_faults_served(self) -> int:
        """How many requests :meth:`add_random_faults` has faulted."""
        with self._lock:
            return self._random_faults_served

    def _end_request(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _sleep(self, seconds: float) -> bool:
        """Sleeps unless stopping; False when the server is stopping (the caller then gives up)."""
        if seconds > 0:
            self._stopping.wait(seconds)
        return not self._stopping.is_set()

    def _connection_opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections[conn] = threading.current_thread()

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)
