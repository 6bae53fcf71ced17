"""Real servers on 127.0.0.1 for the remote-source tests: a small threaded web server with Range
support, and moto's S3 server.

The web server serves files from a folder under URL prefixes that pick its behaviour:

* ``/files/NAME``: normal, with single ``Range: bytes=a-b`` requests answered 206;
* ``/redirect/NAME``: 302 to ``/files/NAME`` (as a hub's "resolve" URL redirects to its CDN);
* ``/status/CODE/NAME``: always answers CODE (403, 404, 500...);
* ``/norange/NAME``: ignores Range and sends the whole file with 200;
* ``/slow/NAME``: waits ``slow_seconds`` before answering.

It counts what it did itself (``requests``, ``body_bytes``: bytes of response bodies actually
written to the socket), so tests measure the client from the server's side.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK = 64 * 1024


@dataclass
class ServerLog:
    """The server's own accounting."""

    requests: int = 0
    body_bytes: int = 0
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.body_bytes = 0
            self.paths.clear()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _count(self) -> None:
        with self.server.log.lock:
            self.server.log.requests += 1
            self.server.log.paths.append(f"{self.command} {self.path}")

    def _send_body(self, handle: object, length: int) -> None:
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))  # type: ignore[attr-defined]
            if not chunk:
                break
            try:
                self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            with self.server.log.lock:
                self.server.log.body_bytes += len(chunk)
            remaining -= len(chunk)

    def _plain(self, code: int) -> None:
        body = f"status {code}\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        with self.server.log.lock:
            self.server.active += 1
        try:
            self._answer()
        finally:
            with self.server.log.lock:
                self.server.active -= 1

    def _answer(self) -> None:
        self._count()
        path = self.path.split("?", 1)[0]
        parts = path.lstrip("/").split("/")
        mode = parts[0]
        if mode == "status" and len(parts) >= 3:
            self._plain(int(parts[1]))
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "/files/" + "/".join(parts[1:]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "slow":
            time.sleep(self.server.slow_seconds)
        if mode not in ("files", "norange", "slow"):
            self._plain(404)
            return
        relative = "/".join(parts[1:])
        target = Path(self.server.root, relative)
        if ".." in parts or not target.is_file():
            self._plain(404)
            return
        size = target.stat().st_size
        requested = self.headers.get("Range")
        match = _RANGE.match(requested or "") if mode != "norange" else None
        with open(target, "rb") as handle:
            if match is None:
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("Accept-Ranges", "none" if mode == "norange" else "bytes")
                self.end_headers()
                if self.command != "HEAD":
                    self._send_body(handle, size)
                return
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if self.command != "HEAD":
                handle.seek(start)
                self._send_body(handle, end - start + 1)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.log = ServerLog()
        self.slow_seconds = 2.0
        self.active = 0
        """Requests being answered (a hung-up client's response may still be failing to send)."""


@dataclass
class WebServer:
    """A running web server: ``url(mode, name)`` and its ``log``."""

    server: _Server

    @property
    def log(self) -> ServerLog:
        return self.server.log

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, name: str, mode: str = "files") -> str:
        return f"{self.base}/{mode}/{name}"

    def reset(self) -> None:
        """Wait (at most 10 s) until no request is being answered, then zero the counts, so that a
        previous test's unfinished response is not counted in the next one."""
        deadline = time.monotonic() + 10
        seen = -1
        # Quiet means nothing being answered and no request arriving for 50 ms: a request still in
        # the listen queue (accepted, not yet handled) is not yet "active".
        while time.monotonic() < deadline and (self.server.active or self.log.requests != seen):
            seen = self.log.requests
            time.sleep(0.05)
        self.log.reset()

    def set_slow(self, seconds: float) -> None:
        self.server.slow_seconds = seconds


@contextmanager
def web_server(root: Path) -> Iterator[WebServer]:
    """Serve ``root`` on 127.0.0.1 (a free port) for the duration of the block."""
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield WebServer(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; yields its endpoint URL with the AWS variables set for it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in _AWS_VARIABLES}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_EC2_METADATA_DISABLED",
)
