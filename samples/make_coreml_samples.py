"""Write the CoreML samples with coremltools (NeuralNetwork builder and the MIL builder).

Needs ``pip install coremltools numpy`` (not a biasinspect dependency; it runs on Linux, where
models are written but not compiled).  Run from the repository root:
``python samples/make_coreml_samples.py``.  Writes ``samples/coreml/``:

* ``seed_untied.mlmodel``: NeuralNetwork; the seed's untied layer as a bias-free convolution
  plus a ``loadConstant`` [32, 28, 28] and an ``add`` layer; then a second conv with its own
  bias (``hasBias``); weights quantized to 8 bits (``rawValue``) to keep the file small;
* ``nn_patterns.mlmodel``: NeuralNetwork; a bias-free conv followed by ``batchnorm``, a grouped
  deconvolution with a ``bias`` layer; weights stored as fp16;
* ``program.mlpackage``: ML Program; ``conv`` with a bias input, a bias-free ``conv`` plus an
  ``add`` of an untied constant, a ``conv_transpose`` with palettized (``constexpr_lut_to_dense``)
  weights, and a bias-free ``conv`` followed by ``batch_norm``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder
from coremltools.models.neural_network.quantization_utils import _quantize_spec_weights
from coremltools.models.utils import _convert_neural_network_spec_weights_to_fp16, save_spec

HERE = Path(__file__).resolve().parent
OUT = HERE / "coreml"


def _f(*shape: int) -> np.ndarray:
    return np.full(shape, 0.01, dtype=np.float32)


def seed_untied() -> object:
    builder = NeuralNetworkBuilder(
        [("input", datatypes.Array(3, 32, 32))], [("output", datatypes.Array(8, 26, 26))]
    )
    builder.add_convolution(
        "features.0", kernel_channels=3, output_channels=32, height=5, width=5, stride_height=1,
        stride_width=1, border_mode="valid", groups=1, W=_f(5, 5, 3, 32), b=None, has_bias=False,
        input_name="input", output_name="conv0",
    )  # fmt: skip
    builder.add_load_constant("features.1.bias", "bias0", _f(32, 28, 28), [32, 28, 28])
    builder.add_elementwise("features.1", ["conv0", "bias0"], "biased0", mode="ADD")
    builder.add_activation("features.2", "RELU", "biased0", "relu0")
    builder.add_convolution(
        "features.3", kernel_channels=32, output_channels=8, height=3, width=3, stride_height=1,
        stride_width=1, border_mode="valid", groups=1, W=_f(3, 3, 32, 8), b=_f(8), has_bias=True,
        input_name="relu0", output_name="output",
    )  # fmt: skip
    # 8-bit linear quantization: weights become rawValue bytes plus scale/bias arrays.
    return _quantize_spec_weights(builder.spec, 8, "_linear_quantization")


def nn_patterns() -> object:
    builder = NeuralNetworkBuilder(
        [("input", datatypes.Array(4, 8, 8))], [("output", datatypes.Array(4, 16, 16))]
    )
    builder.add_convolution(
        "stem", kernel_channels=4, output_channels=8, height=3, width=3, stride_height=1, stride_width=1,
        border_mode="same", groups=1, W=_f(3, 3, 4, 8), b=None, has_bias=False, input_name="input",
        output_name="stem_out",
    )  # fmt: skip
    builder.add_batchnorm("stem_bn", 8, _f(8), _f(8), _f(8), _f(8) + 1, "stem_out", "bn_out")
    builder.add_convolution(
        "up", kernel_channels=8, output_channels=4, height=2, width=2, stride_height=2, stride_width=2,
        border_mode="valid", groups=2, W=_f(2, 2, 2, 8), b=None, has_bias=False, is_deconv=True,
        output_shape=[16, 16], input_name="bn_out", output_name="up_out",
    )  # fmt: skip
    builder.add_bias("up_bias", _f(4), "up_out", "output", shape_bias=[4])
    return _convert_neural_network_spec_weights_to_fp16(builder.spec)


def program() -> object:
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 32, 32))], opset_version=ct.target.iOS18)
    def prog(x):
        tied = mb.conv(x=x, weight=_f(8, 3, 3, 3), bias=_f(8), pad_type="valid", name="tied")
        bare = mb.conv(x=tied, weight=_f(8, 8, 3, 3), pad_type="valid", name="untied")
        untied = mb.add(x=bare, y=_f(1, 8, 28, 28), name="untied_bias")
        lut = np.linspace(-1, 1, 256).astype(np.float32).reshape(1, 1, 1, 1, 256, 1)
        indices = np.zeros((8, 4, 2, 2), dtype=np.uint8)
        palettized = mb.constexpr_lut_to_dense(indices=indices, lut=lut, name="deconv_weight")
        up = mb.conv_transpose(x=untied, weight=palettized, strides=[2, 2], pad_type="valid", name="up")
        head = mb.conv(x=up, weight=_f(4, 4, 1, 1), pad_type="valid", name="head")
        return mb.batch_norm(x=head, mean=_f(4), variance=_f(4) + 1, gamma=_f(4), beta=_f(4), name="head_bn")

    return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    save_spec(seed_untied(), str(OUT / "seed_untied.mlmodel"))
    save_spec(nn_patterns(), str(OUT / "nn_patterns.mlmodel"))
    package = OUT / "program.mlpackage"
    if package.exists():
        shutil.rmtree(package)
    program().save(str(package))
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(path.relative_to(HERE.parent), path.stat().st_size)


if __name__ == "__main__":
    main()
