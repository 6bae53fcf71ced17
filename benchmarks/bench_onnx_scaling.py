"""Does reading an ONNX graph cost the same per node at 1k nodes as at 200k?  (It must: a walk
that is quadratic somewhere turns a 1 MB file into minutes.)

Three graph shapes, each built in code at several sizes:

* ``fan-in``: N convs of one input whose outputs all feed one ``Sum`` (one node with N inputs);
* ``chain``: N convs in a row, each feeding the next;
* ``biased``: N independent convs, each followed by an ``Add`` of its own bias (the bias tracing
  path) and its own graph output.

Each file is read once in this process (after a warm-up read of a small file) and the table
shows the wall time and the time per node.  Usage::

    python benchmarks/bench_onnx_scaling.py [--sizes 1000 10000 100000 200000] [--shapes fan-in chain biased]

With ``--check`` it exits 1 when the time per node at the largest size exceeds 3x that at the
smallest (the flat-cost goal, with room for noise on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _measure import REPO_ROOT
from onnx import ModelProto, TensorProto, helper

sys.path.insert(0, str(REPO_ROOT))

from biasinspect.readers.onnx_reader import read_onnx


def _weight(name: str) -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [1, 1, 1, 1], [1.0])


def _model(nodes: list, inits: list, outputs: list[str]) -> ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def fan_in(count: int) -> ModelProto:
    """``count`` convs of ``x`` whose outputs feed one Sum."""
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], name=f"conv{i}") for i in range(count)]
    nodes.append(helper.make_node("Sum", [f"c{i}" for i in range(count)], ["y"], name="sum"))
    return _model(nodes, [_weight(f"w{i}") for i in range(count)], ["y"])


def chain(count: int) -> ModelProto:
    """``count`` convs in a row."""
    nodes = [
        helper.make_node("Conv", ["x" if i == 0 else f"c{i - 1}", f"w{i}"], [f"c{i}"], name=f"conv{i}")
        for i in range(count)
    ]
    return _model(nodes, [_weight(f"w{i}") for i in range(count)], [f"c{count - 1}"])


def biased(count: int) -> ModelProto:
    """``count // 2`` independent convs (two nodes each: the conv and its bias Add)."""
    pairs = count // 2
    nodes = []
    inits = []
    for i in range(pairs):
        nodes.append(helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("Add", [f"c{i}", f"b{i}"], [f"y{i}"]))
        inits += [_weight(f"w{i}"), helper.make_tensor(f"b{i}", TensorProto.FLOAT, [1, 1, 1, 1], [0.0])]
    return _model(nodes, inits, [f"y{i}" for i in range(pairs)])


SHAPES: dict[str, Callable[[int], ModelProto]] = {"fan-in": fan_in, "chain": chain, "biased": biased}


def measure(build: Callable[[int], ModelProto], size: int, folder: Path) -> tuple[int, float]:
    """(nodes, seconds) of one read of a ``size``-node file of one shape."""
    model = build(size)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    nodes = len(model.graph.node)
    del model
    start = time.perf_counter()
    (description,) = read_onnx(path)
    elapsed = time.perf_counter() - start
    assert len(description.convs) in (size, size // 2), len(description.convs)
    return nodes, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 200_000])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--check", action="store_true", help="exit 1 if the cost per node is not flat")
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        measure(chain, 100, folder)  # warm-up: imports, onnx's first inference
        print(f"{'shape':<8} {'nodes':>9} {'seconds':>9} {'us/node':>9}")
        for shape in args.shapes:
            per_node: list[float] = []
            for size in args.sizes:
                nodes, seconds = measure(SHAPES[shape], size, folder)
                per_node.append(seconds / nodes * 1e6)
                print(f"{shape:<8} {nodes:>9,} {seconds:>9.3f} {per_node[-1]:>9.1f}", flush=True)
            ratio = per_node[-1] / per_node[0]
            print(f"{shape:<8} cost per node, largest / smallest size: {ratio:.2f}x")
            failed |= ratio > 3
    if args.check and failed:
        print("FAIL: the cost per node grows with the graph", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
