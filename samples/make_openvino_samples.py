"""Write the OpenVINO IR samples with the real OpenVINO converter and opset API.

Needs ``pip install openvino onnx numpy`` (not a biasinspect dependency).  Run from the
repository root: ``python samples/make_openvino_samples.py``.  Writes ``samples/openvino/``:

* ``seed_untied.xml/.bin``: ``samples/seed_untied.onnx`` converted by ``ov.convert_model`` and
  saved with FP16 compression (the bias is ``Const f16 -> Convert -> Add``), the seed's untied
  layer;
* ``conv_bn.xml/.bin``: ``samples/conv_bn.onnx`` converted the same way (the BatchNorm is
  folded into the conv: a tied bias in the IR);
* ``depthwise.xml/.bin``: ``samples/depthwise.onnx`` converted the same way (a GroupConvolution
  and a pointwise Convolution, each with its bias Add);
* ``patterns.xml/.bin``: one graph built with the opset API holding every bias pattern the
  reader handles (a bias-free conv followed by BatchNormInference, a grouped transposed conv
  with a tied bias, int8 weights behind a Convert/Subtract/Multiply dequantization subgraph
  with a FakeQuantize'd bias, a deformable conv, and a conv inside an ``If`` branch).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OV_TELEMETRY_DISABLE", "1")

import numpy as np
import openvino as ov
from openvino import opset13 as ops

HERE = Path(__file__).resolve().parent
OUT = HERE / "openvino"


def _const(shape: tuple[int, ...], dtype: type = np.float32, value: float = 0.01) -> ov.Node:
    return ops.constant(np.full(shape, value, dtype=dtype))


def patterns() -> ov.Model:
    x = ops.parameter([1, 4, 8, 8], np.float32, name="input")
    # 1. bias-free conv followed by a BatchNormInference.
    conv_bn = ops.convolution(x, _const((8, 4, 3, 3)), [1, 1], [1, 1], [1, 1], [1, 1])
    conv_bn.set_friendly_name("features.0")
    bn = ops.batch_norm_inference(
        conv_bn, _const((8,)), _const((8,)), _const((8,)), _const((8,), value=1.0), 1e-5
    )
    relu = ops.relu(bn)
    # 2. grouped transposed conv (groups 2) with a tied bias.
    deconv = ops.group_convolution_backprop_data(
        relu, _const((2, 4, 3, 2, 2)), strides=[2, 2], pads_begin=[0, 0], pads_end=[0, 0], dilations=[1, 1]
    )
    deconv.set_friendly_name("up.0")
    up = ops.add(deconv, _const((1, 6, 1, 1)))
    # 3. int8 weights behind a dequantization subgraph, bias behind FakeQuantize.
    w_q = ops.constant(np.ones((6, 6, 3, 3), dtype=np.int8))
    w_deq = ops.multiply(
        ops.subtract(ops.convert(w_q, np.float32), _const((6, 1, 1, 1))), _const((6, 1, 1, 1))
    )
    qconv = ops.convolution(up, w_deq, [1, 1], [1, 1], [1, 1], [1, 1])
    qconv.set_friendly_name("quant.conv")
    b_fq = ops.fake_quantize(
        _const((1, 6, 1, 1)), _const(()), _const((), value=1.0), _const(()), _const((), value=1.0), 256
    )
    qout = ops.add(qconv, b_fq)
    # 4. deformable conv (weights are input 2) with an untied bias.
    offsets = ops.convolution(qout, _const((18, 6, 3, 3)), [1, 1], [1, 1], [1, 1], [1, 1])
    offsets.set_friendly_name("offsets")
    deform = ops.deformable_convolution(qout, offsets, _const((4, 6, 3, 3)), [1, 1], [1, 1], [1, 1], [1, 1])
    deform.set_friendly_name("deform")
    dout = ops.add(deform, _const((1, 4, 16, 16)))
    # 5. a conv inside an If branch (then: conv with a tied bias; else: identity-like conv, no bias).
    cond = ops.parameter([], np.bool_, name="cond")
    then_x = ops.parameter([1, 4, 16, 16], np.float32)
    then_conv = ops.convolution(then_x, _const((4, 4, 1, 1)), [1, 1], [0, 0], [0, 0], [1, 1])
    then_conv.set_friendly_name("branch.conv")
    then_model = ov.Model([ops.result(ops.add(then_conv, _const((1, 4, 1, 1))))], [then_x])
    else_x = ops.parameter([1, 4, 16, 16], np.float32)
    else_model = ov.Model([ops.result(ops.relu(else_x))], [else_x])
    branch = ops.if_op(cond)
    branch.set_friendly_name("gate")
    branch.set_then_body(then_model)
    branch.set_else_body(else_model)
    branch.set_input(dout.output(0), then_x, else_x)
    out = branch.set_output(then_model.results[0], else_model.results[0])
    return ov.Model([ops.result(out)], [x, cond], "patterns")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    seed = ov.convert_model(str(HERE / "seed_untied.onnx"))
    ov.save_model(seed, str(OUT / "seed_untied.xml"), compress_to_fp16=True)
    # The converter folds the BatchNormalization after this bias-free conv into its weights
    # and a [1, C, 1, 1] Add: absent in the ONNX file, tied in the IR.
    ov.save_model(ov.convert_model(str(HERE / "conv_bn.onnx")), str(OUT / "conv_bn.xml"))
    # A depthwise conv becomes a GroupConvolution (weights [G, C_out/G, C_in/G, kH, kW]).
    ov.save_model(ov.convert_model(str(HERE / "depthwise.onnx")), str(OUT / "depthwise.xml"))
    ov.save_model(patterns(), str(OUT / "patterns.xml"), compress_to_fp16=False)
    for path in sorted(OUT.iterdir()):
        print(path.relative_to(HERE.parent), path.stat().st_size)


if __name__ == "__main__":
    main()
