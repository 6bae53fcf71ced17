"""Regenerate the tiny sample models committed next to this script.

Usage::

    python samples/make_samples.py            # rewrite the samples in samples/
    python samples/make_samples.py --out DIR  # write them somewhere else

Every file is a few KB except the two untied seeds (``seed_untied.onnx`` and
``separate_bias.pt``, ~110 KB each, because their untied bias really has 32x28x28 floats).  The models are built with fixed seeds and exported with the
classic (TorchScript-based) ONNX exporter, ``torch.onnx.export(..., dynamo=False)``: it works
offline, emits plain ``Conv`` nodes whose weights are graph initializers, and its output is
byte-identical from run to run with the same torch version.  The quantized sample is built
by hand with :mod:`onnx.helper` because no exporter here emits ``QLinearConv``.

The README quotes what biasinspect prints for these files; ``tests/test_samples.py`` checks
that the committed files still match what this script generates, so they cannot drift.
"""

from __future__ import annotations

import argparse
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

SAMPLES_DIR = Path(__file__).resolve().parent
"""Where the committed samples live (this script's folder)."""

OPSET = 17
"""ONNX opset for the exported samples: widely supported and stable in the classic exporter."""

QUANT_OPSET = 19
"""Opset of the hand-built quantized sample (QLinearConv exists since 10, per-channel Q/DQ since 13; the
reference evaluator implements Q/DQ only from 19)."""

SEED = 0
"""Seed for every model's initial weights; each builder reseeds so files do not depend on order."""


class SeedTied(nn.Module):
    """The seed example with an ordinary (tied) bias: 32 filters of 5x5 over a 3x32x32 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


class SeedUntied(nn.Module):
    """The seed example with an untied bias: one bias per output channel AND output location.

    The conv has no bias of its own; a [32, 28, 28] parameter is added to its output, which
    the exporter turns into ``Conv`` followed by ``Add(initializer [32, 28, 28])``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 5, bias=False)
        self.bias = nn.Parameter(torch.zeros(32, 28, 28))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x) + self.bias
        return out


class SpatialBias(nn.Module):
    """A separate bias module, the way modern code writes a per-location bias: ``x + self.bias``."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ConvBN(nn.Module):
    """Conv without bias, then BatchNorm (whose shift plays the tied bias's role), then ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.bn(self.conv(x)))
        return out


class ConvTranspose(nn.Module):
    """A 2x upsampling transposed conv: weight layout [C_in=16, C_out=8, 4, 4], tied bias [8]."""

    def __init__(self) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.deconv(x)
        return out


class Depthwise(nn.Module):
    """A depthwise-separable block: depthwise 3x3 (groups = C = 8), then pointwise 1x1 to 16."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pointwise(self.depthwise(x))
        return out


class SmallCNN(nn.Module):
    """A small classifier for the PyTorch state_dict sample: a biased conv, a conv+BN, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        out: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return out


def _randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-default affine parameters and running statistics.

    With default values (weight = running_var = 1, bias = running_mean = 0) the exporter
    deduplicates identical initializers and wires ``Identity`` nodes in; a trained model has
    distinct values, and the sample should look like one.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, **kwargs: object) -> None:
    """Export with the classic exporter, in eval mode, to ``path``."""
    model.eval()
    with warnings.catch_warnings():
        # The classic exporter is deprecated in favour of dynamo; we choose it deliberately.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            **kwargs,  # type: ignore[arg-type]
        )


def make_seed_tied(out_dir: Path) -> Path:
    """``seed_tied.onnx``: Conv2d(3, 32, 5) with bias on (1, 3, 32, 32) -> 1 tied layer, 2,432 params."""
    torch.manual_seed(SEED)
    path = out_dir / "seed_tied.onnx"
    _export_onnx(SeedTied(), torch.zeros(1, 3, 32, 32), path)
    return path


def make_seed_tied_safetensors(out_dir: Path) -> Path:
    """``seed_tied.safetensors``: the same weights as ``seed_tied.onnx`` (keys conv.weight, conv.bias)."""
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    path = out_dir / "seed_tied.safetensors"
    state = {name: tensor.contiguous() for name, tensor in SeedTied().state_dict().items()}
    save_file(state, str(path))
    return path


def make_seed_untied(out_dir: Path) -> Path:
    """``seed_untied.onnx``: bias-free conv + Add of a [32, 28, 28] parameter -> 1 untied layer."""
    torch.manual_seed(SEED)
    path = out_dir / "seed_untied.onnx"
    _export_onnx(SeedUntied(), torch.zeros(1, 3, 32, 32), path)
    return path


def make_conv_bn(out_dir: Path) -> Path:
    """``conv_bn.onnx``: Conv (no bias) -> BatchNormalization -> Relu, BN kept as its own node.

    ``TrainingMode.PRESERVE`` on an eval-mode model exports inference-mode BN
    (``training_mode = 0``) without folding it into the conv, which EVAL mode would do.
    """
    torch.manual_seed(SEED)
    model = ConvBN()
    _randomize_batchnorm(model)
    path = out_dir / "conv_bn.onnx"
    _export_onnx(model, torch.zeros(1, 3, 16, 16), path, training=torch.onnx.TrainingMode.PRESERVE)
    return path


def make_conv_transpose(out_dir: Path) -> Path:
    """``conv_transpose.onnx``: ConvTranspose2d(16, 8, 4, stride=2, padding=1) on (1, 16, 8, 8)."""
    torch.manual_seed(SEED)
    path = out_dir / "conv_transpose.onnx"
    _export_onnx(ConvTranspose(), torch.zeros(1, 16, 8, 8), path)
    return path


def make_depthwise(out_dir: Path) -> Path:
    """``depthwise.onnx``: depthwise 3x3 conv (group = 8) then pointwise 1x1 conv, both biased."""
    torch.manual_seed(SEED)
    path = out_dir / "depthwise.onnx"
    _export_onnx(Depthwise(), torch.zeros(1, 8, 16, 16), path)
    return path


def make_quantized_conv(out_dir: Path) -> Path:
    """``quantized_conv.onnx``: QuantizeLinear -> QLinearConv -> DequantizeLinear, built by hand.

    The layout follows onnxruntime's static QDQ-to-QOperator output: uint8 activations,
    per-channel int8 weights [4, 3, 3, 3] with per-channel scales, and the int32 bias [4]
    (QLinearConv input 8) -- a tied bias.
    """
    rng = np.random.default_rng(SEED)
    c_out, c_in, k = 4, 3, 3
    weight = rng.integers(-127, 128, size=(c_out, c_in, k, k), dtype=np.int8)
    bias = rng.integers(-1000, 1000, size=(c_out,), dtype=np.int32)
    w_scale = rng.uniform(0.001, 0.01, size=(c_out,)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(np.array(0.02, dtype=np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "x_zero_point"),
        numpy_helper.from_array(weight, "conv.weight_quantized"),
        numpy_helper.from_array(w_scale, "conv.weight_scale"),
        numpy_helper.from_array(np.zeros(c_out, dtype=np.int8), "conv.weight_zero_point"),
        numpy_helper.from_array(np.array(0.05, dtype=np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "y_zero_point"),
        numpy_helper.from_array(bias, "conv.bias_quantized"),
    ]
    nodes = [
        helper.make_node(
            "QuantizeLinear",
            ["input", "x_scale", "x_zero_point"],
            ["input_quantized"],
            name="input_QuantizeLinear",
        ),
        helper.make_node(
            "QLinearConv",
            [
                "input_quantized",
                "x_scale",
                "x_zero_point",
                "conv.weight_quantized",
                "conv.weight_scale",
                "conv.weight_zero_point",
                "y_scale",
                "y_zero_point",
                "conv.bias_quantized",
            ],
            ["output_quantized"],
            name="/conv/Conv_quant",
            kernel_shape=[k, k],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
            dilations=[1, 1],
            group=1,
        ),
        helper.make_node(
            "DequantizeLinear",
            ["output_quantized", "y_scale", "y_zero_point"],
            ["output"],
            name="output_DequantizeLinear",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "quantized_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c_out, 8, 8])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", QUANT_OPSET)],
        producer_name="biasinspect-samples",
        producer_version="1",
    )
    # Pin the IR version: make_model would otherwise stamp the installed onnx's newest one.
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    path = out_dir / "quantized_conv.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def make_small_cnn(out_dir: Path) -> Path:
    """``small_cnn.pt``: ``torch.save`` of SmallCNN's state_dict (zip format, the torch default)."""
    torch.manual_seed(SEED)
    model = SmallCNN()
    _randomize_batchnorm(model)
    path = out_dir / "small_cnn.pt"
    # torch.save names the zip's top folder after the file stem and derives serialization_id
    # from the content, so the same name and weights give the same bytes.
    torch.save(model.state_dict(), path)
    return path


def make_lasagne_untied(out_dir: Path) -> Path:
    """``lasagne_untied.npz``: a Lasagne net as ``np.savez(f, *get_all_param_values(net))`` saves it.

    Input 3x8x8; ``Conv2DLayer(4 filters of 3x3, untie_biases=True)`` (W [4, 3, 3, 3], b [4, 6, 6]),
    then ``Conv2DLayer(2 filters of 3x3)`` (W [2, 4, 3, 3], b [2]): members ``arr_0.npy`` to
    ``arr_3.npy``, stored, in parameter order.  Written member by member exactly as ``np.savez``
    writes them (``np.lib.format.write_array`` into a zip64-forced stored member) but with a fixed
    timestamp, so the bytes do not change from run to run.
    """
    rng = np.random.default_rng(SEED)
    params = [
        rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        rng.standard_normal((4, 6, 6)).astype(np.float32),
        rng.standard_normal((2, 4, 3, 3)).astype(np.float32),
        rng.standard_normal((2,)).astype(np.float32),
    ]
    path = out_dir / "lasagne_untied.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for index, array in enumerate(params):
            info = zipfile.ZipInfo(f"arr_{index}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return path


def make_separate_bias(out_dir: Path) -> Path:
    """``separate_bias.pt``: the seed's untied layer as a bias-free ``Conv2d(3, 32, 5)`` followed by
    a separate ``[32, 28, 28]`` bias module in a ``Sequential``; ``torch.save`` of its state_dict."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv2d(3, 32, 5, bias=False), SpatialBias(32, 28, 28))
    with torch.no_grad():
        model[1].bias.normal_(0.0, 0.1)  # a trained bias is not zero
    path = out_dir / "separate_bias.pt"
    torch.save(model.state_dict(), path)
    return path


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "seed_tied.onnx": make_seed_tied,
    "seed_untied.onnx": make_seed_untied,
    "conv_bn.onnx": make_conv_bn,
    "conv_transpose.onnx": make_conv_transpose,
    "depthwise.onnx": make_depthwise,
    "quantized_conv.onnx": make_quantized_conv,
    "seed_tied.safetensors": make_seed_tied_safetensors,
    "small_cnn.pt": make_small_cnn,
    "lasagne_untied.npz": make_lasagne_untied,
    "separate_bias.pt": make_separate_bias,
}
"""Sample file name -> builder that writes it into a folder and returns its path."""


def make_all(out_dir: Path) -> dict[str, Path]:
    """Write every sample into ``out_dir`` (created if needed); return name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: build(out_dir) for name, build in BUILDERS.items()}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: regenerate the samples and list their sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=SAMPLES_DIR, help="folder to write into (default: this script's folder)"
    )
    args = parser.parse_args(argv)
    paths = make_all(args.out)
    total = 0
    for path in paths.values():
        size = path.stat().st_size
        total += size
        print(f"{size:>9,} B  {path}")
    print(f"{total:>9,} B  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
