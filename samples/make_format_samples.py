"""Regenerate the committed TFLite and Keras samples with the real converters.

Usage (needs tensorflow-cpu, tf-keras and keras 3; they are NOT biasinspect dependencies, not even
test ones: install them into a separate environment)::

    python -m venv /work/venv-tf
    /work/venv-tf/bin/pip install tensorflow-cpu==2.20.0 tf-keras==2.20.1 keras==3.15.1 h5py
    /work/venv-tf/bin/python samples/make_format_samples.py            # rewrite samples/
    /work/venv-tf/bin/python samples/make_format_samples.py --out DIR  # somewhere else

Every file is a few KB: filters are few and inputs small.  ``tests/test_tflite_reader.py`` and
``tests/test_keras_reader.py`` read them and assert exact counts (the seed-size Keras models
whose weights are hundreds of KB are built in the tests with h5py instead, with the same
layout the converter writes).

TFLite files come from ``tf.lite.TFLiteConverter.from_keras_model`` on tf-keras (Keras 2)
models: float32, float16 (``target_spec.supported_types = [tf.float16]``: fp16 constants behind
DEQUANTIZE), full-integer int8 (a representative dataset: int8 filters, int32 biases), int16x8,
and a sparse one (``EXPERIMENTAL_SPARSITY`` on a mostly-zero kernel: DENSIFY).  ``.keras`` files
come from keras 3's ``model.save``; legacy ``.h5`` from tf-keras's ``model.save(..., save_format="h5")``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np

SAMPLES_DIR = Path(__file__).resolve().parent
SEED = 0


def _tf_keras():  # type: ignore[no-untyped-def]
    import tf_keras

    tf_keras.utils.set_random_seed(SEED)
    return tf_keras


def _keras3():  # type: ignore[no-untyped-def]
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras

    keras.utils.set_random_seed(SEED)
    return keras


# -- tf-keras models (for TFLite and legacy .h5) -------------------------------------------------


def zoo_2d(k):  # type: ignore[no-untyped-def]
    """Conv2D, a bias-free Conv2D + BatchNormalization, DepthwiseConv2D, SeparableConv2D and
    Conv2DTranspose on a 12x12x3 input."""
    inputs = k.Input((12, 12, 3))
    x = k.layers.Conv2D(4, 3, name="conv")(inputs)  # 10x10x4
    x = k.layers.Conv2D(6, 3, use_bias=False, name="conv_nobias")(x)  # 8x8x6
    x = k.layers.BatchNormalization(name="bn")(x)
    x = k.layers.ReLU()(x)
    x = k.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(x)  # 6x6x12
    x = k.layers.SeparableConv2D(5, 3, name="separable")(x)  # 4x4x5
    x = k.layers.Conv2DTranspose(3, 3, strides=2, name="transpose")(x)  # 9x9x3
    return k.Model(inputs, x, name="zoo_2d")


def zoo_1d(k):  # type: ignore[no-untyped-def]
    """Conv1D (EXPAND_DIMS + CONV_2D in TFLite) on a 20x3 input."""
    inputs = k.Input((20, 3))
    x = k.layers.Conv1D(4, 5, name="conv1d")(inputs)  # 16x4
    x = k.layers.Conv1D(2, 3, use_bias=False, name="conv1d_nobias")(x)  # 14x2
    return k.Model(inputs, x, name="zoo_1d")


def zoo_3d(k):  # type: ignore[no-untyped-def]
    """Conv3D and Conv3DTranspose on a 6x6x6x2 input."""
    inputs = k.Input((6, 6, 6, 2))
    x = k.layers.Conv3D(3, 3, name="conv3d")(inputs)  # 4x4x4x3
    x = k.layers.Conv3DTranspose(2, 3, name="conv3d_transpose")(x)  # 6x6x6x2
    return k.Model(inputs, x, name="zoo_3d")


def seed_tied(k):  # type: ignore[no-untyped-def]
    """The seed example: Conv2D(32, 5) on a 32x32x3 input (2,432 parameters)."""
    inputs = k.Input((32, 32, 3))
    return k.Model(inputs, k.layers.Conv2D(32, 5, name="conv")(inputs), name="seed_tied")


def locally_connected(k):  # type: ignore[no-untyped-def]
    """Keras 2's untied layers, one per implementation, on small inputs."""
    inputs = k.Input((6, 6, 2))
    a = k.layers.LocallyConnected2D(3, 3, implementation=1, name="lc2d_impl1")(inputs)  # 4x4x3
    b = k.layers.LocallyConnected2D(3, 3, implementation=2, name="lc2d_impl2")(inputs)
    c = k.layers.LocallyConnected2D(3, 3, implementation=3, name="lc2d_impl3")(inputs)
    seq = k.Input((8, 2))
    d = k.layers.LocallyConnected1D(4, 3, name="lc1d")(seq)  # 6x4
    return k.Model([inputs, seq], [a, b, c, d], name="locally_connected")


def nested_legacy(k):  # type: ignore[no-untyped-def]
    """A Sequential inside a functional model, and a bias-free conv followed by BatchNormalization."""
    inner = k.Sequential(
        [
            k.layers.Conv2D(4, 3, use_bias=False, name="inner_conv"),
            k.layers.BatchNormalization(name="inner_bn"),
        ],
        name="inner",
    )
    inputs = k.Input((8, 8, 2))
    x = inner(inputs)
    x = k.layers.Conv2D(2, 1, name="head")(x)
    return k.Model(inputs, x, name="nested")


# -- converters ----------------------------------------------------------------------------------


def _representative(model):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(SEED)
    shapes = [tuple(int(d) for d in tensor.shape[1:]) for tensor in model.inputs]

    def dataset() -> Iterator[list[np.ndarray]]:
        for _ in range(8):
            yield [rng.standard_normal((1, *shape)).astype(np.float32) for shape in shapes]

    return dataset


def to_tflite(model, mode: str = "float") -> bytes:  # type: ignore[no-untyped-def]
    """Convert a tf-keras model: ``float``, ``fp16``, ``int8``, ``int16x8`` or ``sparse``."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(model)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif mode == "int16x8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(model)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
    elif mode == "sparse":
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    blob: bytes = converter.convert()
    return blob


def sparse_model(k):  # type: ignore[no-untyped-def]
    """A Conv2D(16, 3) whose kernel is 90% zeros, so the converter stores it sparse (DENSIFY)."""
    inputs = k.Input((8, 8, 8))
    conv = k.layers.Conv2D(16, 3, name="sparse_conv")
    model = k.Model(inputs, conv(inputs), name="sparse")
    kernel, bias = conv.get_weights()
    rng = np.random.default_rng(SEED)
    kernel = kernel * (rng.random(kernel.shape) < 0.1)
    conv.set_weights([kernel.astype(np.float32), bias])
    return model


def keras3_zoo(k):  # type: ignore[no-untyped-def]
    """A keras 3 functional model: every conv layer class, a nested Sequential and a nested
    functional model, a bias-free Conv2D followed by BatchNormalization."""
    inner_seq = k.Sequential(
        [
            k.Input((10, 10, 4)),
            k.layers.Conv2D(4, 3, use_bias=False, name="seq_conv"),
            k.layers.BatchNormalization(name="seq_bn"),
        ],
        name="inner_seq",
    )
    inner_in = k.Input((8, 8, 4))
    inner_fn = k.Model(inner_in, k.layers.DepthwiseConv2D(3, name="fn_depthwise")(inner_in), name="inner_fn")
    image = k.Input((12, 12, 3), name="image")
    x = k.layers.Conv2D(4, 3, name="conv")(image)  # 10x10x4
    x = inner_seq(x)  # 8x8x4
    x = inner_fn(x)  # 6x6x4
    x = k.layers.SeparableConv2D(5, 3, depth_multiplier=2, name="separable")(x)  # 4x4x5
    x = k.layers.Conv2DTranspose(3, 3, strides=2, name="transpose")(x)  # 9x9x3
    x = k.layers.Conv2D(4, 3, groups=1, padding="same", name="same")(x)  # 9x9x4
    signal = k.Input((20, 3), name="signal")
    y = k.layers.Conv1D(4, 5, name="conv1d")(signal)  # 16x4
    y = k.layers.Conv1DTranspose(2, 3, name="conv1d_transpose")(y)  # 18x2
    y = k.layers.SeparableConv1D(3, 3, name="separable1d")(y)  # 16x3
    y = k.layers.DepthwiseConv1D(3, name="depthwise1d")(y)  # 14x3
    volume = k.Input((6, 6, 6, 2), name="volume")
    z = k.layers.Conv3D(3, 3, name="conv3d")(volume)  # 4x4x4x3
    z = k.layers.Conv3DTranspose(2, 3, name="conv3d_transpose")(z)  # 6x6x6x2
    return k.Model([image, signal, volume], [x, y, z], name="keras3_zoo")


def keras3_seed(k):  # type: ignore[no-untyped-def]
    """The seed example in keras 3: Conv2D(32, 5) on 32x32x3."""
    inputs = k.Input((32, 32, 3))
    return k.Model(inputs, k.layers.Conv2D(32, 5, name="conv")(inputs), name="seed")


def keras3_grouped(k):  # type: ignore[no-untyped-def]
    """A grouped Conv2D (groups=2) in keras 3."""
    inputs = k.Input((6, 6, 4))
    return k.Model(inputs, k.layers.Conv2D(6, 3, groups=2, name="grouped")(inputs), name="grouped")


def randomized(model):  # type: ignore[no-untyped-def]
    """Give every variable random non-zero values, as a trained model has: the TFLite converter
    drops a bias add of zeros, and folds a BatchNormalization only into what it can see."""
    rng = np.random.default_rng(SEED)

    def leaves(layer):  # type: ignore[no-untyped-def]
        inner = getattr(layer, "layers", None)
        if inner:
            for child in inner:
                yield from leaves(child)
        else:
            yield layer

    for layer in leaves(model):
        weights = layer.get_weights()
        if not weights:
            continue
        fresh = []
        for value in weights:
            noise = rng.uniform(0.5, 1.5, value.shape) * rng.choice([-1.0, 1.0], value.shape)
            if "Normalization" in type(layer).__name__:
                noise = np.abs(noise)  # variances must stay positive
            fresh.append(noise.astype(value.dtype))
        layer.set_weights(fresh)
    return model


def generate(out: Path) -> list[Path]:
    """Write every sample into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(name: str, data: bytes) -> None:
        path = out / name
        path.write_bytes(data)
        written.append(path)

    tk = _tf_keras()
    tflite_models: list[tuple[str, Callable[..., object], str]] = [
        ("seed_tied.tflite", seed_tied, "float"),
        ("zoo_2d.tflite", zoo_2d, "float"),
        ("zoo_2d_fp16.tflite", zoo_2d, "fp16"),
        ("zoo_2d_int8.tflite", zoo_2d, "int8"),
        ("zoo_2d_int16x8.tflite", zoo_2d, "int16x8"),
        ("zoo_1d.tflite", zoo_1d, "float"),
        ("zoo_3d.tflite", zoo_3d, "float"),
        ("sparse.tflite", sparse_model, "sparse"),
    ]
    for name, build, mode in tflite_models:
        tk.utils.set_random_seed(SEED)
        model = build(tk) if build is sparse_model else randomized(build(tk))
        write(name, to_tflite(model, mode))
    for name, build in (("locally_connected.h5", locally_connected), ("nested_legacy.h5", nested_legacy)):
        tk.utils.set_random_seed(SEED)
        path = out / name
        randomized(build(tk)).save(path, save_format="h5")
        written.append(path)
    k3 = _keras3()
    for name, build in (
        ("keras3_zoo.keras", keras3_zoo),
        ("seed_tied.keras", keras3_seed),
        ("grouped.keras", keras3_grouped),
    ):
        k3.utils.set_random_seed(SEED)
        path = out / name
        randomized(build(k3)).save(path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR)
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
