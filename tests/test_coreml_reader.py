"""CoreML: samples written by coremltools, models encoded in code, and hostile files."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

import biasinspect
from biasinspect.cli import main
from biasinspect.model import BiasKind
from biasinspect.readers.coreml_reader import sniff_coreml

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
COREML = SAMPLES / "coreml"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _model(path: Path) -> biasinspect.model.ModelReport:
    report = biasinspect.inspect(path)
    assert report.errors == ()
    (model,) = report.models
    assert model.format == "coreml"
    return model


def _rows(model: biasinspect.model.ModelReport) -> list[tuple[object, ...]]:
    return [
        (layer.name, layer.op, layer.bias.kind, layer.bias.params, layer.weight_params, layer.output_spatial)
        for layer in model.layers
    ]


# -- Files written by coremltools (samples/make_coreml_samples.py) -------------------------------


def test_seed_untied_neural_network_with_8_bit_weights():
    model = _model(COREML / "seed_untied.mlmodel")
    assert _rows(model) == [
        ("features.0", "convolution", BiasKind.UNTIED, 25_088, 2_400, (28, 28)),
        ("features.3", "convolution", BiasKind.TIED, 8, 2_304, (26, 26)),
    ]
    assert model.layers[0].formula == "3x5x5 x 32 + 32x28x28 = 27,488"
    assert model.layers[0].bias.terms[0].name == "bias0"  # the loadConstant layer's output
    assert model.totals.model_params == 27_488 + 2_312


def test_neural_network_patterns():
    model = _model(COREML / "nn_patterns.mlmodel")
    assert _rows(model) == [
        ("stem", "convolution", BiasKind.ABSENT, 0, 288, (8, 8)),
        ("up", "deconvolution", BiasKind.TIED, 4, 64, (16, 16)),
    ]
    stem, up = model.layers
    assert stem.followed_by == "batchnorm"
    assert (up.in_channels, up.out_channels, up.groups, up.transposed) == (8, 4, 2, True)
    assert model.totals.model_params == 288 + 4 * 8 + 64 + 4


def test_ml_program_package():
    model = _model(COREML / "program.mlpackage")
    assert model.path == str(COREML / "program.mlpackage")
    assert _rows(model) == [
        ("tied", "conv", BiasKind.TIED, 8, 216, (30, 30)),
        ("untied", "conv", BiasKind.UNTIED, 6_272, 576, (28, 28)),
        # Palettized weights: the constexpr_lut_to_dense output declares the dense [8, 4, 2, 2].
        ("up_has_output_shape", "conv_transpose", BiasKind.ABSENT, 0, 128, (56, 56)),
        # The converter folded the batch_norm after this bias-free conv into a conv bias.
        ("head_bn", "conv", BiasKind.TIED, 4, 16, (56, 56)),
    ]
    assert model.layers[1].bias.shape == (1, 8, 28, 28)
    assert model.totals.model_params == 216 + 8 + 576 + 6_272 + 128 + 16 + 4


def test_folder_scan_reads_a_package_as_one_model(tmp_path):
    import shutil

    shutil.copytree(COREML, tmp_path / "coreml")
    code, out, err = run(str(tmp_path), "--format", "json")
    assert (code, err) == (0, "")
    paths = [Path(model["path"]).relative_to(tmp_path).as_posix() for model in json.loads(out)["models"]]
    assert paths == ["coreml/nn_patterns.mlmodel", "coreml/program.mlpackage", "coreml/seed_untied.mlmodel"]


def test_the_weight_blob_is_never_opened(tmp_path):
    import shutil

    package = tmp_path / "program.mlpackage"
    shutil.copytree(COREML / "program.mlpackage", package)
    blob = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    blob.unlink()
    os.mkfifo(blob)  # opening it would block, reading it would fail
    assert len(_model(package).layers) == 4


# -- Protobuf written in code ----------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _msg(number: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _text(number: int, value: str) -> bytes:
    return _msg(number, value.encode())


def _array_input(name: str, *shape: int) -> bytes:
    packed = b"".join(_varint(d) for d in shape)
    return _msg(1, _text(1, name), _msg(3, _msg(5, _msg(1, packed))))


def _weights(count: int) -> bytes:
    return _msg(30, b"\0" * count)  # rawValue: its length is never used for shapes


def _layer(name: str, inputs: list[str], outputs: list[str], kind: int, *params: bytes) -> bytes:
    return _msg(
        1,
        _text(1, name),
        *(_text(2, i) for i in inputs),
        *(_text(3, o) for o in outputs),
        _msg(kind, *params),
    )


def _model_bytes(*layers: bytes, inputs: bytes = b"", network_field: int = 500) -> bytes:
    return _int(1, 4) + _msg(2, inputs or _array_input("x", 4, 8, 8, 8)) + _msg(network_field, *layers)


def test_conv3d_and_scalar_bias_and_branch(tmp_path):
    conv3d = _layer(
        "c3", ["x"], ["y"], 1471,
        _int(1, 6), _int(2, 4), _int(10, 2), _int(20, 3), _int(21, 3), _int(22, 3), _int(50, 1), _int(70, 2),
        _msg(60, _weights(3)), _msg(61, _weights(3)),
    )  # fmt: skip
    conv2d = _layer(
        "inner", ["a"], ["b"], 100,
        _int(1, 5), _int(2, 6), _int(20, 1), _int(20, 1), _msg(90, _weights(2)),
    )  # fmt: skip
    scalar_bias = _layer("scalar", ["b"], ["c"], 250, _int(1, 1), _msg(2, _weights(1)))
    branch = _layer("gate", ["y"], ["z"], 605, _msg(1, conv2d, scalar_bias))
    path = tmp_path / "m.mlmodel"
    path.write_bytes(_model_bytes(conv3d, branch, inputs=_array_input("x", 1, 4, 8, 8, 8)))
    model = _model(path)
    assert _rows(model) == [
        ("gate/inner", "convolution", BiasKind.OTHER, 1, 30, None),
        ("c3", "convolution3d", BiasKind.TIED, 6, 2 * 3 * 3 * 3 * 6, (8, 8, 8)),
    ]
    assert model.layers[1].groups == 2
    assert model.totals.model_params == 30 + 1 + 324 + 6


def test_classifier_inside_a_pipeline_and_unknown_weighted_layers(tmp_path):
    conv = _layer("conv", ["x"], ["y"], 100, _int(1, 4), _int(2, 4), _int(20, 3), _int(20, 3), _int(70, 1))
    lstm = _layer("rnn", ["y"], ["z"], 420, _int(1, 4))
    classifier = _int(1, 4) + _msg(2, _array_input("x", 4, 8, 8)) + _msg(403, conv, lstm)
    pipeline = (
        _int(1, 4) + _msg(2, _array_input("x", 4, 8, 8)) + _msg(202, _msg(1, classifier), _text(2, "net"))
    )
    path = tmp_path / "p.mlmodel"
    path.write_bytes(pipeline)
    model = _model(path)
    assert _rows(model) == [("net/conv", "convolution", BiasKind.TIED, 4, 144, (6, 6))]
    assert model.totals.model_params is None
    assert any("uniDirectionalLSTM" in warning for warning in model.warnings)


def test_onnx_files_are_not_taken_for_coreml():
    assert not sniff_coreml((SAMPLES / "seed_untied.onnx").read_bytes()[:64])
    assert sniff_coreml((COREML / "seed_untied.mlmodel").read_bytes()[:64])


# -- Hostile files ---------------------------------------------------------------------------------


def _deep_pipeline(levels: int) -> bytes:
    model = _model_bytes()
    for _ in range(levels):
        model = _int(1, 4) + _msg(2, _array_input("x", 4, 8, 8)) + _msg(202, _msg(1, model))
    return model


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ((COREML / "seed_untied.mlmodel").read_bytes()[:2000], "truncated protobuf"),
        (_int(1, 4) + _msg(2, _array_input("x", 3)) + b"\xa2\x1f\xff\xff\xff\x0f", "truncated protobuf"),
        (_deep_pipeline(40), "pipelines nested deeper than 32 levels"),
        (
            _model_bytes(
                _layer("c", ["x"], ["y"], 100, _int(1, 2**50), _int(2, 4), _int(20, 3), _int(20, 3))
            ),
            "larger than the supported",
        ),
        (
            _model_bytes(_layer("c", ["x"], ["y"], 100, _int(1, 4), _int(2, 4), _int(10, 2**62))),
            "is not a positive group count",
        ),
        (_int(1, 4) + _msg(2, _array_input("x", 3)) + b"\x0b", "wire type 3"),
    ],
)
def test_hostile_mlmodel_gives_one_line(tmp_path, content, reason):
    path = tmp_path / "evil.mlmodel"
    path.write_bytes(content)
    code, out, err = run(str(path), str(COREML / "nn_patterns.mlmodel"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"biasinspect: {path}: ")
    assert reason in err
    assert "stem" in out


@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("../../outside.mlmodel", "lies outside the package"),
        ("/etc/passwd", "lies outside the package"),
    ],
)
def test_manifest_pointing_outside_the_package(tmp_path, relative, reason):
    import shutil

    package = tmp_path / "evil.mlpackage"
    shutil.copytree(COREML / "program.mlpackage", package)
    (tmp_path / "outside.mlmodel").write_bytes((COREML / "seed_untied.mlmodel").read_bytes())
    manifest = json.loads((package / "Manifest.json").read_text())
    root = manifest["rootModelIdentifier"]
    manifest["itemInfoEntries"][root]["path"] = relative
    (package / "Manifest.json").write_text(json.dumps(manifest))
    code, _out, err = run(str(package))
    assert code == 2
    assert reason in err


def test_manifest_through_a_symlink_out_of_the_package(tmp_path):
    import shutil

    package = tmp_path / "evil.mlpackage"
    shutil.copytree(COREML / "program.mlpackage", package)
    model = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    model.unlink()
    (tmp_path / "outside.mlmodel").write_bytes((COREML / "seed_untied.mlmodel").read_bytes())
    model.symlink_to(tmp_path / "outside.mlmodel")
    code, _out, err = run(str(package))
    assert code == 2
    assert "lies outside the package" in err
