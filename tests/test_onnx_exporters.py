"""Real files from real tools: one float model exported by torch and then rewritten by every
onnxruntime path a deployed model goes through (dynamic quantization, static QDQ and QOperator
quantization, offline graph optimisation).  Each must report the float model's bias structure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

from biasinspect.analysis import analyze
from biasinspect.model import BiasKind, ModelReport
from biasinspect.readers.onnx_reader import read_onnx


class _Net(nn.Module):
    """Conv+BN, a bias-free conv with an untied [C, H, W] bias, a depthwise conv, a ConvTranspose."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, bias=False)
        self.b2 = nn.Parameter(torch.randn(8, 12, 12))
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        x = self.c2(x) + self.b2
        return self.up(self.dw(x))


# (kind, bias params, output spatial) per layer, in graph order: c1 (BN folded in by the
# exporter), c2 (untied), dw, up.
FLOAT_LAYERS = [
    (BiasKind.TIED, 16, (14, 14)),
    (BiasKind.UNTIED, 8 * 12 * 12, (12, 12)),
    (BiasKind.TIED, 8, (10, 10)),
    (BiasKind.TIED, 4, (20, 20)),
]


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {"x": np.random.default_rng(seed).standard_normal((1, 3, 16, 16), dtype=np.float32)}
            for seed in range(4)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _optimised(source: Path, target: Path, level: ort.GraphOptimizationLevel) -> Path:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # the "hardware specific" warning of ORT_ENABLE_ALL
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ort")
    torch.manual_seed(0)
    float_path = folder / "float.onnx"
    torch.onnx.export(
        _Net().eval(), (torch.zeros(1, 3, 16, 16),), str(float_path), dynamo=False, input_names=["x"]
    )
    out = {"float": float_path}
    out["dynamic"] = folder / "dynamic.onnx"
    quantize_dynamic(float_path, out["dynamic"], weight_type=QuantType.QUInt8)
    out["qdq"] = folder / "qdq.onnx"
    quantize_static(float_path, out["qdq"], _Calibration(), quant_format=QuantFormat.QDQ)
    out["qoperator"] = folder / "qoperator.onnx"
    quantize_static(float_path, out["qoperator"], _Calibration(), quant_format=QuantFormat.QOperator)
    extended = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    out["optimised"] = _optimised(float_path, folder / "optimised.onnx", extended)
    out["qoperator_nhwc"] = _optimised(
        out["qoperator"], folder / "qoperator_nhwc.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    out["nchwc"] = _optimised(float_path, folder / "nchwc.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return out


def _report(path: Path) -> ModelReport:
    (description,) = read_onnx(path)
    return analyze(description)


@pytest.mark.parametrize(
    ("variant", "ops"),
    [
        ("float", ["Conv", "Conv", "Conv", "ConvTranspose"]),
        # ConvInteger, then a run-time rescale, then an Add of the bias.
        ("dynamic", ["ConvInteger", "ConvInteger", "ConvInteger", "ConvTranspose"]),
        # Conv -> QuantizeLinear -> DequantizeLinear -> Add(DequantizeLinear(bias)).
        ("qdq", ["Conv", "Conv", "Conv", "ConvTranspose"]),
        # QLinearConv -> com.microsoft QLinearAdd(quantized bias).
        ("qoperator", ["QLinearConv", "QLinearConv", "QLinearConv", "ConvTranspose"]),
        # com.microsoft FusedConv (Conv + Relu).
        ("optimised", ["FusedConv", "Conv", "Conv", "ConvTranspose"]),
        # com.microsoft QLinearConv with channels_last=1, the bias Add in NHWC layout.
        ("qoperator_nhwc", ["QLinearConv", "QLinearConv", "QLinearConv", "ConvTranspose"]),
    ],
)
def test_every_onnxruntime_rewrite_keeps_the_bias_structure(
    files: dict[str, Path], variant: str, ops: list[str]
) -> None:
    report = _report(files[variant])
    assert [layer.op for layer in report.layers] == ops
    assert [
        (layer.bias.kind, layer.bias.params, layer.output_spatial) for layer in report.layers
    ] == FLOAT_LAYERS
    assert [layer.weight_params for layer in report.layers] == [432, 1152, 72, 128]
    assert report.totals.conv_bias_params == 16 + 1152 + 8 + 4
    assert not [w for w in report.warnings if "output size unknown" in w]


def test_nhwc_bias_is_reported_channels_first(files: dict[str, Path]) -> None:
    report = _report(files["qoperator_nhwc"])
    untied = report.layers[1]
    assert untied.bias.shape == (1, 8, 12, 12)
    assert any("channels-last layout; reported as [1, 8, 12, 12]" in w for w in report.warnings)


def test_nchwc_convs_are_named_not_guessed(files: dict[str, Path]) -> None:
    # ORT_ENABLE_ALL on a float model rewrites convs into com.microsoft.nchwc Conv with blocked,
    # padded weights: not analysed, and each one is named in a warning.
    report = _report(files["nchwc"])
    assert [layer.op for layer in report.layers] == ["ConvTranspose"]
    skipped = [w for w in report.warnings if "com.microsoft.nchwc" in w]
    assert len(skipped) == 3
    assert all("not a standard convolution and was not analysed" in w for w in skipped)


class _BnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, bias=False)
        self.b2 = nn.Parameter(torch.randn(8, 12, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.bn(self.conv(x)))) + self.b2


def test_unoptimised_dynamo_export_has_no_phantom_biases(tmp_path: Path) -> None:
    # Without the optimiser, the torch.export-based exporter feeds every bias-free conv a bias
    # input of zeros made at run time; none is stored, so none is counted.
    path = tmp_path / "unoptimised.onnx"
    torch.onnx.export(_BnNet().eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=True, optimize=False)
    report = _report(path)
    assert [
        (layer.name, layer.bias.kind, layer.bias.params, layer.followed_by) for layer in report.layers
    ] == [
        ("conv", BiasKind.ABSENT, 0, "BatchNormalization"),
        ("c2", BiasKind.UNTIED, 8 * 12 * 12, None),
    ]
    assert any("zero tensor made at run time" in warning for warning in report.warnings)
