"""HDF5 structure through h5py in a child process, so a crash in libhdf5 cannot take down a batch.

The child (:mod:`biasinspect.readers._h5worker`) runs in a fresh interpreter started with ``-I``
(isolated mode: neither the current folder nor ``PYTHONPATH`` is on ``sys.path``, so a planted
``h5py.py`` next to the model is never imported; the worker file is run by its path, from ``/``),
with an address-space limit, a CPU-time limit, a wall-clock timeout and HDF5 filter plugins
disabled.  A crash becomes ``HDF5 parser crashed (signal N)``; a timeout or a memory overrun
becomes a :class:`~biasinspect.errors.ResourceLimitError`.  The parent never imports h5py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
    "memory, cpu = int(sys.argv[2]), int(sys.argv[3])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (memory, memory))\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "runpy.run_path(sys.argv[1], run_name='__main__')\n"
)


def describe_hdf5(
    path: str | os.PathLike[str] | None = None,
    *,
    offset: int = 0,
    length: int | None = None,
    data: bytes | None = None,
) -> dict[str, Any]:
    """The structure of an HDF5 image: a window of a local file, or bytes in memory.

    Returns ``{"datasets": [[path, shape, dtype], ...], "attrs": {group: {name: value}}}``.
    """
    if data is not None:
        request: dict[str, Any] = {"stdin": len(data)}
        payload = json.dumps(request).encode() + b"\n" + data
    else:
        if path is None or length is None:
            raise ValueError("describe_hdf5 needs a path and length, or data")
        request = {"path": os.fspath(path), "offset": offset, "length": length}
        payload = json.dumps(request).encode() + b"\n"
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HDF5_USE_FILE_LOCKING": "FALSE",
        "HDF5_PLUGIN_PATH": os.devnull,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "LC_ALL": "C.UTF-8",
    }
    command = [
        sys.executable,
        "-I",
        "-c",
        _BOOT,
        _WORKER,
        str(H5_MEMORY_BYTES),
        str(int(H5_TIMEOUT_SECONDS)),
    ]
    try:
        completed = subprocess.run(
            command,
            input=payload,
            capture_output=True,
            timeout=H5_TIMEOUT_SECONDS,
            env=environment,
            cwd="/",
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise ResourceLimitError(f"HDF5 parser timed out after {H5_TIMEOUT_SECONDS:.0f} s") from error
    except OSError as error:
        raise UnreadableFileError(f"cannot start the HDF5 parser: {error.strerror or error}") from error
    if completed.returncode < 0:
        number = -completed.returncode
        if number == signal.SIGXCPU:
            raise ResourceLimitError("HDF5 parser exceeded its CPU-time limit")
        raise MalformedModelError(f"HDF5 parser crashed (signal {number})")
    if len(completed.stdout) > MAX_H5_REPLY_BYTES:
        raise ResourceLimitError("HDF5 structure description is too large")
    try:
        reply = json.loads(completed.stdout)
    except ValueError as error:
        last = completed.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        if "MemoryError" in last[0]:
            raise ResourceLimitError("HDF5 parser ran out of memory") from error
        raise MalformedModelError(
            f"HDF5 parser failed (exit {completed.returncode}): {' '.join(last[0].split())[:300]}"
        ) from error
    if not isinstance(reply, dict):
        raise MalformedModelError("HDF5 parser gave no structure")
    if "error" in reply:
        raise MalformedModelError(f"not a readable HDF5 file: {reply['error']}")
    return reply


__all__ = ["H5_MEMORY_BYTES", "H5_TIMEOUT_SECONDS", "describe_hdf5"]
