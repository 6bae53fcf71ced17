"""Benchmark biasinspect against ``onnx.load`` on a VGG19-size ONNX model (~575 MB).

The model (VGG19 with 1000 classes, 143,667,240 float32 parameters, 16 Conv + 3 Gemm) is
written with plain protobuf pieces, streaming zero weights to disk, so generating it needs
neither torch nor ~1 GB of RAM.  Two files are produced: one with inline weights
(``raw_data``) and one with the weights in an external data file.

Each command runs as its own process (start-up and imports included -- that is what a user
pays), in alternating rounds; the tables show median wall time and per-run peak RSS.  Goals
(PASS/FAIL lines): on both files biasinspect takes at most 1/3 of ``onnx.load``'s wall time
(the default ``onnx.load``, which reads external data) and peaks at 150 MiB RSS or less.

Usage::

    python benchmarks/bench_onnx.py [--rounds 5] [--workdir DIR] [--keep] [--check]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from _measure import MIB, Series, alternate, check_vgg19_report, print_table, verdict, write_zeros
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper

VGG19_FEATURES: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
]  # fmt: skip
"""torchvision's VGG19 feature config: conv widths, "M" = 2x2 max pool."""

VGG19_CLASSIFIER = [(512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]
"""(in, out) of the three fully-connected layers at torchvision indices 0, 3, 6."""

VGG19_PARAMS = 143_667_240
"""Parameter count of torchvision's vgg19 (a check that the generated model is the real size)."""

WALL_RATIO_GOAL = 3.0
RSS_GOAL_BYTES = 150 * MIB
EXTERNAL_ALIGN = 4096
"""Offset alignment of tensors in the external data file (onnx aligns large tensors similarly)."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field_number: int) -> bytes:
    """Tag of a length-delimited protobuf field."""
    return _varint(field_number << 3 | 2)


# Field numbers from onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9


def vgg19_layout() -> tuple[list[NodeProto], list[tuple[str, list[int]]]]:
    """Nodes and (initializer name, dims) of VGG19 in torchvision's naming, input 1x3x224x224."""
    nodes: list[NodeProto] = []
    tensors: list[tuple[str, list[int]]] = []
    current, channels, index = "input", 3, 0
    for item in VGG19_FEATURES:
        if item == "M":
            out = f"/features/features.{index}/MaxPool_output_0"
            nodes.append(
                helper.make_node(
                    "MaxPool", [current], [out], name=f"/features/features.{index}/MaxPool",
                    kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0],
                )
            )  # fmt: skip
            current, index = out, index + 1
            continue
        width = int(item)
        prefix = f"features.{index}"
        tensors += [(f"{prefix}.weight", [width, channels, 3, 3]), (f"{prefix}.bias", [width])]
        conv_out = f"/features/{prefix}/Conv_output_0"
        nodes.append(
            helper.make_node(
                "Conv", [current, f"{prefix}.weight", f"{prefix}.bias"], [conv_out], name=f"/features/{prefix}/Conv",
                dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
            )
        )  # fmt: skip
        relu_out = f"/features/features.{index + 1}/Relu_output_0"
        nodes.append(
            helper.make_node("Relu", [conv_out], [relu_out], name=f"/features/features.{index + 1}/Relu")
        )
        current, channels, index = relu_out, width, index + 2
    nodes.append(helper.make_node("Flatten", [current], ["/Flatten_output_0"], name="/Flatten", axis=1))
    current = "/Flatten_output_0"
    for position, (fan_in, fan_out) in enumerate(VGG19_CLASSIFIER):
        prefix = f"classifier.{position * 3}"
        tensors += [(f"{prefix}.weight", [fan_out, fan_in]), (f"{prefix}.bias", [fan_out])]
        last = position == len(VGG19_CLASSIFIER) - 1
        gemm_out = "output" if last else f"/classifier/{prefix}/Gemm_output_0"
        nodes.append(
            helper.make_node(
                "Gemm", [current, f"{prefix}.weight", f"{prefix}.bias"], [gemm_out],
                name=f"/classifier/{prefix}/Gemm", alpha=1.0, beta=1.0, transB=1,
            )
        )  # fmt: skip
        current = gemm_out
        if not last:
            relu_out = f"/classifier/classifier.{position * 3 + 1}/Relu_output_0"
            nodes.append(
                helper.make_node("Relu", [current], [relu_out], name=relu_out.removesuffix("_output_0"))
            )
            current = relu_out
    return nodes, tensors


def _numel(dims: list[int]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def write_vgg19(path: Path, external: bool) -> int:
    """Write VGG19 to ``path`` (weights inline, or in ``<name>.data`` next to it); return bytes written.

    The protobuf is assembled from pieces: a ModelProto's leading fields, then the graph field
    whose length is computed up front, whose body is the nodes, then each initializer
    (header + streamed zero payload), then inputs/outputs; then the opset imports.  Peak memory
    is one 8 MiB buffer of zeros plus the small node list.
    """
    nodes, tensors = vgg19_layout()
    assert sum(_numel(dims) for _, dims in tensors) == VGG19_PARAMS
    data_name = path.name + ".data"

    head_graph = GraphProto(node=nodes, name="main_graph").SerializeToString()
    tail_graph = GraphProto(
        input=[helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        output=[helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1000])],
    ).SerializeToString()

    # Each initializer: (serialized TensorProto without payload, payload bytes to stream after it).
    pieces: list[tuple[bytes, int]] = []
    offset = 0
    for name, dims in tensors:
        nbytes = _numel(dims) * 4
        tensor = TensorProto(name=name, dims=dims, data_type=TensorProto.FLOAT)
        if external:
            offset = -(-offset // EXTERNAL_ALIGN) * EXTERNAL_ALIGN
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += nbytes
            pieces.append((tensor.SerializeToString(), 0))
        else:
            header = tensor.SerializeToString() + _key(_TENSOR_RAW_DATA) + _varint(nbytes)
            pieces.append((header, nbytes))

    initializer_bytes = sum(
        len(_key(_GRAPH_INITIALIZER)) + len(_varint(len(h) + n)) + len(h) + n for h, n in pieces
    )
    graph_length = len(head_graph) + initializer_bytes + len(tail_graph)

    head_model = ModelProto(
        ir_version=8, producer_name="biasinspect-bench", producer_version="1"
    ).SerializeToString()
    tail_model = ModelProto(opset_import=[helper.make_opsetid("", 17)]).SerializeToString()

    with open(path, "wb") as out:
        out.write(head_model + _key(_MODEL_GRAPH) + _varint(graph_length) + head_graph)
        for header, nbytes in pieces:
            out.write(_key(_GRAPH_INITIALIZER) + _varint(len(header) + nbytes) + header)
            write_zeros(out, nbytes)
        out.write(tail_graph + tail_model)
    size = path.stat().st_size
    if external:
        with open(path.parent / data_name, "wb") as data:
            _write_external(data, tensors)
        size += (path.parent / data_name).stat().st_size
    return size


def _write_external(handle: BinaryIO, tensors: list[tuple[str, list[int]]]) -> None:
    offset = 0
    for _, dims in tensors:
        aligned = -(-offset // EXTERNAL_ALIGN) * EXTERNAL_ALIGN
        write_zeros(handle, aligned - offset)
        nbytes = _numel(dims) * 4
        write_zeros(handle, nbytes)
        offset = aligned + nbytes


def main(argv: list[str] | None = None) -> int:
    """Generate the two files, run the alternating rounds, print figures and PASS/FAIL; 1 on any FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per command first (default 1)")
    parser.add_argument("--workdir", type=Path, help="where to write the models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--check", action="store_true", help="run onnx.checker on the generated models first")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-onnx-", dir=args.workdir))
    py = sys.executable
    try:
        files = {"inline": workdir / "vgg19.onnx", "external": workdir / "vgg19_ext.onnx"}
        for kind, path in files.items():
            start = time.perf_counter()
            size = write_vgg19(path, external=kind == "external")
            print(f"wrote {path} ({size / MIB:,.1f} MiB incl. data) in {time.perf_counter() - start:.1f} s")
        if args.check:
            import onnx.checker

            for path in files.values():
                onnx.checker.check_model(str(path), full_check=True)
            print("onnx.checker: both models valid")

        context = [
            Series("python -c pass", [py, "-c", "pass"]),
            Series("import onnx", [py, "-c", "import onnx"]),
            Series("import biasinspect.cli", [py, "-c", "import biasinspect.cli"]),
        ]
        load = "import sys, onnx; onnx.load(sys.argv[1])"
        load_no_ext = "import sys, onnx; onnx.load(sys.argv[1], load_external_data=False)"
        ours = {k: Series(f"biasinspect {p.name}", [py, "-m", "biasinspect", str(p), "--format", "json"])
                for k, p in files.items()}  # fmt: skip
        base = {k: Series(f"onnx.load {p.name}", [py, "-c", load, str(p)]) for k, p in files.items()}
        no_ext = Series(f"onnx.load {files['external'].name} (no ext data)", [py, "-c", load_no_ext,
                        str(files["external"])])  # fmt: skip
        order = [ours["inline"], base["inline"], ours["external"], base["external"], no_ext, *context]
        alternate(order, rounds=args.rounds, warmup=args.warmup)
        for series in ours.values():
            for run in series.runs:
                check_vgg19_report(run.stdout)

        print()
        print_table(order)
        print()
        failed = False
        for kind in files:
            ratio = base[kind].median_wall / ours[kind].median_wall
            lines = [
                (ratio >= WALL_RATIO_GOAL,
                 f"{kind}: biasinspect {ours[kind].median_wall:.3f} s vs onnx.load {base[kind].median_wall:.3f} s "
                 f"= {ratio:.1f}x faster (goal >= {WALL_RATIO_GOAL:.0f}x)"),
                (ours[kind].max_rss <= RSS_GOAL_BYTES,
                 f"{kind}: biasinspect peak RSS {ours[kind].max_rss / MIB:.1f} MiB "
                 f"(goal <= {RSS_GOAL_BYTES / MIB:.0f} MiB; onnx.load {base[kind].max_rss / MIB:.1f} MiB)"),
            ]  # fmt: skip
            for ok, text in lines:
                failed |= not ok
                print(verdict(ok, text))
        print(
            f"note: onnx.load without external data: {no_ext.median_wall:.3f} s, {no_ext.max_rss / MIB:.1f} MiB"
        )
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
