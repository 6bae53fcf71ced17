"""onnxruntime's dynamic quantization as older releases wrote it (producer ``onnx.quantize``):
the bias is quantized at run time with the input's dynamic scale, and must still count.

Current onnxruntime writes a different graph, so the old one is built here with onnx.helper,
node for node, and run with onnxruntime to prove it is a valid model that computes what the
float model computes.  Its layers, kinds and bias totals must equal the float model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from biasinspect.analysis import analyze
from biasinspect.model import BiasKind, BiasSource, ModelReport
from biasinspect.readers.onnx_reader import read_onnx

# (name, weight shape) per conv, in graph order; every conv has a [C_out] bias.
_CONVS = [("c1", (8, 3, 3, 3)), ("c2", (4, 8, 3, 3)), ("c3", (6, 4, 1, 1))]
_INPUT = (1, 3, 12, 12)
_RNG = np.random.default_rng(0)
_WEIGHTS = {
    name: (
        _RNG.standard_normal(shape).astype(np.float32) * 0.3,
        _RNG.standard_normal(shape[0]).astype(np.float32),
    )
    for name, shape in _CONVS
}


def _float_model() -> onnx.ModelProto:
    nodes, inits = [], []
    current = "x"
    for index, (name, _shape) in enumerate(_CONVS):
        weight, bias = _WEIGHTS[name]
        inits += [numpy_helper.from_array(weight, f"{name}.w"), numpy_helper.from_array(bias, f"{name}.b")]
        out = "y" if index == len(_CONVS) - 1 else f"{name}.relu"
        nodes.append(
            helper.make_node(
                "Conv", ["x" if index == 0 else current, f"{name}.w", f"{name}.b"], [f"{name}.out"], name=name
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_INPUT))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def _old_dynamic_conv(name: str, x: str, out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """One Conv as onnxruntime's old ``quantize.py`` wrote it in dynamic mode (uint8 weights)."""
    weight, bias = _WEIGHTS[name]
    w_scale = np.float32(np.abs(weight).max() / 127.0)
    w_zero = np.uint8(128)
    w_quant = np.clip(np.round(weight / w_scale) + 128, 0, 255).astype(np.uint8)
    inits = [
        numpy_helper.from_array(w_quant, f"{name}.w_quantized"),
        numpy_helper.from_array(np.array(w_scale, np.float32), f"{name}.w_scale"),
        numpy_helper.from_array(np.array(w_zero, np.uint8), f"{name}.w_zero_point"),
        numpy_helper.from_array(bias, f"{name}.b"),
        numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), f"{name}.reshape_shape"),
    ]
    nodes = [
        helper.make_node(
            "DynamicQuantizeLinear",
            [x],
            [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"],
            name=f"{x}_QuantizeLinear",
        ),
        helper.make_node(
            "Mul", [f"{x}_scale", f"{name}.w_scale"], [f"{name}_scales_mul:0"], name=f"{name}_scales_mul"
        ),
        # The bias, quantized with the product of the input's run-time scale and the weight scale.
        helper.make_node(
            "Div",
            [f"{name}.b", f"{name}_scales_mul:0"],
            [f"{name}.b_tmp_quant:0"],
            name=f"{name}.b_tmp_quant",
        ),
        helper.make_node(
            "Floor", [f"{name}.b_tmp_quant:0"], [f"{name}.b_quant_rounded:0"], name=f"{name}.b_quant_rounded"
        ),
        helper.make_node(
            "Cast",
            [f"{name}.b_quant_rounded:0"],
            [f"{name}.b_quantized"],
            name=f"{name}.b_quantized_node",
            to=TensorProto.INT32,
        ),
        helper.make_node(
            "Reshape",
            [f"{name}.b_quantized", f"{name}.reshape_shape"],
            [f"{name}.b_reshaped"],
            name=f"{name}.b_reshape",
        ),
        helper.make_node(
            "ConvInteger",
            [f"{x}_quantized", f"{name}.w_quantized", f"{x}_zero_point", f"{name}.w_zero_point"],
            [f"{name}_output_quantized"],
            name=f"{name}_quant",
        ),
        helper.make_node(
            "Add",
            [f"{name}_output_quantized", f"{name}.b_reshaped"],
            [f"{name}_output_biased"],
            name=f"{name}_bias_add",
        ),
        helper.make_node(
            "Cast",
            [f"{name}_output_biased"],
            [f"{name}_output_cast"],
            name=f"{name}_output_cast",
            to=TensorProto.FLOAT,
        ),
        helper.make_node(
            "Mul", [f"{name}_output_cast", f"{name}_scales_mul:0"], [out], name=f"{name}_output_scale_mul"
        ),
    ]
    return nodes, inits


def _old_dynamic_model() -> onnx.ModelProto:
    nodes, inits = [], []
    current = "x"
    for index, (name, _shape) in enumerate(_CONVS):
        conv_nodes, conv_inits = _old_dynamic_conv(name, current, f"{name}.out")
        out = "y" if index == len(_CONVS) - 1 else f"{name}.relu"
        nodes += [*conv_nodes, helper.make_node("Relu", [f"{name}.out"], [out])]
        inits += conv_inits
        current = out
    graph = helper.make_graph(
        nodes,
        "old_dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_INPUT))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    model.producer_name = "onnx.quantize"
    model.producer_version = "0.1.0"
    return model


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    return np.asarray(y)


def _report(path: Path) -> ModelReport:
    (description,) = read_onnx(path)
    return analyze(description)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("old_dynamic")
    out = {"float": folder / "float.onnx", "old": folder / "old_dynamic.onnx"}
    onnx.save(_float_model(), out["float"])
    old = _old_dynamic_model()
    onnx.checker.check_model(old, full_check=True)
    onnx.save(old, out["old"])
    out["current"] = folder / "current.onnx"
    quantize_dynamic(out["float"], out["current"], weight_type=QuantType.QUInt8)
    out["current_per_channel"] = folder / "current_per_channel.onnx"
    quantize_dynamic(out["float"], out["current_per_channel"], weight_type=QuantType.QUInt8, per_channel=True)
    return out


def test_old_graph_is_a_valid_model_computing_the_float_model(files: dict[str, Path]) -> None:
    x = np.random.default_rng(1).standard_normal(_INPUT).astype(np.float32)
    expected = _run(files["float"], x)
    got = _run(files["old"], x)
    assert got.shape == expected.shape == (1, 6, 8, 8)
    # 8-bit arithmetic: close, not equal; a missing bias would be off by about 1 everywhere.
    assert float(np.abs(got - expected).max()) < 0.1 * float(np.abs(expected).max())


def test_old_dynamic_quantization_reads_like_the_float_model(files: dict[str, Path]) -> None:
    float_report = _report(files["float"])
    old_report = _report(files["old"])
    assert [layer.op for layer in old_report.layers] == ["ConvInteger"] * 3
    assert [(layer.bias.kind, layer.bias.params) for layer in old_report.layers] == [
        (BiasKind.TIED, 8),
        (BiasKind.TIED, 4),
        (BiasKind.TIED, 6),
    ]
    assert [(layer.bias.kind, layer.bias.params) for layer in float_report.layers] == [
        (layer.bias.kind, layer.bias.params) for layer in old_report.layers
    ]
    for layer in old_report.layers:
        assert layer.bias.source is BiasSource.ADD
        assert [term.name for term in layer.bias.terms] == [f"{layer.name.split('_')[0]}.b_reshaped"]
    totals, float_totals = old_report.totals, float_report.totals
    assert (totals.conv_layers, totals.tied, totals.untied, totals.absent, totals.other) == (3, 3, 0, 0, 0)
    assert (totals.conv_layers, totals.tied, totals.untied, totals.absent, totals.other) == (
        float_totals.conv_layers,
        float_totals.tied,
        float_totals.untied,
        float_totals.absent,
        float_totals.other,
    )
    assert totals.conv_bias_params == float_totals.conv_bias_params == 18
    assert totals.conv_weight_params == float_totals.conv_weight_params == 216 + 288 + 24
    assert [layer.output_spatial for layer in old_report.layers] == [(10, 10), (8, 8), (8, 8)]
    # The float model's weights and biases, plus per conv a weight scale and zero point.
    assert float_totals.model_params == 216 + 8 + 288 + 4 + 24 + 6
    assert totals.model_params == float_totals.model_params + 2 * 3


@pytest.mark.parametrize("variant", ["current", "current_per_channel"])
def test_current_dynamic_quantization_reads_like_the_float_model(
    files: dict[str, Path], variant: str
) -> None:
    report = _report(files[variant])
    assert [layer.op for layer in report.layers] == ["ConvInteger"] * 3
    assert [(layer.bias.kind, layer.bias.params) for layer in report.layers] == [
        (BiasKind.TIED, 8),
        (BiasKind.TIED, 4),
        (BiasKind.TIED, 6),
    ]
    assert report.totals.conv_bias_params == 18


# --------------------------------------------------------------------------------------------
# What the lineage rule must not take for a bias: data reaching a graph input or an activation.


def _one_conv_with_add(
    operand_nodes: list[onnx.NodeProto], operand: str, extra_inputs: list[onnx.ValueInfoProto]
) -> onnx.ModelProto:
    nodes, inits = _old_dynamic_conv("c1", "x", "c1.out")
    # Re-point the bias Add at ``operand`` instead of the reshaped stored bias.
    add = next(n for n in nodes if n.op_type == "Add")
    add.input[1] = operand
    graph = helper.make_graph(
        [*nodes, *operand_nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_INPUT)), *extra_inputs],
        [helper.make_tensor_value_info("c1.out", TensorProto.FLOAT, None)],
        [*inits, numpy_helper.from_array(np.array([0.5], np.float32), "half")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def _int32_of(source: str, prefix: str) -> list[onnx.NodeProto]:
    """Quantize ``source`` exactly as the old graph quantizes its bias, into ``prefix``.r."""
    return [
        helper.make_node("Div", [source, "c1_scales_mul:0"], [f"{prefix}.d"]),
        helper.make_node("Floor", [f"{prefix}.d"], [f"{prefix}.f"]),
        helper.make_node("Cast", [f"{prefix}.f"], [f"{prefix}.i"], to=TensorProto.INT32),
        helper.make_node("Reshape", [f"{prefix}.i", "c1.reshape_shape"], [f"{prefix}.r"]),
    ]


@pytest.mark.parametrize(
    ("case", "operand_nodes", "extra_inputs"),
    [
        # A graph input quantized like a bias: its data path reaches the input.
        ("input", _int32_of("v", "v"), [helper.make_tensor_value_info("v", TensorProto.FLOAT, [8])]),
        # An activation (the network's own input, pooled per channel) quantized like a bias.
        (
            "activation",
            [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]), *_int32_of("pooled", "v")],
            [],
        ),
        # A stored bias gated by a run-time per-channel vector (squeeze-excitation style): the
        # run-time operand is not one element, so it is data, not a scale.
        (
            "gated",
            [
                helper.make_node("Mul", ["c1.b", "gate"], ["gated"]),
                *_int32_of("gated", "v"),
            ],
            [helper.make_tensor_value_info("gate", TensorProto.FLOAT, [8])],
        ),
        # A residual times a stored scalar: the data is the residual.
        (
            "residual",
            [
                helper.make_node("Mul", ["half", "res"], ["scaled"]),
                helper.make_node("Cast", ["scaled"], ["v.r"], to=TensorProto.INT32),
            ],
            [helper.make_tensor_value_info("res", TensorProto.FLOAT, [1, 8, 10, 10])],
        ),
    ],
)
def test_runtime_data_is_never_a_bias(
    tmp_path: Path, case: str, operand_nodes: list[onnx.NodeProto], extra_inputs: list[onnx.ValueInfoProto]
) -> None:
    path = tmp_path / f"{case}.onnx"
    onnx.save(_one_conv_with_add(operand_nodes, "v.r", extra_inputs), path)
    (layer,) = _report(path).layers
    assert (layer.op, layer.bias.kind, layer.bias.params) == ("ConvInteger", BiasKind.ABSENT, 0)
