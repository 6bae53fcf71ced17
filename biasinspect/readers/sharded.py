"""Sharded checkpoints: one model spread over several files listed by an index JSON.

Two index flavours exist (Hugging Face ``save_pretrained``):

* ``model.safetensors.index.json`` -> safetensors shards;
* ``pytorch_model.bin.index.json`` -> PyTorch shards (read with
  :func:`biasinspect.readers.torch_reader.tensors_from_torch_file`).

Both are ``{"metadata": {...}, "weight_map": {tensor name: shard file name}}``.  Every shard
path must resolve inside the index's folder: absolute paths, ``..`` components and symlinks
that lead outside are rejected before any shard is opened.

Order matters for the state-dict ``followed_by`` heuristic.  The index's ``weight_map`` is
written with sorted keys, so it says nothing about registration order.  Shards are therefore
read in natural order of their file names (``-00001-of-`` before ``-00002-of-``), and each
shard's own key order kept: for PyTorch shards that concatenation IS the registration order
(``save_pretrained`` fills shards while walking the state dict in order); safetensors headers
are sorted, so safetensors shards are described with ``registration_order=False``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import cast

from biasinspect import limits
from biasinspect.errors import (
    BiasInspectError,
    MalformedModelError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from biasinspect.model import ModelDescription
from biasinspect.readers.files import parse_json_object, quote
from biasinspect.readers.safetensors_reader import tensors_from_safetensors
from biasinspect.readers.state_dict import describe_state_dict, natural_sort_key
from biasinspect.readers.tensors import TensorInfo
from biasinspect.registry import INDEX_SUFFIXES, SAFETENSORS_INDEX_SUFFIX, base_name
from biasinspect.source import ByteSource, Location, NotFoundError, OutsideFolderError, opened

TensorReader = Callable[[ByteSource], dict[str, TensorInfo]]


def _load_index(source: ByteSource) -> dict[str, str]:
    """The validated ``weight_map`` of an index file."""
    size = source.size
    if size > limits.MAX_JSON_BYTES:
        raise ResourceLimitError(f"index JSON of {size} bytes exceeds the {limits.MAX_JSON_BYTES}-byte limit")
    raw = source.read_at(0, size)
    parsed = parse_json_object(raw, "index")
    weight_map = parsed.get("weight_map")
    if not isinstance(weight_map, dict):
        raise MalformedModelError("index has no 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise MalformedModelError(f"weight_map entry {quote(name)} is not a file name")
    return cast(dict[str, str], weight_map)


def _check_shard_name(shard: str) -> None:
    """MalformedModelError for a shard name that is empty, absolute or climbs with ``..``."""
    if not shard or "\x00" in shard:
        raise MalformedModelError(f"shard {quote(shard)}: empty or invalid file name")
    posix, windows = PurePosixPath(shard), PureWindowsPath(shard)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or shard.startswith(("/", "\\")):
        raise MalformedModelError(f"shard {quote(shard)}: absolute paths are not allowed")
    if ".." in posix.parts or ".." in windows.parts:
        raise MalformedModelError(f"shard {quote(shard)}: '..' is not allowed in shard paths")


def _open_shard(index: ByteSource, shard: str) -> ByteSource:
    """The shard next to the index (a local file or a URL relative to the index's URL)."""
    _check_shard_name(shard)
    try:
        return index.sibling(shard)
    except OutsideFolderError as error:
        raise MalformedModelError(f"shard {quote(shard)}: resolves outside the index's folder") from error
    except NotFoundError as error:
        raise MalformedModelError(f"shard {quote(shard)} listed in the index does not exist") from error
    except BiasInspectError as error:
        raise type(error)(f"shard {quote(shard)}: {error}") from error


def _check_shard_path(folder: Path, shard: str) -> Path:
    """The shard's path under ``folder``; MalformedModelError if it could lead outside."""
    _check_shard_name(shard)
    candidate = folder / shard
    root = os.path.realpath(folder)
    resolved = os.path.realpath(candidate)
    if os.path.commonpath([root, resolved]) != root:
        raise MalformedModelError(f"shard {quote(shard)}: resolves outside the index's folder")
    return candidate


def _shard_names(weight_map: dict[str, str]) -> list[str]:
    return sorted(set(weight_map.values()), key=natural_sort_key)


def _index_format(index_name: str) -> str:
    """``"safetensors"`` or ``"pytorch"``, from the index's name.

    Only names ending in one of :data:`INDEX_SUFFIXES` are read as indexes (the format sniffer
    sends nothing else here), so the name always tells.
    """
    name = base_name(index_name)
    if name.endswith(SAFETENSORS_INDEX_SUFFIX):
        return "safetensors"
    if name.endswith(INDEX_SUFFIXES):
        return "pytorch"
    raise UnsupportedFormatError(
        f"not a shard index name: expected a name ending in one of {', '.join(INDEX_SUFFIXES)}"
    )


def shard_names(location: Location) -> list[str]:
    """The shard names an index lists (relative to the index), validated, in natural order."""
    with opened(location) as source:
        names = _shard_names(_load_index(source))
    for name in names:
        _check_shard_name(name)
    return names


def shard_files(index_path: Path) -> list[Path]:
    """The shard files a local index covers (``index folder / name``), in natural order.

    Paths are validated (nothing may resolve outside the index's folder) but not required to
    exist, so that a folder scanner can skip them whatever their state.
    """
    with opened(index_path) as source:
        weight_map = _load_index(source)
    folder = index_path.parent
    return [_check_shard_path(folder, shard) for shard in _shard_names(weight_map)]


def _torch_tensor_reader() -> TensorReader:
    # Imported here, not at the top: PyTorch shards are rare and the torch reader pulls in the
    # pickle machinery, which a safetensors index never needs.
    from biasinspect.readers.torch_reader import tensors_from_torch_file

    return tensors_from_torch_file


MAX_LISTED_DUPLICATES = 5
"""Names quoted in the one warning about tensors found in more than one shard."""


def _names_sample(names: list[str]) -> str:
    """``n tensors: 'a', 'b', ...``: the count and the first few names, for one warning line."""
    shown = ", ".join(quote(name) for name in names[:MAX_LISTED_DUPLICATES])
    more = ", ..." if len(names) > MAX_LISTED_DUPLICATES else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown}{more})"


def read_sharded_index(location: Location) -> list[ModelDescription]:
    """Describe the one model a sharded checkpoint's index describes.

    All shard names are validated first; shards are opened next to the index (for a URL index:
    relative to its URL).  A missing shard, a shard that cannot be read, or a tensor listed in
    ``weight_map`` but absent from its shard raises a :class:`BiasInspectError` naming the
    shard or tensor.  ``path`` in the result is the index.
    """
    with opened(location) as index:
        return _read_sharded(index)


def _read_sharded(index: ByteSource) -> list[ModelDescription]:
    weight_map = _load_index(index)
    format_name = _index_format(index.name)
    shards = _shard_names(weight_map)
    for shard in shards:
        _check_shard_name(shard)
    reader: TensorReader = (
        tensors_from_safetensors if format_name == "safetensors" else _torch_tensor_reader()
    )
    merged: dict[str, TensorInfo] = {}
    warnings: list[str] = []
    for shard in shards:
        shard_source = _open_shard(index, shard)
        try:
            tensors = reader(shard_source)
        except BiasInspectError as error:
            raise type(error)(f"shard {quote(shard)}: {error}") from error
        finally:
            shard_source.close()
        # One warning per kind per shard, not one per tensor: a shard that repeats another's
        # tensors may hold millions of them.
        elsewhere: list[str] = []
        repeated: list[str] = []
        for name, info in tensors.items():
            owner = weight_map.get(name)
            if owner is not None and owner != shard:
                elsewhere.append(name)
                continue
            if name in merged:
                repeated.append(name)
                continue
            if info.storage_key is not None:
                # Storage keys are per file ("0", "1"...): qualify them so shards never alias.
                info = dataclasses.replace(info, storage_key=f"{shard}:{info.storage_key}")
            merged[name] = info
        if elsewhere:
            warnings.append(
                f"shard {quote(shard)} also holds {_names_sample(elsewhere)} that the index maps to"
                " other shards; those copies were ignored"
            )
        if repeated:
            warnings.append(
                f"shard {quote(shard)} repeats {_names_sample(repeated)} already read from an earlier"
                " shard; the first copies were kept"
            )
    for name, shard in weight_map.items():
        if name not in merged:
            raise MalformedModelError(
                f"tensor {quote(name)} is listed for shard {quote(shard)} but is not in it"
            )
    description = describe_state_dict(
        merged,
        path=index.name,
        format=format_name,
        warnings=warnings,
        registration_order=format_name == "pytorch",
    )
    return [description]
