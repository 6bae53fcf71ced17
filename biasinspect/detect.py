"""Which reader a file needs, decided from its first bytes (the name only breaks ties).

Also: finding model files in folders.  Nothing here parses a model; it opens a file only to read
its first bytes, and never opens anything that is not a regular file (a FIFO would block).
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from biasinspect.errors import BiasInspectError, UnreadableFileError, UnsupportedFormatError
from biasinspect.limits import MAX_SAFETENSORS_HEADER_BYTES, MAX_SCAN_FILES
from biasinspect.readers.files import check_file_mode, unreadable
from biasinspect.readers.keras_reader import sniff_hdf5
from biasinspect.readers.tflite_reader import sniff_tflite


class FileFormat(str, enum.Enum):
    """Container families, each served by one reader."""

    ONNX = "onnx"
    ZIP = "zip"
    PICKLE = "pickle"
    SAFETENSORS = "safetensors"
    SHARD_INDEX = "shard-index"
    TFLITE = "tflite"
    HDF5 = "hdf5"


MODEL_SUFFIXES = frozenset(
    {
        ".onnx",
        ".pt",
        ".pth",
        ".bin",
        ".ckpt",
        ".pt2",
        ".safetensors",
        ".pkl",
        ".pickle",
        ".ptl",
        ".torchscript",
        ".jit",
        ".tflite",
        ".keras",
        ".h5",
        ".hdf5",
    }
)
"""Suffixes a folder scan picks up (a file named explicitly is read whatever its name)."""

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
INDEX_SUFFIXES = (SAFETENSORS_INDEX_SUFFIX, ".bin.index.json", ".pt.index.json", ".pth.index.json")
"""Shard index names: a folder scan picks them up, and :mod:`biasinspect.readers.sharded` reads
exactly these (the index name tells safetensors from PyTorch shards)."""

_PICKLE_SUFFIXES = frozenset(
    {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".ptl", ".jit", ".torchscript"}
)

# Field tags a serialized ModelProto can start with (ir_version, producer_name, ..., graph, opset_import).
_ONNX_FIRST_BYTES = frozenset({0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA})

_OTHER_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x7fELF", "an ELF executable"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ", "an xz file"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)

_SNIFF_BYTES = 512


def check_regular_file(path: Path) -> os.stat_result:
    """stat ``path`` and insist on a regular file; never opens it."""
    try:
        info = path.stat()
    except OSError as error:
        raise unreadable(error, path) from error
    except ValueError as error:  # an embedded NUL byte
        raise UnreadableFileError("invalid path (contains a NUL byte)") from error
    check_file_mode(info.st_mode)
    return info


def read_head(path: Path, count: int = _SNIFF_BYTES) -> bytes:
    """The first ``count`` bytes of a regular file."""
    check_regular_file(path)
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except PermissionError as error:
        raise UnreadableFileError("permission denied") from error
    except OSError as error:
        raise UnreadableFileError(f"cannot read: {error.strerror or error}") from error


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\r\n\t\f" for char in text)


def _safetensors_header_plausible(head: bytes, file_size: int) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    # A plausible length alone identifies the format even when it is wrong; the reader says why.
    return bool(0 < header_length <= max(file_size, 4 * MAX_SAFETENSORS_HEADER_BYTES))


def sniff(path: Path) -> FileFormat:
    """Decide a file's container format from its content; the name breaks ties only."""
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIXES):
        check_regular_file(path)
        return FileFormat.SHARD_INDEX
    info = check_regular_file(path)
    head = read_head(path)
    if not head:
        raise UnsupportedFormatError("empty file (0 bytes)")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return FileFormat.ZIP
    if sniff_tflite(head):
        return FileFormat.TFLITE
    if sniff_hdf5(head):
        return FileFormat.HDF5
    # safetensors first: a header length of 640, 896, 1152 or 1408 (mod 65536) starts with the
    # bytes of a pickle PROTO opcode, while no pickle has a '{' at byte 8 after a plausible length.
    if _safetensors_header_plausible(head, info.st_size):
        return FileFormat.SAFETENSORS
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return FileFormat.PICKLE
    suffix = path.suffix.lower()
    for magic, description in _OTHER_MAGIC:
        if head.startswith(magic):
            raise UnsupportedFormatError(f"not a model file: the content is {description}")
    if suffix == ".safetensors":
        return FileFormat.SAFETENSORS
    if _looks_like_text(head):
        if suffix in _PICKLE_SUFFIXES and head[:1] in (b"(", b"c", b"}", b"]") and b"\n" in head:
            return FileFormat.PICKLE  # protocol 0/1 pickles are text-like
        what = "an ONNX model" if suffix == ".onnx" else "a model file"
        raise UnsupportedFormatError(f"not {what}: the file is text")
    if head[0] in _ONNX_FIRST_BYTES:
        return FileFormat.ONNX
    if suffix in _PICKLE_SUFFIXES and head[:1] in (b"(", b"c", b"}", b"]", b"\x80"):
        return FileFormat.PICKLE
    if suffix == ".onnx":
        return FileFormat.ONNX
    raise UnsupportedFormatError(
        "not a recognised model format (ONNX, PyTorch zip/legacy/pickle, TorchScript, torch.export, "
        "safetensors, TFLite, Keras)"
    )


@dataclass(frozen=True)
class FoundPath:
    """A path a scan produced: either a model file to read or a problem to report."""

    path: Path
    problem: str | None = None


def scan_folder(folder: Path) -> Iterator[FoundPath]:
    """Model files under ``folder``, recursively, in sorted order.

    Symbolic links to files are followed; links to folders are not (so a link loop cannot trap the
    scan).  Shards covered by an ``*.index.json`` are left to that index.  Unreadable sub-folders
    are yielded as problems rather than skipped silently.
    """
    candidates: list[Path] = []
    problems: list[FoundPath] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError as error:
            problems.append(FoundPath(Path(current), f"cannot list folder: {error.strerror or error}"))
            continue
        for entry in entries:
            entry_path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                pending.append(entry_path)
                continue
            lowered = entry.name.lower()
            if lowered.endswith(INDEX_SUFFIXES) or entry_path.suffix.lower() in MODEL_SUFFIXES:
                candidates.append(entry_path)
                if len(candidates) > MAX_SCAN_FILES:
                    problems.append(
                        FoundPath(folder, f"more than {MAX_SCAN_FILES:,} model files; scan stopped")
                    )
                    pending.clear()
                    break
    covered: set[Path] = set()
    for candidate in candidates:
        if candidate.name.lower().endswith(INDEX_SUFFIXES):
            covered.update(_shards_of(candidate))
    for candidate in sorted(candidates):
        if Path(os.path.normpath(candidate)) not in covered:
            yield FoundPath(candidate)
    yield from problems


def _shards_of(index_path: Path) -> list[Path]:
    try:
        from biasinspect.readers.sharded import shard_files

        return [Path(os.path.normpath(shard)) for shard in shard_files(index_path)]
    except (BiasInspectError, OSError, ValueError):
        return []  # a broken index is reported when it is read; its shards then stand alone
