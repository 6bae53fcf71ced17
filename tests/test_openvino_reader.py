"""OpenVINO IR: the samples written by the real converter, IR built in code, and hostile XML."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import biasinspect
from biasinspect.cli import main
from biasinspect.model import BiasKind

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
OPENVINO = SAMPLES / "openvino"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _only_model(path: Path) -> biasinspect.model.ModelReport:
    report = biasinspect.inspect(path)
    assert report.errors == ()
    (model,) = report.models
    assert model.format == "openvino"
    return model


# -- Files written by OpenVINO itself (samples/make_openvino_samples.py) ---------------------------


def test_seed_untied_converted_by_openvino_with_fp16_compression():
    model = _only_model(OPENVINO / "seed_untied.xml")
    (layer,) = model.layers
    assert layer.name == "/conv/Conv"
    assert layer.op == "Convolution"
    assert layer.bias.kind is BiasKind.UNTIED
    assert layer.bias.shape == (1, 32, 28, 28)
    assert layer.bias.params == 25_088
    assert layer.weight_params == 2_400
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"
    assert model.totals.model_params == 27_488
    # The bias tensor is named after the Const behind the decompression Convert.
    (term,) = layer.bias.terms
    assert term.name == "Constant_2280_compressed"


def test_openvino_folds_the_batchnorm_of_a_bias_free_conv():
    (onnx_layer,) = biasinspect.inspect(SAMPLES / "conv_bn.onnx").models[0].layers
    assert (onnx_layer.bias.kind, onnx_layer.followed_by) == (BiasKind.ABSENT, "BatchNormalization")
    model = _only_model(OPENVINO / "conv_bn.xml")
    (layer,) = model.layers
    assert (layer.bias.kind, layer.bias.shape, layer.formula) == (
        BiasKind.TIED, (1, 8, 1, 1), "(3x3x3 + 1) x 8 = 224",
    )  # fmt: skip
    assert model.totals.model_params == 224


def test_depthwise_converted_by_openvino_is_a_group_convolution():
    model = _only_model(OPENVINO / "depthwise.xml")
    rows = [
        (layer.name, layer.op, layer.groups, layer.weight_shape, layer.bias.kind, layer.bias.params)
        for layer in model.layers
    ]
    assert rows == [
        ("/depthwise/Conv", "GroupConvolution", 8, (8, 1, 3, 3), BiasKind.TIED, 8),
        ("/pointwise/Conv", "Convolution", 1, (16, 8, 1, 1), BiasKind.TIED, 16),
    ]
    (onnx_model,) = biasinspect.inspect(SAMPLES / "depthwise.onnx").models
    assert model.totals == onnx_model.totals


def test_every_pattern_in_the_opset_built_model():
    model = _only_model(OPENVINO / "patterns.xml")
    rows = [
        (layer.name, layer.op, layer.bias.kind, layer.bias.params, layer.groups) for layer in model.layers
    ]
    assert rows == [
        ("features.0", "Convolution", BiasKind.ABSENT, 0, 1),
        ("up.0", "GroupConvolutionBackpropData", BiasKind.TIED, 6, 2),
        ("quant.conv", "Convolution", BiasKind.TIED, 6, 1),
        ("offsets", "Convolution", BiasKind.ABSENT, 0, 1),
        ("deform", "DeformableConvolution", BiasKind.UNTIED, 1_024, 1),
        ("gate/then_body/branch.conv", "Convolution", BiasKind.TIED, 4, 1),
    ]
    by_name = {layer.name: layer for layer in model.layers}
    assert by_name["features.0"].followed_by == "BatchNormInference"
    up = by_name["up.0"]
    assert (up.in_channels, up.out_channels, up.transposed, up.output_spatial) == (8, 6, True, (16, 16))
    assert up.weight_shape == (8, 3, 2, 2)
    quant = by_name["quant.conv"]
    assert quant.weight_shape == (6, 6, 3, 3)  # int8 Const behind Convert/Subtract/Multiply
    assert model.totals.tied == 3 and model.totals.untied == 1 and model.totals.absent == 2
    assert model.totals.conv_weight_params == 1_912
    assert model.totals.conv_bias_params == 1_040
    # Every Const counted once: weights, BN statistics, int8 weights with zero points and scales,
    # FakeQuantize limits, biases; i64 shape constants are not parameters.
    assert model.totals.model_params == 3_000


def test_the_bin_is_not_needed(tmp_path):
    (tmp_path / "seed_untied.xml").write_bytes((OPENVINO / "seed_untied.xml").read_bytes())
    (layer,) = _only_model(tmp_path / "seed_untied.xml").layers
    assert (layer.bias.kind, layer.bias.params) == (BiasKind.UNTIED, 25_088)


def test_a_folder_scan_reports_the_ir_once_and_skips_other_xml(tmp_path):
    for name in ("seed_untied.xml", "seed_untied.bin"):
        (tmp_path / name).write_bytes((OPENVINO / name).read_bytes())
    (tmp_path / "notes.xml").write_text("<?xml version='1.0'?><catalog><book/></catalog>")
    code, out, err = run(str(tmp_path), "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert [m["path"] for m in data["models"]] == [str(tmp_path / "seed_untied.xml")]
    assert data["models"][0]["format"] == "openvino"
    assert data["errors"] == []


# -- IR written in code ------------------------------------------------------------------------------


def _port(port_id: int, dims: tuple[int | str, ...]) -> str:
    inner = "".join(f"<dim>{dim}</dim>" for dim in dims)
    return f'<port id="{port_id}" precision="FP32">{inner}</port>'


def _layer(layer_id: int, name: str, kind: str, data: str = "", inputs=(), outputs=()) -> str:
    ins = "".join(_port(p, d) for p, d in inputs)
    outs = "".join(_port(p, d) for p, d in outputs)
    return (
        f'<layer id="{layer_id}" name="{name}" type="{kind}" version="opset1">'
        f"{f'<data {data}/>' if data else ''}"
        f"{f'<input>{ins}</input>' if ins else ''}{f'<output>{outs}</output>' if outs else ''}</layer>"
    )


def _net(layers: list[str], edges: list[tuple[int, int, int, int]], prologue: str = "") -> str:
    edge_text = "".join(
        f'<edge from-layer="{a}" from-port="{b}" to-layer="{c}" to-port="{d}"/>' for a, b, c, d in edges
    )
    return f'{prologue}<net name="t" version="11"><layers>{"".join(layers)}</layers><edges>{edge_text}</edges></net>'


def _conv_then(second: str, second_inputs, second_type: str = "Add", const_type: str = "f32") -> str:
    """input -> Convolution(8x3x3x3) -> <second>(conv, Const)."""
    layers = [
        _layer(0, "x", "Parameter", 'shape="1,3,10,10" element_type="f32"', outputs=[(0, (1, 3, 10, 10))]),
        _layer(1, "w", "Const", 'element_type="f32" shape="8,3,3,3" offset="0" size="864"', outputs=[(0, (8, 3, 3, 3))]),
        _layer(2, "conv", "Convolution", 'strides="1,1" dilations="1,1" pads_begin="0,0" pads_end="0,0"',
               inputs=[(0, (1, 3, 10, 10)), (1, (8, 3, 3, 3))], outputs=[(2, (1, 8, 8, 8))]),
        _layer(3, "b", "Const", f'element_type="{const_type}" shape="{second}" offset="0" size="4"',
               outputs=[(0, second_inputs)]),
        _layer(4, "add", second_type, 'auto_broadcast="numpy"',
               inputs=[(0, (1, 8, 8, 8)), (1, second_inputs)], outputs=[(2, (1, 8, 8, 8))]),
    ]  # fmt: skip
    return _net(layers, [(0, 0, 2, 0), (1, 0, 2, 1), (2, 2, 4, 0), (3, 0, 4, 1)])


@pytest.mark.parametrize(
    ("shape", "dims", "kind", "params"),
    [
        ("1,8,1,1", (1, 8, 1, 1), BiasKind.TIED, 8),
        ("1,8,8,8", (1, 8, 8, 8), BiasKind.UNTIED, 512),
        ("1,1,1,1", (1, 1, 1, 1), BiasKind.OTHER, 1),
        ("", (), BiasKind.OTHER, 1),
    ],
)
def test_bias_add_of_a_const(tmp_path, shape, dims, kind, params):
    path = tmp_path / "m.xml"
    path.write_text(_conv_then(shape, dims))
    (layer,) = _only_model(path).layers
    assert (layer.bias.kind, layer.bias.params) == (kind, params)


def test_add_of_an_activation_is_not_a_bias(tmp_path):
    layers = [
        _layer(0, "x", "Parameter", 'shape="1,8,8,8" element_type="f32"', outputs=[(0, (1, 8, 8, 8))]),
        _layer(1, "w", "Const", 'element_type="f32" shape="8,8,1,1"', outputs=[(0, (8, 8, 1, 1))]),
        _layer(2, "conv", "Convolution", 'strides="1,1"', inputs=[(0, (1, 8, 8, 8)), (1, (8, 8, 1, 1))],
               outputs=[(2, (1, 8, 8, 8))]),
        _layer(3, "residual", "Add", "", inputs=[(0, (1, 8, 8, 8)), (1, (1, 8, 8, 8))], outputs=[(2, (1, 8, 8, 8))]),
    ]  # fmt: skip
    path = tmp_path / "residual.xml"
    path.write_text(_net(layers, [(0, 0, 2, 0), (1, 0, 2, 1), (2, 2, 3, 0), (0, 0, 3, 1)]))
    model = _only_model(path)
    (layer,) = model.layers
    assert layer.bias.kind is BiasKind.ABSENT
    assert model.totals.model_params == 64


def test_i64_consts_are_not_parameters_and_dynamic_dims_are_unknown(tmp_path):
    path = tmp_path / "m.xml"
    path.write_text(
        _conv_then("4", (4,), second_type="Reshape", const_type="i64").replace(
            "<dim>10</dim>", "<dim>-1</dim>"
        )
    )
    model = _only_model(path)
    (layer,) = model.layers
    assert layer.bias.kind is BiasKind.ABSENT
    assert model.totals.model_params == 216


# -- Hostile XML ---------------------------------------------------------------------------------


_BOMB = (
    '<?xml version="1.0"?><!DOCTYPE net [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
    + ']><net name="&i;" version="11"><layers/></net>'
)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_BOMB, "XML with a DTD, entities or external references is refused"),
        (
            '<?xml version="1.0"?><!DOCTYPE net [<!ENTITY x SYSTEM "file:///etc/passwd">]><net name="&x;"/>',
            "XML with a DTD, entities or external references is refused",
        ),
        ('<?xml version="1.0"?><net name="t" version="11"><layers><layer id="0"', "XML is not well-formed"),
        (
            _net([_layer(0, "x", "Parameter", outputs=[(0, (1,))])], [(0, 0, 7, 0)]),
            "an edge names a layer that does not exist",
        ),
        (
            _net([_layer(0, "x", "Parameter"), _layer(0, "y", "Parameter")], []),
            "two layers have id '0'",
        ),
        (
            _net([_layer(0, "x", "Parameter", outputs=[(0, (1, 2**41))])], []),
            "larger than the supported",
        ),
        (
            _net([_layer(0, "x", "Parameter", outputs=[(0, (1, "9" * 400))])], []),
            "dimension of 400 digits is unsupported",
        ),
        (
            _net([_layer(0, "c", "Convolution", inputs=[(0, (1, 3, 4, 4))])], []),
            "Convolution layer 'c' has no weight input",
        ),
    ],
)
def test_hostile_ir_gives_one_line(tmp_path, content, reason):
    path = tmp_path / "evil.xml"
    path.write_text(content)
    good = tmp_path / "good.xml"
    good.write_bytes((OPENVINO / "seed_untied.xml").read_bytes())
    code, out, err = run(str(path), str(good))
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"biasinspect: {path}: ")
    assert reason in err
    assert "/conv/Conv" in out  # the good file is still reported


def test_cycles_and_deep_bodies_end_cleanly(tmp_path):
    # Two Adds feeding each other (a cycle) behind a conv: no hang, the conv has no bias.
    layers = [
        _layer(0, "x", "Parameter", outputs=[(0, (1, 8, 4, 4))]),
        _layer(1, "w", "Const", 'element_type="f32" shape="8,8,1,1"', outputs=[(0, (8, 8, 1, 1))]),
        _layer(2, "conv", "Convolution", "", inputs=[(0, (1, 8, 4, 4)), (1, (8, 8, 1, 1))], outputs=[(2, (1, 8, 4, 4))]),
        _layer(3, "a", "Add", "", inputs=[(0, (1, 8, 4, 4)), (1, (1, 8, 4, 4))], outputs=[(2, (1, 8, 4, 4))]),
        _layer(4, "b", "Multiply", "", inputs=[(0, (1, 8, 4, 4)), (1, (1, 8, 4, 4))], outputs=[(2, (1, 8, 4, 4))]),
    ]  # fmt: skip
    path = tmp_path / "cycle.xml"
    path.write_text(
        _net(layers, [(0, 0, 2, 0), (1, 0, 2, 1), (2, 2, 3, 0), (4, 2, 3, 1), (3, 2, 4, 0), (3, 2, 4, 1)])
    )
    (layer,) = _only_model(path).layers
    assert layer.bias.kind is BiasKind.ABSENT

    body = '<layers><layer id="0" name="x" type="Parameter"/></layers>'
    for _ in range(40):
        body = f'<layers><layer id="0" name="loop" type="Loop"><body>{body}</body></layer></layers>'
    deep = tmp_path / "deep.xml"
    deep.write_text(f'<net name="t" version="11">{body}</net>')
    code, _out, err = run(str(deep))
    assert code == 2
    assert "subgraph bodies nested deeper than 32 levels" in err
