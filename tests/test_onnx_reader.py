"""Tests for the ONNX reader (biasinspect.readers.onnx_reader) and its wire walker (protowire)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from biasinspect import limits
from biasinspect.errors import (
    MalformedModelError,
    ResourceLimitError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from biasinspect.model import BiasKind, BiasSource, BiasTerm, ConvNode, ModelDescription
from biasinspect.readers.onnx_reader import read_onnx
from biasinspect.readers.protowire import strip_model_proto

sys.path.insert(0, str(Path(__file__).parent))
from onnx_builders import FLOAT, INT64, conv_model, graph, init, ints, model, node, save, vi

ADD = BiasSource.ADD
CONV = BiasSource.CONV


def read(m: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> ModelDescription:
    descriptions = read_onnx(save(m, tmp_path / name))
    assert len(descriptions) == 1
    assert descriptions[0].format == "onnx"
    return descriptions[0]


def by_name(desc: ModelDescription) -> dict[str, ConvNode]:
    return {conv.name: conv for conv in desc.convs}


def kinds(desc: ModelDescription) -> dict[str, BiasKind]:
    from biasinspect.analysis import analyze

    return {layer.name: layer.bias.kind for layer in analyze(desc).layers}


# --------------------------------------------------------------------------------------------
# Plain convs, own bias, Add biases


def test_conv_with_own_bias(tmp_path: Path) -> None:
    desc = read(conv_model(pads=[1, 1, 1, 1], strides=[2, 2]), tmp_path)
    (conv,) = desc.convs
    assert conv == ConvNode(
        name="conv",
        op="Conv",
        weight_name="w",
        weight_shape=(8, 3, 3, 3),
        transposed=False,
        groups=1,
        kernel_shape=(3, 3),
        output_spatial=(8, 8),
        bias_terms=(BiasTerm("b", (8,), CONV),),
    )
    assert desc.model_params == 8 * 27 + 8
    assert desc.warnings == ()
    assert kinds(desc) == {"conv": BiasKind.TIED}


def test_unnamed_nodes_are_named_by_op_and_index(tmp_path: Path) -> None:
    g = graph(
        [node("Relu", ["x"], ["r"]), node("Conv", ["r", "w"], ["y"])],
        [vi("x", [1, 3, 8, 8])],
        ["y"],
        [init("w", [4, 3, 1, 1])],
    )
    assert [c.name for c in read(model(g), tmp_path).convs] == ["Conv_1"]


def _add_model(bias_nodes: list[onnx.NodeProto], bias_name: str, inits: list[TensorProto]) -> onnx.ModelProto:
    g = graph(
        [node("Conv", ["x", "w"], ["c"], name="conv"), *bias_nodes, node("Add", ["c", bias_name], ["y"])],
        [vi("x", [1, 3, 10, 10])],
        ["y"],
        [init("w", [4, 3, 3, 3]), *inits],
    )
    return model(g)


@pytest.mark.parametrize(
    ("bias_nodes", "bias_name", "inits", "shape", "kind"),
    [
        ([], "b", [init("b", [1, 4, 1, 1])], (1, 4, 1, 1), BiasKind.TIED),
        ([], "b", [init("b", [4, 8, 8])], (4, 8, 8), BiasKind.UNTIED),
        ([], "b", [init("b", [1, 4, 8, 8])], (1, 4, 8, 8), BiasKind.UNTIED),
        ([], "b", [init("b", [1])], (1,), BiasKind.OTHER),
        ([node("Constant", [], ["k"], value=init("kv", [4, 1, 1]))], "k", [], (4, 1, 1), BiasKind.TIED),
        ([node("Constant", [], ["k"], value_float=0.5)], "k", [], (), BiasKind.OTHER),
        (
            [node("Reshape", ["b", "s"], ["r"])],
            "r",
            [init("b", [4]), ints("s", [1, -1, 1, 1])],
            (1, 4, 1, 1),
            BiasKind.TIED,
        ),
        (
            [node("Unsqueeze", ["b", "ax"], ["u"])],
            "u",
            [init("b", [4, 8, 8]), ints("ax", [0])],
            (1, 4, 8, 8),
            BiasKind.UNTIED,
        ),
        (
            [node("Unsqueeze", ["b", "ax"], ["u"])],
            "u",
            [init("b", [4]), ints("ax", [1, 2])],
            (4, 1, 1),
            BiasKind.TIED,
        ),
        (
            [node("DequantizeLinear", ["bq", "sc"], ["dq"])],
            "dq",
            [init("bq", [4, 1, 1], TensorProto.INT32), init("sc", [], FLOAT, [0.1])],
            (4, 1, 1),
            BiasKind.TIED,
        ),
        (
            [node("Cast", ["b"], ["cb"], to=FLOAT)],
            "cb",
            [init("b", [4, 8, 8], TensorProto.FLOAT16)],
            (4, 8, 8),
            BiasKind.UNTIED,
        ),
    ],
)
def test_add_of_a_parameter_is_a_bias_term(
    tmp_path: Path,
    bias_nodes: list[onnx.NodeProto],
    bias_name: str,
    inits: list[TensorProto],
    shape: tuple[int, ...],
    kind: BiasKind,
) -> None:
    desc = read(_add_model(bias_nodes, bias_name, inits), tmp_path)
    (conv,) = desc.convs
    assert conv.bias_terms == (BiasTerm(bias_name, shape, ADD),)
    assert conv.followed_by is None
    assert conv.output_spatial == (8, 8)
    assert kinds(desc) == {"conv": kind}


def test_add_operand_shapes_without_shape_inference(tmp_path: Path) -> None:
    # A custom-domain op without an opset import makes ONNX shape inference fail outright; the
    # Reshape/Unsqueeze targets are still computed from the stored shape vectors.
    g = graph(
        [
            node("Foo", ["x0"], ["x"], domain="my.custom"),
            node("Conv", ["x", "w"], ["c"], name="conv"),
            node("Reshape", ["b", "s"], ["r"]),
            node("Add", ["c", "r"], ["y"]),
            node("Conv", ["y", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        ],
        [vi("x0", [1, 3, 10, 10])],
        ["c2"],
        [init("w", [4, 3, 3, 3]), init("b", [4]), ints("s", [1, -1, 1, 1]), init("w2", [4, 4, 3, 3])],
    )
    desc = read(model(g), tmp_path)
    assert len(desc.warnings) == 1
    assert desc.warnings[0].startswith("shape inference failed: ")
    assert "my.custom" in desc.warnings[0]
    conv, conv2 = desc.convs
    assert conv.bias_terms == (BiasTerm("r", (1, 4, 1, 1), ADD),)
    assert conv.weight_shape == (4, 3, 3, 3)
    assert conv.output_spatial is None  # the input comes from the unknown op
    assert conv2.weight_shape == (4, 4, 3, 3)
    assert conv2.output_spatial is None
    assert kinds(desc) == {"conv": BiasKind.TIED, "conv2": BiasKind.ABSENT}


def test_own_spatial_arithmetic_when_inference_fails(tmp_path: Path) -> None:
    g = graph(
        [
            node("Foo", ["x0"], ["unused"], domain="my.custom"),
            node(
                "Conv", ["x", "w"], ["a"], name="strided", strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1]
            ),
            node("Conv", ["x", "w"], ["b"], name="same", strides=[2, 2], auto_pad="SAME_UPPER"),
            node("Conv", ["x", "w"], ["c"], name="valid", auto_pad="VALID", dilations=[2, 2]),
            node("ConvTranspose", ["x", "wt"], ["d"], name="up", strides=[2, 2], output_padding=[1, 1]),
            node("ConvTranspose", ["x", "wt"], ["e"], name="shaped", strides=[2, 2], output_shape=[40, 41]),
        ],
        [vi("x0", [1]), vi("x", [1, 3, 17, 17])],
        ["a", "b", "c", "d", "e"],
        [init("w", [4, 3, 3, 3]), init("wt", [3, 2, 3, 3])],
    )
    desc = read(model(g), tmp_path)
    assert desc.warnings and desc.warnings[0].startswith("shape inference failed")
    spatial = {c.name: c.output_spatial for c in desc.convs}
    assert spatial == {
        "strided": (9, 9),
        "same": (9, 9),
        "valid": (13, 13),
        "up": (36, 36),
        "shaped": (40, 41),
    }


def test_residual_add_of_a_graph_input_is_not_a_bias(tmp_path: Path) -> None:
    g = graph(
        [node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), node("Add", ["c", "x"], ["y"])],
        [vi("x", [1, 3, 8, 8])],
        ["y"],
        [init("w", [3, 3, 3, 3])],
    )
    desc = read(model(g), tmp_path)
    assert desc.convs[0].bias_terms == ()
    assert desc.convs[0].followed_by is None
    assert kinds(desc) == {"conv": BiasKind.ABSENT}


def test_add_is_not_followed_when_the_conv_output_has_other_consumers(tmp_path: Path) -> None:
    g = graph(
        [
            node("Conv", ["x", "w"], ["c"], name="conv"),
            node("Add", ["c", "b"], ["y"]),
            node("Relu", ["c"], ["z"]),
        ],
        [vi("x", [1, 3, 8, 8])],
        ["y", "z"],
        [init("w", [4, 3, 3, 3]), init("b", [1, 4, 1, 1])],
    )
    assert read(model(g), tmp_path).convs[0].bias_terms == ()


def test_own_bias_plus_add_gives_two_terms(tmp_path: Path) -> None:
    g = graph(
        [node("Conv", ["x", "w", "b"], ["c"], name="conv"), node("Add", ["c", "u"], ["y"])],
        [vi("x", [1, 3, 8, 8])],
        ["y"],
        [init("w", [4, 3, 3, 3]), init("b", [4]), init("u", [4, 6, 6])],
    )
    desc = read(model(g), tmp_path)
    assert desc.convs[0].bias_terms == (BiasTerm("b", (4,), CONV), BiasTerm("u", (4, 6, 6), ADD))
    assert kinds(desc) == {"conv": BiasKind.UNTIED}


def test_batchnorm_and_mul_add_followers(tmp_path: Path) -> None:
    bn_inits = [init(n, [4]) for n in ("s", "o", "mu", "var")]
    g = graph(
        [
            node("Conv", ["x", "w"], ["c1"], name="bn_conv"),
            node("BatchNormalization", ["c1", "s", "o", "mu", "var"], ["n1"]),
            node("Conv", ["n1", "w2"], ["c2"], name="muladd_conv"),
            node("Mul", ["c2", "m"], ["m2"]),
            node("Add", ["m2", "a"], ["a2"]),
            node("Conv", ["a2", "w2", "b2"], ["c3"], name="biased_conv"),
            node("BatchNormalization", ["c3", "s", "o", "mu", "var"], ["n3"]),
            node("Conv", ["n3", "w2"], ["c4"], name="plain_conv"),
            node("Relu", ["c4"], ["y"]),
        ],
        [vi("x", [1, 3, 12, 12])],
        ["y"],
        [
            init("w", [4, 3, 3, 3]),
            init("w2", [4, 4, 1, 1]),
            init("b2", [4]),
            init("m", [4, 1, 1]),
            init("a", [4, 1, 1]),
            *bn_inits,
        ],
    )
    convs = by_name(read(model(g), tmp_path))
    assert convs["bn_conv"].followed_by == "BatchNormalization"
    assert convs["bn_conv"].bias_terms == ()
    assert convs["muladd_conv"].followed_by == "Mul+Add"
    assert convs["muladd_conv"].bias_terms == ()
    assert convs["biased_conv"].followed_by is None  # it has its own bias
    assert convs["biased_conv"].bias_terms == (BiasTerm("b2", (4,), CONV),)
    assert convs["plain_conv"].followed_by is None


# --------------------------------------------------------------------------------------------
# Where weights come from


def test_weights_from_constant_constantofshape_and_graph_input(tmp_path: Path) -> None:
    g = graph(
        [
            node("Constant", [], ["cw"], value=init("cwv", [4, 3, 3, 3])),
            node("Conv", ["x", "cw"], ["a"], name="const_w"),
            node("ConstantOfShape", ["ws"], ["zw"], value=init("fill", [1], FLOAT, [0.5])),
            node("Conv", ["x", "zw"], ["b"], name="cos_w"),
            node("ConstantOfShape", ["ws"], ["zw2"]),
            node("Reshape", ["zw2", "rs"], ["rw"]),
            node("Conv", ["x", "rw"], ["c"], name="reshaped_w"),
            node("Conv", ["x", "gw", "gb"], ["d"], name="input_w"),
        ],
        [vi("x", [1, 3, 9, 9]), vi("gw", [2, 3, 5, 5]), vi("gb", [2])],
        ["a", "b", "c", "d"],
        [ints("ws", [6, 3, 1, 1]), ints("rs", [6, 3, 1, 1])],
    )
    desc = read(model(g), tmp_path)
    convs = by_name(desc)
    assert convs["const_w"].weight_shape == (4, 3, 3, 3)
    assert convs["cos_w"].weight_shape == (6, 3, 1, 1)
    assert convs["cos_w"].output_spatial == (9, 9)
    assert convs["reshaped_w"].weight_shape == (6, 3, 1, 1)
    assert convs["input_w"].weight_shape == (2, 3, 5, 5)
    assert convs["input_w"].bias_terms == (BiasTerm("gb", (2,), CONV),)
    assert convs["input_w"].output_spatial == (5, 5)
    # Only the Constant tensor (4x3x3x3 = 108): ConstantOfShape fill values are not Constant nodes and
    # INT64 shape vectors never count.
    assert desc.model_params == 108
    assert all(not c.notes for c in desc.convs)


def test_symbolic_dims_stay_unknown(tmp_path: Path) -> None:
    g = graph(
        [node("Conv", ["x", "w"], ["c"], name="conv"), node("Add", ["c", "b"], ["y"])],
        [vi("x", ["N", 3, "H", 16])],
        ["y"],
        [init("w", [4, 3, 3, 3]), init("b", [4, 1, 1])],
    )
    desc = read(model(g), tmp_path)
    (conv,) = desc.convs
    assert conv.output_spatial == (None, 14)
    assert conv.bias_terms == (BiasTerm("b", (4, 1, 1), ADD),)
    assert kinds(desc) == {"conv": BiasKind.TIED}


def test_dangling_weight_is_reported_with_a_note(tmp_path: Path) -> None:
    g = graph([node("Conv", ["x", "nowhere"], ["y"], name="conv")], [vi("x", [1, 3, 8, 8])], ["y"])
    desc = read(model(g), tmp_path)
    (conv,) = desc.convs
    assert conv.weight_shape is None
    assert conv.weight_name == "nowhere"
    assert conv.notes == ("weight 'nowhere' has no producer (not an initializer, input or node output)",)


def test_cyclic_graph_does_not_hang(tmp_path: Path) -> None:
    g = graph(
        [
            node("Conv", ["x", "w"], ["c"], name="conv"),
            node("Add", ["c", "loop_b"], ["y"]),
            node("Mul", ["y", "loop_a"], ["loop_b"]),
            node("Relu", ["loop_b"], ["loop_a"]),
            node("Conv", ["loop_a", "w2"], ["z"], name="conv2"),
        ],
        [vi("x", [1, 3, 8, 8])],
        ["z"],
        [init("w", [3, 3, 1, 1]), init("w2", [3, 3, 1, 1])],
    )
    desc = read(model(g), tmp_path)
    assert [c.name for c in desc.convs] == ["conv", "conv2"]
    assert desc.convs[0].bias_terms == ()  # the cycle is not a parameter


# --------------------------------------------------------------------------------------------
# Other conv ops


def test_contrib_and_quantized_conv_ops(tmp_path: Path) -> None:
    u8, i32 = TensorProto.UINT8, TensorProto.INT32
    g = graph(
        [
            node(
                "FusedConv",
                ["x", "w", "b"],
                ["f"],
                name="fused",
                domain="com.microsoft",
                activation="Relu",
                pads=[1, 1, 1, 1],
            ),
            node(
                "NhwcConv", ["xh", "wh", "b"], ["h"], name="nhwc", domain="com.microsoft", kernel_shape=[3, 3]
            ),
            node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"], ["q"], name="qconv"),
            node("ConvInteger", ["xq", "wq", "xz", "wz"], ["i"], name="iconv"),
        ],
        [vi("x", [1, 3, 8, 8]), vi("xh", [1, 8, 8, 3]), vi("xq", [1, 3, 8, 8], u8)],
        ["f", "h", "q", "i"],
        [
            init("w", [4, 3, 3, 3]),
            init("b", [4]),
            init("wh", [4, 3, 3, 3 + 2]),
            init("xs", [], FLOAT, [0.1]),
            init("xz", [], u8),
            init("wq", [4, 3, 3, 3], u8),
            init("ws", [], FLOAT, [0.1]),
            init("wz", [], u8),
            init("ys", [], FLOAT, [0.1]),
            init("yz", [], u8),
            init("bq", [4], i32),
        ],
    )
    desc = read(model(g, extra_opsets={"com.microsoft": 1}), tmp_path)
    convs = by_name(desc)
    assert convs["fused"].weight_shape == (4, 3, 3, 3)
    assert convs["fused"].bias_terms == (BiasTerm("b", (4,), CONV),)
    assert convs["fused"].output_spatial == (8, 8)
    # NhwcConv weights are stored [M, kH, kW, C/group]; reported as [M, C/group, kH, kW].
    assert convs["nhwc"].weight_shape == (4, 5, 3, 3)
    assert convs["nhwc"].kernel_shape == (3, 3)
    assert convs["nhwc"].output_spatial == (6, 6)
    assert convs["qconv"].weight_name == "wq"
    assert convs["qconv"].weight_shape == (4, 3, 3, 3)
    assert convs["qconv"].bias_terms == (BiasTerm("bq", (4,), CONV),)
    assert convs["qconv"].output_spatial == (6, 6)
    assert convs["iconv"].weight_shape == (4, 3, 3, 3)
    assert convs["iconv"].bias_terms == ()
    # float: w 108 + b 4 + wh 180 + 3 scales; uint8: wq 108 + 3 zero points; int32 QLinearConv bias 4.
    assert desc.model_params == 108 + 4 + 180 + 3 + 108 + 3 + 4
    assert kinds(desc) == {
        "fused": BiasKind.TIED,
        "nhwc": BiasKind.TIED,
        "qconv": BiasKind.TIED,
        "iconv": BiasKind.ABSENT,
    }


def test_quantized_conv_output_dequantized_then_biased(tmp_path: Path) -> None:
    u8 = TensorProto.UINT8
    g = graph(
        [
            node("QLinearConv", ["xq", "s", "z", "wq", "s", "z", "s", "z"], ["q"], name="qconv"),
            node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
            node("Add", ["dq", "b"], ["y"]),
        ],
        [vi("xq", [1, 3, 8, 8], u8)],
        ["y"],
        [
            init("s", [], FLOAT, [0.1]),
            init("z", [], u8),
            init("wq", [4, 3, 3, 3], u8),
            init("b", [1, 4, 1, 1]),
        ],
    )
    desc = read(model(g), tmp_path)
    assert desc.convs[0].bias_terms == (BiasTerm("b", (1, 4, 1, 1), ADD),)
    assert kinds(desc) == {"qconv": BiasKind.TIED}


def test_nhwc_conv_add_bias_is_reported_channels_first(tmp_path: Path) -> None:
    g = graph(
        [
            node("NhwcConv", ["x", "w"], ["h"], name="nhwc", domain="com.microsoft", kernel_shape=[1, 1]),
            node("Add", ["h", "b"], ["y"]),
        ],
        [vi("x", [1, 5, 5, 3])],
        ["y"],
        [init("w", [4, 1, 1, 3]), init("b", [4])],
    )
    desc = read(model(g, extra_opsets={"com.microsoft": 1}), tmp_path)
    (conv,) = desc.convs
    assert conv.weight_shape == (4, 3, 1, 1)
    assert conv.bias_terms == (BiasTerm("b", (1, 4, 1, 1), ADD),)
    assert kinds(desc) == {"nhwc": BiasKind.TIED}


def test_other_domain_conv_is_warned_not_analysed(tmp_path: Path) -> None:
    g = graph(
        [node("Conv", ["x", "w"], ["y"], name="blocked", domain="com.microsoft.nchwc")],
        [vi("x", [1, 8, 4, 4])],
        ["y"],
        [init("w", [8, 8, 1, 1])],
    )
    desc = read(model(g, extra_opsets={"com.microsoft.nchwc": 1}), tmp_path)
    assert desc.convs == ()
    assert any("blocked" in w and "com.microsoft.nchwc" in w for w in desc.warnings)


def _float_conv_model() -> onnx.ModelProto:
    g = graph(
        [node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        [vi("x", [1, 3, 10, 10])],
        ["y"],
        [init("w", [6, 3, 3, 3]), init("b", [6])],
    )
    return model(g)


def _dynamically_quantized_model() -> onnx.ModelProto:
    """What onnxruntime's dynamic quantizer makes of _float_conv_model(), plus a bias that is itself
    quantized at run time (DynamicQuantizeLinear -> DequantizeLinear)."""
    u8 = TensorProto.UINT8
    g = graph(
        [
            node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
            node("ConvInteger", ["xq", "wq", "xz", "wz"], ["ci"], name="conv_quant"),
            node("Cast", ["ci"], ["cf"], to=FLOAT),
            node("Mul", ["xs", "ws"], ["scale"]),
            node("Mul", ["cf", "scale"], ["scaled"]),
            node("DynamicQuantizeLinear", ["b"], ["bq", "bs", "bz"]),
            node("DequantizeLinear", ["bq", "bs", "bz"], ["bdq"]),
            node("Reshape", ["bdq", "shape"], ["br"]),
            node("Add", ["scaled", "br"], ["y"]),
        ],
        [vi("x", [1, 3, 10, 10])],
        ["y"],
        [
            init("wq", [6, 3, 3, 3], u8),
            init("wz", [], u8),
            init("ws", [], FLOAT, [0.02]),
            init("b", [6]),
            ints("shape", [1, -1, 1, 1]),
        ],
    )
    return model(g)


def test_dynamically_quantized_conv_reports_the_float_models_bias(tmp_path: Path) -> None:
    fdesc = read(_float_conv_model(), tmp_path, "f.onnx")
    qdesc = read(_dynamically_quantized_model(), tmp_path, "q.onnx")
    (fconv,), (qconv,) = fdesc.convs, qdesc.convs
    assert qconv.op == "ConvInteger"
    assert qconv.weight_shape == fconv.weight_shape == (6, 3, 3, 3)
    assert qconv.output_spatial == fconv.output_spatial == (8, 8)
    assert qconv.bias_terms == (BiasTerm("br", (1, 6, 1, 1), ADD),)
    assert fconv.bias_terms == (BiasTerm("b", (6,), CONV),)
    assert list(kinds(qdesc).values()) == list(kinds(fdesc).values()) == [BiasKind.TIED]
    from biasinspect.analysis import analyze

    assert analyze(qdesc).layers[0].bias.params == analyze(fdesc).layers[0].bias.params == 6


def test_conv_integer_rescale_by_a_non_scalar_is_not_followed(tmp_path: Path) -> None:
    m = _dynamically_quantized_model()
    for t in m.graph.initializer:
        if t.name == "ws":
            t.CopyFrom(init("ws", [1, 6, 10, 10]))  # would grow the tensor: not a rescale
    assert read(m, tmp_path).convs[0].bias_terms == ()


# --------------------------------------------------------------------------------------------
# Subgraphs and functions


def _body(name: str, conv_name: str, weight: str, out: str) -> onnx.GraphProto:
    return graph(
        [node("Conv", ["x", weight], [out], name=conv_name), node("Add", [out, "bb"], [out + "_y"])],
        [],
        [out + "_y"],
        [init("bb", [1, 2, 1, 1])],
        name=name,
    )


def test_if_loop_scan_bodies(tmp_path: Path) -> None:
    then_g = _body("then", "tconv", "w", "t")
    else_g = graph([node("Conv", ["x", "w"], ["e"])], [], ["e"], name="else")
    loop_body = graph(
        [
            node("Identity", ["cond_in"], ["cond_out"]),
            node("Conv", ["x", "w"], ["lc"], name="lconv"),
            node("Identity", ["carry"], ["carry_out"]),
        ],
        [vi("i", [], INT64), vi("cond_in", [], TensorProto.BOOL), vi("carry", [1, 3, 6, 6])],
        ["cond_out", "carry_out", "lc"],
    )
    scan_body = graph(
        [node("Conv", ["sx", "w"], ["sc"], name="sconv"), node("Identity", ["st"], ["st_out"])],
        [vi("st", [1]), vi("sx", [1, 3, 6, 6])],
        ["st_out", "sc"],
    )
    g = graph(
        [
            node("If", ["cond"], ["r"], name="branch", then_branch=then_g, else_branch=else_g),
            node("Loop", ["n", "", "x"], ["carry_final", "scan_out"], name="loop", body=loop_body),
            node("Scan", ["s0", "xs"], ["s_final", "sc_out"], name="scan", body=scan_body, num_scan_inputs=1),
        ],
        [
            vi("cond", [], TensorProto.BOOL),
            vi("x", [1, 3, 6, 6]),
            vi("n", [], INT64),
            vi("s0", [1]),
            vi("xs", [5, 1, 3, 6, 6]),
        ],
        ["r", "carry_final", "scan_out", "s_final", "sc_out"],
        [init("w", [2, 3, 3, 3])],
    )
    desc = read(model(g), tmp_path)
    convs = by_name(desc)
    # Subgraphs are walked in attribute order (onnx.helper sorts attributes by name).
    assert list(convs) == [
        "branch/else_branch/Conv_0",
        "branch/then_branch/tconv",
        "loop/body/lconv",
        "scan/body/sconv",
    ]
    then_conv = convs["branch/then_branch/tconv"]
    assert then_conv.weight_shape == (2, 3, 3, 3)  # the weight is an outer-scope initializer
    assert then_conv.output_spatial == (4, 4)
    assert then_conv.bias_terms == (BiasTerm("bb", (1, 2, 1, 1), ADD),)
    assert convs["loop/body/lconv"].output_spatial == (4, 4)
    assert convs["scan/body/sconv"].output_spatial == (4, 4)
    # w (54) + the then-branch's own initializer (2)
    assert desc.model_params == 54 + 2


def test_deeply_nested_if_levels(tmp_path: Path) -> None:
    depth = 25
    inner = _body("level", "deep_conv", "w", "d")
    for level in range(depth - 1):
        inner = graph(
            [
                node(
                    "If",
                    ["cond"],
                    [f"o{level}"],
                    name=f"if{level}",
                    then_branch=inner,
                    else_branch=graph([node("Identity", ["x"], [f"e{level}"])], [], [f"e{level}"]),
                )
            ],
            [],
            [f"o{level}"],
            name=f"g{level}",
        )
    g = graph(
        [
            node(
                "If",
                ["cond"],
                ["y"],
                name="top",
                then_branch=inner,
                else_branch=graph([node("Identity", ["x"], ["z"])], [], ["z"]),
            )
        ],
        [vi("cond", [], TensorProto.BOOL), vi("x", [1, 3, 5, 5])],
        ["y"],
        [init("w", [2, 3, 3, 3])],
    )
    desc = read(model(g), tmp_path)
    (conv,) = desc.convs
    expected = "top/then_branch/" + "".join(f"if{level}/then_branch/" for level in reversed(range(depth - 1)))
    assert conv.name == expected + "deep_conv"
    assert conv.weight_shape == (2, 3, 3, 3)
    assert conv.bias_terms == (BiasTerm("bb", (1, 2, 1, 1), ADD),)


def _nested_if_bytes(depth: int) -> bytes:
    """A model with ``depth`` nested If levels around one conv."""
    inner = graph([node("Conv", ["x", "w"], ["y"], name="c")], [], ["y"])
    for _ in range(depth):
        wrapper = onnx.GraphProto(name="g")
        wrapper.node.append(node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner))
        wrapper.output.append(onnx.ValueInfoProto(name="y"))
        inner = wrapper
    inner.input.extend([vi("cond", [], TensorProto.BOOL), vi("x", [1, 3, 4, 4])])
    inner.initializer.append(init("w", [30, 3, 1, 1]))  # over 64 elements: its payload is stripped
    return model(inner).SerializeToString()


def test_nesting_beyond_protobuf_limits_is_a_clean_error(tmp_path: Path) -> None:
    # Build 60 If levels by splicing serialized graphs (onnx's Python API would recurse anyway).
    graph_bytes = graph([node("Conv", ["x", "w"], ["y"], name="c")], [], ["y"]).SerializeToString()
    for _ in range(60):
        attribute = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH)
        attr_bytes = attribute.SerializeToString() + _field(6, graph_bytes)
        node_bytes = node("If", ["cond"], ["y"]).SerializeToString() + _field(5, attr_bytes)
        graph_bytes = _field(1, node_bytes)
    top = model(graph([], [vi("x", [1, 3, 4, 4])], ["y"], [init("w", [1, 3, 1, 1])]))
    path = tmp_path / "deep.onnx"
    path.write_bytes(top.SerializeToString() + _field(7, graph_bytes))
    with pytest.raises((ResourceLimitError, MalformedModelError)) as info:
        read_onnx(path)
    assert "nest" in str(info.value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_walker_depth_limit_is_enforced(tmp_path: Path) -> None:
    data = _nested_if_bytes(3)  # Model > Graph > (Node > Attribute > Graph) x 3 > Node: 12 levels
    assert len(strip_model_proto(data, max_depth=12).data) < len(data)
    with pytest.raises(ResourceLimitError, match="nesting deeper than 11 messages"):
        strip_model_proto(data, max_depth=11)
    path = tmp_path / "nested.onnx"
    path.write_bytes(data)
    convs = by_name(read_onnx(path)[0])
    assert len(convs) == 8  # both branches at each of 3 levels
    conv = convs["If_0/then_branch/If_0/else_branch/If_0/then_branch/c"]
    assert conv.weight_shape == (30, 3, 1, 1)
    assert conv.output_spatial == (4, 4)


def _function(
    name: str,
    body: list[onnx.NodeProto],
    inputs: list[str],
    outputs: list[str],
    attributes: list[str] | None = None,
) -> onnx.FunctionProto:
    return helper.make_function(
        "local",
        name,
        inputs,
        outputs,
        body,
        [helper.make_opsetid("", 17)],
        attributes=attributes or [],
    )


def test_local_functions_per_call_site(tmp_path: Path) -> None:
    ref_group = onnx.AttributeProto(name="group", type=onnx.AttributeProto.INT, ref_attr_name="g")
    conv = node("Conv", ["X", "W"], ["C"], name="inner")
    conv.attribute.append(ref_group)
    block = _function(
        "Block",
        [conv, node("Constant", [], ["B"], value=init("bv", [1, 4, 1, 1])), node("Add", ["C", "B"], ["Y"])],
        ["X", "W"],
        ["Y"],
        attributes=["g"],
    )
    unused = _function("Unused", [node("Conv", ["X", "W"], ["Y"], name="lonely")], ["X", "W"], ["Y"])
    g = graph(
        [
            node("Block", ["x", "w"], ["a"], name="call_one", domain="local", g=1),
            node("Block", ["x2", "wg"], ["b"], name="call_two", domain="local", g=2),
        ],
        [vi("x", [1, 3, 12, 12]), vi("x2", [1, 4, 7, 7])],
        ["a", "b"],
        [init("w", [4, 3, 3, 3]), init("wg", [4, 2, 1, 1])],
    )
    desc = read(model(g, extra_opsets={"local": 1}, functions=[block, unused]), tmp_path)
    convs = by_name(desc)
    assert list(convs) == ["call_one/inner", "call_two/inner", "local.Unused/lonely"]
    one, two, lonely = convs.values()
    assert (one.weight_shape, one.groups, one.output_spatial) == ((4, 3, 3, 3), 1, (10, 10))
    assert (two.weight_shape, two.groups, two.output_spatial) == ((4, 2, 1, 1), 2, (7, 7))
    assert one.bias_terms == two.bias_terms == (BiasTerm("B", (1, 4, 1, 1), ADD),)
    assert lonely.weight_shape is None
    assert lonely.output_spatial is None
    # w 108 + wg 8 + the function's Constant counted once (4)
    assert desc.model_params == 108 + 8 + 4
    assert kinds(desc)["call_two/inner"] is BiasKind.TIED


def test_recursive_function_is_not_followed_forever(tmp_path: Path) -> None:
    rec = _function(
        "Rec",
        [node("Rec", ["X"], ["Y"], domain="local"), node("Conv", ["X", "W"], ["Z"], name="c")],
        ["X", "W"],
        ["Y"],
    )
    g = graph(
        [node("Rec", ["x", "w"], ["y"], name="call", domain="local")],
        [vi("x", [1, 1, 3, 3])],
        ["y"],
        [init("w", [1, 1, 1, 1])],
    )
    desc = read(model(g, extra_opsets={"local": 1}, functions=[rec]), tmp_path)
    assert [c.name for c in desc.convs] == ["call/c"]
    assert any("calls itself" in w for w in desc.warnings)


def test_function_call_expansion_bomb_is_capped(tmp_path: Path) -> None:
    # F0 calls F1 twice, F1 calls F2 twice, ... : 2**30 instances from a tiny file.
    functions = [_function("F30", [node("Conv", ["X", "W"], ["Y"], name="c")], ["X", "W"], ["Y"])]
    for level in reversed(range(30)):
        body = [
            node(f"F{level + 1}", ["X", "W"], ["A"], domain="local"),
            node(f"F{level + 1}", ["A", "W"], ["Y"], domain="local"),
        ]
        functions.append(_function(f"F{level}", body, ["X", "W"], ["Y"]))
    g = graph(
        [node("F0", ["x", "w"], ["y"], domain="local")],
        [vi("x", [1, 1, 3, 3])],
        ["y"],
        [init("w", [1, 1, 1, 1])],
    )
    with pytest.raises(ResourceLimitError, match="functions expand to more than 10,000 call sites"):
        read(model(g, extra_opsets={"local": 1}, functions=functions), tmp_path)


# --------------------------------------------------------------------------------------------
# model_params rules


def test_model_params_dtype_rules(tmp_path: Path) -> None:
    g = graph(
        [
            node("Conv", ["x", "w"], ["c"], name="conv"),
            node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0]),
            node("Constant", [], ["shape_const"], value_ints=[1, 2, 3, 4]),
            node("Constant", [], ["idx"], value=init("idxv", [5], INT64)),
            node("DequantizeLinear", ["q32", "sc"], ["dq"]),
        ],
        [vi("x", [1, 3, 4, 4])],
        ["c", "k", "dq"],
        [
            init("w", [2, 3, 1, 1]),  # float: 6
            init("half", [10], TensorProto.FLOAT16),  # float16: 10
            init("i8", [7], TensorProto.INT8),  # int8: 7
            init("i16", [3], TensorProto.INT16),  # int16: 3
            init("q32", [5], TensorProto.INT32),  # DequantizeLinear input 0: 5
            init("plain32", [9], TensorProto.INT32),  # plain int32: never
            init("i64", [11], INT64),  # int64: never
            init("mask", [4], TensorProto.BOOL),  # bool: never
            init("sc", [], FLOAT, [1.0]),  # float scalar: 1
        ],
    )
    desc = read(model(g), tmp_path)
    assert desc.model_params == 6 + 10 + 7 + 3 + 5 + 1 + 3


def test_sparse_initializer_weight_and_training_info(tmp_path: Path) -> None:
    # 70 stored values: more than the 64 elements whose values a stripped copy keeps.
    values = init("sw", [70])
    indices = numpy_helper.from_array(np.arange(0, 210, 3, dtype=np.int64), "sw_idx")
    sparse = helper.make_sparse_tensor(values, indices, [70, 3, 1, 1])
    g = graph([node("Conv", ["x", "sw"], ["y"], name="conv")], [vi("x", [1, 3, 5, 5])], ["y"])
    g.sparse_initializer.append(sparse)
    m = model(g)
    training = m.training_info.add()
    training.initialization.CopyFrom(graph([], [], [], [init("big_state", [1000])], name="init"))
    desc = read(m, tmp_path)
    (conv,) = desc.convs
    assert conv.weight_shape == (70, 3, 1, 1)
    assert conv.output_spatial == (5, 5)
    assert desc.model_params == 210  # the dense shape; training-info graphs are not counted
    stripped = strip_model_proto(m.SerializeToString())
    parsed = onnx.ModelProto()
    parsed.ParseFromString(stripped.data)
    assert not parsed.training_info[0].initialization.initializer[0].raw_data
    assert list(parsed.training_info[0].initialization.initializer[0].dims) == [1000]
    assert not parsed.graph.sparse_initializer[0].values.raw_data


def test_negative_and_overflowing_dims_are_malformed(tmp_path: Path) -> None:
    bad = onnx.TensorProto(name="bad_w", data_type=FLOAT, dims=[4, -3, 3, 3])
    g = graph([node("Conv", ["x", "bad_w"], ["y"])], [vi("x", [1, 3, 8, 8])], ["y"], [bad])
    with pytest.raises(MalformedModelError, match="'bad_w' has a negative dimension -3"):
        read(model(g), tmp_path)
    huge = onnx.TensorProto(name="huge", data_type=FLOAT, dims=[1 << 40, 1 << 40])
    g = graph([node("Constant", [], ["k"], value=huge)], [], ["k"])
    with pytest.raises(MalformedModelError, match=r"'k'.*overflows int64"):
        read(model(g), tmp_path)


# --------------------------------------------------------------------------------------------
# File-level behaviour: external data, bad files, huge files, stripping


def test_external_data_is_never_opened(tmp_path: Path) -> None:
    m = conv_model(weight=(16, 3, 3, 3))
    onnx.save_model(
        m,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.bin",
        size_threshold=0,
    )
    (tmp_path / "ext.bin").unlink()  # the reader must not need it
    desc = read_onnx(tmp_path / "ext.onnx")[0]
    assert desc.convs[0].weight_shape == (16, 3, 3, 3)
    assert desc.convs[0].bias_terms == (BiasTerm("b", (16,), CONV),)
    assert desc.model_params == 16 * 27 + 16
    assert desc.warnings == ()


def test_external_data_outside_the_folder_is_warned_about(tmp_path: Path) -> None:
    m = conv_model()
    locations = {"w": "../secret.bin", "b": "/etc/passwd"}
    for tensor in m.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=locations[tensor.name])
    (tmp_path / "sub").mkdir()
    os.symlink("/etc", tmp_path / "sub" / "link")
    extra = init("v", [2])
    extra.ClearField("raw_data")
    extra.data_location = TensorProto.EXTERNAL
    extra.external_data.add(key="location", value="link/hostname")
    m.graph.initializer.append(extra)
    desc = read(m, tmp_path / "sub")
    assert desc.convs[0].weight_shape == (8, 3, 3, 3)
    assert len(desc.warnings) == 3
    assert "tensor 'w'" in desc.warnings[0] and "climbs out" in desc.warnings[0]
    assert "tensor 'b'" in desc.warnings[1] and "absolute" in desc.warnings[1]
    assert "tensor 'v'" in desc.warnings[2] and "symbolic link" in desc.warnings[2]


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (b"", UnsupportedFormatError, "not an ONNX model: the file is empty"),
        (b"hello, this is a text file\n", UnsupportedFormatError, "not an ONNX model"),
        (bytes(range(255, 0, -1)), UnsupportedFormatError, "not an ONNX model"),
        (b"\x08\x08\x12\x04abc", MalformedModelError, "truncated protobuf"),
        (b"\x08\x08", MalformedModelError, "ONNX model has no graph"),
        (b"\x08\x08\x3b\x00", MalformedModelError, "group wire type"),
        (b"\x08\x08\x3e\x00", MalformedModelError, "invalid wire type 6"),
        (b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", MalformedModelError, "longer than 10 bytes"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, error: type[Exception], message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(error, match=message) as info:
        read_onnx(path)
    assert "\n" not in str(info.value)
    assert str(path) not in str(info.value)


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match=r"^no such file or directory$"):
        read_onnx(tmp_path / "absent.onnx")


def test_truncated_real_model(tmp_path: Path) -> None:
    data = conv_model(weight=(32, 3, 5, 5)).SerializeToString()
    for cut in (len(data) // 2, len(data) - 3, 12):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(MalformedModelError, match="truncated protobuf"):
            read_onnx(path)


def test_file_over_2gib_with_sparse_payload(tmp_path: Path) -> None:
    # A ModelProto whose initializer raw_data claims 2.5 GiB; the file is extended sparsely, so the
    # test costs no disk and proves the payload is skipped, not read.
    payload_len = 5 * (1 << 29)
    conv = node("Conv", ["x", "big"], ["y"], name="conv")
    tensor_head = onnx.TensorProto(name="big", data_type=FLOAT, dims=[payload_len // 4 // 9, 1, 3, 3])
    tensor_bytes_head = tensor_head.SerializeToString() + _varint(9 << 3 | 2) + _varint(payload_len)
    initializer_len = len(tensor_bytes_head) + payload_len
    graph_head = (
        _field(1, conv.SerializeToString())
        + _field(11, vi("x", [1, 1, 8, 8]).SerializeToString())
        + _field(12, onnx.ValueInfoProto(name="y").SerializeToString())
        + _varint(5 << 3 | 2)
        + _varint(initializer_len)
        + tensor_bytes_head
    )
    graph_len = len(graph_head) + payload_len
    head = (
        _varint(1 << 3)
        + _varint(8)
        + _field(8, helper.make_opsetid("", 17).SerializeToString())
        + _varint(7 << 3 | 2)
        + _varint(graph_len)
        + graph_head
    )
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(len(head) + payload_len)
    assert path.stat().st_size > 2 * (1 << 30)
    desc = read_onnx(path)[0]
    (c,) = desc.convs
    assert c.weight_shape == (payload_len // 36, 1, 3, 3)
    assert c.output_spatial == (6, 6)
    assert desc.model_params == payload_len // 36 * 9


def test_stripped_model_matches_onnx_load(tmp_path: Path) -> None:
    m = _dynamically_quantized_model()
    m.graph.initializer.append(init("big_i64", [100], INT64))
    m.graph.initializer.append(ints("small_i64", [1, 2, 3]))
    path = save(m, tmp_path / "q.onnx")
    stripped = onnx.ModelProto()
    result = strip_model_proto(path.read_bytes())
    stripped.ParseFromString(result.data)
    loaded = onnx.load(str(path))
    assert len(stripped.graph.node) == len(loaded.graph.node)
    assert [n.op_type for n in stripped.graph.node] == [n.op_type for n in loaded.graph.node]
    kept = []
    for a, b in zip(stripped.graph.initializer, loaded.graph.initializer, strict=True):
        assert (a.name, list(a.dims), a.data_type) == (b.name, list(b.dims), b.data_type)
        if a.raw_data or a.int64_data or a.float_data or a.int32_data:
            assert numpy_helper.to_array(a).tolist() == numpy_helper.to_array(b).tolist()
            kept.append(a.name)
    # Small int64/float tensors keep their values; uint8 weights and zero points, and the
    # 100-element int64 tensor, do not.
    assert kept == ["ws", "b", "shape", "small_i64"]
    assert [t.name for t in loaded.graph.initializer] == [
        "wq",
        "wz",
        "ws",
        "b",
        "shape",
        "big_i64",
        "small_i64",
    ]
    # Nothing but payloads removed: stripping an already stripped copy changes nothing.
    assert strip_model_proto(result.data).data == result.data


def test_stripped_size_cap(tmp_path: Path) -> None:
    data = conv_model().SerializeToString()
    with pytest.raises(ResourceLimitError, match="graph structure exceeds"):
        strip_model_proto(data, max_bytes=16)
    assert limits.MAX_ONNX_STRIPPED_BYTES >= 1 << 20


# --------------------------------------------------------------------------------------------
# A real exporter


def test_torch_exported_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, bias=False)
            self.bn = torch.nn.BatchNorm2d(8)
            self.c3 = torch.nn.Conv2d(8, 4, 3, bias=False)
            self.b3 = torch.nn.Parameter(torch.zeros(4, 24, 24))
            self.up = torch.nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)

        def forward(self, x: object) -> object:
            return self.up(self.c3(self.bn(self.c2(self.c1(x)))) + self.b3)

    path = tmp_path / "net.onnx"
    torch.onnx.export(
        Net().eval(), (torch.randn(1, 3, 28, 28),), str(path), dynamo=False, do_constant_folding=False
    )
    desc = read_onnx(path)[0]
    layers = [
        (c.weight_shape, c.bias_terms, c.followed_by, c.output_spatial, c.groups, c.transposed)
        for c in desc.convs
    ]
    assert layers == [
        ((8, 3, 3, 3), (BiasTerm("c1.bias", (8,), CONV),), None, (28, 28), 1, False),
        ((8, 8, 3, 3), (), "BatchNormalization", (26, 26), 1, False),
        ((4, 8, 3, 3), (BiasTerm("b3", (4, 24, 24), ADD),), None, (24, 24), 1, False),
        ((4, 3, 2, 2), (BiasTerm("up.bias", (6,), CONV),), None, (48, 48), 2, True),
    ]
    assert list(kinds(desc).values()) == [BiasKind.TIED, BiasKind.ABSENT, BiasKind.UNTIED, BiasKind.TIED]
    loaded = onnx.load(str(path))
    expected = sum(int(np.prod(t.dims)) for t in loaded.graph.initializer if t.data_type == FLOAT)
    expected += sum(
        int(np.prod(a.t.dims))
        for n in loaded.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value" and a.t.data_type == FLOAT
    )
    assert desc.model_params == expected


def test_light_onnx_import_coexists_with_a_later_full_import(tmp_path: Path) -> None:
    # In a fresh process the reader loads only onnx's protobuf module and C++ extension (no numpy,
    # no onnx package); a later ``import onnx`` must still work fully and share those modules.
    import subprocess

    path = save(conv_model(), tmp_path / "m.onnx")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from biasinspect.readers.onnx_reader import allow_light_onnx_import, read_onnx\n"
        "allow_light_onnx_import()\n"
        f"d = read_onnx(Path({str(path)!r}))[0]\n"
        "assert 'onnx' not in sys.modules and 'numpy' not in sys.modules\n"
        "assert d.convs[0].output_spatial == (14, 14), d\n"
        "import onnx, onnx.helper, onnx.shape_inference, onnx.numpy_helper\n"
        f"m = onnx.load({str(path)!r})\n"
        "assert onnx.helper.make_node('Relu', ['a'], ['b']).op_type == 'Relu'\n"
        "assert onnx.onnx_ml_pb2.ModelProto is onnx.ModelProto\n"
        "assert len(onnx.shape_inference.infer_shapes(m).graph.output[0].type.tensor_type.shape.dim) == 4\n"
        "assert onnx.numpy_helper.to_array(m.graph.initializer[0]).shape == (8, 3, 3, 3)\n"
        f"assert read_onnx(Path({str(path)!r}))[0] == d\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_library_use_imports_onnx_normally(tmp_path: Path) -> None:
    # Only the CLI opts in to the light import; a library user's process gets the whole package.
    import subprocess

    path = save(conv_model(), tmp_path / "m.onnx")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from biasinspect.readers.onnx_reader import read_onnx\n"
        f"read_onnx(Path({str(path)!r}))\n"
        "print('onnx' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_invalid_group_attribute_is_unknown_not_guessed(tmp_path: Path) -> None:
    conv = node("Conv", ["x", "w"], ["y"], name="conv")
    conv.attribute.append(helper.make_attribute("group", [1, 2]))
    g = graph([conv], [vi("x", [1, 3, 8, 8])], ["y"], [init("w", [3, 3, 3, 3])])
    (layer,) = read(model(g), tmp_path).convs
    assert layer.groups is None
    assert layer.notes == ("invalid 'group' attribute",)
    assert layer.weight_shape == (3, 3, 3, 3)


def test_dynamo_exported_model_with_external_data(tmp_path: Path) -> None:
    # torch's default exporter (torch.export based): node names like node_Conv_0, an optimizer
    # pass over the graph, and weights saved beside the model as external data.
    import torch

    class Net(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 5, bias=False)
            self.bias = torch.nn.Parameter(torch.randn(32, 28, 28))
            self.up = torch.nn.ConvTranspose2d(32, 8, 4, stride=2, padding=1)
            self.dw = torch.nn.Conv2d(8, 8, 3, groups=8)

        def forward(self, x: object) -> object:
            return self.dw(self.up(self.conv(x) + self.bias))

    path = tmp_path / "dynamo.onnx"
    torch.onnx.export(
        Net().eval(), (torch.randn(1, 3, 32, 32),), str(path), dynamo=True, external_data=True, verbose=False
    )
    data_files = [p for p in tmp_path.iterdir() if p != path]
    assert data_files, "the exporter was expected to write external data"
    for data_file in data_files:
        data_file.unlink()  # inspection never needs it
    desc = read_onnx(path)[0]
    layers = [(c.op, c.weight_shape, c.groups, c.output_spatial, c.bias_terms) for c in desc.convs]
    assert [(op, shape, groups, spatial) for op, shape, groups, spatial, _ in layers] == [
        ("Conv", (32, 3, 5, 5), 1, (28, 28)),
        ("ConvTranspose", (32, 8, 4, 4), 1, (56, 56)),
        ("Conv", (8, 1, 3, 3), 8, (54, 54)),
    ]
    assert [[term.shape for term in terms] for *_, terms in layers] == [[(32, 28, 28)], [(8,)], [(8,)]]
    assert list(kinds(desc).values()) == [BiasKind.UNTIED, BiasKind.TIED, BiasKind.TIED]
    assert desc.model_params == 2400 + 32 * 28 * 28 + 32 * 8 * 16 + 8 + 72 + 8
    # Layers are named by their module path from the node metadata, not node_Conv_0.
    assert [c.name for c in desc.convs] == ["conv", "up", "dw"]


def test_dynamo_export_names_layers_by_module_path(tmp_path: Path) -> None:
    # A conv+BN block whose BN the exporter folds into the conv (the node then carries the
    # BatchNorm's scope), a container class whose name holds "Conv", and one conv module called
    # twice (two nodes with one module path).
    import torch
    from torch import nn

    class ConvNormAct(nn.Sequential):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    class Net(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.stem = ConvNormAct()
            self.shared = nn.Conv2d(8, 8, 1)

        def forward(self, x: object) -> object:
            return self.shared(self.shared(self.stem(x)))

    path = tmp_path / "dynamo_names.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=True, verbose=False)
    desc = read_onnx(path)[0]
    names = [c.name for c in desc.convs]
    assert names[0] == "stem.0"
    assert len(names) == 3
    assert names[1].startswith("shared (node_") and names[2].startswith("shared (node_")
    assert names[1] != names[2]


def _node_with_torch_scopes(scopes: str, classes: str) -> onnx.NodeProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="node_Conv_3")
    for key, value in (("pkg.torch.onnx.name_scopes", scopes), ("pkg.torch.onnx.class_hierarchy", classes)):
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    return node


@pytest.mark.parametrize(
    ("scopes", "classes", "weight", "expected"),
    [
        (
            "['', 'a', 'a.conv', 'conv2d']",
            "['M', 'S', 'torch.nn.modules.conv.Conv2d', 'aten.conv2d']",
            "w",
            "a.conv",
        ),
        (
            "['', 'up', 'conv_transpose2d']",
            "['M', 'torch.nn.modules.conv.ConvTranspose2d', 'aten.x']",
            "w",
            "up",
        ),
        (
            "['', 'b', 'b.1', 'bn']",
            "['M', 'x.ConvBlock', 'torch.nn.BatchNorm2d', 'aten.bn']",
            "b.0.weight",
            "b.0",
        ),
        ("['', 'b', 'b.1', 'bn']", "['M', 'x.ConvBlock', 'torch.nn.BatchNorm2d', 'aten.bn']", "val_3", "b"),
        # A conv module at the root has an empty scope: the node name stays.
        ("['', 'conv2d']", "['torch.nn.modules.conv.Conv2d', 'aten.conv2d']", "w", None),
        # Malformed or mismatched lists are ignored, never guessed from.
        ("not a list", "['M']", "w", None),
        ("['', 'a']", "['M']", "w", None),
        ("['" + "x" * 70_000 + "']", "['torch.nn.Conv2d']", "w", None),
    ],
)
def test_torch_module_path_from_node_metadata(
    scopes: str, classes: str, weight: str, expected: str | None
) -> None:
    from biasinspect.readers.onnx_reader import _torch_module_path

    assert _torch_module_path(_node_with_torch_scopes(scopes, classes), weight) == expected


def test_nodes_without_torch_metadata_keep_their_names() -> None:
    from biasinspect.readers.onnx_reader import _torch_module_path

    node = helper.make_node("Conv", ["x", "features.0.weight"], ["y"], name="/features/features.0/Conv")
    assert _torch_module_path(node, "features.0.weight") is None


# --------------------------------------------------------------------------------------------
# Regression tests for review findings


def _kept_values(tensor: TensorProto) -> list[float] | None:
    """The values a stripped copy of a model holding ``tensor`` keeps (None when dropped)."""
    g = graph([], [], [], [tensor])
    parsed = onnx.ModelProto()
    parsed.ParseFromString(strip_model_proto(model(g).SerializeToString()).data)
    (out,) = parsed.graph.initializer
    assert (list(out.dims), out.data_type) == (list(tensor.dims), tensor.data_type)
    if not (out.raw_data or out.float_data or out.int32_data or out.int64_data or out.double_data):
        return None
    return [float(v) for v in numpy_helper.to_array(out).ravel()]


def test_small_float_tensors_keep_their_values() -> None:
    scales = [1.0, 1.0, 2.0, 2.5]
    assert _kept_values(init("f32", [4], FLOAT, scales)) == scales
    assert _kept_values(init("f64", [4], TensorProto.DOUBLE, scales)) == scales
    assert _kept_values(init("f16", [4], TensorProto.FLOAT16, scales)) == scales
    assert _kept_values(init("f64_64", [64], TensorProto.DOUBLE, [0.5] * 64)) == [0.5] * 64
    # Typed (non-raw) float payload fields are kept too.
    assert _kept_values(helper.make_tensor("typed", FLOAT, [2], [3.0, 4.0])) == [3.0, 4.0]
    # Past 64 elements, or another dtype: shape only.
    assert _kept_values(init("f32_65", [65], FLOAT, [1.0] * 65)) is None
    assert _kept_values(init("u8", [4], TensorProto.UINT8, [1, 2, 3, 4])) is None
    assert _kept_values(init("i16", [4], TensorProto.INT16, [1, 2, 3, 4])) is None


def test_small_int_tensor_byte_cap_counts_only_the_data() -> None:
    # 64 negative int64 values as varints: exactly 640 data bytes, plus the field tag and length.
    values = [-1] * 64
    tensor = helper.make_tensor("neg", INT64, [64], values)
    assert len(tensor.int64_data) == 64
    assert _kept_values(tensor) == [-1.0] * 64


def _resize_model(scales: TensorProto | None, custom_op: bool = False) -> onnx.ModelProto:
    nodes = [
        node("Conv", ["x", "w"], ["c"], name="c1"),
        node("Resize", ["c", "", "sc"], ["r"], mode="nearest"),
        node("Conv", ["r", "w2", "b2"], ["y"], name="c2"),
    ]
    if custom_op:  # makes ONNX shape inference fail: our own Resize rule must compute the size
        nodes.insert(0, node("Foo", ["x"], ["unused"], domain="my.custom"))
    inputs = [vi("x", [1, 3, 8, 8])]
    inits = [init("w", [4, 3, 3, 3]), init("w2", [4, 4, 3, 3]), init("b2", [4])]
    if scales is None:
        inputs.append(vi("sc", [4]))  # scales given at run time: the size cannot be known
    else:
        inits.append(scales)
    return model(graph(nodes, inputs, ["y"], inits))


@pytest.mark.parametrize(
    ("dtype", "custom_op"),
    [
        (FLOAT, False),
        (TensorProto.FLOAT16, False),
        (FLOAT, True),
        (TensorProto.FLOAT16, True),
        (TensorProto.DOUBLE, True),  # ONNX wants float scales; our own Resize rule reads any
    ],
)
def test_conv_after_resize_keeps_its_output_size(tmp_path: Path, dtype: int, custom_op: bool) -> None:
    scales = init("sc", [4], dtype, [1, 1, 2, 2])
    desc = read(_resize_model(scales, custom_op), tmp_path)
    c1, c2 = desc.convs
    assert (c1.name, c1.output_spatial, c1.notes) == ("c1", (6, 6), ())
    assert (c2.name, c2.output_spatial, c2.notes) == ("c2", (10, 10), ())
    assert c2.bias_terms == (BiasTerm("b2", (4,), CONV),)
    assert len(desc.warnings) == int(custom_op)


def test_resize_scales_built_by_concat_of_constants(tmp_path: Path) -> None:
    # torch's legacy exporter without constant folding (nn.Upsample): scales = Concat(Constant
    # [1, 1], Constant [2, 2]); ONNX data propagation does not follow float Concats.
    ones = helper.make_tensor("ones", FLOAT, [2], [1.0, 1.0])
    twos = helper.make_tensor("twos", FLOAT, [2], [2.0, 2.0])
    g = graph(
        [
            node("Constant", [], ["one"], value=ones),
            node("Constant", [], ["two"], value=twos),
            node("Concat", ["one", "two"], ["sc"], axis=0),
            node("Identity", ["sc"], ["sc_id"]),
            node("Conv", ["x", "w"], ["c"], name="c1"),
            node("Resize", ["c", "", "sc_id"], ["r"], mode="nearest"),
            node("Conv", ["r", "w2", "b2"], ["y"], name="c2"),
        ],
        [vi("x", [1, 3, 8, 8])],
        ["y"],
        [init("w", [4, 3, 3, 3]), init("w2", [4, 4, 3, 3]), init("b2", [4])],
    )
    desc = read(model(g), tmp_path)
    assert [(c.name, c.output_spatial, c.notes) for c in desc.convs] == [
        ("c1", (6, 6), ()),
        ("c2", (10, 10), ()),
    ]


def test_upsample_scales_attribute_and_resize_sizes_without_inference(tmp_path: Path) -> None:
    g = graph(
        [
            node("Foo", ["x"], ["unused"], domain="my.custom"),
            node("Upsample", ["x"], ["u"], scales=[1.0, 1.0, 3.0, 2.0]),
            node("Conv", ["u", "w"], ["a"], name="after_upsample"),
            node("Resize", ["x", "", "", "sizes"], ["r"]),
            node("Conv", ["r", "w"], ["b"], name="after_resize_sizes"),
        ],
        [vi("x", [1, 3, 4, 4])],
        ["a", "b"],
        [init("w", [2, 3, 1, 1]), ints("sizes", [1, 3, 5, 7])],
    )
    desc = read(model(g, opset=7), tmp_path)
    assert {c.name: c.output_spatial for c in desc.convs} == {
        "after_upsample": (12, 8),
        "after_resize_sizes": (5, 7),
    }


def test_conv_output_size_lost_with_fixed_inputs_gets_a_note(tmp_path: Path) -> None:
    desc = read(_resize_model(None), tmp_path)
    c1, c2 = desc.convs
    assert c1.notes == ()
    assert c2.output_spatial == (None, None)
    assert c2.notes == (
        "output size unknown: the size of input 'r' could not be inferred, "
        "although the model's input shapes are fixed",
    )
    # With a symbolic input dim an unknown size is expected: no note.
    m = _resize_model(None)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    c1, c2 = read(m, tmp_path, "symbolic.onnx").convs
    assert (c1.output_spatial, c2.output_spatial) == ((None, 6), (None, None))
    assert c1.notes == c2.notes == ()


def _many_call_sites_model(calls: int, doc_bytes: int) -> onnx.ModelProto:
    """``calls`` call sites of a one-conv function, each with a different input size, plus an
    unrelated function carrying a large doc string."""
    f = _function("F", [node("Conv", ["X", "W"], ["Y"], name="c")], ["X", "W"], ["Y"])
    unrelated = _function("G", [node("Identity", ["X"], ["Y"])], ["X"], ["Y"])
    unrelated.doc_string = "x" * doc_bytes
    g = graph(
        [node("F", [f"x{i}", "w"], [f"y{i}"], name=f"call{i}", domain="local") for i in range(calls)],
        [vi(f"x{i}", [1, 1, 3 + i, 3]) for i in range(calls)],
        [f"y{i}" for i in range(calls)],
        [init("w", [1, 1, 1, 1])],
    )
    return model(g, extra_opsets={"local": 1}, functions=[f, unrelated])


def test_many_function_call_sites_stay_small(tmp_path: Path) -> None:
    # 300 call sites with distinct shapes and a 2 MB doc string elsewhere: each call site's
    # inference used to copy every function (1.2 GiB peak); now only the called one, no docs.
    path = save(_many_call_sites_model(300, 2_000_000), tmp_path / "calls.onnx")
    # Peak RSS from /proc (VmHWM): getrusage's ru_maxrss would inherit pytest's peak across exec.
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from biasinspect.readers.onnx_reader import read_onnx\n"
        "d = read_onnx(Path(sys.argv[1]))[0]\n"
        "print(len(d.convs), d.convs[299].name, d.convs[299].output_spatial, len(d.warnings))\n"
        "status = Path('/proc/self/status').read_text().splitlines()\n"
        "print(next(int(line.split()[1]) for line in status if line.startswith('VmHWM:')) // 1024)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    summary, peak_mib = result.stdout.splitlines()
    assert summary == "300 call299/c (302, 3) 0"
    assert int(peak_mib) < 200  # ~50 MiB now; 1,239 MiB before


def test_function_inference_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_ONNX_FUNCTION_INFERENCE_NODES", 4)
    desc = read(_many_call_sites_model(6, 0), tmp_path)
    # Four call sites are inferred (one node each); the rest are walked without inference, and
    # the conv arithmetic still gives their sizes from the bound input shapes.
    assert [c.output_spatial for c in desc.convs] == [(3 + i, 3) for i in range(6)]
    assert desc.warnings == (
        "shape inference inside functions stopped after 4 nodes; "
        "shapes in the remaining call sites may be unknown",
    )


def _quantized_bn_models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A conv followed by a folded BatchNorm (Mul, Add by per-channel parameters), float and
    ConvInteger form (rescaled by a run-time scalar first)."""
    bn = [init("s", [1, 4, 1, 1]), init("t", [1, 4, 1, 1])]
    float_g = graph(
        [
            node("Conv", ["x", "w"], ["c"], name="conv"),
            node("Mul", ["c", "s"], ["m"]),
            node("Add", ["m", "t"], ["y"]),
        ],
        [vi("x", [1, 3, 8, 8])],
        ["y"],
        [init("w", [4, 3, 3, 3]), *bn],
    )
    int_g = graph(
        [
            node("ConvInteger", ["xq", "wq"], ["ci"], name="conv"),
            node("Cast", ["ci"], ["cf"], to=FLOAT),
            node("Mul", ["cf", "sc"], ["r"]),
            node("Mul", ["r", "s"], ["m"]),
            node("Add", ["m", "t"], ["y"]),
        ],
        [vi("xq", [1, 3, 8, 8], TensorProto.UINT8), vi("sc", [])],
        ["y"],
        [init("wq", [4, 3, 3, 3], TensorProto.UINT8), *bn],
    )
    return model(float_g), model(int_g)


def test_quantized_conv_then_folded_batchnorm_has_no_bias(tmp_path: Path) -> None:
    float_m, int_m = _quantized_bn_models()
    (fconv,) = read(float_m, tmp_path, "f.onnx").convs
    (qconv,) = read(int_m, tmp_path, "q.onnx").convs
    assert (fconv.bias_terms, fconv.followed_by) == ((), "Mul+Add")
    assert (qconv.bias_terms, qconv.followed_by) == ((), "Mul+Add")


def test_conv_integer_rescale_by_a_stored_per_channel_scale_is_not_followed(tmp_path: Path) -> None:
    # Without the run-time scalar rescale, the per-channel Mul is the norm's, not a rescale.
    _, int_m = _quantized_bn_models()
    nodes = [n for n in int_m.graph.node if n.output[0] != "r"]
    nodes[2].input[0] = "cf"
    del int_m.graph.node[:]
    int_m.graph.node.extend(nodes)
    (qconv,) = read(int_m, tmp_path).convs
    assert (qconv.bias_terms, qconv.followed_by) == ((), "Mul+Add")
    # A stored scalar rescale is followed (once), and the Add after it is the bias.
    g = graph(
        [
            node("ConvInteger", ["xq", "wq"], ["ci"], name="conv"),
            node("Cast", ["ci"], ["cf"], to=FLOAT),
            node("Mul", ["cf", "sc"], ["r"]),
            node("Add", ["r", "b"], ["y"]),
        ],
        [vi("xq", [1, 3, 8, 8], TensorProto.UINT8)],
        ["y"],
        [init("wq", [4, 3, 3, 3], TensorProto.UINT8), init("sc", [], FLOAT, [0.5]), init("b", [1, 4, 1, 1])],
    )
    (qconv,) = read(model(g), tmp_path, "scalar.onnx").convs
    assert (qconv.bias_terms, qconv.followed_by) == ((BiasTerm("b", (1, 4, 1, 1), ADD),), None)


def _nested_functions_model(functions: int, if_levels: int) -> onnx.ModelProto:
    """F0 calls F1 ... calls F{functions-1} (which holds the conv), each call and the conv inside
    ``if_levels`` nested If nodes."""

    def nest(body: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], str]:
        out = "Y"
        for level in range(if_levels):
            sub = helper.make_graph(body, f"b{level}", [], [onnx.ValueInfoProto(name=out)])
            out = f"o{level}"
            body = [
                node(
                    "Constant",
                    [],
                    [f"cond{level}"],
                    value=helper.make_tensor("cv", TensorProto.BOOL, [], [True]),
                ),
                node(
                    "If",
                    [f"cond{level}"],
                    [out],
                    then_branch=sub,
                    else_branch=graph([node("Identity", ["X"], ["e"])], [], ["e"]),
                ),
            ]
        return body, out

    protos = []
    for i in range(functions):
        last = i + 1 == functions
        inner = (
            node("Conv", ["X", "W"], ["Y"], name="c")
            if last
            else node(f"F{i + 1}", ["X", "W"], ["Y"], domain="local")
        )
        body, out = nest([inner])
        protos.append(_function(f"F{i}", [*body, node("Identity", [out], ["Z"])], ["X", "W"], ["Z"]))
    g = graph(
        [node("F0", ["x", "w"], ["y"], name="call", domain="local")],
        [vi("x", [1, 1, 3, 3])],
        ["y"],
        [init("w", [1, 1, 1, 1])],
    )
    return model(g, extra_opsets={"local": 1}, functions=protos)


def test_deep_function_and_subgraph_nesting_does_not_exhaust_the_stack(tmp_path: Path) -> None:
    # 32 nested functions x 31 nested If levels: ~1,000 scopes, past Python's recursion limit.
    desc = read(_nested_functions_model(32, 31), tmp_path)
    ifs = "If_1/then_branch/" * 31
    expected = "call/" + "".join(f"{ifs}F{i}_0/" for i in range(1, 32)) + ifs + "c"
    (conv,) = desc.convs
    assert conv.name == expected
    assert conv.weight_shape == (1, 1, 1, 1)
    assert desc.warnings == ()


def test_function_called_only_from_a_subgraph_is_reported_once(tmp_path: Path) -> None:
    g_fn = _function("G", [node("Conv", ["X", "W"], ["Y"], name="c")], ["X", "W"], ["Y"])
    then = graph([node("G", ["X", "W"], ["t"], domain="local", name="callG")], [], ["t"])
    other = graph([node("Identity", ["X"], ["e"])], [], ["e"])
    f_fn = _function(
        "F",
        [node("If", ["C"], ["Y"], name="if", then_branch=then, else_branch=other)],
        ["X", "W", "C"],
        ["Y"],
    )
    g = graph([node("Relu", ["x"], ["y"])], [vi("x", [1, 1, 3, 3])], ["y"])
    desc = read(model(g, extra_opsets={"local": 1}, functions=[g_fn, f_fn]), tmp_path)
    assert [c.name for c in desc.convs] == ["local.F/if/then_branch/callG/c"]


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
def test_quantized_int32_biases_count_in_any_domain(tmp_path: Path, domain: str) -> None:
    u8, i8, i32 = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
    g = graph(
        [
            node(
                "QLinearConv",
                ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                ["y"],
                name="qc",
                domain=domain,
            ),
            node("DequantizeLinear", ["q32", "xs"], ["dq"], domain=domain),
        ],
        [vi("x", [1, 3, 8, 8], u8)],
        ["y", "dq"],
        [
            init("xs", []),
            init("xz", [], u8),
            init("w", [4, 3, 3, 3], i8),
            init("ws", []),
            init("wz", [], i8),
            init("ys", []),
            init("yz", [], u8),
            init("b", [4], i32),
            init("q32", [5], i32),
            init("plain32", [7], i32),
        ],
    )
    desc = read(model(g, extra_opsets={"com.microsoft": 1}), tmp_path)
    # float scales 3, int8/uint8 weight and zero points 108 + 3, int32 conv bias 4 and
    # DequantizeLinear input 5; the unused int32 tensor never counts.
    assert desc.model_params == 3 + 108 + 3 + 4 + 5
    assert desc.convs[0].bias_terms == (BiasTerm("b", (4,), CONV),)


# --------------------------------------------------------------------------------------------
# Bias Adds after Squeeze / Unsqueeze / Transpose (tf2onnx's Keras Conv1D, NHWC graphs)


def _layout_model(
    steps: list[onnx.NodeProto], last: str, bias_shape: list[int], extra: list[TensorProto]
) -> onnx.ModelProto:
    nodes = [node("Conv", ["x", "w"], ["c"], name="conv"), *steps, node("Add", [last, "b"], ["y"])]
    inits = [init("w", [4, 3, 1, 3]), init("b", bias_shape), *extra]
    return model(graph(nodes, [vi("x", [1, 3, 1, 10])], ["y"], inits))


@pytest.mark.parametrize(
    ("steps", "last", "bias_shape", "extra", "expected_shape", "kind"),
    [
        # Keras Conv1D through tf2onnx: [1, 4, 1, 8] -> Squeeze(2) -> [1, 4, 8] + [1, 4, 1].
        (
            [node("Squeeze", ["c", "ax"], ["s"])],
            "s",
            [1, 4, 1],
            [ints("ax", [2])],
            (1, 4, 1, 1),
            BiasKind.TIED,
        ),
        # Squeeze without axes drops every extent-1 axis (batch and H): [4, 8] + [4, 1].
        ([node("Squeeze", ["c"], ["s"])], "s", [4, 1], [], (1, 4, 1, 1), BiasKind.TIED),
        # Back to NHWC before the Add: [C] broadcasts along the last axis, the channels.
        ([node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1])], "t", [4], [], (1, 4, 1, 1), BiasKind.TIED),
        # An untied bias in NHWC: [H, W, C].
        (
            [node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1])],
            "t",
            [1, 8, 4],
            [],
            (1, 4, 1, 8),
            BiasKind.UNTIED,
        ),
        # Squeeze, then Transpose to [N, W, C] (Keras' Conv1D layout) and an untied [W, C] bias.
        (
            [node("Squeeze", ["c", "ax"], ["s"]), node("Transpose", ["s"], ["t"], perm=[0, 2, 1])],
            "t",
            [8, 4],
            [ints("ax", [2])],
            (1, 4, 1, 8),
            BiasKind.UNTIED,
        ),
        (
            [node("Unsqueeze", ["c", "ax"], ["u"])],
            "u",
            [1, 1, 4, 1, 1],
            [ints("ax", [0])],
            (1, 4, 1, 1),
            BiasKind.TIED,
        ),
    ],
)
def test_bias_add_after_layout_steps(
    tmp_path: Path,
    steps: list[onnx.NodeProto],
    last: str,
    bias_shape: list[int],
    extra: list[TensorProto],
    expected_shape: tuple[int, ...],
    kind: BiasKind,
) -> None:
    desc = read(_layout_model(steps, last, bias_shape, extra), tmp_path)
    (conv,) = desc.convs
    assert conv.output_spatial == (1, 8)
    assert conv.bias_terms == (BiasTerm("b", expected_shape, ADD),)
    assert kinds(desc) == {"conv": kind}
    assert conv.notes[0].startswith("bias added after ")


def test_bias_add_that_does_not_map_back_is_other(tmp_path: Path) -> None:
    # It varies along the axis the Unsqueeze added: not a bias of the conv output.
    steps = [node("Unsqueeze", ["c", "ax"], ["u"])]
    desc = read(_layout_model(steps, "u", [2, 1, 4, 1, 1], [ints("ax", [0])]), tmp_path)
    (conv,) = desc.convs
    assert conv.bias_terms == (BiasTerm("b", (2, 1, 4, 1, 1), ADD, aligned=False),)
    assert kinds(desc) == {"conv": BiasKind.OTHER}
    assert conv.notes == ("bias 'b' is added after Unsqueeze and does not map onto the conv output",)


def test_shape_reads_of_the_conv_output_do_not_hide_its_bias_add(tmp_path: Path) -> None:
    g = graph(
        [
            node("Conv", ["x", "w"], ["c"], name="conv"),
            node("Shape", ["c"], ["c_shape"]),
            node("Size", ["c"], ["c_size"]),
            node("Add", ["c", "b"], ["y"]),
        ],
        [vi("x", [1, 3, 8, 8])],
        ["y", "c_shape", "c_size"],
        [init("w", [4, 3, 3, 3]), init("b", [4, 6, 6])],
    )
    desc = read(model(g), tmp_path)
    assert desc.convs[0].bias_terms == (BiasTerm("b", (4, 6, 6), ADD),)
    assert kinds(desc) == {"conv": BiasKind.UNTIED}


def _runtime_zero_bias_model(weight_at_run_time: bool, zero: float = 0.0) -> onnx.ModelProto:
    # torch's unoptimised dynamo export of a bias-free conv: bias = Expand(CastLike(0.0, x),
    # Shape(weight)[:1]).
    zero_t = helper.make_tensor("z", FLOAT, [], [zero])
    nodes = [
        node("Shape", ["w"], ["w_shape"], end=1),
        node("Constant", [], ["zero"], value=zero_t),
        node("CastLike", ["zero", "x"], ["zero_like"]),
        node("Expand", ["zero_like", "w_shape"], ["b"]),
        node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        node("BatchNormalization", ["c", "s", "o", "m", "v"], ["y"]),
    ]
    inits = [init(n, [4]) for n in "somv"]
    if weight_at_run_time:
        nodes.insert(0, node("ConstantOfShape", ["w_dims"], ["w"]))
        inits.append(ints("w_dims", [4, 3, 3, 3]))
    else:
        inits.append(init("w", [4, 3, 3, 3]))
    return model(graph(nodes, [vi("x", [1, 3, 8, 8])], ["y"], inits))


def test_bias_input_of_run_time_zeros_is_no_stored_bias(tmp_path: Path) -> None:
    desc = read(_runtime_zero_bias_model(weight_at_run_time=False), tmp_path)
    (conv,) = desc.convs
    assert conv.bias_terms == ()
    assert conv.followed_by == "BatchNormalization"
    assert conv.notes == ("the bias input is a zero tensor made at run time: no stored bias",)
    assert kinds(desc) == {"conv": BiasKind.ABSENT}


def test_run_time_bias_that_is_not_zero_or_beside_run_time_weights_is_kept(tmp_path: Path) -> None:
    for m in (_runtime_zero_bias_model(False, zero=0.5), _runtime_zero_bias_model(True)):
        (conv,) = read(m, tmp_path).convs
        assert [(t.name, t.source) for t in conv.bias_terms] == [("b", CONV)]
        assert conv.notes == ()
