"""HDF5 structure through h5py in a child process, so a crash in libhdf5 cannot take down a batch.

The child (:mod:`biasinspect.readers._h5worker`) runs in a fresh interpreter started with ``-I``
(isolated mode: neither the current folder nor ``PYTHONPATH`` is on ``sys.path``, so a planted
``h5py.py`` next to the model is never imported; the worker file is run by its path, from ``/``),
with an address-space limit, no core dumps, HDF5 filter plugins disabled, and a wall-clock timeout
per file enforced here.  One child serves every HDF5 file of a run (importing h5py costs more than
parsing a model's structure); after a crash or a timeout it is replaced for the next file.

A crash becomes ``HDF5 parser crashed (signal N)``; a timeout or a memory overrun a
:class:`~biasinspect.errors.ResourceLimitError`.  The parent never imports h5py.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from biasinspect.errors import MalformedModelError, ResourceLimitError, UnreadableFileError

H5_TIMEOUT_SECONDS = 60.0
"""Wall-clock limit for one HDF5 file's structure."""
H5_MEMORY_BYTES = 2 * 1024 * 1024 * 1024
"""Address-space limit of the parser process (h5py and numpy themselves take ~0.5 GiB of it)."""
MAX_H5_REPLY_BYTES = 256 * 1024 * 1024
"""Largest structure description accepted from the child."""

_WORKER = str(Path(__file__).resolve().with_name("_h5worker.py"))

_BOOT = (
    "import resource, runpy, sys\n"
    "memory = int(sys.argv[2])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (memory, memory))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "runpy.run_path(sys.argv[1], run_name='__main__')\n"
)


class _Parser:
    """The running child, its pipes, and the process that started it (a fork does not share it)."""

    def __init__(self) -> None:
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HDF5_USE_FILE_LOCKING": "FALSE",
            "HDF5_PLUGIN_PATH": os.devnull,
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "LC_ALL": "C.UTF-8",
        }
        command = [sys.executable, "-I", "-c", _BOOT, _WORKER, str(H5_MEMORY_BYTES)]
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=environment,
                cwd="/",
            )
        except OSError as error:
            raise UnreadableFileError(f"cannot start the HDF5 parser: {error.strerror or error}") from error
        self.owner = os.getpid()
        self.pending = b""

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait (bounded) for its reply line."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            request = {**request, "cpu_seconds": int(H5_TIMEOUT_SECONDS) + 1}
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died() from None
        deadline = time.monotonic() + H5_TIMEOUT_SECONDS
        stdout = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self.pending:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.stop()
                    raise ResourceLimitError(f"HDF5 parser timed out after {H5_TIMEOUT_SECONDS:.0f} s")
                chunk = os.read(stdout, 1 << 20)
                if not chunk:
                    raise self._died()
                self.pending += chunk
                if len(self.pending) > MAX_H5_REPLY_BYTES:
                    self.stop()
                    raise ResourceLimitError("HDF5 structure description is too large")
        line, self.pending = self.pending.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError as error:
            self.stop()
            raise MalformedModelError("HDF5 parser gave an unreadable reply") from error
        if not isinstance(reply, dict):
            raise MalformedModelError("HDF5 parser gave no structure")
        return reply

    def _died(self) -> Exception:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.stop()
            code = self.process.returncode
        if code is not None and code < 0:
            if -code == signal.SIGKILL:
                return ResourceLimitError("HDF5 parser was killed (out of memory?)")
            if -code == signal.SIGXCPU:
                return ResourceLimitError("HDF5 parser exceeded its CPU-time limit")
            return MalformedModelError(f"HDF5 parser crashed (signal {-code})")
        return MalformedModelError(f"HDF5 parser exited unexpectedly (status {code})")

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None

    def stop(self) -> None:
        """End the child (ours: by its own handle, never by name)."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


_lock = threading.Lock()
_parser: _Parser | None = None


def _shutdown() -> None:
    global _parser
    if _parser is not None and _parser.owner == os.getpid():
        _parser.stop()
    _parser = None


atexit.register(_shutdown)


def describe_hdf5(
    path: str | os.PathLike[str] | None = None,
    *,
    offset: int = 0,
    length: int | None = None,
    data: bytes | None = None,
) -> dict[str, Any]:
    """The structure of an HDF5 image: a window of a local file, or bytes in memory.

    Returns ``{"datasets": [[path, shape, dtype], ...], "attrs": {group: {name: value}}}``.
    Bytes in memory are written to a private temporary file for the child and removed after.
    """
    if data is not None:
        with tempfile.NamedTemporaryFile(prefix="biasinspect-h5-", suffix=".h5") as scratch:
            scratch.write(data)
            scratch.flush()
            return _ask({"path": scratch.name, "offset": 0, "length": len(data)})
    if path is None or length is None:
        raise ValueError("describe_hdf5 needs a path and length, or data")
    # The child runs from /: a relative path must be made absolute here.
    return _ask({"path": os.path.abspath(os.fspath(path)), "offset": offset, "length": length})


def _ask(request: dict[str, Any]) -> dict[str, Any]:
    global _parser
    with _lock:
        if _parser is None or not _parser.alive():
            if _parser is not None and _parser.owner == os.getpid():
                _parser.stop()
            _parser = _Parser()
        parser = _parser
        try:
            reply = parser.ask(request)
        except BaseException:
            # A crash, a timeout, an interrupt mid-reply: the next file gets a fresh child.
            parser.stop()
            _parser = None
            raise
    if "error" in reply:
        raise MalformedModelError(f"not a readable HDF5 file: {reply['error']}")
    return reply


__all__ = ["H5_MEMORY_BYTES", "H5_TIMEOUT_SECONDS", "describe_hdf5"]
