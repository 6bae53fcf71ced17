"""PyTorch checkpoints without torch: zip (``torch.save``), TorchScript, torch.export, legacy and
plain pickles.

Nothing here imports torch or runs anything from the file.  Pickles are interpreted by
:mod:`biasinspect.readers.pickle_inert`; zips are read through
:class:`~biasinspect.readers.safe_zip.SafeZip`, and only the pickles and code text are
decompressed -- tensor storages (``<prefix>/data/<key>``) are never read, only their presence and
declared sizes are checked.

Where the weights are
    The unpickled object is searched (iteratively, depth-capped, each object once) for weight
    sets: a pickled ``nn.Module`` (described from its module tree) or a dict whose values are
    mostly tensors (a state dict, described by
    :func:`~biasinspect.readers.state_dict.describe_state_dict`).  The search does not descend
    into optimizer state (keys containing ``optim``, ``scheduler``, ``scaler``; dicts with
    ``state`` + ``param_groups``).  Each distinct weight set is reported once (two sets over the
    same tensors are one), with ``location`` naming where it was found (``state_dict``,
    ``model``, ``ema``, ``models[0]``...; ``None`` for the root object).
"""

from __future__ import annotations

import dataclasses

from biasinspect import limits
from biasinspect.errors import (
    BiasInspectError,
    MalformedModelError,
    UnsupportedFormatError,
)
from biasinspect.model import ModelDescription
from biasinspect.readers.archive import Archive
from biasinspect.readers.files import REFUSED_TAR, TAR_BLOCK, is_tar_header
from biasinspect.readers.module_tree import (
    ModuleNode,
    describe_module_tree,
    is_module_object,
    module_from_pickle,
)
from biasinspect.readers.pickle_inert import (
    LEGACY_MAGIC,
    Call,
    InertPickle,
    InertUnpickler,
    PDict,
    StorageRef,
    TensorRef,
    describe_value,
    guard,
    is_plain_value,
    itemsize,
    load_inert,
    tensor_of,
)
from biasinspect.readers.safe_zip import AMBIGUOUS_ZIP, SafeZip
from biasinspect.readers.tensors import TensorInfo
from biasinspect.source import ByteSource, Location, buffered, opened

__all__ = ["describe_unpickled", "read_pickle_file", "read_torch_zip", "tensors_from_torch_file"]

LEGACY_PROTOCOL_VERSION = 1001
"""The only legacy torch.save protocol version torch.load accepts."""

_OPTIMIZER_WORDS = ("optim", "scheduler", "scaler")
"""Dict keys containing these name optimizer / scheduler state, never weights."""

_MAX_NAMES_IN_WARNING = 10


# --------------------------------------------------------------------------------------------
# Public API


def read_torch_zip(location: Location) -> list[ModelDescription]:
    """Read a zip-format PyTorch file: torch.save checkpoint, TorchScript, or torch.export archive.

    A zip that is none of these raises UnsupportedFormatError.
    """
    with SafeZip(location) as archive:
        path = archive.name
        names = archive.names()
        kind, prefix = classify_zip(names)
        if kind == "torch-export":
            from biasinspect.readers.torch_export import read_torch_export

            return _with_hidden_pickles(read_torch_export(path, archive), archive, names)
        pickle = _read_data_pickle(archive, prefix)
        if kind == "torchscript":
            return _describe_torchscript(archive, prefix, pickle, path)
        return describe_unpickled(pickle, path=path, format="pytorch")


def read_pickle_file(location: Location) -> list[ModelDescription]:
    """Read a non-zip pickle file: a legacy ``torch.save`` file (format ``pytorch``) or a plain
    pickle holding tensors / state dicts (format ``pickle``).  Only pickles are read; the raw
    storages that follow them in a legacy file are never touched."""
    with opened(location) as source:
        pickle, legacy = _load_pickle_file(source)
        return describe_unpickled(pickle, path=source.name, format="pytorch" if legacy else "pickle")


def tensors_from_torch_file(location: Location) -> dict[str, TensorInfo]:
    """The flat ``name -> TensorInfo`` state dict of one checkpoint shard (zip, legacy or pickle).

    For sharded-index readers: the first weight set found is returned (a module's parameters and
    buffers under their dotted names).  MalformedModelError if the file holds no state dict.
    """
    with opened(location) as source:
        if source.read_at(0, 4) == b"PK\x03\x04":
            with SafeZip(source) as archive:
                kind, prefix = classify_zip(archive.names())
                if kind != "pytorch":
                    raise UnsupportedFormatError(f"shard is a {kind} archive, not a torch.save state dict")
                pickle = _read_data_pickle(archive, prefix)
        else:
            pickle, _legacy = _load_pickle_file(source)
    sets, _warnings = find_weight_sets(pickle.root)
    if not sets:
        raise MalformedModelError("no state dict found in the file")
    _location, obj = sets[0]
    if is_module_object(obj):
        assert isinstance(obj, Call)
        return _flatten_module(module_from_pickle(obj))
    return _state_dict_tensors(obj)


def classify_zip(names: list[str]) -> tuple[str, str]:
    """``(kind, prefix)`` of a zip's member list: kind is ``pytorch``, ``torchscript`` or
    ``torch-export``; prefix is the record folder with its trailing slash.

    UnsupportedFormatError when the zip is none of these.
    """
    name_set = set(names)
    if "serialized_exported_program.json" in name_set:
        return "torch-export", ""  # torch <= 2.2 wrote the export archive without a folder
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] in ("archive_format", "serialized_exported_program.json"):
            return "torch-export", parts[0] + "/"
        if len(parts) == 3 and parts[1] == "models" and parts[2].endswith(".json"):
            return "torch-export", parts[0] + "/"
    records = [name for name in names if _is_record_pickle(name)]
    folders = sorted({name.split("/")[0].lower() for name in records})
    if len(folders) > 1:
        # torch.load reads one record folder; which one is ambiguous, so refuse (torch does too).
        raise MalformedModelError(f"zip holds data.pkl in several top folders ({', '.join(folders[:5])})")
    for name in names:
        if (
            name.count("/") == 1
            and name.lower().endswith(_FIXED_RECORDS)
            and not name.endswith(_FIXED_RECORDS)
        ):
            # torch finds record names ignoring case; we read only exact names.
            raise MalformedModelError(
                f"zip member {name!r} is a torch record name in other letter case; {AMBIGUOUS_ZIP}"
            )
    if folders:
        prefix = records[0].split("/")[0] + "/"
        if prefix + "constants.pkl" in name_set or any(n.startswith(prefix + "code/") for n in names):
            return "torchscript", prefix
        return "pytorch", prefix
    raise UnsupportedFormatError(
        "zip archive is not a PyTorch checkpoint, TorchScript or torch.export archive (no data.pkl)"
    )


_FIXED_RECORDS = ("/data.pkl", "/constants.pkl")
"""Records torch reads by a fixed name (and finds ignoring letter case)."""


def _is_record_pickle(name: str) -> bool:
    """``<folder>/data.pkl``: the pickle of a torch.save record folder, which torch.load reads
    (torch's zip reader matches names ignoring ASCII case)."""
    return name.count("/") == 1 and name.lower().endswith("/data.pkl")


def _with_hidden_pickles(
    descriptions: list[ModelDescription], archive: SafeZip, names: list[str]
) -> list[ModelDescription]:
    """Merge what any ``data.pkl`` of a torch.export archive references into its descriptions.

    torch.export archives have no pickle, but ``torch.load`` on the same file would unpickle a
    ``<prefix>/data.pkl`` planted in it (running whatever it names): read such members inertly
    and report their unsafe / unknown globals on every description.
    """
    hidden = [name for name in names if name == "data.pkl" or _is_record_pickle(name)]
    if not hidden:
        return descriptions
    warnings: list[str] = []
    unsafe: set[str] = set()
    for member in hidden:
        pickle = load_inert(archive.read(member, limits.MAX_PICKLE_BYTES))
        found_warnings, found_unsafe = _pickle_warnings(pickle)
        warnings.append(f"torch.export archive also holds {member!r}, which torch.load would unpickle")
        warnings.extend(found_warnings)
        unsafe.update(found_unsafe)
    return [
        dataclasses.replace(
            description,
            warnings=(*description.warnings, *warnings),
            unsafe_callables=tuple(sorted(unsafe.union(description.unsafe_callables))),
        )
        for description in descriptions
    ]


# --------------------------------------------------------------------------------------------
# Reading pickles


def _read_data_pickle(archive: SafeZip, prefix: str) -> InertPickle:
    member = prefix + "data.pkl"
    data = archive.read(member, limits.MAX_PICKLE_BYTES)
    pickle = load_inert(data)
    _check_storages(archive, prefix, pickle.storages)
    return pickle


def _check_storages(archive: Archive, prefix: str, storages: list[StorageRef]) -> None:
    """Every storage the pickle names must exist and be large enough (sizes only, never read)."""
    names = set(archive.names())
    for storage in storages:
        member = f"{prefix}data/{storage.key}"
        if member not in names:
            raise MalformedModelError(f"tensor storage {member!r} is missing from the archive")
        size = itemsize(storage.dtype or "")
        if size is not None and storage.numel is not None and storage.numel * size > archive.size(member):
            raise MalformedModelError(
                f"tensor storage {member!r} holds {archive.size(member):,} bytes but the pickle "
                f"declares {storage.numel * size:,}"
            )


def _load_pickle_file(source: ByteSource) -> tuple[InertPickle, bool]:
    """Interpret a pickle file; ``(pickle, is_legacy_torch_save)``.

    The file is read the way ``torch.load`` reads a non-zip file: a valid tar header first means
    the legacy tar format (refused, see :data:`~biasinspect.readers.files.REFUSED_TAR`); then the
    first pickle is the legacy magic number or the whole object.  Where torch's reading could
    differ from ours, the file is refused as unsafe rather than reported clean.  Read through a
    small buffer, so that only the pickles are read (never the storages after them, beyond one
    buffer).
    """
    available = source.size
    if is_tar_header(source.read_at(0, TAR_BLOCK)):
        raise MalformedModelError(REFUSED_TAR)
    with buffered(source) as handle:
        unpickler = InertUnpickler.from_file(handle, available=available)
        first = _load_next(unpickler)
        if isinstance(first, int) and not isinstance(first, bool) and first == LEGACY_MAGIC:
            version = _load_next(unpickler)
            if version != LEGACY_PROTOCOL_VERSION:
                raise MalformedModelError(
                    f"legacy torch.save file with unsupported protocol version {describe_value(version)}"
                    + ("" if is_plain_value(version) else f"; {_COMPUTED_VALUE}")
                )
            _load_next(unpickler)  # sys_info: byte order and type sizes
            root = _load_next(unpickler)
            # The storage-keys pickle: torch.load unpickles it too, so its globals count (it is a
            # short list of strings in a real file).
            _load_next(unpickler)
            return unpickler.result(root), True
        if not is_plain_value(first) and unpickler.bytes_read < available:
            # torch.load compares the first pickle's value with the legacy magic number: a value
            # made by a call or named by a global (torch.serialization.MAGIC_NUMBER) may equal it,
            # and torch would then unpickle the bytes that follow, which we would never read.
            raise MalformedModelError(
                "the first pickle is computed (by a call or a global) and more data follows; torch.load "
                f"may take it for the legacy magic number and unpickle the rest; {_COMPUTED_VALUE}"
            )
        return unpickler.result(first), False


_COMPUTED_VALUE = "refused as unsafe: torch.load might run what was not inspected"


def _load_next(unpickler: InertUnpickler) -> object:
    """The next pickle of a file; a broken one still names the code-running callables met before
    the break (torch.load would have run them by then)."""
    try:
        return guard(unpickler.load)
    except BiasInspectError as error:
        unsafe = unpickler.result(None).unsafe_callables()
        if not unsafe:
            raise
        raise type(error)(
            f"{error}; before that point the pickle calls {_name_list(unsafe)}, which "
            "torch.load(weights_only=False) would already have run: treated as unsafe"
        ) from error


# --------------------------------------------------------------------------------------------
# Finding weight sets


def _is_optimizer_key(key: object) -> bool:
    return isinstance(key, str) and any(word in key.lower() for word in _OPTIMIZER_WORDS)


def _is_optimizer_state(obj: dict[object, object]) -> bool:
    return "state" in obj and "param_groups" in obj


def _looks_like_state_dict(obj: dict[object, object]) -> bool:
    tensors = 0
    for key, value in obj.items():
        if isinstance(key, str) and tensor_of(value) is not None:
            tensors += 1
    return tensors > 0 and tensors * 2 >= len(obj)


def _child_location(location: str | None, key: object) -> str:
    if isinstance(key, int):
        return f"{location or ''}[{key}]"
    text = key if isinstance(key, str) else "?"
    return f"{location}.{text}" if location else text


def find_weight_sets(root: object) -> tuple[list[tuple[str | None, object]], list[str]]:
    """Locate state dicts and module objects in an unpickled tree, in document order.

    Returns ``[(location, object)]`` (not yet deduplicated) and warnings.
    """
    found: list[tuple[str | None, object]] = []
    warnings: list[str] = []
    visited: set[int] = set()
    work: list[tuple[object, str | None, int]] = [(root, None, 0)]
    budget = limits.MAX_PICKLE_OBJECTS
    too_deep = False
    while work:
        obj, location, depth = work.pop()
        if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
            continue
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        budget -= 1
        if budget < 0:
            warnings.append("object tree larger than the node budget: search stopped early")
            break
        if depth > limits.MAX_CONTAINER_DEPTH:
            too_deep = True
            continue
        children: list[tuple[object, str | None]] = []
        if is_module_object(obj):
            found.append((location, obj))
            continue
        if isinstance(obj, dict):
            if _is_optimizer_state(obj):
                continue
            if _looks_like_state_dict(obj):
                found.append((location, obj))
                continue
            for key, value in obj.items():
                if not _is_optimizer_key(key):
                    children.append((value, _child_location(location, key)))
        elif isinstance(obj, (list, tuple)):
            children.extend((value, _child_location(location, i)) for i, value in enumerate(obj))
        elif isinstance(obj, Call):
            # Custom containers: look at what BUILD / SETITEM gave them, and at the arguments
            # they are rebuilt from: torch.save(torch.compile(model)) pickles the compiled
            # wrapper as OptimizedModule(model, dynamo_ctx) through __reduce__, so the model
            # itself is only an argument.
            if isinstance(obj.state, (dict, list, tuple)):
                children.append((obj.state, location))
            children.extend((value, location) for value in obj.args)
            if isinstance(obj.kwargs, dict):
                children.extend(
                    (value, _child_location(location, key))
                    for key, value in obj.kwargs.items()
                    if not _is_optimizer_key(key)
                )
            if obj.items:
                children.extend(
                    (value, _child_location(location, key))
                    for key, value in obj.items
                    if not _is_optimizer_key(key)
                )
        work.extend((value, loc, depth + 1) for value, loc in reversed(children))
    if too_deep:
        warnings.append(
            f"objects nested deeper than {limits.MAX_CONTAINER_DEPTH} levels were not searched for weights"
        )
    return found, warnings


def _state_dict_tensors(obj: object) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            tensor = tensor_of(value)
            if isinstance(key, str) and tensor is not None:
                out[key] = tensor.info
    return out


def _flatten_module(root: ModuleNode) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    work = [root]
    while work:
        node = work.pop()
        for name, tensor in [*node.params.items(), *node.buffers.items()]:
            if tensor is not None:
                out[f"{node.path}.{name}" if node.path else name] = tensor.info
        work.extend(reversed(node.children))
    return out


def _signature(obj: object, tree: ModuleNode | None = None) -> frozenset[object]:
    """Identity of a weight set: the storages/regions its tensors occupy (``tree``: the module
    tree of ``obj`` when it is a module object and the caller already built it)."""
    tensors: list[TensorRef] = []
    if is_module_object(obj):
        assert isinstance(obj, Call)
        work = [tree if tree is not None else module_from_pickle(obj)]
        while work:
            node = work.pop()
            tensors.extend(
                t for t in [*node.params.values(), *node.buffers.values(), *node.extra_params] if t
            )
            work.extend(node.children)
    elif isinstance(obj, dict):
        tensors.extend(t for t in (tensor_of(v) for v in obj.values()) if t is not None)
    keys: set[object] = set()
    for tensor in tensors:
        info = tensor.info
        if info.storage_key is not None:
            keys.add((info.storage_key, info.storage_offset, info.shape, info.dtype))
        else:
            keys.add(id(tensor))
    return frozenset(keys)


def _pickle_warnings(
    pickle: InertPickle, *, ignore_prefixes: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """(warnings, unsafe callables) about the globals a pickle references."""
    warnings: list[str] = []
    unsafe = pickle.unsafe_callables()
    if unsafe:
        warnings.append(
            "pickle references callables that run code under torch.load(weights_only=False): "
            + _name_list(unsafe)
        )
    unknown = [name for name in pickle.unknown_globals() if not name.startswith(ignore_prefixes)]
    if unknown:
        warnings.append(
            "pickle references globals outside the known-safe set (torch.load(weights_only=False) "
            "would import them): " + _name_list(unknown)
        )
    return warnings, unsafe


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_WARNING])
    more = len(names) - _MAX_NAMES_IN_WARNING
    return shown + (f" and {more} more" if more > 0 else "")


def describe_unpickled(pickle: InertPickle, *, path: str, format: str) -> list[ModelDescription]:
    """Describe every distinct weight set of an unpickled checkpoint (at least one description:
    a pickle without weights yields one empty description carrying the warnings)."""
    from biasinspect.readers.numpy_reader import describe_parameter_list, parameter_list_of
    from biasinspect.readers.state_dict import describe_state_dict

    warnings, unsafe = _pickle_warnings(pickle)
    sets, search_warnings = find_weight_sets(pickle.root)
    warnings.extend(search_warnings)
    out: list[ModelDescription] = []
    seen: dict[frozenset[object], str | None] = {}
    for location, obj in sets:
        tree = module_from_pickle(obj) if isinstance(obj, Call) and is_module_object(obj) else None
        signature = _signature(obj, tree)  # the tree is built once, for both uses
        if signature in seen:
            continue
        seen[signature] = location
        if tree is not None:
            out.append(
                describe_module_tree(
                    tree,
                    path=path,
                    format=format,
                    location=location,
                    warnings=warnings,
                    unsafe_callables=unsafe,
                )
            )
        else:
            out.append(
                describe_state_dict(
                    _state_dict_tensors(obj),
                    path=path,
                    format=format,
                    location=location,
                    warnings=warnings,
                    unsafe_callables=unsafe,
                )
            )
    if not out and (found := parameter_list_of(pickle.root)) is not None:
        arrays, location = found
        out.append(
            describe_parameter_list(
                arrays,
                path=path,
                format=format,
                location=location,
                warnings=warnings,
                unsafe_callables=unsafe,
            )
        )
    if not out:
        out.append(
            ModelDescription(
                path=path,
                format=format,
                convs=(),
                model_params=None,
                warnings=(*warnings, "no weights (state dict or module) found in the pickle"),
                unsafe_callables=tuple(unsafe),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# TorchScript


def _describe_torchscript(
    archive: SafeZip, prefix: str, pickle: InertPickle, path: str
) -> list[ModelDescription]:
    from biasinspect.readers.torchscript import module_from_torchscript, parse_code

    constants_member = prefix + "constants.pkl"
    if constants_member in archive.names():
        # torch.jit.load unpickles constants.pkl too: merge its globals (its tensors are not needed).
        constants = load_inert(archive.read(constants_member, limits.MAX_PICKLE_BYTES))
        pickle = dataclasses.replace(
            pickle,
            globals={**constants.globals, **pickle.globals},
            dynamic_calls=[*pickle.dynamic_calls, *constants.dynamic_calls],
            attribute_paths={**constants.attribute_paths, **pickle.attribute_paths},
        )
    warnings, unsafe = _pickle_warnings(pickle, ignore_prefixes=("__torch__.",))
    classes = parse_code(archive, prefix, warnings)
    root = pickle.root
    if not isinstance(root, Call) or not isinstance(root.state, dict):
        if isinstance(root, (dict, PDict)):
            return describe_unpickled(pickle, path=path, format="torchscript")
        raise MalformedModelError("TorchScript data.pkl does not hold a module object")
    tree = module_from_torchscript(root, classes, warnings)
    return [
        describe_module_tree(
            tree, path=path, format="torchscript", warnings=warnings, unsafe_callables=unsafe
        )
    ]
