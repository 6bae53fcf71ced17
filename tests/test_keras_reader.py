"""Keras reader: committed samples written by keras 3 and tf-keras, plus HDF5 files built with h5py.

h5py fixtures write datasets with a shape and no data: HDF5 allocates nothing for them, so the seed
example's 1.9 M locally connected weights cost a few KB on disk, and the reader (which reads shapes
only) sees exactly what a real file would give it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import pytest

from biasinspect.analysis import analyze
from biasinspect.api import inspect, read_file
from biasinspect.cli import main
from biasinspect.errors import BiasInspectError, MalformedModelError, UnsupportedFormatError
from biasinspect.model import BiasKind, ModelReport

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def report_of(path: Path) -> ModelReport:
    descriptions = read_file(path)
    assert len(descriptions) == 1
    assert descriptions[0].format == "keras"
    return analyze(descriptions[0])


def rows(
    report: ModelReport,
) -> list[tuple[str, str, str, int | None, int | None, int | None, str, int | None]]:
    return [
        (
            layer.name,
            layer.op,
            "x".join(str(d) for d in layer.kernel_shape or ()),
            layer.in_channels,
            layer.out_channels,
            layer.groups,
            str(layer.bias.kind),
            layer.bias.params,
        )
        for layer in report.layers
    ]


# -- samples (samples/make_format_samples.py) ----------------------------------------------------


def test_seed_sample_keras3_is_tied_with_2432_parameters():
    report = report_of(SAMPLES / "seed_tied.keras")
    (layer,) = report.layers
    assert (layer.op, layer.output_spatial, layer.formula) == ("Conv2D", (28, 28), "(3x5x5 + 1) x 32 = 2,432")
    assert report.totals.model_params == 2432


KERAS3_ZOO = [
    ("conv", "Conv2D", "3x3", 3, 4, 1, "tied", 4),
    ("inner_seq/seq_conv", "Conv2D", "3x3", 4, 4, 1, "absent", 0),
    ("inner_fn/fn_depthwise", "DepthwiseConv2D", "3x3", 4, 4, 4, "tied", 4),
    ("conv1d", "Conv1D", "5", 3, 4, 1, "tied", 4),
    ("separable/depthwise", "SeparableConv2D (depthwise)", "3x3", 4, 8, 4, "absent", 0),
    ("separable/pointwise", "SeparableConv2D (pointwise)", "1x1", 8, 5, 1, "tied", 5),
    ("conv1d_transpose", "Conv1DTranspose", "3", 4, 2, 1, "tied", 2),
    ("transpose", "Conv2DTranspose", "3x3", 5, 3, 1, "tied", 3),
    ("separable1d/depthwise", "SeparableConv1D (depthwise)", "3", 2, 2, 2, "absent", 0),
    ("separable1d/pointwise", "SeparableConv1D (pointwise)", "1", 2, 3, 1, "tied", 3),
    ("conv3d", "Conv3D", "3x3x3", 2, 3, 1, "tied", 3),
    ("same", "Conv2D", "3x3", 3, 4, 1, "tied", 4),
    ("depthwise1d", "DepthwiseConv1D", "3", 3, 3, 3, "tied", 3),
    ("conv3d_transpose", "Conv3DTranspose", "3x3x3", 3, 2, 1, "tied", 2),
]


def test_keras3_zoo_sample():
    """Every conv class of keras 3, a nested Sequential and a nested functional model: variables
    stored by position under auto-generated paths are matched to the config by name."""
    report = report_of(SAMPLES / "keras3_zoo.keras")
    assert rows(report) == KERAS3_ZOO
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["inner_seq/seq_conv"].followed_by == "BatchNormalization"
    assert by_name["separable/depthwise"].followed_by is None
    assert by_name["transpose"].weight_shape == (5, 3, 3, 3) and by_name["transpose"].transposed
    assert [layer.output_spatial for layer in report.layers] == [
        (10, 10),
        (8, 8),
        (6, 6),
        (16,),
        (4, 4),
        (4, 4),
        (18,),
        (9, 9),
        (16,),
        (16,),
        (4, 4, 4),
        (9, 9),
        (14,),
        (6, 6, 6),
    ]
    # Every variable of the weights file: conv 1,072 weights + 37 biases, BatchNormalization 4 x 4.
    assert report.totals.model_params == 1072 + 37 + 16


def test_keras3_grouped_conv_sample():
    report = report_of(SAMPLES / "grouped.keras")
    assert rows(report) == [("grouped", "Conv2D", "3x3", 4, 6, 2, "tied", 6)]
    assert report.layers[0].formula == "(2x3x3 + 1) x 6 = 114"


def test_keras3_archive_with_deflated_weights(tmp_path):
    """model.weights.h5 deflated inside the zip is inflated (capped) and parsed from memory."""
    source = zipfile.ZipFile(SAMPLES / "keras3_zoo.keras")
    target = tmp_path / "deflated.keras"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in source.namelist():
            archive.writestr(name, source.read(name))
    assert rows(report_of(target)) == KERAS3_ZOO


def test_locally_connected_sample_all_implementations():
    """tf-keras LocallyConnected2D with implementation 1, 2 and 3 and LocallyConnected1D: untied
    biases [out_rows, out_cols, filters], a filter per output location."""
    report = report_of(SAMPLES / "locally_connected.h5")
    assert rows(report) == [
        ("lc2d_impl1", "LocallyConnected2D", "3x3", 2, 3, 1, "untied", 48),
        ("lc2d_impl2", "LocallyConnected2D", "3x3", 2, 3, 1, "untied", 48),
        ("lc2d_impl3", "LocallyConnected2D", "3x3", 2, 3, 1, "untied", 48),
        ("lc1d", "LocallyConnected1D", "3", 2, 4, 1, "untied", 24),
    ]
    assert [layer.weight_params for layer in report.layers] == [864, 864, 864, 144]
    assert report.layers[0].formula == "2x3x3 x 3 x 4x4 + 3x4x4 = 912"
    assert report.layers[0].bias.shape == (3, 4, 4)
    # Stored variables: impl 1 and 3 store 864 weights, impl 2 a dense masked 6x6x2x4x4x3 = 3,456.
    assert report.totals.model_params == (864 + 48) * 2 + 3456 + 48 + 144 + 24


def test_nested_legacy_sample():
    report = report_of(SAMPLES / "nested_legacy.h5")
    assert rows(report) == [
        ("inner/inner_conv", "Conv2D", "3x3", 2, 4, 1, "absent", 0),
        ("head", "Conv2D", "1x1", 4, 2, 1, "tied", 2),
    ]
    assert report.layers[0].followed_by == "BatchNormalization"
    # Legacy files record no per-layer input shapes: they are propagated from the inputs through
    # layers of known shape; a nested model's output shape is not, so "head" stays unknown.
    assert [layer.output_spatial for layer in report.layers] == [(6, 6), None]
    assert report.totals.model_params == 72 + 16 + 10


# -- HDF5 files built with h5py ------------------------------------------------------------------


def legacy_h5(
    path: Path,
    config: dict | None,
    layers: dict[str, dict[str, tuple[int, ...]]],
    *,
    root: str = "model_weights",
) -> Path:
    """A legacy Keras HDF5 file: ``layers`` maps layer name -> {weight name: shape}."""
    with h5py.File(path, "w") as handle:
        if config is not None:
            handle.attrs["model_config"] = json.dumps(config)
            handle.attrs["keras_version"] = "2.15.0"
        group = handle.require_group(root) if root else handle
        group.attrs["layer_names"] = [name.encode() for name in layers]
        for name, weights in layers.items():
            layer_group = group.create_group(name)
            layer_group.attrs["weight_names"] = [weight.encode() for weight in weights]
            for weight, shape in weights.items():
                layer_group.create_dataset(weight, shape=shape, dtype="float32")
    return path


def sequential_config(*layers: tuple[str, dict]) -> dict:
    entries = [
        {"class_name": cls, "config": {"name": name, **cfg}}
        for cls, (name, cfg) in ((c, (n["name"], n)) for c, n in layers)
    ]
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": entries}}


def test_seed_locally_connected2d_is_untied_with_25088_biases(tmp_path):
    """The seed example: LocallyConnected2D(32, 5) on (32, 32, 3) has 32x28x28 = 25,088 biases and a
    filter of 3x5x5 per output location: 75 x 32 x 784 = 1,881,600 weights."""
    config = sequential_config(
        (
            "LocallyConnected2D",
            {"name": "lc", "filters": 32, "kernel_size": [5, 5], "implementation": 1, "use_bias": True},
        )
    )
    path = legacy_h5(
        tmp_path / "seed.h5", config, {"lc": {"lc/kernel:0": (784, 75, 32), "lc/bias:0": (28, 28, 32)}}
    )
    assert path.stat().st_size < 20_000
    report = report_of(path)
    (layer,) = report.layers
    assert layer.bias.kind is BiasKind.UNTIED
    assert (layer.bias.params, layer.bias.shape) == (25088, (32, 28, 28))
    assert layer.weight_params == 1_881_600
    assert layer.formula == "3x5x5 x 32 x 28x28 + 32x28x28 = 1,906,688"
    assert report.totals.model_params == 1_906_688


def test_seed_conv2d_is_tied_with_2432_parameters(tmp_path):
    config = sequential_config(
        ("Conv2D", {"name": "conv", "filters": 32, "kernel_size": [5, 5], "use_bias": True})
    )
    path = legacy_h5(
        tmp_path / "conv.h5", config, {"conv": {"conv/kernel:0": (5, 5, 3, 32), "conv/bias:0": (32,)}}
    )
    (layer,) = report_of(path).layers
    assert (layer.bias.kind, layer.formula) == (BiasKind.TIED, "(3x5x5 + 1) x 32 = 2,432")


def test_locally_connected_channels_first_and_without_bias(tmp_path):
    config = sequential_config(
        (
            "LocallyConnected2D",
            {
                "name": "a",
                "filters": 4,
                "kernel_size": [3, 3],
                "implementation": 2,
                "data_format": "channels_first",
            },
        ),
        (
            "LocallyConnected1D",
            {"name": "b", "filters": 2, "kernel_size": 3, "implementation": 1, "use_bias": False},
        ),
    )
    path = legacy_h5(
        tmp_path / "lc.h5",
        config,
        {
            "a": {"a/kernel:0": (2, 6, 6, 4, 4, 4), "a/bias:0": (4, 4, 4)},
            "b": {"b/kernel:0": (10, 6, 2)},
        },
    )
    report = report_of(path)
    assert rows(report) == [
        ("a", "LocallyConnected2D", "3x3", 2, 4, 1, "untied", 64),
        ("b", "LocallyConnected1D", "3", 2, 2, 1, "absent", 0),
    ]
    assert [layer.weight_params for layer in report.layers] == [2 * 9 * 4 * 16, 2 * 3 * 2 * 10]


def test_weights_only_h5_infers_classes_and_warns(tmp_path):
    path = legacy_h5(
        tmp_path / "weights.h5",
        None,
        {
            "conv": {"conv/kernel:0": (3, 3, 3, 8), "conv/bias:0": (8,)},
            "sep": {"sep/depthwise_kernel:0": (3, 3, 8, 1), "sep/pointwise_kernel:0": (1, 1, 8, 16)},
        },
        root="",
    )
    report = report_of(path)
    assert rows(report) == [
        ("conv", "Conv2D", "3x3", 3, 8, 1, "tied", 8),
        ("sep/depthwise", "SeparableConv2D (depthwise)", "3x3", 8, 8, 8, "absent", 0),
        ("sep/pointwise", "SeparableConv2D (pointwise)", "1x1", 8, 16, 1, "absent", 0),
    ]
    assert any("weights-only" in warning for warning in report.warnings)


def test_functional_followed_by_and_old_keras_folder_names(tmp_path):
    """Keras 2.0-era files name a layer's inner folder ``conv_1`` for layer ``conv``; a bias-free
    conv whose only consumer is BatchNormalization is absent, followed by it."""
    config = {
        "class_name": "Model",
        "config": {
            "name": "m",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "name": "in",
                    "config": {"name": "in", "batch_input_shape": [None, 8, 8, 3]},
                    "inbound_nodes": [],
                },
                {
                    "class_name": "Conv2D",
                    "name": "conv",
                    "config": {"name": "conv", "filters": 4, "kernel_size": [3, 3], "use_bias": False},
                    "inbound_nodes": [[["in", 0, 0, {}]]],
                },
                {
                    "class_name": "BatchNormalization",
                    "name": "bn",
                    "config": {"name": "bn"},
                    "inbound_nodes": [[["conv", 0, 0, {}]]],
                },
            ],
        },
    }
    path = legacy_h5(
        tmp_path / "old.h5",
        config,
        {
            "in": {},
            "conv": {"conv_1/kernel:0": (3, 3, 3, 4)},
            "bn": {f"bn_1/{name}:0": (4,) for name in ("gamma", "beta", "moving_mean", "moving_variance")},
        },
    )
    report = report_of(path)
    assert rows(report) == [("conv", "Conv2D", "3x3", 3, 4, 1, "absent", 0)]
    assert report.layers[0].followed_by == "BatchNormalization"
    assert report.layers[0].output_spatial == (6, 6)
    assert report.totals.model_params == 108 + 16


# -- hostile and bad input -----------------------------------------------------------------------


def test_truncated_h5_is_one_clean_line(tmp_path, capsys):
    path = tmp_path / "cut.h5"
    path.write_bytes((SAMPLES / "nested_legacy.h5").read_bytes()[:3000])
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"biasinspect: {path}: ")


def test_plain_hdf5_that_is_not_keras(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", shape=(3,), dtype="float32")
    with pytest.raises(UnsupportedFormatError, match="not a Keras model"):
        read_file(path)


def test_hard_link_cycle_and_huge_dims(tmp_path):
    """A group linked into itself (a cycle) is visited once; a dataset declaring 2**40 elements
    (never allocated) is counted from its shape alone."""
    config = sequential_config(("Conv2D", {"name": "conv", "filters": 4, "kernel_size": [3, 3]}))
    path = legacy_h5(
        tmp_path / "cycle.h5", config, {"conv": {"conv/kernel:0": (3, 3, 3, 4), "conv/bias:0": (4,)}}
    )
    with h5py.File(path, "a") as handle:
        handle["model_weights/conv/loop"] = handle["model_weights/conv"]
        handle["model_weights/conv"].create_dataset("huge", shape=(1 << 20, 1 << 20), dtype="float32")
    report = report_of(path)
    assert rows(report) == [("conv", "Conv2D", "3x3", 3, 4, 1, "tied", 4)]
    assert report.totals.model_params == 108 + 4 + (1 << 40)


def test_config_nested_too_deep_and_bad_json(tmp_path):
    config: dict = {"class_name": "Conv2D", "config": {"name": "c"}}
    for depth in range(80):
        config = {
            "class_name": "Sequential",
            "name": f"s{depth}",
            "config": {"name": f"s{depth}", "layers": [config]},
        }
    path = legacy_h5(tmp_path / "deep.h5", config, {})
    with pytest.raises(MalformedModelError, match="nests models more than 64 deep"):
        read_file(path)
    with h5py.File(path, "a") as handle:
        handle.attrs["model_config"] = "{not json"
    with pytest.raises(MalformedModelError, match="not valid JSON"):
        read_file(path)


def test_keras_archive_without_config_is_not_keras(tmp_path):
    path = tmp_path / "x.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "[1, 2]")
        archive.writestr("metadata.json", "{}")
    with pytest.raises(MalformedModelError, match="not a JSON object"):
        read_file(path)


def test_keras_archive_with_garbage_weights(tmp_path):
    path = tmp_path / "garbage.keras"
    with zipfile.ZipFile(SAMPLES / "seed_tied.keras") as source, zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", source.read("config.json"))
        archive.writestr("metadata.json", source.read("metadata.json"))
        archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + b"\xff" * 500)
    with pytest.raises(BiasInspectError, match="HDF5"):
        read_file(path)


def test_planted_h5py_module_next_to_the_model_is_not_imported(tmp_path):
    """The parser child runs isolated (-I, cwd /): an h5py.py beside the model or in the current
    folder is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "h5py.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    target = tmp_path / "seed_tied.keras"
    target.write_bytes((SAMPLES / "seed_tied.keras").read_bytes())

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert report_of(target).totals.model_params == 2432
    finally:
        os.chdir(cwd)
    assert not marker.exists()


def libhdf5_crasher(path: Path) -> Path:
    """An HDF5 file that makes libhdf5 (2.0.0, bundled with h5py 3.16) dereference a bad pointer:
    a variable-length string attribute whose datatype says vlen kind 3 (only 0 and 1 exist)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.attrs["backend"] = "tensorflow"
        handle.create_group("model_weights").attrs["layer_names"] = [b"conv"]
    data = bytearray(buffer.getvalue())
    where = bytes(data).find(b"backend\x00\x19\x01")  # name, then datatype class 9 (vlen) v1, kind 1
    assert where > 0
    data[where + 9] = 3
    path.write_bytes(bytes(data))
    return path


def test_libhdf5_crash_is_one_line_and_spares_the_batch(tmp_path, capsys):
    """A file that segfaults h5py in-process ends in one line; the other files are reported."""
    crasher = libhdf5_crasher(tmp_path / "crash.h5")
    plain = subprocess.run(
        [sys.executable, "-c", f"import h5py; h5py.File({str(crasher)!r}, 'r').attrs['backend']"],
        capture_output=True,
        check=False,
    )
    assert plain.returncode == -signal.SIGSEGV, "libhdf5 no longer crashes on this file: find a new crasher"
    for name in ("seed_tied.keras", "nested_legacy.h5", "seed_tied.tflite", "seed_tied.onnx"):
        (tmp_path / name).write_bytes((SAMPLES / name).read_bytes())
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    assert main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"biasinspect: {tmp_path / 'broken.h5'}: not a readable HDF5 file: "
        "OSError: Unable to synchronously open file (bad byte number in an address)",
        f"biasinspect: {crasher}: HDF5 parser crashed (signal 11)",
    ]
    report = inspect(tmp_path)
    assert sorted((Path(model.path).name, model.format) for model in report.models) == [
        ("nested_legacy.h5", "keras"),
        ("seed_tied.keras", "keras"),
        ("seed_tied.onnx", "onnx"),
        ("seed_tied.tflite", "tflite"),
    ]
    assert sorted(Path(error.path).name for error in report.errors) == ["broken.h5", "crash.h5"]


def test_keras_json_contract(capsys):
    assert main([str(SAMPLES / "seed_tied.keras"), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (model,) = document["models"]
    assert model["format"] == "keras"
    assert model["totals"]["model_params"] == 2432


def test_h5_bytes_in_memory_round_trip():
    """The archive path for deflated members: the same structure from bytes as from the file."""
    from biasinspect.readers.h5_isolated import describe_hdf5

    data = (SAMPLES / "nested_legacy.h5").read_bytes()
    from_bytes = describe_hdf5(data=data)
    from_file = describe_hdf5(SAMPLES / "nested_legacy.h5", length=len(data))
    assert from_bytes == from_file
    assert ["model_weights/head/head/bias:0", [2], "float32"] in from_file["datasets"]


def test_relative_paths_from_the_command_line(tmp_path):
    """The parser child runs from /, so a relative path is made absolute before it is sent."""
    (tmp_path / "m.h5").write_bytes((SAMPLES / "nested_legacy.h5").read_bytes())
    (tmp_path / "m.keras").write_bytes((SAMPLES / "seed_tied.keras").read_bytes())
    completed = subprocess.run(
        [sys.executable, "-m", "biasinspect", "m.h5", "m.keras", "--format", "json"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(SAMPLES.parent)},
    )
    assert completed.returncode == 0, completed.stderr
    models = json.loads(completed.stdout)["models"]
    assert [(model["path"], model["totals"]["model_params"]) for model in models] == [
        ("m.h5", 98),
        ("m.keras", 2432),
    ]


def test_legacy_shape_propagation_through_pools_paddings_and_merges(tmp_path):
    """Input shapes flow through ZeroPadding, MaxPooling, Add and Concatenate to later convs."""

    def layer(cls, name, inbound, **config):
        return {
            "class_name": cls,
            "name": name,
            "config": {"name": name, **config},
            "inbound_nodes": [[[s, 0, 0, {}] for s in inbound]] if inbound else [],
        }

    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                layer("InputLayer", "in", [], batch_input_shape=[None, 32, 32, 3]),
                layer("ZeroPadding2D", "pad", ["in"], padding=[[1, 1], [2, 2]]),  # 34x36
                layer(
                    "Conv2D", "a", ["pad"], filters=4, kernel_size=[3, 3], strides=[2, 2], padding="valid"
                ),  # 16x17
                layer("Conv2D", "b", ["pad"], filters=4, kernel_size=[3, 3], strides=[2, 2], padding="valid"),
                layer("Add", "sum", ["a", "b"]),
                layer("Concatenate", "cat", ["a", "sum"], axis=-1),  # 16x17x8
                layer("MaxPooling2D", "pool", ["cat"], pool_size=[2, 2], padding="valid"),  # 8x8x8
                layer(
                    "DepthwiseConv2D", "dw", ["pool"], kernel_size=[3, 3], padding="same", depth_multiplier=2
                ),
            ],
        },
    }
    weights = {
        "a": {"a/kernel:0": (3, 3, 3, 4), "a/bias:0": (4,)},
        "b": {"b/kernel:0": (3, 3, 3, 4), "b/bias:0": (4,)},
        "dw": {"dw/depthwise_kernel:0": (3, 3, 8, 2), "dw/bias:0": (16,)},
    }
    report = report_of(legacy_h5(tmp_path / "shapes.h5", config, weights))
    assert [(layer.name, layer.output_spatial) for layer in report.layers] == [
        ("a", (16, 17)),
        ("b", (16, 17)),
        ("dw", (8, 8)),
    ]
    assert rows(report)[-1] == ("dw", "DepthwiseConv2D", "3x3", 8, 16, 8, "tied", 16)


def test_deep_nesting_in_hdf5_groups_and_in_config_json(tmp_path):
    """200 nested HDF5 groups are walked; 300 are past the 256-level cap; a config.json nested
    100,000 lists deep is refused cleanly (RecursionError inside json is caught)."""
    config = sequential_config(("Conv2D", {"name": "conv", "filters": 4, "kernel_size": [3, 3]}))
    path = legacy_h5(
        tmp_path / "deep.h5", config, {"conv": {"conv/kernel:0": (3, 3, 3, 4), "conv/bias:0": (4,)}}
    )
    with h5py.File(path, "a") as handle:
        group = handle["model_weights"]
        for depth in range(200):
            group = group.create_group(f"g{depth}")
        deepest = group.name
    assert rows(report_of(path)) == [("conv", "Conv2D", "3x3", 3, 4, 1, "tied", 4)]
    with h5py.File(path, "a") as handle:
        for depth in range(100):
            deepest = handle[deepest].create_group(f"h{depth}").name
    with pytest.raises(MalformedModelError, match="nested more than 256 deep"):
        read_file(path)
    archive = tmp_path / "deep.keras"
    with zipfile.ZipFile(archive, "w") as target:
        target.writestr("config.json", "[" * 100_000 + "]" * 100_000)
        target.writestr("metadata.json", "{}")
    with pytest.raises(MalformedModelError, match=r"config\.json is not valid JSON"):
        read_file(archive)


class MemorySource:
    """A ByteSource over bytes in memory (what a remote source looks like to a reader: no path)."""

    def __init__(self, data: bytes, name: str = "memory.h5", size: int | None = None) -> None:
        self._data = data
        self.name = name
        self._size = len(data) if size is None else size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        assert self._size == len(self._data), "an oversized source must be refused before any read"
        return self._data[offset : offset + length]

    def sibling(self, relative: str) -> MemorySource:
        raise NotImplementedError(relative)

    def close(self) -> None:
        pass


def test_non_local_hdf5_is_fetched_up_to_the_cap():
    """A source without a local path is read whole (libhdf5 needs a file) up to 256 MiB; a
    larger one is refused with the reason, before a byte is read."""
    from biasinspect.readers.keras_reader import read_keras_h5

    (description,) = read_keras_h5(MemorySource((SAMPLES / "nested_legacy.h5").read_bytes()))
    assert (len(description.convs), description.model_params) == (2, 98)
    with pytest.raises(UnsupportedFormatError, match="fetched only up to 268,435,456 bytes"):
        read_keras_h5(MemorySource(b"", size=300 * 1024 * 1024))


def test_keras3_weights_file_alone_says_what_is_missing(tmp_path):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(zipfile.ZipFile(SAMPLES / "seed_tied.keras").read("model.weights.h5"))
    with pytest.raises(UnsupportedFormatError, match=r"holds no layer config: read the \.keras archive"):
        read_file(path)
