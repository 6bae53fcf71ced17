"""Child process that parses an HDF5 file with h5py and prints its structure as JSON.

libhdf5 is native code reading a stranger's file, so it never runs inside the biasinspect
process: :mod:`biasinspect.readers.h5_isolated` starts this module in a fresh interpreter (``-I``:
no current folder, no user site, no ``PYTHON*`` variables on ``sys.path``) with an address-space and
CPU-time limit, and turns a crash into one line.

Requests (one JSON line each on stdin): ``{"path": str, "offset": int, "length": int}``, a window
of a local file (a whole ``.h5``, a stored zip member, or a temporary file holding inflated bytes).
The process serves requests until stdin closes, so a batch pays for importing h5py once.

Reply (one JSON line on stdout per request): ``{"datasets": [[path, shape, dtype], ...], "attrs":
{group: {name: value}}}`` or ``{"error": str}``.  Only structure is read: dataset shapes and dtypes, and string attributes (the
Keras ``model_config``, ``layer_names``, ``weight_names``); dataset values never are.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from typing import Any

MAX_OBJECTS = 500_000
"""Groups plus datasets visited."""
MAX_DEPTH = 256
"""Deepest group nesting walked (a Keras 3 file nests two groups per nested model)."""
MAX_ATTRIBUTE_BYTES = 64 * 1024 * 1024
"""Total bytes of attribute text kept."""
_WANTED_ATTRIBUTES = ("name", "model_config", "layer_names", "weight_names", "keras_version", "backend")


class _Window(io.RawIOBase):
    """A read-only file object over ``[offset, offset + length)`` of a file (a stored zip member)."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        super().__init__()
        # The isolated child cannot import biasinspect: open_regular_file's rule, restated here
        # (no blocking open, then the open descriptor must be a regular file).
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise OSError(f"not a regular file: {path}")
        self._offset = offset
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self._length - self._position))
        data = os.pread(self._fd, count, self._offset + self._position) if count else b""
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _attribute_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        items = value.tolist()
        if isinstance(items, list):
            return [_attribute_text(item) for item in items]
        return _attribute_text(items)
    return None


def describe(handle: Any) -> dict[str, Any]:
    """The structure of an open ``h5py.File``: datasets with shapes, wanted string attributes."""
    import h5py  # type: ignore[import-untyped]

    datasets: list[list[Any]] = []
    attrs: dict[str, dict[str, Any]] = {}
    budget = {"objects": 0, "attr_bytes": 0}

    def keep_attributes(path: str, obj: Any) -> None:
        kept: dict[str, Any] = {}
        for name in obj.attrs:
            base = name.rstrip("0123456789")
            if base not in _WANTED_ATTRIBUTES:
                continue
            value = _attribute_text(obj.attrs[name])
            budget["attr_bytes"] += len(json.dumps(value))
            if budget["attr_bytes"] > MAX_ATTRIBUTE_BYTES:
                raise ValueError(f"HDF5 attributes exceed {MAX_ATTRIBUTE_BYTES:,} bytes")
            kept[name] = value
        if kept:
            attrs[path] = kept

    visited: set[int] = set()
    """Hashes of the objects seen (h5py hashes an ObjectID by file and object address); keeping
    the IDs themselves would keep every object open."""

    def walk(group: Any, prefix: str, depth: int) -> None:
        # Children are opened relative to their group (cost per object does not grow with depth);
        # only hard links are followed (a soft or external link could name another file), and an
        # object reached twice (a hard-link cycle) is visited once.
        if depth > MAX_DEPTH:
            raise ValueError(f"HDF5 groups nested more than {MAX_DEPTH} deep")
        for name in group:
            if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                continue
            obj = group[name]
            key = hash(obj.id)
            if key in visited:
                continue
            visited.add(key)
            budget["objects"] += 1
            if budget["objects"] > MAX_OBJECTS:
                raise ValueError(f"HDF5 file holds more than {MAX_OBJECTS:,} groups and datasets")
            path = f"{prefix}{name}"
            if isinstance(obj, h5py.Dataset):
                datasets.append([path, [int(dim) for dim in obj.shape or ()], str(obj.dtype)])
            keep_attributes(path, obj)
            if isinstance(obj, h5py.Group):
                walk(obj, path + "/", depth + 1)

    keep_attributes("", handle)
    walk(handle, "", 1)
    return {"datasets": datasets, "attrs": attrs}


def serve_one(request: dict[str, Any]) -> dict[str, Any]:
    """Parse one HDF5 window; every failure h5py reports becomes ``{"error": ...}``."""
    try:
        import h5py

        source = _Window(str(request["path"]), int(request["offset"]), int(request["length"]))
        with source, h5py.File(source, "r") as handle:
            return describe(handle)
    except MemoryError:
        return {"error": "out of memory parsing the HDF5 structure"}
    except RecursionError:
        return {"error": "HDF5 structure nested too deeply"}
    except Exception as error:  # h5py raises OSError/ValueError/KeyError/RuntimeError for bad files
        return {"error": " ".join(f"{type(error).__name__}: {error}".split())[:500]}


def main() -> int:
    """Serve requests, one JSON line each on stdin, until stdin closes; one JSON line per reply."""
    import h5py

    while h5py.h5pl.size():  # no HDF5 filter plugin is ever loaded (none is needed for shapes)
        h5py.h5pl.remove(0)
    import resource

    for line in sys.stdin.buffer:
        request = json.loads(line)
        # A CPU-time backstop per request: should the parent vanish while libhdf5 loops forever,
        # SIGXCPU still ends this process.
        used = resource.getrusage(resource.RUSAGE_SELF)
        budget = int(used.ru_utime + used.ru_stime) + int(request.get("cpu_seconds", 120)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY))
        reply = serve_one(request)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
