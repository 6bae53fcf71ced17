"""The one reader registry: for each format, how to recognise it, which names a folder scan picks
up, and the function that reads it.

The CLI and the library both find a file's reader here (:func:`reader_for`), for a local file and
for a URL alike: a reader is handed a :class:`~biasinspect.source.ByteSource` and never knows
which.  Adding a format is one reader module plus one :class:`FormatSpec` in :data:`FORMATS`.

How a file is recognised
    Every spec's ``sniff`` looks at the file's first bytes and its name and answers with the
    :class:`Stage` at which it claims the file (or ``None``).  Stages are tried in order; within
    a stage the lowest ``priority`` wins:

    1. ``MAGIC``: content that identifies the format (zip, safetensors, pickle PROTO), or a name
       that does (a shard index);
    2. then known non-model content (PNG, gzip, ELF, ...) is refused, naming what it is;
    3. ``NAMED``: the name says so and the content did not contradict it (``x.safetensors``);
    4. text content: only ``TEXT`` claims (protocol-0 pickles) are accepted, otherwise the file is
       refused as text;
    5. ``STRUCTURE``: binary content compatible with the format (a first byte that can start an
       ONNX ModelProto);
    6. ``FALLBACK``: the name alone (``x.onnx``).
"""

from __future__ import annotations

import enum
import importlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from biasinspect.errors import MalformedModelError, UnsupportedFormatError
from biasinspect.limits import MAX_SAFETENSORS_HEADER_BYTES
from biasinspect.readers.files import REFUSED_TAR, is_tar_header

if TYPE_CHECKING:
    from biasinspect.model import ModelDescription
    from biasinspect.source import ByteSource

SNIFF_BYTES = 512
"""How many leading bytes ``sniff`` functions are shown."""


class Stage(enum.IntEnum):
    """How strongly a sniff rule claims a file (lower is stronger; see the module docstring)."""

    MAGIC = 1
    NAMED = 2
    TEXT = 3
    STRUCTURE = 4
    FALLBACK = 5


@dataclass(frozen=True)
class SniffInput:
    """What a sniff rule may look at."""

    head: bytes
    """The first :data:`SNIFF_BYTES` bytes (fewer for a shorter file)."""
    name: str
    """The file's base name, lower-cased (for a URL: the last path segment)."""
    size: int
    """The file's size in bytes."""
    is_text: bool
    """``head`` is printable UTF-8."""

    @property
    def suffix(self) -> str:
        """The last dotted suffix of ``name`` (``""`` when none), like :attr:`pathlib.Path.suffix`."""
        stem = self.name.lstrip(".")
        return "." + stem.rsplit(".", 1)[1] if "." in stem else ""


@dataclass(frozen=True)
class FormatSpec:
    """One format family and its reader.

    ``reader`` is ``"module:function"``, imported only when a file of this format is read (so
    that start-up stays light and e.g. onnx is imported only for ONNX files); the function takes a
    :class:`~biasinspect.source.ByteSource` and returns the file's model descriptions.
    """

    name: str
    sniff: Callable[[SniffInput], Stage | None]
    suffixes: tuple[str, ...]
    """Name endings a folder scan picks up (``.onnx``; ``.safetensors.index.json``)."""
    reader: str
    priority: int = 50

    def read(self, source: ByteSource) -> list[ModelDescription]:
        """Read ``source`` with this format's reader."""
        module_name, function_name = self.reader.split(":")
        function: Callable[[ByteSource], list[ModelDescription]] = getattr(
            importlib.import_module(module_name), function_name
        )
        return function(source)


# ------------------------------------------------------------------------------------------------
# Sniff rules of the built-in formats

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
INDEX_SUFFIXES = (SAFETENSORS_INDEX_SUFFIX, ".bin.index.json", ".pt.index.json", ".pth.index.json")
"""Shard index names: a folder scan picks them up, and :mod:`biasinspect.readers.sharded` reads
exactly these (the index name tells safetensors from PyTorch shards)."""

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".ptl", ".jit", ".torchscript")
TORCH_ZIP_SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt", ".ptl", ".jit", ".torchscript")

# Field tags a serialized ModelProto can start with (ir_version, producer_name, ..., graph, opset_import).
_ONNX_FIRST_BYTES = frozenset({0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA})


def _sniff_index(sample: SniffInput) -> Stage | None:
    return Stage.MAGIC if sample.name.endswith(INDEX_SUFFIXES) else None


def _sniff_zip(sample: SniffInput) -> Stage | None:
    return Stage.MAGIC if sample.head.startswith((b"PK\x03\x04", b"PK\x05\x06")) else None


def safetensors_header_plausible(head: bytes, file_size: int) -> bool:
    """An 8-byte length that fits the file (or the cap) followed by ``{``."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    # A plausible length alone identifies the format even when it is wrong; the reader says why.
    return bool(0 < header_length <= max(file_size, 4 * MAX_SAFETENSORS_HEADER_BYTES))


def _sniff_safetensors(sample: SniffInput) -> Stage | None:
    # Before pickle: a header length of 640, 896, 1152 or 1408 (mod 65536) starts with the bytes
    # of a pickle PROTO opcode, while no pickle has a '{' at byte 8 after a plausible length.
    if safetensors_header_plausible(sample.head, sample.size):
        return Stage.MAGIC
    return Stage.NAMED if sample.suffix == ".safetensors" else None


def _sniff_pickle(sample: SniffInput) -> Stage | None:
    head = sample.head
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return Stage.MAGIC
    if sample.suffix not in PICKLE_SUFFIXES:
        return None
    if sample.is_text:
        # protocol 0/1 pickles are text-like
        return Stage.TEXT if head[:1] in (b"(", b"c", b"}", b"]") and b"\n" in head else None
    return Stage.STRUCTURE if head[:1] in (b"(", b"c", b"}", b"]", b"\x80") else None


def _first_zip_member(head: bytes) -> str:
    """The name in a zip's first local header, when ``head`` holds it (else "")."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return ""
    (name_length,) = struct.unpack_from("<H", head, 26)
    return head[30 : 30 + name_length].decode("cp437")


def _sniff_numpy(sample: SniffInput) -> Stage | None:
    # np.save (the .npy magic) and np.savez (a zip whose first member is an .npy array); before
    # the torch zip, which the NumPy reader hands a torch archive on to.
    if sample.head.startswith(b"\x93NUMPY") or _first_zip_member(sample.head).endswith(".npy"):
        return Stage.MAGIC
    return None


def _sniff_openvino(sample: SniffInput) -> Stage | None:
    from biasinspect.readers.openvino_reader import sniff_openvino

    # Content identifies it (XML whose root is <net>), though it is text.
    return Stage.MAGIC if sniff_openvino(sample.head) else None


def _sniff_coreml(sample: SniffInput) -> Stage | None:
    from biasinspect.readers.coreml_reader import sniff_coreml

    if sniff_coreml(sample.head):
        return Stage.MAGIC
    return Stage.NAMED if sample.suffix == ".mlmodel" and sample.head[:1] == b"\x08" else None


def _sniff_keras_archive(sample: SniffInput) -> Stage | None:
    # A Keras 3 .keras zip starts with one of its own members (never a torch record folder).
    if _first_zip_member(sample.head) in ("metadata.json", "config.json", "model.weights.h5"):
        return Stage.MAGIC
    return None


def _sniff_tflite(sample: SniffInput) -> Stage | None:
    from biasinspect.readers.tflite_reader import sniff_tflite

    return Stage.MAGIC if sniff_tflite(sample.head) else None


def _sniff_hdf5(sample: SniffInput) -> Stage | None:
    from biasinspect.readers.keras_reader import sniff_hdf5

    return Stage.MAGIC if sniff_hdf5(sample.head) else None


def _sniff_onnx(sample: SniffInput) -> Stage | None:
    if sample.head and sample.head[0] in _ONNX_FIRST_BYTES:
        return Stage.STRUCTURE
    return Stage.FALLBACK if sample.suffix == ".onnx" else None


FORMATS: list[FormatSpec] = [
    FormatSpec(
        "shard-index", _sniff_index, INDEX_SUFFIXES, "biasinspect.readers.sharded:read_sharded_index", 0
    ),
    FormatSpec("zip", _sniff_zip, TORCH_ZIP_SUFFIXES, "biasinspect.readers.torch_reader:read_torch_zip", 10),
    FormatSpec(
        "safetensors",
        _sniff_safetensors,
        (".safetensors",),
        "biasinspect.readers.safetensors_reader:read_safetensors",
        20,
    ),
    FormatSpec(
        "pickle", _sniff_pickle, PICKLE_SUFFIXES, "biasinspect.readers.torch_reader:read_pickle_file", 30
    ),
    FormatSpec("onnx", _sniff_onnx, (".onnx",), "biasinspect.readers.onnx_reader:read_onnx", 40),
    FormatSpec("numpy", _sniff_numpy, (".npz", ".npy"), "biasinspect.readers.numpy_reader:read_numpy", 5),
    FormatSpec(
        "openvino", _sniff_openvino, (".xml",), "biasinspect.readers.openvino_reader:read_openvino", 50
    ),
    FormatSpec("coreml", _sniff_coreml, (".mlmodel",), "biasinspect.readers.coreml_reader:read_coreml", 35),
    FormatSpec(
        "keras", _sniff_keras_archive, (".keras",), "biasinspect.readers.keras_reader:read_keras_archive", 8
    ),
    FormatSpec("tflite", _sniff_tflite, (".tflite",), "biasinspect.readers.tflite_reader:read_tflite", 45),
    FormatSpec(
        "keras-h5", _sniff_hdf5, (".h5", ".hdf5"), "biasinspect.readers.keras_reader:read_keras_h5", 46
    ),
]
"""Every format biasinspect reads.  A new format: append one spec (its module is imported lazily)."""

# ------------------------------------------------------------------------------------------------
# The engine

OTHER_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x7fELF", "an ELF executable"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ", "an xz file"),
)
"""Content that is known not to be a model (checked after every ``MAGIC`` rule)."""


def looks_like_text(head: bytes) -> bool:
    """``head`` decodes as UTF-8 and holds only printable characters and whitespace."""
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\r\n\t\f" for char in text)


def base_name(location: str) -> str:
    """The last path segment of a local path or a URL (query and fragment dropped), lower-cased."""
    if "://" in location:
        location = location.split("?", 1)[0].split("#", 1)[0]
        return location.rstrip("/").rsplit("/", 1)[-1].lower()
    return os.path.basename(location).lower()


def sniff(head: bytes, name: str, size: int) -> FormatSpec:
    """The spec that reads a file with these first bytes, base name and size.

    Raises :class:`UnsupportedFormatError` (one line) for anything no reader claims.
    """
    sample = SniffInput(head=head, name=name.lower(), size=size, is_text=looks_like_text(head))
    claims = sorted(
        (stage, spec.priority, index, spec)
        for index, spec in enumerate(FORMATS)
        if (stage := spec.sniff(sample)) is not None
    )

    def best(stage: Stage) -> FormatSpec | None:
        return next((spec for claimed, _p, _i, spec in claims if claimed is stage), None)

    if is_tar_header(head):
        # torch.load tries tar before anything else: a header that also reads as a harmless
        # pickle, ONNX or safetensors file must not hide the tar members torch would unpickle.
        raise MalformedModelError(REFUSED_TAR)
    found = best(Stage.MAGIC)
    if found is not None:
        return found
    if not head:
        raise UnsupportedFormatError("empty file (0 bytes)")
    for magic, description in OTHER_MAGIC:
        if head.startswith(magic):
            raise UnsupportedFormatError(f"not a model file: the content is {description}")
    found = best(Stage.NAMED)
    if found is not None:
        return found
    if sample.is_text:
        found = best(Stage.TEXT)
        if found is not None:
            return found
        what = "an ONNX model" if sample.suffix == ".onnx" else "a model file"
        raise UnsupportedFormatError(f"not {what}: the file is text")
    found = best(Stage.STRUCTURE) or best(Stage.FALLBACK)
    if found is not None:
        return found
    raise UnsupportedFormatError(
        "not a recognised model format (ONNX, PyTorch zip/legacy/pickle, TorchScript, torch.export, "
        "safetensors, NumPy, TFLite, Keras, OpenVINO, CoreML)"
    )


def reader_for(source: ByteSource) -> FormatSpec:
    """The spec whose reader reads ``source`` (from its first bytes; the name breaks ties)."""
    name = base_name(source.name)
    if name.endswith(INDEX_SUFFIXES):
        # Decided by the name alone: an empty or broken index is the index reader's to explain.
        return sniff(b"", name, source.size)
    return sniff(source.read_at(0, SNIFF_BYTES), name, source.size)


def scanned(name: str) -> bool:
    """A folder scan picks up a file of this (base) name."""
    lowered = name.lower()
    suffix = SniffInput(b"", lowered, 0, False).suffix
    for spec in FORMATS:
        for ending in spec.suffixes:
            if lowered.endswith(ending) if ending.count(".") > 1 else suffix == ending:
                return True
    return False


__all__ = [
    "FORMATS",
    "INDEX_SUFFIXES",
    "SAFETENSORS_INDEX_SUFFIX",
    "FormatSpec",
    "SniffInput",
    "Stage",
    "reader_for",
    "scanned",
    "sniff",
]
