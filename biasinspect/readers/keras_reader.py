"""Keras reader: Keras 3 ``.keras`` archives and legacy ``.h5`` files, from shapes only.

* **Keras 3** ``.keras``: a zip of ``config.json`` (the layer graph), ``metadata.json`` and
  ``model.weights.h5``.  The weights file stores each layer's variables by position under a path
  of auto-generated names (``layers/conv2d_1/vars/0``); the ``vars`` group's ``name`` attribute
  gives the layer's real name, so variables are matched to the config by name path (nested
  models included), and positions mapped per layer class (``kernel, bias``; SeparableConv:
  ``depthwise_kernel, pointwise_kernel, bias``).
* **Legacy** ``.h5`` (``model.save(..., save_format="h5")`` and ``save_weights``): the
  ``model_config`` attribute (JSON), ``layer_names`` and each layer group's ``weight_names``,
  with datasets named after the variables.

The HDF5 part is parsed by h5py in a child process (:mod:`biasinspect.readers.h5_isolated`); only
dataset shapes and dtypes and string attributes come back, never a dataset's values.  Nothing from
the file is deserialized as Keras objects or run.

Layers: ``Conv1D/2D/3D``, ``Conv1D/2D/3DTranspose``, ``DepthwiseConv1D/2D``,
``SeparableConv1D/2D`` (two convs: depthwise, then pointwise with the bias) and Keras 2's
``LocallyConnected1D/2D`` (untied: bias ``[out_rows, out_cols, filters]``, a filter per output
location; kernel layouts of ``implementation`` 1, 2 and 3 are understood).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biasinspect.errors import BiasInspectError, MalformedModelError, UnsupportedFormatError
from biasinspect.limits import MAX_JSON_BYTES
from biasinspect.model import BiasSource, BiasTerm, ConvNode, MaybeShape, ModelDescription, Shape
from biasinspect.source import ByteSource

FORMAT = "keras"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KERAS_WEIGHTS_MEMBER = "model.weights.h5"
MAX_H5_IN_MEMORY_BYTES = 256 * 1024 * 1024
"""Largest deflated ``model.weights.h5`` (or non-local HDF5 file) inflated for the parser."""
MAX_CONFIG_DEPTH = 64
"""Deepest nesting of models inside models followed in a config."""
MAX_CONFIG_LAYERS = 1_000_000

_NORMS = frozenset(
    {
        "BatchNormalization",
        "SyncBatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
    }
)
_MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
_PARAMETER_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16", "int8", "int4", "uint8"})
"""Variable dtypes model_params counts (floating, and quantized int8/int4 kernels); integer
states (seed generators, step counters) are not parameters."""

_CONV = "conv"
_TRANSPOSE = "transpose"
_DEPTHWISE = "depthwise"
_SEPARABLE = "separable"
_LOCAL = "local"


def _layer_kind(class_name: str) -> tuple[str, int] | None:
    """(kind, spatial rank) of a conv layer class name, or None."""
    name = class_name.split(">")[-1].split(".")[-1]
    table = {
        "Conv1D": (_CONV, 1),
        "Conv2D": (_CONV, 2),
        "Conv3D": (_CONV, 3),
        "Convolution1D": (_CONV, 1),
        "Convolution2D": (_CONV, 2),
        "Convolution3D": (_CONV, 3),
        "Conv1DTranspose": (_TRANSPOSE, 1),
        "Conv2DTranspose": (_TRANSPOSE, 2),
        "Conv3DTranspose": (_TRANSPOSE, 3),
        "Convolution2DTranspose": (_TRANSPOSE, 2),
        "Convolution3DTranspose": (_TRANSPOSE, 3),
        "Deconvolution2D": (_TRANSPOSE, 2),
        "Deconvolution3D": (_TRANSPOSE, 3),
        "DepthwiseConv1D": (_DEPTHWISE, 1),
        "DepthwiseConv2D": (_DEPTHWISE, 2),
        "SeparableConv1D": (_SEPARABLE, 1),
        "SeparableConv2D": (_SEPARABLE, 2),
        "SeparableConvolution1D": (_SEPARABLE, 1),
        "SeparableConvolution2D": (_SEPARABLE, 2),
        "LocallyConnected1D": (_LOCAL, 1),
        "LocallyConnected2D": (_LOCAL, 2),
    }
    return table.get(name)


_POSITIONS = {
    _CONV: ("kernel", "bias"),
    _TRANSPOSE: ("kernel", "bias"),
    _DEPTHWISE: ("depthwise_kernel", "bias"),
    _SEPARABLE: ("depthwise_kernel", "pointwise_kernel", "bias"),
    _LOCAL: ("kernel", "bias"),
}
"""Keras 3 stores variables by position: the names, in order, per kind (bias last, optional)."""


def sniff_hdf5(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) starts with the HDF5 signature."""
    return head.startswith(HDF5_SIGNATURE)


def is_keras_archive(path: Path) -> bool:
    """Whether a zip file is a Keras 3 ``.keras`` archive (``config.json`` plus the weights file
    or ``metadata.json`` at its top); reads the central directory only."""
    from biasinspect.readers.safe_zip import SafeZip

    try:
        with SafeZip(path) as archive:
            names = set(archive.names())
    except BiasInspectError:
        return False
    return "config.json" in names and (KERAS_WEIGHTS_MEMBER in names or "metadata.json" in names)


@dataclass(frozen=True)
class _Variable:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Layer:
    path: tuple[str, ...]
    class_name: str
    config: dict[str, Any]
    build_shape: MaybeShape
    followed_by: str | None


def read_keras_archive(source: ByteSource) -> list[ModelDescription]:
    """Read a Keras 3 ``.keras`` zip archive into one :class:`ModelDescription`."""
    from biasinspect.readers.h5_isolated import describe_hdf5
    from biasinspect.readers.safe_zip import SafeZip

    path = getattr(source, "path", None)
    warnings: list[str] = []
    with SafeZip(source) as archive:
        names = set(archive.names())
        if "config.json" not in names:
            raise MalformedModelError("Keras archive has no config.json")
        config = _json(archive.read("config.json", MAX_JSON_BYTES), "config.json")
        keras_version = None
        if "metadata.json" in names:
            metadata = _json(archive.read("metadata.json", MAX_JSON_BYTES), "metadata.json")
            keras_version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        variables: dict[tuple[str, ...], dict[str, _Variable]] | None = None
        model_params: int | None = None
        if KERAS_WEIGHTS_MEMBER in names:
            span = archive.stored_span(KERAS_WEIGHTS_MEMBER)
            if span is not None and isinstance(path, Path):  # the parser child opens the file itself
                structure = describe_hdf5(path, offset=span[0], length=span[1])
            else:
                structure = describe_hdf5(data=archive.read(KERAS_WEIGHTS_MEMBER, MAX_H5_IN_MEMORY_BYTES))
            by_position = _keras3_variables(structure)
            model_params = _count_params(structure, exclude=("optimizer",))
        else:
            by_position = None
            warnings.append(f"archive has no {KERAS_WEIGHTS_MEMBER}: shapes come from the config alone")
    layers = list(_walk_config(config))
    if by_position is not None:
        variables = {layer.path: _name_positions(layer, by_position.get(layer.path, {})) for layer in layers}
    convs = _describe_layers(layers, variables, warnings)
    if keras_version is not None and not str(keras_version).startswith("3"):
        warnings.append(f"archive written by Keras {keras_version}; read with the Keras 3 layout")
    return [
        ModelDescription(
            path=source.name,
            format=FORMAT,
            convs=tuple(convs),
            model_params=model_params,
            warnings=tuple(warnings),
        )
    ]


def read_keras_h5(source: ByteSource) -> list[ModelDescription]:
    """Read a legacy Keras HDF5 file (a whole model or weights only) into one description."""
    from biasinspect.readers.h5_isolated import describe_hdf5

    path = getattr(source, "path", None)
    if isinstance(path, Path):
        structure = describe_hdf5(path, offset=0, length=source.size)
    else:
        if source.size > MAX_H5_IN_MEMORY_BYTES:
            raise UnsupportedFormatError(
                f"a remote HDF5 file is fetched only up to {MAX_H5_IN_MEMORY_BYTES:,} bytes "
                f"(this one has {source.size:,}): libhdf5 needs the whole file"
            )
        structure = describe_hdf5(data=source.read_at(0, source.size))
    attrs: dict[str, dict[str, Any]] = structure.get("attrs", {})
    warnings: list[str] = []
    root = attrs.get("", {})
    weights_root = "model_weights" if "model_weights" in attrs else ""
    if "layer_names" not in attrs.get(weights_root, {}) and not any(
        key.startswith("layer_names") for key in attrs.get(weights_root, {})
    ):
        if _keras3_variables(structure):
            raise UnsupportedFormatError(
                "a Keras 3 weights file (model.weights.h5) holds no layer config: read the .keras archive"
            )
        raise UnsupportedFormatError("HDF5 file is not a Keras model (no layer_names attribute)")
    legacy = _legacy_variables(structure, weights_root)
    config_text = root.get("model_config")
    if isinstance(config_text, str):
        config = _json(config_text, "model_config")
        layers = list(_walk_config(config))
    else:
        warnings.append("weights-only HDF5 file (no model_config): layer classes inferred from weight names")
        layers = _layers_from_weights(legacy)
    variables = {layer.path: _legacy_lookup(legacy, layer.path) for layer in layers if layer.path}
    convs = _describe_layers(layers, variables, warnings)
    model_params = _count_params(structure, exclude=("optimizer_weights",), root=weights_root)
    return [
        ModelDescription(
            path=source.name,
            format=FORMAT,
            convs=tuple(convs),
            model_params=model_params,
            warnings=tuple(warnings),
        )
    ]


def _json(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise MalformedModelError(f"{what} is not valid JSON: {error}") from error


# -- variables ------------------------------------------------------------------------------------


def _datasets(structure: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    for entry in structure.get("datasets", []):
        if isinstance(entry, list) and len(entry) == 3:
            path, shape, dtype = entry
            yield str(path), tuple(int(dim) for dim in shape), str(dtype)


def _keras3_variables(structure: dict[str, Any]) -> dict[tuple[str, ...], dict[int, _Variable]]:
    """Name path -> {position: variable} for a Keras 3 weights file."""
    attrs: dict[str, dict[str, Any]] = structure.get("attrs", {})
    found: dict[tuple[str, ...], dict[int, _Variable]] = {}
    for path, shape, dtype in _datasets(structure):
        parts = path.split("/")
        if len(parts) < 2 or parts[-2] != "vars" or not parts[-1].isdigit():
            continue
        owner = parts[:-2]
        names: list[str] = []
        for end in range(1, len(owner) + 1):
            group = "/".join(owner[:end]) + "/vars"
            name = attrs.get(group, {}).get("name")
            if isinstance(name, str):
                names.append(name)
        if not names or names == []:
            continue
        found.setdefault(tuple(names), {})[int(parts[-1])] = _Variable(shape, dtype)
    return found


def _name_positions(layer: _Layer, by_position: dict[int, _Variable]) -> dict[str, _Variable]:
    kind = _layer_kind(layer.class_name)
    if kind is None:
        return {}
    names = list(_POSITIONS[kind[0]])
    if not layer.config.get("use_bias", True):
        names.remove("bias")
    return {names[index]: variable for index, variable in by_position.items() if index < len(names)}


def _legacy_variables(structure: dict[str, Any], root: str) -> dict[tuple[str, str], dict[str, _Variable]]:
    """(top layer, sublayer) -> {variable: shape} from a legacy file's weight names."""
    attrs: dict[str, dict[str, Any]] = structure.get("attrs", {})
    shapes = {path: _Variable(shape, dtype) for path, shape, dtype in _datasets(structure)}
    found: dict[tuple[str, str], dict[str, _Variable]] = {}
    prefix = f"{root}/" if root else ""
    for group, values in attrs.items():
        if not group.startswith(prefix) or "/" in group[len(prefix) :]:
            continue
        top = group[len(prefix) :]
        weight_names = _joined_list(values, "weight_names")
        for weight_name in weight_names:
            variable = shapes.get(f"{group}/{weight_name}")
            if variable is None:
                continue
            parts = weight_name.split("/")
            base = parts[-1].split(":")[0]
            sublayer = parts[-2] if len(parts) >= 2 else top
            found.setdefault((top, sublayer), {})[base] = variable
    return found


def _legacy_lookup(
    legacy: dict[tuple[str, str], dict[str, _Variable]], path: tuple[str, ...]
) -> dict[str, _Variable]:
    """A layer's variables: a top-level layer owns its whole group (old Keras names the inner
    folder ``conv2d_1_1``, not ``conv2d_1``); a nested one is found by its own name, or by that
    name with a ``_N`` suffix."""
    top, leaf = path[0], path[-1]
    if len(path) == 1:
        merged: dict[str, _Variable] = {}
        for (group, _sublayer), variables in legacy.items():
            if group == top:
                merged.update(variables)
        return merged
    exact = legacy.get((top, leaf))
    if exact is not None:
        return exact
    for (group, sublayer), variables in legacy.items():
        if group == top and sublayer.startswith(leaf + "_") and sublayer[len(leaf) + 1 :].isdigit():
            return variables
    return {}


def _joined_list(values: dict[str, Any], key: str) -> list[str]:
    """An attribute list Keras may split into ``key0``, ``key1``... when it exceeds 64 KB."""
    if key in values:
        value = values[key]
        return [str(item) for item in value] if isinstance(value, list) else []
    items: list[str] = []
    index = 0
    while f"{key}{index}" in values:
        value = values[f"{key}{index}"]
        items.extend(str(item) for item in value) if isinstance(value, list) else None
        index += 1
    return items


def _count_params(structure: dict[str, Any], *, exclude: tuple[str, ...], root: str = "") -> int:
    total = 0
    prefix = f"{root}/" if root else ""
    for path, shape, dtype in _datasets(structure):
        if not path.startswith(prefix) or path.split("/")[0] in exclude:
            continue
        if dtype in _PARAMETER_DTYPES:
            total += math.prod(shape)
    return total


def _layers_from_weights(legacy: dict[tuple[str, str], dict[str, _Variable]]) -> list[_Layer]:
    layers: list[_Layer] = []
    for (top, sublayer), variables in legacy.items():
        if "depthwise_kernel" in variables and "pointwise_kernel" in variables:
            rank = len(variables["depthwise_kernel"].shape) - 2
            class_name = f"SeparableConv{rank}D"
        elif "depthwise_kernel" in variables:
            class_name = f"DepthwiseConv{len(variables['depthwise_kernel'].shape) - 2}D"
        elif "kernel" in variables and 3 <= len(variables["kernel"].shape) <= 5:
            class_name = f"Conv{len(variables['kernel'].shape) - 2}D"
        else:
            continue
        path = (top,) if top == sublayer else (top, sublayer)
        config = {"use_bias": "bias" in variables}
        layers.append(_Layer(path, class_name, config, None, None))
    return layers


# -- config ---------------------------------------------------------------------------------------


def _walk_config(config: Any) -> Iterator[_Layer]:
    """Every layer of a model config, nested models flattened, with its name path."""
    if not isinstance(config, dict):
        raise MalformedModelError("Keras config is not a JSON object")
    budget = [0]
    yield from _walk_model(config, (), 0, budget)


def _walk_model(
    model: dict[str, Any], prefix: tuple[str, ...], depth: int, budget: list[int]
) -> Iterator[_Layer]:
    if depth > MAX_CONFIG_DEPTH:
        raise MalformedModelError(f"Keras config nests models more than {MAX_CONFIG_DEPTH} deep")
    inner = model.get("config")
    entries = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(entries, list):
        return
    sequential = str(model.get("class_name", "")).endswith("Sequential")
    named = [entry for entry in entries if isinstance(entry, dict)]
    consumers = _consumers(named, sequential)
    # Legacy configs record no per-layer input shapes: propagate them from the inputs through
    # the layers whose output shape is known from their config (convs, pools, paddings, ...).
    shapes: dict[str, MaybeShape] = {}
    previous: MaybeShape = _ints_shape(inner.get("build_input_shape")) if isinstance(inner, dict) else None
    for entry in named:
        budget[0] += 1
        if budget[0] > MAX_CONFIG_LAYERS:
            raise MalformedModelError(f"Keras config has more than {MAX_CONFIG_LAYERS:,} layers")
        layer_config = entry.get("config")
        if not isinstance(layer_config, dict):
            continue
        name = entry.get("name", layer_config.get("name"))
        if not isinstance(name, str):
            continue
        class_name = str(entry.get("class_name", ""))
        path = (*prefix, name)
        input_shape = _build_shape(entry)
        if input_shape is None:
            if sequential:
                input_shape = previous
            else:
                sources = list(dict.fromkeys(_referenced(entry.get("inbound_nodes"), 0)))
                input_shape = _merged_shape(
                    [shapes.get(source) for source in sources], class_name, layer_config
                )
        if input_shape is None:
            input_shape = _ints_shape(
                layer_config.get("batch_input_shape") or layer_config.get("batch_shape")
            )
        if class_name in _MODEL_CLASSES or isinstance(layer_config.get("layers"), list):
            yield from _walk_model(entry, path, depth + 1, budget)
            shapes[name] = previous = None
            continue
        follower = None
        next_layers = consumers.get(name, [])
        if len(next_layers) == 1 and next_layers[0] in _NORMS:
            follower = next_layers[0]
        layer = _Layer(path, class_name, layer_config, input_shape, follower)
        shapes[name] = previous = _output_shape(layer)
        yield layer


def _merged_shape(inputs: list[MaybeShape], class_name: str, config: dict[str, Any]) -> MaybeShape:
    """The shape a layer sees from its inputs: one input as is; several (Add, Concatenate) only
    when all are known and agree (Concatenate: the channel extents are summed)."""
    if not inputs or any(shape is None for shape in inputs):
        return None
    known = [shape for shape in inputs if shape is not None]
    if len(known) == 1:
        return known[0]
    if class_name == "Concatenate" and config.get("axis", -1) == -1:
        if len({shape[:-1] for shape in known}) != 1 or any(shape[-1] is None for shape in known):
            return None
        return (*known[0][:-1], sum(shape[-1] or 0 for shape in known))
    return known[0] if len(set(known)) == 1 else None


_SHAPE_KEEPING = frozenset(
    {
        "InputLayer", "BatchNormalization", "SyncBatchNormalization", "LayerNormalization",
        "GroupNormalization", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "ThresholdedReLU",
        "Softmax", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
        "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Add",
        "Subtract", "Multiply", "Average", "Maximum", "Minimum",
    }
)  # fmt: skip


def _ints_shape(value: Any) -> MaybeShape:
    if not isinstance(value, list) or not all(dim is None or isinstance(dim, int) for dim in value):
        return None
    return tuple(dim if dim is None or dim >= 0 else None for dim in value)


def _output_shape(layer: _Layer) -> MaybeShape:
    """A layer's output shape (batch included) from its input shape and config, when known."""
    shape = layer.build_shape
    if shape is None or len(shape) < 2:
        return None
    config = layer.config
    name = layer.class_name
    if name in _SHAPE_KEEPING or name == "Concatenate":
        return shape
    channels_first = config.get("data_format") == "channels_first"
    rank = len(shape) - 2
    kind = _layer_kind(name)
    if kind is not None:
        spatial = _output_spatial(layer, kind[0], kind[1])
        if spatial is None:
            return None
        if kind[0] == _DEPTHWISE:
            channels = shape[1] if channels_first else shape[-1]
            multiplier = config.get("depth_multiplier", 1)
            filters = None if channels is None or not isinstance(multiplier, int) else channels * multiplier
        else:
            filters = config.get("filters") if isinstance(config.get("filters"), int) else None
        return (shape[0], filters, *spatial) if channels_first else (shape[0], *spatial, filters)
    spatial = shape[2:] if channels_first else shape[1:-1]
    channels = shape[1] if channels_first else shape[-1]
    if "Pooling" in name and not name.startswith("Global"):
        size = _ints(config.get("pool_size"), rank)
        strides = _ints(config.get("strides") or config.get("pool_size"), rank)
        padding = config.get("padding", "valid")
        if size is None or strides is None:
            return None
        out: list[int | None] = []
        for extent, window, stride in zip(spatial, size, strides, strict=False):
            if extent is None or stride <= 0:
                out.append(None)
            elif padding == "same":
                out.append(-(-extent // stride))
            else:
                out.append((extent - window) // stride + 1 if extent >= window else None)
    elif name.startswith("ZeroPadding"):
        padding = config.get("padding")
        pads: list[tuple[int, int]] = []
        for axis in range(rank):
            value = padding[axis] if isinstance(padding, list) and len(padding) == rank else padding
            if isinstance(value, int):
                pads.append((value, value))
            elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
                pads.append((value[0], value[1]))
            else:
                return None
        out = [
            None if extent is None else extent + low + high
            for extent, (low, high) in zip(spatial, pads, strict=False)
        ]
    elif name.startswith("UpSampling"):
        size = _ints(config.get("size"), rank)
        if size is None:
            return None
        out = [
            None if extent is None else extent * factor for extent, factor in zip(spatial, size, strict=False)
        ]
    else:
        return None
    return (shape[0], channels, *out) if channels_first else (shape[0], *out, channels)


def _build_shape(entry: dict[str, Any]) -> MaybeShape:
    build = entry.get("build_config")
    shape = build.get("input_shape") if isinstance(build, dict) else None
    if not isinstance(shape, list) or not all(dim is None or isinstance(dim, int) for dim in shape):
        return None
    return tuple(dim if dim is None or dim >= 0 else None for dim in shape)


def _consumers(entries: list[dict[str, Any]], sequential: bool) -> dict[str, list[str]]:
    """Layer name -> class names of the layers that take its output (in this model)."""
    classes = {}
    for entry in entries:
        config = entry.get("config")
        name = entry.get("name", config.get("name") if isinstance(config, dict) else None)
        if isinstance(name, str):
            classes[name] = str(entry.get("class_name", ""))
    found: dict[str, list[str]] = {}
    if sequential:
        ordered = [name for name, cls in classes.items() if cls != "InputLayer"]
        for current, after in itertools.pairwise(ordered):
            found.setdefault(current, []).append(classes[after])
        return found
    for entry in entries:
        config = entry.get("config")
        name = entry.get("name", config.get("name") if isinstance(config, dict) else None)
        if not isinstance(name, str):
            continue
        for source in set(_referenced(entry.get("inbound_nodes"), 0)):
            if source in classes:
                found.setdefault(source, []).append(classes[name])
    return found


def _referenced(value: Any, depth: int) -> Iterator[str]:
    """Layer names an ``inbound_nodes`` value refers to (Keras 3 ``keras_history`` or the legacy
    ``[name, node_index, tensor_index, kwargs]`` lists)."""
    if depth > 32:
        return
    if isinstance(value, dict):
        history = value.get("keras_history")
        if isinstance(history, list) and history and isinstance(history[0], str):
            yield history[0]
            return
        for item in value.values():
            yield from _referenced(item, depth + 1)
    elif isinstance(value, list):
        if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
            yield value[0]
            return
        for item in value:
            yield from _referenced(item, depth + 1)


# -- layers -> convs ------------------------------------------------------------------------------


def _ints(value: Any, rank: int) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * rank
    if isinstance(value, list) and len(value) == rank and all(isinstance(item, int) for item in value):
        return tuple(value)
    return None


def _describe_layers(
    layers: list[_Layer], variables: dict[tuple[str, ...], dict[str, _Variable]] | None, warnings: list[str]
) -> list[ConvNode]:
    convs: list[ConvNode] = []
    for layer in layers:
        kind = _layer_kind(layer.class_name)
        if kind is None:
            continue
        found = None if variables is None else variables.get(layer.path, {})
        convs.extend(_layer_convs(layer, kind[0], kind[1], found, warnings))
    return convs


def _shape(found: dict[str, _Variable] | None, key: str) -> tuple[int, ...] | None:
    if found is None or key not in found:
        return None
    return found[key].shape


def _layer_convs(
    layer: _Layer, kind: str, rank: int, found: dict[str, _Variable] | None, warnings: list[str]
) -> list[ConvNode]:
    name = "/".join(layer.path)
    config = layer.config
    use_bias = bool(config.get("use_bias", True))
    channels_first = config.get("data_format") == "channels_first"
    bias_shape = _shape(found, "bias")
    if found is not None and use_bias and bias_shape is None:
        warnings.append(f"{name}: use_bias is set but no bias variable is stored")
    bias_terms: tuple[BiasTerm, ...] = ()
    if bias_shape is not None:
        bias_terms = (BiasTerm(f"{name}/bias", bias_shape, BiasSource.CONV),)
    output = _output_spatial(layer, kind, rank)
    common = {"output_spatial": output}
    if kind == _LOCAL:
        return [_locally_connected(layer, name, rank, found, bias_shape, channels_first)]
    if kind == _SEPARABLE:
        depthwise = _shape(found, "depthwise_kernel")
        pointwise = _shape(found, "pointwise_kernel")
        depth_weight, depth_groups = _depthwise_layout(depthwise, rank)
        point_weight: MaybeShape = None
        if pointwise is not None and len(pointwise) == rank + 2:
            point_weight = (pointwise[-1], pointwise[-2], *pointwise[:-2])
        return [
            ConvNode(
                name=f"{name}/depthwise",
                op=f"{layer.class_name} (depthwise)",
                weight_name=f"{name}/depthwise_kernel",
                weight_shape=depth_weight,
                transposed=False,
                groups=depth_groups,
                kernel_shape=_ints(config.get("kernel_size"), rank),
                output_spatial=output,
                followed_by=None,
            ),
            ConvNode(
                name=f"{name}/pointwise",
                op=f"{layer.class_name} (pointwise)",
                weight_name=f"{name}/pointwise_kernel",
                weight_shape=point_weight,
                transposed=False,
                groups=1,
                kernel_shape=(1,) * rank,
                output_spatial=output,
                bias_terms=bias_terms,
                followed_by=layer.followed_by,
            ),
        ]
    kernel = _shape(found, "depthwise_kernel" if kind == _DEPTHWISE else "kernel")
    if kind == _DEPTHWISE and kernel is None:
        kernel = _shape(found, "kernel")
    weight: MaybeShape = None
    groups: int | None = None
    notes: tuple[str, ...] = ()
    if kernel is not None and len(kernel) != rank + 2:
        notes = (f"kernel shape {list(kernel)} does not fit {layer.class_name}",)
        kernel = None
    if kind == _DEPTHWISE:
        weight, groups = _depthwise_layout(kernel, rank)
    elif kernel is not None and kind == _CONV:
        weight = (kernel[-1], kernel[-2], *kernel[:-2])
        configured = config.get("groups", 1)
        groups = configured if isinstance(configured, int) and configured > 0 else None
    elif kernel is not None:
        weight = (kernel[-1], kernel[-2], *kernel[:-2])
        groups = 1
    return [
        ConvNode(
            name=name,
            op=layer.class_name,
            weight_name=f"{name}/kernel",
            weight_shape=weight,
            transposed=kind == _TRANSPOSE,
            groups=groups,
            kernel_shape=_ints(config.get("kernel_size"), rank) if weight is None else None,
            bias_terms=bias_terms,
            followed_by=layer.followed_by if not bias_terms else None,
            notes=notes,
            **common,
        )
    ]


def _depthwise_layout(kernel: tuple[int, ...] | None, rank: int) -> tuple[MaybeShape, int | None]:
    """Keras ``[*k, C_in, multiplier]`` -> ``[C_in * multiplier, 1, *k]`` with groups C_in."""
    if kernel is None or len(kernel) != rank + 2:
        return None, None
    channels, multiplier = kernel[-2], kernel[-1]
    return (channels * multiplier, 1, *kernel[:-2]), channels


def _locally_connected(
    layer: _Layer,
    name: str,
    rank: int,
    found: dict[str, _Variable] | None,
    bias_shape: tuple[int, ...] | None,
    channels_first: bool,
) -> ConvNode:
    """A LocallyConnected layer: a distinct filter per output location, an untied bias."""
    config = layer.config
    filters = config.get("filters") if isinstance(config.get("filters"), int) else None
    kernel_size = _ints(config.get("kernel_size"), rank)
    implementation = config.get("implementation", 1)
    kernel = _shape(found, "kernel")
    locations: tuple[int, ...] | None = None
    if bias_shape is not None and len(bias_shape) == rank + 1:
        locations = bias_shape[1:] if channels_first else bias_shape[:-1]
        filters = bias_shape[0] if channels_first else bias_shape[-1]
    in_channels: int | None = None
    if kernel is not None and kernel_size is not None:
        window = math.prod(kernel_size)
        if implementation == 1 and len(kernel) == 3 and window and kernel[1] % window == 0:
            in_channels = kernel[1] // window
            if locations is None and rank == 1:
                locations = (kernel[0],)
            filters = kernel[2]
        elif implementation == 2 and len(kernel) == 2 * rank + 2:
            # channels_last: [*in, C_in, *out, F]; channels_first: [C_in, *in, F, *out]
            if channels_first:
                in_channels, filters = kernel[0], kernel[rank + 1]
                locations = locations or tuple(kernel[rank + 2 :])
            else:
                in_channels, filters = kernel[rank], kernel[-1]
                locations = locations or tuple(kernel[rank + 1 : -1])
        elif implementation == 3 and len(kernel) == 1 and locations is not None and filters:
            per_input = math.prod(locations) * filters * window
            if per_input and kernel[0] % per_input == 0:
                in_channels = kernel[0] // per_input
    if locations is None:
        locations_shape: MaybeShape = _output_spatial(layer, _LOCAL, rank)
    else:
        locations_shape = locations
    weight: MaybeShape = None
    if kernel_size is not None:
        weight = (filters, in_channels, *kernel_size)
    terms: tuple[BiasTerm, ...] = ()
    if bias_shape is not None:
        aligned = bias_shape if channels_first else (bias_shape[-1], *bias_shape[:-1])
        terms = (BiasTerm(f"{name}/bias", aligned, BiasSource.CONV),)
    return ConvNode(
        name=name,
        op=layer.class_name,
        weight_name=f"{name}/kernel",
        weight_shape=weight,
        transposed=False,
        groups=1,
        kernel_shape=kernel_size,
        output_spatial=locations_shape,
        bias_terms=terms,
        followed_by=layer.followed_by if not terms else None,
        weight_locations=locations_shape if locations_shape is not None else (None,) * rank,
    )


def _output_spatial(layer: _Layer, kind: str, rank: int) -> MaybeShape:
    """Output extents from the layer's build input shape (Keras 3 ``build_config``) and config."""
    shape = layer.build_shape
    if shape is None or len(shape) != rank + 2:
        return None
    config = layer.config
    spatial = shape[2:] if config.get("data_format") == "channels_first" else shape[1:-1]
    kernel = _ints(config.get("kernel_size"), rank)
    strides = _ints(config.get("strides", 1), rank)
    dilation = _ints(config.get("dilation_rate", 1), rank)
    padding = config.get("padding", "valid")
    if kernel is None or strides is None or dilation is None or not isinstance(padding, str):
        return None
    output_padding = _ints(config.get("output_padding"), rank) if config.get("output_padding") else None
    result: list[int | None] = []
    for axis, size in enumerate(spatial):
        if size is None:
            result.append(None)
            continue
        effective = dilation[axis] * (kernel[axis] - 1) + 1
        stride = strides[axis]
        if kind == _TRANSPOSE:
            result.append(_transposed_length(size, effective, stride, padding, output_padding, axis))
        elif padding in ("same", "causal"):
            result.append(-(-size // stride))
        elif padding == "valid":
            result.append((size - effective) // stride + 1 if size >= effective else None)
        else:
            result.append(None)
    return tuple(result)


def _transposed_length(
    size: int, kernel: int, stride: int, padding: str, output_padding: Shape | None, axis: int
) -> int | None:
    if output_padding is None:
        if padding == "valid":
            return size * stride + max(kernel - stride, 0)
        if padding == "same":
            return size * stride
        return None
    pad = {"same": kernel // 2, "valid": 0}.get(padding)
    extra = output_padding[axis]
    if pad is None or extra is None:
        return None
    return (size - 1) * stride + kernel - 2 * pad + extra


__all__ = ["FORMAT", "is_keras_archive", "read_keras_archive", "read_keras_h5", "sniff_hdf5"]
