"""`biasinspect diff`: a checkpoint against its export, on files written by torch and onnxruntime."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

from biasinspect import inspect
from biasinspect.cli import main
from biasinspect.diff import diff_models, module_path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


class _Block(nn.Module):
    """A torchvision BasicBlock: conv-bn-relu-conv-bn, with a conv-bn downsample."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(_Block(8, 16, 2))
        self.head = nn.Conv2d(16, 4, 1)  # keeps its own bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.relu(self.bn1(self.conv1(x)))))


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = _TinyResNet().eval()
    paths = {"pt": folder / "resnet.pt", "onnx": folder / "resnet.onnx"}
    torch.save(model.state_dict(), paths["pt"])
    # The legacy exporter folds each eval-mode BatchNorm into the conv before it.
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(paths["onnx"]), dynamo=False, opset_version=17)
    return paths


def test_state_dict_against_its_onnx_export_reports_folded_norms(resnet_files):
    code, out, err = run("diff", str(resnet_files["pt"]), str(resnet_files["onnx"]), "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["source"] == str(resnet_files["pt"]) and data["export"] == str(resnet_files["onnx"])
    rows = {row["source_name"]: row for row in data["layers"]}
    assert list(rows) == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0", "head"]
    for name in ("conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0"):
        row = rows[name]
        assert row["matched_by"] == "name"
        assert row["changes"] == ["kind", "params"]
        assert row["folded_norm"] is True
        assert row["source_bias"]["kind"] == "absent" and row["export_bias"]["kind"] == "tied"
        assert row["source_followed_by"] == "BatchNorm"  # state dicts know the norm, not its class
    assert rows["head"]["changes"] == [] and rows["head"]["export_name"] == "/head/Conv"
    assert data["summary"] == {
        "matched": 5,
        "changed": 4,
        "folded_norms": 4,
        "only_source": 0,
        "only_export": 0,
    }

    code, out, _err = run("diff", str(resnet_files["pt"]), str(resnet_files["onnx"]))
    assert code == 0
    assert "absent (BatchNorm follows) -> tied [16] (folded norm)" in out
    assert "5 matched, 4 changed (4 folded norms), 0 only in source, 0 only in export" in out


def test_fail_on_change_gates_an_export(resnet_files):
    code, _out, err = run(
        "diff", str(resnet_files["pt"]), str(resnet_files["onnx"]), "--fail-on-change", "kind"
    )
    assert code == 1
    assert err == (
        f"biasinspect: policy: {resnet_files['pt']} -> {resnet_files['onnx']}: 4 layer(s) changed "
        "(--fail-on-change kind): conv1, layer1.0.conv1, layer1.0.conv2, layer1.0.downsample.0\n"
    )
    code, _out, err = run(
        "diff", str(resnet_files["pt"]), str(resnet_files["onnx"]), "--fail-on-change", "weight_shape"
    )
    assert (code, err) == (0, "")


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, name: str) -> None:
        rng = np.random.default_rng(0)
        self._batches = iter(
            [{name: rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@pytest.mark.parametrize("mode", ["dynamic", "qdq"])
def test_float_onnx_against_its_quantized_copy_keeps_every_kind(resnet_files, tmp_path, mode):
    quantized = tmp_path / f"resnet.{mode}.onnx"
    if mode == "dynamic":
        quantize_dynamic(str(resnet_files["onnx"]), str(quantized), weight_type=QuantType.QUInt8)
    else:
        name = onnx.load(str(resnet_files["onnx"])).graph.input[0].name
        quantize_static(
            str(resnet_files["onnx"]), str(quantized), _Calibration(name), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    code, out, err = run(
        "diff", str(resnet_files["onnx"]), str(quantized), "--format", "json", "--fail-on-change", "kind"
    )
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["summary"]["matched"] == 5
    assert data["summary"]["only_source"] == data["summary"]["only_export"] == 0
    assert all("kind" not in row["changes"] for row in data["layers"])
    assert {row["export_bias"]["kind"] for row in data["layers"]} == {"tied"}


def _onnx_conv(path: Path, names: list[str], bias: bool) -> None:
    """Two chained convs 3->8->4 (3x3), with or without bias inputs, under the given names."""
    nodes, inits = [], []
    previous, channels = "x", 3
    for index, (name, width) in enumerate(zip(names, (8, 4), strict=True)):
        weight = helper.make_tensor(
            f"w{index}", onnx.TensorProto.FLOAT, [width, channels, 3, 3], [0.0] * width * channels * 9
        )
        inits.append(weight)
        inputs = [previous, f"w{index}"]
        if bias:
            inits.append(helper.make_tensor(f"b{index}", onnx.TensorProto.FLOAT, [width], [0.0] * width))
            inputs.append(f"b{index}")
        nodes.append(helper.make_node("Conv", inputs, [f"y{index}"], name=name))
        previous, channels = f"y{index}", width
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_an_export_that_dropped_a_bias(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    _onnx_conv(tmp_path / "export.onnx", ["/0/Conv", "/1/Conv"], bias=False)
    code, out, err = run(
        "diff", str(tmp_path / "model.pt"), str(tmp_path / "export.onnx"), "--fail-on-change", "kind"
    )
    assert code == 1
    assert "tied [8] -> absent" in out and "bias params 8 -> 0" in out
    assert "2 matched, 2 changed (0 folded norms)" in out
    assert "(--fail-on-change kind): 0, 1" in err


def test_renamed_layers_are_matched_by_order_and_say_so(tmp_path):
    _onnx_conv(tmp_path / "a.onnx", ["stem", "head"], bias=True)
    _onnx_conv(tmp_path / "b.onnx", ["conv_a", "conv_b"], bias=True)
    code, out, _err = run("diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert [(r["source_name"], r["export_name"], r["matched_by"], r["changes"]) for r in data["layers"]] == [
        ("stem", "conv_a", "order", []),
        ("head", "conv_b", "order", []),
    ]
    assert data["notes"] == [
        "2 layer pair(s) matched by order and weight geometry only (their names differ); check them"
    ]
    code, out, _err = run("diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"))
    assert "note: 2 layer pair(s) matched by order" in out


def test_layers_on_one_side_only(tmp_path):
    _onnx_conv(tmp_path / "a.onnx", ["stem", "head"], bias=True)
    report = diff_models(
        inspect(tmp_path / "a.onnx").models[0], inspect(SAMPLES / "seed_tied.onnx").models[0]
    )
    assert [
        (r.source.name if r.source else None, r.export.name if r.export else None) for r in report.layers
    ] == [
        ("stem", None),
        ("head", None),
        (None, "/conv/Conv"),
    ]
    assert (report.summary.only_source, report.summary.only_export, report.summary.matched) == (2, 1, 0)


def test_unreadable_side_is_one_line(tmp_path):
    missing = tmp_path / "missing.onnx"
    code, out, err = run("diff", str(SAMPLES / "seed_tied.onnx"), str(missing))
    assert (code, out) == (2, "")
    assert err == f"biasinspect: {missing}: no such file or directory\n"


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
        ("/layer1/layer1.0/downsample/downsample.0/Conv", "layer1.0.downsample.0"),
        ("/layer1/layer1.0/conv1/Conv_quant", "layer1.0.conv1"),
        ("/features/features.0/Conv", "features.0"),
        ("/conv/Conv", "conv"),
        ("/depthwise/Conv/WithoutBiases", "depthwise"),
        ("features.0", "features.0"),
        ("conv1.weight", "conv1"),
    ],
)
def test_module_paths(name, path):
    assert module_path(name) == path
