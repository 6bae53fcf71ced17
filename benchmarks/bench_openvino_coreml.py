"""Benchmark biasinspect against OpenVINO's and coremltools' own loaders on VGG19-size models.

The models are VGG19 (torchvision's layout, 143,667,240 float32 parameters, ~548 MiB of
weights, non-zero so that no converter drops a bias), written by the real tools:

* OpenVINO IR: built with the opset API and ``ov.save_model(compress_to_fp16=False)``;
  baseline ``openvino.Core().read_model(xml)``;
* CoreML ``.mlpackage`` (ML Program, float32 weights): built with coremltools' MIL builder and
  ``ct.convert(..., compute_precision=FLOAT32)``; baseline
  ``coremltools.models.MLModel(path, skip_model_load=True)``.

Each command is its own process (imports included), in alternating rounds.  Goals (PASS/FAIL):
biasinspect takes at most 1/3 of the loader's wall time and peaks at 150 MiB RSS or less.

Needs ``pip install openvino coremltools onnx defusedxml tabulate`` in the running interpreter
(the converters are not biasinspect dependencies).  Usage::

    python benchmarks/bench_openvino_coreml.py [--rounds 5] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _measure import MIB, Series, alternate, check_vgg19_report, print_loader_verdicts, print_table
from bench_onnx import VGG19_CLASSIFIER, VGG19_FEATURES

os.environ.setdefault("OV_TELEMETRY_DISABLE", "1")
# Measured as a user runs them: with bytecode caching (a warm-up round writes the .pyc files).
# With it off, every run recompiles biasinspect's modules, about 0.1 s that no installed copy pays.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

WALL_RATIO_GOAL = 3.0
RSS_GOAL_BYTES = 150 * MIB


def write_openvino(xml_path: Path) -> None:
    """Build VGG19 with OpenVINO's opset API (float32 weights, biases as a [1, C, 1, 1] Add, as
    ``ov.convert_model`` writes them) and save it as IR."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([1, 3, 224, 224], np.float32, name="input")
    node, channels, index = x, 3, 0
    for item in VGG19_FEATURES:
        if item == "M":
            node = ops.max_pool(node, [2, 2], [1, 1], [0, 0], [0, 0], [2, 2]).output(0)
            continue
        width = int(item)
        weight = ops.constant(np.full((width, channels, 3, 3), 0.01, dtype=np.float32))
        conv = ops.convolution(node, weight, [1, 1], [1, 1], [1, 1], [1, 1])
        conv.set_friendly_name(f"features.{index}")
        node = ops.relu(ops.add(conv, ops.constant(np.full((1, width, 1, 1), 0.1, dtype=np.float32))))
        channels, index = width, index + 1
    node = ops.reshape(node, ops.constant(np.array([1, 512 * 7 * 7], dtype=np.int64)), False)
    for fan_in, fan_out in VGG19_CLASSIFIER:
        weight = ops.constant(np.full((fan_out, fan_in), 0.01, dtype=np.float32))
        node = ops.add(
            ops.matmul(node, weight, False, True), ops.constant(np.full((fan_out,), 0.1, np.float32))
        )
    ov.save_model(ov.Model([ops.result(node)], [x], "vgg19"), str(xml_path), compress_to_fp16=False)


def write_coreml(package: Path) -> None:
    """Build VGG19 as an ML Program with float32 zero weights and save it as an .mlpackage."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 224, 224))], opset_version=ct.target.iOS16)
    def vgg19(x):  # type: ignore[no-untyped-def]
        channels, index = 3, 0
        for item in VGG19_FEATURES:
            if item == "M":
                x = mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid")
                continue
            width = int(item)
            weight = np.full((width, channels, 3, 3), 0.01, dtype=np.float32)
            bias = np.full(width, 0.1, np.float32)  # non-zero: the converter drops an all-zero bias
            x = mb.conv(x=x, weight=weight, bias=bias, pad_type="same", name=f"conv{index}")
            x = mb.relu(x=x)
            channels, index = width, index + 1
        x = mb.reshape(x=x, shape=[1, 512 * 7 * 7])
        for number, (fan_in, fan_out) in enumerate(VGG19_CLASSIFIER):
            weight = np.full((fan_out, fan_in), 0.01, dtype=np.float32)
            x = mb.linear(x=x, weight=weight, bias=np.full(fan_out, 0.1, np.float32), name=f"fc{number}")
        return x

    model = ct.convert(
        vgg19, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS16, skip_model_load=True,
    )  # fmt: skip
    model.save(str(package))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def main(argv: list[str] | None = None) -> int:
    """Write both models, run the alternating rounds, print figures and PASS/FAIL; 1 on any FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per command first (default 1)")
    parser.add_argument("--workdir", type=Path, help="where to write the models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-ov-coreml-", dir=args.workdir))
    py = sys.executable
    try:
        xml_path, package = workdir / "vgg19.xml", workdir / "vgg19.mlpackage"
        start = time.perf_counter()
        write_openvino(xml_path)
        print(
            f"wrote {xml_path} (+ .bin, {_size(workdir / 'vgg19.bin') / MIB:,.1f} MiB) in {time.perf_counter() - start:.1f} s"
        )
        start = time.perf_counter()
        write_coreml(package)
        print(f"wrote {package} ({_size(package) / MIB:,.1f} MiB) in {time.perf_counter() - start:.1f} s")

        read_model = "import sys, openvino as ov; ov.Core().read_model(sys.argv[1])"
        mlmodel = "import sys, coremltools as ct; ct.models.MLModel(sys.argv[1], skip_model_load=True)"
        pairs = {
            "openvino": (
                Series("biasinspect vgg19.xml", [py, "-m", "biasinspect", str(xml_path), "--format", "json"]),
                Series("Core().read_model vgg19.xml", [py, "-c", read_model, str(xml_path)]),
            ),
            "coreml": (
                Series(
                    "biasinspect vgg19.mlpackage", [py, "-m", "biasinspect", str(package), "--format", "json"]
                ),
                Series("MLModel(skip_model_load) vgg19.mlpackage", [py, "-c", mlmodel, str(package)]),
            ),
        }
        order = [series for pair in pairs.values() for series in pair]
        alternate(order, rounds=args.rounds, warmup=args.warmup)
        for ours, _base in pairs.values():
            for run in ours.runs:
                check_vgg19_report(run.stdout)
        print()
        print_table(order)
        print()
        failed = False
        for kind, (ours, base) in pairs.items():
            loader_name = base.label.split(" ")[0]
            failed |= not print_loader_verdicts(
                kind, ours, base, loader_name, WALL_RATIO_GOAL, RSS_GOAL_BYTES
            )
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
