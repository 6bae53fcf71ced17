"""TFLite reader: committed samples written by the real converter, plus flatbuffers built in code."""

from __future__ import annotations

from pathlib import Path

import pytest
import tflite_builders as tb
from tflite_builders import Graph, Op, T

from biasinspect.analysis import analyze
from biasinspect.api import inspect, read_file
from biasinspect.cli import main
from biasinspect.errors import MalformedModelError
from biasinspect.model import BiasKind, ModelReport

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def report_of(path: Path) -> ModelReport:
    descriptions = read_file(path)
    assert len(descriptions) == 1
    assert descriptions[0].format == "tflite"
    return analyze(descriptions[0])


def write(tmp_path: Path, data: bytes, name: str = "model.tflite") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rows(report: ModelReport) -> list[tuple[str, str, int | None, int | None, int | None, str, int | None]]:
    return [
        (
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


# -- samples written by tf.lite.TFLiteConverter (samples/make_format_samples.py) -------------------


def test_seed_sample_is_tied_with_2432_parameters():
    report = report_of(SAMPLES / "seed_tied.tflite")
    (layer,) = report.layers
    assert (layer.op, layer.in_channels, layer.out_channels, layer.output_spatial) == (
        "CONV_2D",
        3,
        32,
        (28, 28),
    )
    assert layer.weight_shape == (32, 3, 5, 5)
    assert layer.bias.kind is BiasKind.TIED
    assert layer.formula == "(3x5x5 + 1) x 32 = 2,432"
    assert report.totals.model_params == 2432


ZOO_2D = [
    ("CONV_2D", "3x3", 3, 4, 1, "tied", 4),
    ("CONV_2D", "3x3", 4, 6, 1, "tied", 6),  # use_bias=False + BatchNormalization: folded bias
    ("DEPTHWISE_CONV_2D", "3x3", 6, 12, 6, "tied", 12),
    ("DEPTHWISE_CONV_2D", "3x3", 12, 12, 12, "tied", 12),  # SeparableConv2D's depthwise half
    ("CONV_2D", "1x1", 12, 5, 1, "tied", 5),  # ... and its pointwise half
    ("TRANSPOSE_CONV", "3x3", 5, 3, 1, "tied", 3),
]


@pytest.mark.parametrize(
    "name", ["zoo_2d.tflite", "zoo_2d_fp16.tflite", "zoo_2d_int8.tflite", "zoo_2d_int16x8.tflite"]
)
def test_zoo_2d_samples_in_every_precision(name):
    """Float, float16 (DEQUANTIZE), int8 and int16x8 conversions of one tf-keras model report the
    same convs: the converter folds BatchNormalization into a stored bias."""
    report = report_of(SAMPLES / name)
    assert rows(report) == ZOO_2D
    assert [layer.output_spatial for layer in report.layers] == [
        (10, 10),
        (8, 8),
        (6, 6),
        (4, 4),
        (4, 4),
        (9, 9),
    ]
    transpose = report.layers[-1]
    assert transpose.weight_shape == (5, 3, 3, 3) and transpose.transposed
    assert report.totals.conv_bias_params == 42


def test_layer_names_come_from_the_converted_tf_ops():
    report = report_of(SAMPLES / "zoo_2d.tflite")
    assert [layer.name for layer in report.layers] == [
        "zoo_2d/conv/Conv2D",
        "zoo_2d/conv_nobias/Conv2D",
        "zoo_2d/depthwise/BiasAdd",
        "zoo_2d/separable/separable_conv2d/depthwise",
        "zoo_2d/separable/BiasAdd",
        "StatefulPartitionedCall:0",  # the model's output: the converter keeps no other name
    ]


def test_zoo_2d_model_params():
    # 112 + 222 + 120 + 120 + 65 + 138: every constant tensor once.
    assert report_of(SAMPLES / "zoo_2d.tflite").totals.model_params == 777
    # float16: the fp16 constants count, their DEQUANTIZE outputs are not constants.
    assert report_of(SAMPLES / "zoo_2d_fp16.tflite").totals.model_params == 777
    # int8 filters and int32 biases count.
    assert report_of(SAMPLES / "zoo_2d_int8.tflite").totals.model_params == 777


def test_conv1d_sample_is_expand_dims_plus_conv2d():
    report = report_of(SAMPLES / "zoo_1d.tflite")
    assert rows(report) == [("CONV_2D", "5", 3, 4, 1, "tied", 4), ("CONV_2D", "3", 4, 2, 1, "tied", 2)]
    assert [layer.weight_shape for layer in report.layers] == [(4, 3, 5), (2, 4, 3)]
    assert [layer.output_spatial for layer in report.layers] == [(16,), (14,)]


def test_conv3d_sample_biases_are_adds():
    """CONV_3D and CONV_3D_TRANSPOSE have no bias input: the converter leaves a constant ADD."""
    report = report_of(SAMPLES / "zoo_3d.tflite")
    assert rows(report) == [
        ("CONV_3D", "3x3x3", 2, 3, 1, "tied", 3),
        ("CONV_3D_TRANSPOSE", "3x3x3", 3, 2, 1, "tied", 2),
    ]
    assert [str(layer.bias.source) for layer in report.layers] == ["add", "add"]
    assert [layer.weight_shape for layer in report.layers] == [(3, 2, 3, 3, 3), (3, 2, 3, 3, 3)]
    assert [layer.output_spatial for layer in report.layers] == [(4, 4, 4), (6, 6, 6)]


def test_sparse_sample_reads_through_densify():
    report = report_of(SAMPLES / "sparse.tflite")
    assert rows(report) == [("CONV_2D", "3x3", 8, 16, 1, "tied", 16)]
    assert report.layers[0].formula == "(8x3x3 + 1) x 16 = 1,168"
    assert report.totals.model_params == 1168


# -- fixtures built in code ----------------------------------------------------------------------


def conv2d_model(bias: bool = True) -> bytes:
    tensors = [
        T("input", (1, 32, 32, 3)),
        T("conv/filter", (32, 5, 5, 3), const=True),
        T("conv/bias", (32,), const=True),
        T("conv/out", (1, 28, 28, 32)),
    ]
    return tb.single(tensors, [Op(tb.CONV_2D, (0, 1, 2 if bias else -1), (3,))])


def test_conv2d_bias_input_and_absent(tmp_path):
    tied = report_of(write(tmp_path, conv2d_model()))
    assert tied.layers[0].formula == "(3x5x5 + 1) x 32 = 2,432"
    assert tied.layers[0].name == "conv/out"
    absent = report_of(write(tmp_path, conv2d_model(bias=False), "absent.tflite"))
    assert str(absent.layers[0].bias.kind) == "absent"
    assert absent.totals.model_params == 2400 + 32  # the unused bias constant still counts


def test_untied_add_after_conv(tmp_path):
    """A constant [1, H, W, C] ADDed to the conv output is an untied bias: 32x28x28 = 25,088."""
    tensors = [
        T("input", (1, 32, 32, 3)),
        T("filter", (32, 5, 5, 3), const=True),
        T("conv", (1, 28, 28, 32)),
        T("untied_bias", (1, 28, 28, 32), const=True),
        T("out", (1, 28, 28, 32)),
    ]
    ops = [Op(tb.CONV_2D, (0, 1, -1), (2,)), Op(tb.ADD, (2, 3), (4,))]
    report = report_of(write(tmp_path, tb.single(tensors, ops)))
    (layer,) = report.layers
    assert layer.bias.kind is BiasKind.UNTIED
    assert layer.bias.shape == (32, 28, 28)
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"
    assert report.totals.untied == 1 and report.totals.model_params == 27488


def test_tied_add_through_dequantize_and_follower(tmp_path):
    """An fp16 bias constant behind DEQUANTIZE, ADDed after the conv, is tied; a bias-free conv
    followed by MUL and ADD of constants (an unfolded norm) is absent, followed by MUL+ADD."""
    tensors = [
        T("input", (1, 8, 8, 4)),
        T("filter", (4, 3, 3, 4), const=True),
        T("conv_a", (1, 6, 6, 4)),
        T("bias16", (4,), tb.FLOAT16, const=True),
        T("bias32", (4,)),
        T("a_out", (1, 6, 6, 4)),
        T("filter_b", (4, 1, 1, 4), const=True),
        T("conv_b", (1, 6, 6, 4)),
        T("scale", (4,), const=True),
        T("scaled", (1, 6, 6, 4)),
        T("shift", (4,), const=True),
        T("b_out", (1, 6, 6, 4)),
    ]
    ops = [
        Op(tb.CONV_2D, (0, 1, -1), (2,)),
        Op(tb.DEQUANTIZE, (3,), (4,)),
        Op(tb.ADD, (2, 4), (5,)),
        Op(tb.CONV_2D, (5, 6, -1), (7,)),
        Op(tb.MUL, (7, 8), (9,)),
        Op(tb.ADD, (9, 10), (11,)),
    ]
    report = report_of(write(tmp_path, tb.single(tensors, ops)))
    first, second = report.layers
    assert (str(first.bias.kind), str(first.bias.source), first.bias.params) == ("tied", "add", 4)
    assert (str(second.bias.kind), second.followed_by) == ("absent", "MUL+ADD")
    assert report.totals.model_params == 144 + 4 + 16 + 4 + 4


def test_depthwise_transpose_custom_and_3d_layouts(tmp_path):
    tensors = [
        T("input", (1, 10, 10, 3)),  # 0
        T("dw_filter", (1, 3, 3, 6), const=True),  # 1: multiplier 2
        T("dw_bias", (6,), const=True),  # 2
        T("dw_out", (1, 8, 8, 6)),  # 3
        T("shape", (4,), tb.INT32, const=True),  # 4
        T("tc_filter", (2, 3, 3, 6), const=True),  # 5: [O, KH, KW, I]
        T("tc_bias", (2,), const=True),  # 6
        T("tc_out", (1, 10, 10, 2)),  # 7
        T("mp_filter", (5, 2, 2, 2), const=True),  # 8
        T("mp_bias", (5,), const=True),  # 9
        T("mp_out", (1, 20, 20, 5)),  # 10
        T("vol", (1, 6, 6, 6, 2)),  # 11
        T("c3_filter", (3, 3, 3, 2, 4), const=True),  # 12: [KD, KH, KW, I, O]
        T("c3_out", (1, 4, 4, 4, 4)),  # 13
        T("shape5", (5,), tb.INT32, const=True),  # 14
        T("t3_filter", (3, 3, 3, 2, 4), const=True),  # 15: [KD, KH, KW, O, I]
        T("t3_bias", (2,), const=True),  # 16
        T("t3_out", (1, 6, 6, 6, 2)),  # 17
    ]
    ops = [
        Op(tb.DEPTHWISE_CONV_2D, (0, 1, 2), (3,), depth_multiplier=2),
        Op(tb.TRANSPOSE_CONV, (4, 5, 3, 6), (7,)),
        Op(tb.CUSTOM, (7, 8, 9), (10,), custom="Convolution2DTransposeBias"),
        Op(tb.CONV_3D, (11, 12), (13,)),
        Op(tb.CONV_3D_TRANSPOSE, (14, 15, 13, 16), (17,)),
    ]
    report = report_of(write(tmp_path, tb.single(tensors, ops)))
    assert rows(report) == [
        ("DEPTHWISE_CONV_2D", "3x3", 3, 6, 3, "tied", 6),
        ("TRANSPOSE_CONV", "3x3", 6, 2, 1, "tied", 2),
        ("Convolution2DTransposeBias", "2x2", 2, 5, 1, "tied", 5),
        ("CONV_3D", "3x3x3", 2, 4, 1, "absent", 0),
        ("CONV_3D_TRANSPOSE", "3x3x3", 4, 2, 1, "tied", 2),
    ]
    assert [layer.weight_shape for layer in report.layers] == [
        (6, 1, 3, 3),
        (6, 2, 3, 3),
        (2, 5, 2, 2),
        (4, 2, 3, 3, 3),
        (4, 2, 3, 3, 3),
    ]
    # int32 shape vectors are not parameters; the float constants are.
    assert report.totals.model_params == 54 + 6 + 108 + 2 + 40 + 5 + 216 + 216 + 2


def test_grouped_conv2d_and_shared_constant(tmp_path):
    """CONV_2D on 8 input channels with [4, 3, 3, 4] filters has 2 groups; one filter constant
    feeding two convs is reported for both and counted once in model_params."""
    tensors = [
        T("input", (1, 6, 6, 8)),
        T("filter", (4, 3, 3, 4), const=True),
        T("bias", (4,), const=True),
        T("a", (1, 4, 4, 4)),
        T("b", (1, 4, 4, 4)),
    ]
    ops = [Op(tb.CONV_2D, (0, 1, 2), (3,)), Op(tb.CONV_2D, (0, 1, 2), (4,))]
    report = report_of(write(tmp_path, tb.single(tensors, ops)))
    assert rows(report) == [("CONV_2D", "3x3", 8, 4, 2, "tied", 4)] * 2
    assert report.totals.model_params == 144 + 4


def test_quantized_and_sparse_constants(tmp_path):
    tensors = [
        T("input", (1, 6, 6, 2), tb.INT8),
        T("filter_q", (4, 3, 3, 2), tb.INT8, const=True),
        T("bias_q", (4,), tb.INT32, const=True),
        T("q_out", (1, 4, 4, 4), tb.INT8),
        T("sparse_filter", (3, 1, 1, 4), const=True),
        T("dense_filter", (3, 1, 1, 4)),
        T("s_out", (1, 4, 4, 3)),
    ]
    ops = [Op(tb.CONV_2D, (0, 1, 2), (3,)), Op(tb.DENSIFY, (4,), (5,)), Op(tb.CONV_2D, (3, 5, -1), (6,))]
    report = report_of(write(tmp_path, tb.single(tensors, ops)))
    assert rows(report) == [("CONV_2D", "3x3", 2, 4, 1, "tied", 4), ("CONV_2D", "1x1", 4, 3, 1, "absent", 0)]
    assert report.layers[1].weight_shape == (3, 4, 1, 1)
    assert report.totals.model_params == 72 + 4 + 12


def test_conv1d_add_after_squeeze(tmp_path):
    tensors = [
        T("signal", (1, 20, 3)),
        T("axis", (), tb.INT32, const=True),
        T("expanded", (1, 1, 20, 3)),
        T("filter", (4, 1, 5, 3), const=True),
        T("conv", (1, 1, 16, 4)),
        T("squeezed", (1, 16, 4)),
        T("bias", (4,), const=True),
        T("out", (1, 16, 4)),
    ]
    ops = [
        Op(tb.EXPAND_DIMS, (0, 1), (2,)),
        Op(tb.CONV_2D, (2, 3, -1), (4,)),
        Op(tb.SQUEEZE, (4,), (5,)),
        Op(tb.ADD, (5, 6), (7,)),
    ]
    report = report_of(write(tmp_path, tb.single(tensors, ops)))
    (layer,) = report.layers
    assert (layer.kernel_shape, layer.weight_shape, layer.output_spatial) == ((5,), (4, 3, 5), (16,))
    assert layer.formula == "(3x5 + 1) x 4 = 64"


def test_every_subgraph_is_walked(tmp_path):
    main_graph = Graph([T("input", (1, 4, 4, 1)), T("out", (1, 4, 4, 1))], [Op(tb.WHILE, (0,), (1,))])
    body = Graph(
        [
            T("x", (1, 4, 4, 1)),
            T("w", (2, 3, 3, 1), const=True),
            T("b", (2,), const=True),
            T("y", (1, 2, 2, 2)),
        ],
        [Op(tb.CONV_2D, (0, 1, 2), (3,))],
        name="body",
    )
    report = report_of(write(tmp_path, tb.tflite_model([main_graph, body])))
    assert [layer.name for layer in report.layers] == ["body/y"]
    assert report.totals.tied == 1


def test_buffers_outside_the_flatbuffer(tmp_path):
    """Models over 2 GB keep buffers after the flatbuffer (Buffer.offset/size): shapes still read."""
    path = write(
        tmp_path,
        tb.single(
            [
                T("input", (1, 32, 32, 3)),
                T("w", (32, 5, 5, 3), const=True),
                T("b", (32,), const=True),
                T("o", (1, 28, 28, 32)),
            ],
            [Op(tb.CONV_2D, (0, 1, 2), (3,))],
            external=True,
            data_bytes=64,
        ),
    )
    report = report_of(path)
    assert report.layers[0].formula == "(3x5x5 + 1) x 32 = 2,432"
    assert report.totals.model_params == 2432
    # The same file cut short: the last buffer now lies past the end.
    truncated = write(tmp_path, path.read_bytes()[:-10], "cut.tflite")
    with pytest.raises(MalformedModelError, match="past the end of the file"):
        read_file(truncated)


# -- real published models (a wheel's .tflite is not committed; see the README) ------------------


def test_cli_json_format_field(tmp_path, capsys):
    path = write(tmp_path, conv2d_model())
    assert main([str(path), "--format", "json"]) == 0
    assert '"format": "tflite"' in capsys.readouterr().out


def test_folder_scan_picks_up_tflite(tmp_path):
    write(tmp_path, conv2d_model(), "a.tflite")
    report = inspect(tmp_path)
    assert [model.format for model in report.models] == ["tflite"] and not report.errors


# -- hostile files -------------------------------------------------------------------------------


def _cli_one_line(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"biasinspect: {path}: "), err
    return err[0]


def test_truncated_at_every_length_is_a_clean_error(tmp_path):
    """Every prefix of a valid model is a report or a MalformedModelError, never anything else."""
    data = conv2d_model()
    path = tmp_path / "cut.tflite"
    outcomes = set()
    for length in range(8, len(data), 7):
        path.write_bytes(data[:length])
        try:
            read_file(path)
            outcomes.add("ok")
        except MalformedModelError:
            outcomes.add("malformed")
    assert "malformed" in outcomes


def test_offsets_past_the_end(tmp_path, capsys):
    data = bytearray(conv2d_model())
    data[0:4] = (len(data) + 100).to_bytes(4, "little")  # root table offset past the end
    line = _cli_one_line(write(tmp_path, bytes(data), "root.tflite"), capsys)
    assert "lies outside the file" in line


def test_vector_length_past_the_end(tmp_path, capsys):
    data = bytearray(conv2d_model())
    shape = bytes(data).find((32).to_bytes(4, "little") + (5).to_bytes(4, "little") * 2)  # [32, 5, 5, 3]
    assert shape > 4
    data[shape - 4 : shape] = (0x7FFFFFFF).to_bytes(4, "little")  # its element count
    line = _cli_one_line(write(tmp_path, bytes(data), "vector.tflite"), capsys)
    assert "past the end of the file" in line or "exceeds" in line


def test_tensor_and_opcode_indices_out_of_range(tmp_path, capsys):
    tensors = [T("input", (1, 4, 4, 1)), T("w", (2, 3, 3, 1), const=True), T("o", (1, 2, 2, 2))]
    path = write(tmp_path, tb.single(tensors, [Op(tb.CONV_2D, (0, 1, 7), (2,))]), "index.tflite")
    assert "uses tensor 7, but the subgraph has 3" in _cli_one_line(path, capsys)


def test_huge_and_negative_dims(tmp_path):
    """Dims near 2**31 multiply without overflow; -1 (dynamic) dims are unknown, never guessed."""
    big = 2**31 - 1
    tensors = [
        T("input", (1, -1, -1, 3)),
        T("w", (big, 1, 1, 3), const=True),
        T("b", (big,), const=True),
        T("o", (1, -1, -1, big)),
    ]
    report = report_of(write(tmp_path, tb.single(tensors, [Op(tb.CONV_2D, (0, 1, 2), (3,))])))
    (layer,) = report.layers
    assert layer.weight_params == big * 3
    assert layer.output_spatial == (None, None)
    assert report.totals.model_params == big * 4


def test_producer_cycle_does_not_trap_the_walk(tmp_path):
    """DEQUANTIZE ops feeding each other in a loop (an invalid graph) end the constant search."""
    tensors = [
        T("input", (1, 4, 4, 2)),
        T("a", (2, 1, 1, 2)),
        T("b", (2, 1, 1, 2)),
        T("o", (1, 4, 4, 2)),
    ]
    ops = [Op(tb.DEQUANTIZE, (2,), (1,)), Op(tb.DEQUANTIZE, (1,), (2,)), Op(tb.CONV_2D, (0, 1, -1), (3,))]
    report = report_of(write(tmp_path, tb.single(tensors, ops)))
    assert rows(report) == [("CONV_2D", "1x1", 2, 2, 1, "absent", 0)]


def test_not_tflite_without_identifier(tmp_path, capsys):
    data = bytearray(conv2d_model())
    data[4:8] = b"XXXX"
    line = _cli_one_line(write(tmp_path, bytes(data), "noid.tflite"), capsys)
    assert "not a recognised model format" in line or "not a TFLite model" in line
