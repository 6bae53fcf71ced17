"""The committed samples: structure, no drift from samples/make_samples.py, and the README facts.

The generator runs once per session into a temporary folder (~3 s).  Each committed file must
match its regenerated twin structurally (ops, attributes, initializer names/shapes/dtypes) and,
because generation is deterministic with the pinned torch, byte for byte.  The last group of
tests asserts what biasinspect reports for each sample -- the numbers the README quotes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, shape_inference
from onnx.reference import ReferenceEvaluator
from safetensors import safe_open

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

ONNX_NAMES = [
    "seed_tied.onnx",
    "seed_untied.onnx",
    "conv_bn.onnx",
    "conv_transpose.onnx",
    "depthwise.onnx",
    "quantized_conv.onnx",
]
ALL_NAMES = [*ONNX_NAMES, "seed_tied.safetensors", "small_cnn.pt", "lasagne_untied.npz", "separate_bias.pt"]

F32, I8, U8, I32 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32

# name -> (op types in graph order, initializer name -> (dims, dtype), graph output shape)
EXPECTED_ONNX: dict[str, tuple[list[str], dict[str, tuple[list[int], int]], list[int]]] = {
    "seed_tied.onnx": (
        ["Conv"],
        {"conv.weight": ([32, 3, 5, 5], F32), "conv.bias": ([32], F32)},
        [1, 32, 28, 28],
    ),
    "seed_untied.onnx": (
        ["Conv", "Add"],
        {"conv.weight": ([32, 3, 5, 5], F32), "bias": ([32, 28, 28], F32)},
        [1, 32, 28, 28],
    ),
    "conv_bn.onnx": (
        ["Conv", "BatchNormalization", "Relu"],
        {
            "conv.weight": ([8, 3, 3, 3], F32),
            "bn.weight": ([8], F32),
            "bn.bias": ([8], F32),
            "bn.running_mean": ([8], F32),
            "bn.running_var": ([8], F32),
        },
        [1, 8, 16, 16],
    ),
    "conv_transpose.onnx": (
        ["ConvTranspose"],
        {"deconv.weight": ([16, 8, 4, 4], F32), "deconv.bias": ([8], F32)},
        [1, 8, 16, 16],
    ),
    "depthwise.onnx": (
        ["Conv", "Conv"],
        {
            "depthwise.weight": ([8, 1, 3, 3], F32),
            "depthwise.bias": ([8], F32),
            "pointwise.weight": ([16, 8, 1, 1], F32),
            "pointwise.bias": ([16], F32),
        },
        [1, 16, 16, 16],
    ),
    "quantized_conv.onnx": (
        ["QuantizeLinear", "QLinearConv", "DequantizeLinear"],
        {
            "x_scale": ([], F32),
            "x_zero_point": ([], U8),
            "conv.weight_quantized": ([4, 3, 3, 3], I8),
            "conv.weight_scale": ([4], F32),
            "conv.weight_zero_point": ([4], I8),
            "y_scale": ([], F32),
            "y_zero_point": ([], U8),
            "conv.bias_quantized": ([4], I32),
        },
        [1, 4, 8, 8],
    ),
}

EXPECTED_TENSORS: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
    "seed_tied.safetensors": {
        "conv.weight": ((32, 3, 5, 5), "float32"),
        "conv.bias": ((32,), "float32"),
    },
    "small_cnn.pt": {
        "conv1.weight": ((8, 3, 3, 3), "float32"),
        "conv1.bias": ((8,), "float32"),
        "conv2.weight": ((16, 8, 3, 3), "float32"),
        "bn2.weight": ((16,), "float32"),
        "bn2.bias": ((16,), "float32"),
        "bn2.running_mean": ((16,), "float32"),
        "bn2.running_var": ((16,), "float32"),
        "bn2.num_batches_tracked": ((), "int64"),
        "fc.weight": ((10, 16), "float32"),
        "fc.bias": ((10,), "float32"),
    },
    "lasagne_untied.npz": {
        "arr_0": ((4, 3, 3, 3), "float32"),
        "arr_1": ((4, 6, 6), "float32"),
        "arr_2": ((2, 4, 3, 3), "float32"),
        "arr_3": ((2,), "float32"),
    },
    "separate_bias.pt": {
        "0.weight": ((32, 3, 5, 5), "float32"),
        "1.bias": ((32, 28, 28), "float32"),
    },
}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_samples", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every sample, freshly regenerated into a temporary folder."""
    out = tmp_path_factory.mktemp("samples")
    paths: dict[str, Path] = _load_generator().make_all(out)
    return paths


def _onnx_signature(path: Path) -> dict[str, Any]:
    """Everything about an ONNX file except tensor payloads."""
    model = onnx.load(str(path))
    graph = model.graph
    return {
        "ir_version": model.ir_version,
        "opsets": sorted((o.domain, o.version) for o in model.opset_import),
        "nodes": [
            (
                n.op_type,
                n.name,
                list(n.input),
                list(n.output),
                sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute),
            )
            for n in graph.node
        ],
        "initializers": [(t.name, list(t.dims), t.data_type) for t in graph.initializer],
        "inputs": [str(v) for v in graph.input],
        "outputs": [str(v) for v in graph.output],
    }


def _tensor_signature(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of a safetensors file or a torch state_dict file."""
    if path.suffix == ".safetensors":
        signature: dict[str, tuple[tuple[int, ...], str]] = {}
        with safe_open(str(path), "np") as handle:
            for key in handle.keys():  # noqa: SIM118 -- safe_open handles are not mappings
                tensor_slice = handle.get_slice(key)
                signature[key] = (tuple(tensor_slice.get_shape()), _st_dtype(tensor_slice))
        return signature
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {key: (arrays[key].shape, str(arrays[key].dtype)) for key in arrays.files}
    state = torch.load(path, weights_only=True, map_location="cpu")
    return {key: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in state.items()}


def _st_dtype(tensor_slice: Any) -> str:
    """safetensors dtype code (F32, I64, ...) as a numpy-style name."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}
    code = str(tensor_slice.get_dtype())
    return names.get(code, code)


# --- generated files: expected structure -------------------------------------------------


@pytest.mark.parametrize("name", ONNX_NAMES)
def test_generated_onnx_has_expected_structure(generated: dict[str, Path], name: str) -> None:
    ops, initializers, output_shape = EXPECTED_ONNX[name]
    model = onnx.load(str(generated[name]))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ops
    assert {t.name: (list(t.dims), t.data_type) for t in model.graph.initializer} == initializers
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    (output,) = inferred.graph.output
    assert [d.dim_value for d in output.type.tensor_type.shape.dim] == output_shape


@pytest.mark.parametrize(
    "name", ["seed_tied.safetensors", "small_cnn.pt", "lasagne_untied.npz", "separate_bias.pt"]
)
def test_generated_tensor_files_have_expected_tensors(generated: dict[str, Path], name: str) -> None:
    assert _tensor_signature(generated[name]) == EXPECTED_TENSORS[name]


def test_seed_models_keep_the_real_geometry(generated: dict[str, Path]) -> None:
    for name in ("seed_tied.onnx", "seed_untied.onnx"):
        model = onnx.load(str(generated[name]))
        (graph_input,) = model.graph.input
        assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, 32, 32]
        conv = model.graph.node[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        assert attrs["kernel_shape"] == [5, 5]
        assert attrs["strides"] == [1, 1]
        assert attrs["pads"] == [0, 0, 0, 0]
        assert attrs["group"] == 1


def test_seed_untied_adds_the_initializer_to_the_conv_output(generated: dict[str, Path]) -> None:
    conv, add = onnx.load(str(generated["seed_untied.onnx"])).graph.node
    assert len(conv.input) == 2  # no bias of its own
    assert sorted(add.input) == sorted([conv.output[0], "bias"])


def test_seed_tied_safetensors_holds_the_onnx_weights(generated: dict[str, Path]) -> None:
    graph = onnx.load(str(generated["seed_tied.onnx"])).graph
    onnx_weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    with safe_open(str(generated["seed_tied.safetensors"]), "np") as handle:
        for key in ("conv.weight", "conv.bias"):
            np.testing.assert_array_equal(handle.get_tensor(key), onnx_weights[key])


def test_conv_bn_keeps_an_inference_batchnorm(generated: dict[str, Path]) -> None:
    conv, bn, _ = onnx.load(str(generated["conv_bn.onnx"])).graph.node
    assert len(conv.input) == 2
    assert bn.input[0] == conv.output[0]
    assert len(bn.output) == 1  # inference form: no running-stat outputs
    attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
    assert attrs.get("training_mode", 0) == 0


def test_depthwise_and_transpose_attributes(generated: dict[str, Path]) -> None:
    depthwise, pointwise = onnx.load(str(generated["depthwise.onnx"])).graph.node
    assert {a.name: helper.get_attribute_value(a) for a in depthwise.attribute}["group"] == 8
    assert {a.name: helper.get_attribute_value(a) for a in pointwise.attribute}["group"] == 1
    (deconv,) = onnx.load(str(generated["conv_transpose.onnx"])).graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in deconv.attribute}
    assert (attrs["strides"], attrs["pads"], attrs["kernel_shape"]) == ([2, 2], [1, 1, 1, 1], [4, 4])


def test_quantized_conv_runs_and_its_bias_is_input_8(generated: dict[str, Path]) -> None:
    model = onnx.load(str(generated["quantized_conv.onnx"]))
    qconv = model.graph.node[1]
    assert len(qconv.input) == 9
    assert qconv.input[8] == "conv.bias_quantized"
    x = np.linspace(0.0, 1.0, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)
    (y,) = ReferenceEvaluator(model).run(None, {"input": x})
    assert y.shape == (1, 4, 8, 8)
    assert y.dtype == np.float32


def test_samples_stay_small(generated: dict[str, Path]) -> None:
    sizes = {name: path.stat().st_size for name, path in generated.items()}
    assert set(sizes) == set(ALL_NAMES)
    assert all(size < 120_000 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 300_000, sizes  # two untied seeds of ~110 KB, the rest a few KB


# --- committed files: no drift ----------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_committed_sample_matches_generator(generated: dict[str, Path], name: str) -> None:
    committed = SAMPLES / name
    assert committed.is_file(), f"{committed} missing: run samples/make_samples.py"
    if name.endswith(".onnx"):
        assert _onnx_signature(committed) == _onnx_signature(generated[name])
    else:
        assert _tensor_signature(committed) == _tensor_signature(generated[name])
    # Generation is deterministic (fixed seeds, pinned torch), so even the weights agree.
    assert committed.read_bytes() == generated[name].read_bytes(), (
        f"{name} differs from what samples/make_samples.py writes; regenerate and commit it"
    )


# --- what biasinspect reports (the README's facts) --------------------------------------


@pytest.fixture(scope="module")
def inspect_sample() -> Any:
    from biasinspect import api

    def run(name: str) -> Any:
        report = api.inspect(SAMPLES / name)
        assert report.errors == ()
        (model,) = report.models
        return model

    return run


def test_report_seed_untied(inspect_sample: Any) -> None:
    model = inspect_sample("seed_untied.onnx")
    (layer,) = model.layers
    assert str(layer.bias.kind) == "untied"
    assert layer.bias.params == 25_088
    assert layer.weight_params == 2_400
    assert (layer.in_channels, layer.out_channels) == (3, 32)
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"
    assert (model.totals.untied, model.totals.tied, model.totals.absent, model.totals.other) == (1, 0, 0, 0)
    assert model.totals.model_params == 27_488


@pytest.mark.parametrize("name", ["seed_tied.onnx", "seed_tied.safetensors"])
def test_report_seed_tied(inspect_sample: Any, name: str) -> None:
    model = inspect_sample(name)
    (layer,) = model.layers
    assert str(layer.bias.kind) == "tied"
    assert layer.bias.params == 32
    assert layer.formula == "(3x5x5 + 1) x 32 = 2,432"
    assert model.totals.model_params == 2_432


def test_report_conv_bn(inspect_sample: Any) -> None:
    (layer,) = inspect_sample("conv_bn.onnx").layers
    assert str(layer.bias.kind) == "absent"
    assert layer.bias.params in (0, None)
    assert layer.followed_by == "BatchNormalization"
    assert layer.weight_params == 8 * 3 * 3 * 3


def test_report_depthwise(inspect_sample: Any) -> None:
    depthwise, pointwise = inspect_sample("depthwise.onnx").layers
    assert (depthwise.groups, depthwise.in_channels, depthwise.out_channels) == (8, 8, 8)
    assert (pointwise.groups, pointwise.in_channels, pointwise.out_channels) == (1, 8, 16)
    assert depthwise.weight_params == 8 * 1 * 3 * 3
    assert [str(layer.bias.kind) for layer in (depthwise, pointwise)] == ["tied", "tied"]


def test_report_conv_transpose(inspect_sample: Any) -> None:
    (layer,) = inspect_sample("conv_transpose.onnx").layers
    assert (layer.in_channels, layer.out_channels) == (16, 8)
    assert layer.transposed is True
    assert str(layer.bias.kind) == "tied"
    assert layer.bias.params == 8


def test_report_quantized_conv(inspect_sample: Any) -> None:
    (layer,) = inspect_sample("quantized_conv.onnx").layers
    assert layer.op == "QLinearConv"
    assert str(layer.bias.kind) == "tied"
    assert layer.bias.params == 4
    assert (layer.in_channels, layer.out_channels) == (3, 4)


def test_report_small_cnn_state_dict(inspect_sample: Any) -> None:
    conv1, conv2 = inspect_sample("small_cnn.pt").layers
    assert (conv1.out_channels, str(conv1.bias.kind), conv1.bias.params) == (8, "tied", 8)
    assert (conv2.out_channels, str(conv2.bias.kind)) == (16, "absent")


def test_report_lasagne_untied(inspect_sample: Any) -> None:
    model = inspect_sample("lasagne_untied.npz")
    untied, tied = model.layers
    assert model.format == "numpy"
    assert (untied.name, str(untied.bias.kind), untied.bias.params, untied.output_spatial) == (
        "arr_0",
        "untied",
        144,
        (6, 6),
    )
    assert untied.formula == "3x3x3 x 4 + 4x6x6 = 252"
    assert (tied.name, str(tied.bias.kind), tied.formula) == ("arr_2", "tied", "(4x3x3 + 1) x 2 = 74")
    assert model.totals.model_params == 108 + 144 + 72 + 2


def test_report_separate_bias_state_dict(inspect_sample: Any) -> None:
    """The seed's untied layer as a bias-free conv plus a separate [32, 28, 28] bias module."""
    model = inspect_sample("separate_bias.pt")
    (layer,) = model.layers
    assert (layer.name, layer.out_channels, str(layer.bias.kind)) == ("0", 32, "untied")
    assert (layer.weight_params, layer.bias.params) == (2_400, 25_088)
    assert [term.name for term in layer.bias.terms] == ["1.bias"]
    assert layer.output_spatial == (28, 28)
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"
    assert model.totals.model_params == 27_488
    assert model.warnings == (
        "0: bias 1.bias [32, 28, 28] taken as added to this conv's output, inferred from the next"
        " Sequential index and its shape (a state dict does not record the order of application)",
    )


def test_cli_prints_the_readme_formulas(capsys: pytest.CaptureFixture[str]) -> None:
    from biasinspect import cli

    assert cli.main([str(SAMPLES / "seed_untied.onnx"), str(SAMPLES / "seed_tied.onnx")]) == 0
    out = capsys.readouterr().out
    assert "3x5x5 x 32 + 32x28x28 = 27,488" in out
    assert "(3x5x5 + 1) x 32 = 2,432" in out
    assert "untied" in out
