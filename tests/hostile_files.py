"""Generators of hostile and broken model files, for tests/test_hostile.py and the fuzzers.

Nothing here is committed malware: every file is built in memory by the test that needs it.  The
"payloads" would only create a marker file if something executed them -- the tests assert that
the marker never appears.

Three families of helpers:

* a tiny protobuf encoder (``pb_*``) to write ONNX bytes by hand where protobuf's own serializer
  would refuse (nesting past its depth limit, length prefixes claiming gigabytes);
* a pickle assembler (:class:`PickleAsm`) that writes opcodes directly, so a test can reference
  any global -- ``os.system``, ``evilmod.boom`` -- without importing it, in any protocol from 0
  to 5, with GLOBAL or STACK_GLOBAL, INST/OBJ/NEWOBJ and memo tricks;
* zip and safetensors writers that put exactly the requested bytes into headers (sizes, names,
  offsets), including lies.

Seed files made with torch (a real ``torch.save`` zip, a legacy file, a TorchScript archive, a
plain pickle) are built by the ``seed_*`` functions; torch is imported only inside them.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import pickletools
import random
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Protobuf, by hand
# ---------------------------------------------------------------------------------------------


def pb_varint(value: int) -> bytes:
    """Encode a non-negative or negative (two's complement, 10 bytes) varint."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def pb_int(field: int, value: int) -> bytes:
    """A varint field."""
    return pb_varint(field << 3) + pb_varint(value)


def pb_bytes(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field (bytes, string or embedded message)."""
    data = payload.encode() if isinstance(payload, str) else payload
    return pb_varint((field << 3) | 2) + pb_varint(len(data)) + data


# onnx.proto field numbers used below.
_MODEL_IR_VERSION, _MODEL_GRAPH, _MODEL_OPSET = 1, 7, 8
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 2, 5, 11, 12
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP, _NODE_ATTR = 1, 2, 3, 4, 5
_ATTR_NAME, _ATTR_G, _ATTR_TYPE, _ATTR_GRAPH = 1, 6, 20, 5
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 8, 9
_FLOAT = 1


def pb_node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, attrs: bytes = b"") -> bytes:
    """A serialized NodeProto."""
    body = b"".join(pb_bytes(_NODE_INPUT, item) for item in inputs)
    body += b"".join(pb_bytes(_NODE_OUTPUT, item) for item in outputs)
    return body + pb_bytes(_NODE_NAME, name) + pb_bytes(_NODE_OP, op) + attrs


def pb_graph_attr(name: str, graph: bytes) -> bytes:
    """A serialized AttributeProto of type GRAPH (as a NodeProto.attribute field)."""
    attr = pb_bytes(_ATTR_NAME, name) + pb_bytes(_ATTR_G, graph) + pb_int(_ATTR_TYPE, _ATTR_GRAPH)
    return pb_bytes(_NODE_ATTR, attr)


def pb_model(graph: bytes, opset: int = 17) -> bytes:
    """A serialized ModelProto around a serialized GraphProto."""
    opset_import = pb_bytes(1, "") + pb_int(2, opset)
    return pb_int(_MODEL_IR_VERSION, 8) + pb_bytes(_MODEL_OPSET, opset_import) + pb_bytes(_MODEL_GRAPH, graph)


def deeply_nested_if_onnx(levels: int) -> bytes:
    """An ONNX model whose If nodes nest ``levels`` deep (then_branch inside then_branch ...).

    Written by hand because protobuf's serializer and parser refuse messages nested past ~100
    levels; each If level adds three message levels (NodeProto, AttributeProto, GraphProto).
    The innermost graph holds one Conv.
    """
    graph = pb_node("Conv", ["X", "W"], ["Y"], "deep_conv")
    for level in range(levels):
        node = pb_node("If", ["cond"], [f"out{level}"], f"if{level}", pb_graph_attr("then_branch", graph))
        graph = pb_bytes(_GRAPH_NODE, node) + pb_bytes(_GRAPH_NAME, f"g{level}")
    return pb_model(graph)


def nested_if_onnx(levels: int) -> bytes:
    """A valid ONNX model with ``levels`` nested If nodes and one Conv (with bias) at every level.

    Each level's then_branch runs a Conv on the outer input X (weights are main-graph
    initializers, visible in every subgraph) and holds the next If; the else_branch is an
    Identity.  The main graph holds the outermost If only, so there are exactly ``levels`` convs.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_info = helper.make_tensor_value_info
    inner: onnx.GraphProto | None = None
    for level in reversed(range(levels)):
        nodes = [helper.make_node("Conv", ["X", "W", "B"], [f"y{level}"], name=f"conv{level}")]
        if inner is not None:
            else_graph = helper.make_graph(
                [helper.make_node("Identity", ["X"], [f"e{level + 1}"])],
                f"else{level + 1}",
                [],
                [out_info(f"e{level + 1}", TensorProto.FLOAT, None)],
            )
            nodes.append(
                helper.make_node(
                    "If",
                    ["cond"],
                    [f"r{level + 1}"],
                    name=f"if{level + 1}",
                    then_branch=inner,
                    else_branch=else_graph,
                )
            )
        inner = helper.make_graph(nodes, f"then{level}", [], [out_info(f"y{level}", TensorProto.FLOAT, None)])
    assert inner is not None
    else0 = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["e0"])], "else0", [], [out_info("e0", TensorProto.FLOAT, None)]
    )
    top = helper.make_node("If", ["cond"], ["Y"], name="if0", then_branch=inner, else_branch=else0)
    graph = helper.make_graph(
        [top],
        "nested",
        [out_info("X", TensorProto.FLOAT, [1, 3, 8, 8]), out_info("cond", TensorProto.BOOL, [])],
        [out_info("Y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "W"),
            numpy_helper.from_array(np.zeros((4,), np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def huge_initializer_onnx(path: Path, weight_dims: Sequence[int]) -> int:
    """Write a sparse ONNX file > 2 GiB: one Conv whose weight initializer's raw_data is huge.

    The file is a valid ModelProto whose last field is the graph, whose last field is the
    initializer, whose last field is raw_data with a length prefix of numel x 4 bytes; the
    payload itself is a hole made with ``truncate`` (no disk blocks).  Returns the file size.
    """
    numel = 1
    for dim in weight_dims:
        numel *= dim
    raw_len = numel * 4
    x_dims = [1, weight_dims[1], weight_dims[2] + 8, weight_dims[3] + 8]
    tensor_head = b"".join(pb_int(_TENSOR_DIMS, dim) for dim in weight_dims)
    tensor_head += pb_int(_TENSOR_TYPE, _FLOAT) + pb_bytes(_TENSOR_NAME, "W")
    tensor_head += pb_varint((_TENSOR_RAW << 3) | 2) + pb_varint(raw_len)
    tensor_len = len(tensor_head) + raw_len
    graph_head = pb_bytes(_GRAPH_NODE, pb_node("Conv", ["X", "W"], ["Y"], "huge_conv"))
    graph_head += pb_bytes(_GRAPH_NAME, "huge")
    graph_head += pb_bytes(_GRAPH_INPUT, _value_info("X", x_dims))
    graph_head += pb_bytes(_GRAPH_OUTPUT, _value_info("Y", None))
    graph_head += pb_varint((_GRAPH_INIT << 3) | 2) + pb_varint(tensor_len) + tensor_head
    graph_len = len(graph_head) + raw_len
    opset_import = pb_bytes(1, "") + pb_int(2, 17)
    head = pb_int(_MODEL_IR_VERSION, 8) + pb_bytes(_MODEL_OPSET, opset_import)
    head += pb_varint((_MODEL_GRAPH << 3) | 2) + pb_varint(graph_len) + graph_head
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(len(head) + raw_len)
    return len(head) + raw_len


def _value_info(name: str, dims: Sequence[int] | None) -> bytes:
    # ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: {elem_type=1, shape=2: {dim=1: {dim_value=1}}}}}
    tensor_type = pb_int(1, _FLOAT)
    if dims is not None:
        shape = b"".join(pb_bytes(1, pb_int(1, dim)) for dim in dims)
        tensor_type += pb_bytes(2, shape)
    return pb_bytes(1, name) + pb_bytes(2, pb_bytes(1, tensor_type))


def onnx_conv_model(
    weight: object = None,
    *,
    extra_nodes: Sequence[object] = (),
    conv_inputs: Sequence[str] = ("X", "W", "B"),
    conv_output: str = "Y",
    initializers: Sequence[object] | None = None,
    check: bool = False,
) -> bytes:
    """A one-Conv ONNX model (X [1,3,8,8], W [4,3,3,3], B [4]) with optional replacements.

    ``weight`` replaces the W initializer (e.g. a TensorProto with hostile dims); ``initializers``
    replaces the whole list; ``extra_nodes`` are appended to the graph.
    """
    import numpy as np
    from onnx import TensorProto, checker, helper, numpy_helper

    if initializers is None:
        inits = [
            weight if weight is not None else numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W"),
            numpy_helper.from_array(np.ones((4,), np.float32), "B"),
        ]
    else:
        inits = list(initializers)
    conv = helper.make_node("Conv", list(conv_inputs), [conv_output], name="conv")
    graph = helper.make_graph(
        [conv, *extra_nodes],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 6, 6])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if check:
        checker.check_model(model)
    return bytes(model.SerializeToString())


def onnx_tensor(name: str, dims: Sequence[int]) -> object:
    """A FLOAT TensorProto with the given dims and no data (dims may be hostile)."""
    from onnx import TensorProto

    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend(dims)
    return tensor


def onnx_external_tensor(name: str, dims: Sequence[int], location: str) -> object:
    """A FLOAT TensorProto whose data lives in an external file at ``location``."""
    from onnx import TensorProto

    tensor = onnx_tensor(name, dims)
    assert isinstance(tensor, TensorProto)
    tensor.data_location = TensorProto.EXTERNAL
    numel = 1
    for dim in dims:
        numel *= dim
    for key, value in (("location", location), ("offset", "0"), ("length", str(numel * 4))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value
    return tensor


def onnx_cyclic() -> bytes:
    """A graph whose Conv input comes from an Add that consumes the Conv's own output (a cycle)."""
    from onnx import helper

    add = helper.make_node("Add", ["Y", "X"], ["Z"], name="add")
    return onnx_conv_model(conv_inputs=("Z", "W", "B"), extra_nodes=[add])


# ---------------------------------------------------------------------------------------------
# Pickles, by hand
# ---------------------------------------------------------------------------------------------


class PickleAsm:
    """Write pickle opcodes directly.  Protocol 0/1 use text opcodes and GLOBAL; 2/3 binary
    opcodes and GLOBAL; 4/5 STACK_GLOBAL (+ MEMOIZE, as CPython's pickler writes it).

    Memo slots used by the helpers start at ``memo_base`` so that assembled fragments can be
    spliced into real pickles (whose memo counts from 0) without clashing.
    """

    def __init__(self, protocol: int, memo_base: int = 1_000_000) -> None:
        self.protocol = protocol
        self.out = bytearray()
        self.next_memo = memo_base

    def raw(self, data: bytes) -> PickleAsm:
        """Append raw opcode bytes."""
        self.out += data
        return self

    def header(self) -> PickleAsm:
        """PROTO (protocol >= 2 only, as real pickles do)."""
        if self.protocol >= 2:
            self.out += b"\x80" + bytes([self.protocol])
        return self

    def stop(self) -> bytes:
        """STOP, and the finished bytes."""
        self.out += b"."
        return bytes(self.out)

    def glob(self, module: str, name: str) -> PickleAsm:
        """Push a global: GLOBAL for protocols < 4, STACK_GLOBAL otherwise."""
        if self.protocol < 4:
            self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        else:
            self.string(module).string(name)
            # STACK_GLOBAL, then MEMOIZE (slot len(memo): far below the explicit slots used here).
            self.out += b"\x93\x94"
        return self

    def string(self, text: str) -> PickleAsm:
        """Push a str: UNICODE in protocol 0, BINUNICODE / SHORT_BINUNICODE otherwise."""
        if self.protocol == 0:
            escaped = text.replace("\\", "\\u005c").replace("\n", "\\u000a")
            self.out += b"V" + escaped.encode("raw_unicode_escape") + b"\n"
        else:
            data = text.encode()
            if self.protocol >= 4 and len(data) < 256:
                self.out += b"\x8c" + bytes([len(data)]) + data
            else:
                self.out += b"X" + struct.pack("<I", len(data)) + data
        return self

    def integer(self, value: int) -> PickleAsm:
        """Push an int."""
        if self.protocol == 0:
            self.out += b"I" + str(value).encode() + b"\n"
        else:
            self.out += b"J" + struct.pack("<i", value)
        return self

    def mark(self) -> PickleAsm:
        """MARK."""
        self.out += b"("
        return self

    def tuple_from_mark(self) -> PickleAsm:
        """TUPLE (everything since MARK)."""
        self.out += b"t"
        return self

    def list_from_mark(self) -> PickleAsm:
        """LIST (everything since MARK)."""
        self.out += b"l"
        return self

    def empty_dict(self) -> PickleAsm:
        """An empty dict (EMPTY_DICT, or DICT of nothing in protocol 0)."""
        self.out += b"(d" if self.protocol == 0 else b"}"
        return self

    def reduce(self) -> PickleAsm:
        """REDUCE: call the callable under the argument tuple on the stack."""
        self.out += b"R"
        return self

    def put(self) -> int:
        """Store the top of stack in the next memo slot; return the slot."""
        slot = self.next_memo
        self.next_memo += 1
        if self.protocol == 0:
            self.out += b"p" + str(slot).encode() + b"\n"
        else:
            self.out += b"r" + struct.pack("<I", slot)
        return slot

    def get(self, slot: int) -> PickleAsm:
        """Push a memo slot's object."""
        if self.protocol == 0:
            self.out += b"g" + str(slot).encode() + b"\n"
        else:
            self.out += b"j" + struct.pack("<I", slot)
        return self

    def pop(self) -> PickleAsm:
        """POP."""
        self.out += b"0"
        return self

    def setitem(self) -> PickleAsm:
        """SETITEM."""
        self.out += b"s"
        return self

    def call(self, module: str, name: str, *args: str | int | list[str] | dict[str, str]) -> PickleAsm:
        """Push ``module.name(*args)`` via GLOBAL/STACK_GLOBAL + REDUCE."""
        self.glob(module, name)
        self.args(*args)
        return self.reduce()

    def args(self, *args: str | int | list[str] | dict[str, str]) -> PickleAsm:
        """Push a tuple of simple arguments (str, int, list of str, empty dict)."""
        self.mark()
        for arg in args:
            if isinstance(arg, str):
                self.string(arg)
            elif isinstance(arg, int):
                self.integer(arg)
            elif isinstance(arg, dict):
                self.empty_dict()
            else:
                self.mark()
                for item in arg:
                    self.string(item)
                self.list_from_mark()
        return self.tuple_from_mark()


@dataclass(frozen=True)
class Payload:
    """One way for a pickle to run code: ``emit`` pushes one object whose construction would run
    the code; ``callables`` are the dotted names biasinspect must report."""

    name: str
    callables: tuple[str, ...]
    emit: Callable[[PickleAsm, str, str], None]
    """(assembler, marker path, folder holding evilmod.py) -> pushes one object."""
    min_protocol: int = 0
    max_protocol: int = 5
    dangerous_family: bool = True
    """False for a global of an arbitrary unknown module: biasinspect names it in a warning as a
    global outside the known-safe set, but only the dangerous families count as unsafe_callables."""


def _touch_code(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


def _emit_memo_trick(asm: PickleAsm, marker: str, _folder: str) -> None:
    # The callable is memoised, popped, buried under harmless objects, then fetched back by slot.
    asm.glob("os", "system")
    slot = asm.put()
    asm.pop()
    asm.string("decoy")
    asm.pop()
    asm.get(slot)
    asm.args(f"touch {marker}")
    asm.reduce()


def _emit_getattr_chain(asm: PickleAsm, marker: str, _folder: str) -> None:
    # getattr(__import__('os'), 'system')('touch marker'): no dangerous name appears as a GLOBAL
    # except the builtins themselves.
    asm.glob("builtins", "getattr")
    asm.mark()
    asm.call("builtins", "__import__", "os")
    asm.string("system")
    asm.tuple_from_mark()
    asm.reduce()
    asm.args(f"touch {marker}")
    asm.reduce()


def _emit_inst(asm: PickleAsm, marker: str, _folder: str) -> None:
    # INST: MARK args INST 'module\nname\n' -- protocol 0's way to build (= call) a class.
    asm.mark()
    asm.string(f"touch {marker}")
    asm.raw(b"ios\nsystem\n")


def _emit_obj(asm: PickleAsm, marker: str, _folder: str) -> None:
    # OBJ: MARK callable args OBJ -- protocol 1.
    asm.mark()
    asm.glob("subprocess", "check_call")
    asm.mark().string("touch").string(marker).list_from_mark()
    asm.raw(b"o")


def _emit_newobj(asm: PickleAsm, marker: str, _folder: str) -> None:
    # NEWOBJ: cls.__new__(cls, *args) -- protocol 2.  Popen.__new__ itself runs nothing, but the
    # reference alone must be reported (the only payload here that would not leave the marker).
    asm.glob("subprocess", "Popen")
    asm.mark()
    asm.mark().string("touch").string(marker).list_from_mark()
    asm.tuple_from_mark()
    asm.raw(b"\x81")


def _simple(
    module: str, name: str, make_args: Callable[[str, str], tuple[str | int | list[str], ...]]
) -> Callable[[PickleAsm, str, str], None]:
    def emit(asm: PickleAsm, marker: str, folder: str) -> None:
        asm.call(module, name, *make_args(marker, folder))

    return emit


PAYLOADS: tuple[Payload, ...] = (
    Payload("os.system", ("os.system",), _simple("os", "system", lambda m, _f: (f"touch {m}",))),
    Payload("posix.system", ("posix.system",), _simple("posix", "system", lambda m, _f: (f"touch {m}",))),
    Payload(
        "builtins.exec", ("builtins.exec",), _simple("builtins", "exec", lambda m, _f: (_touch_code(m),))
    ),
    Payload(
        "builtins.eval", ("builtins.eval",), _simple("builtins", "eval", lambda m, _f: (_touch_code(m),))
    ),
    Payload(
        "subprocess.Popen",
        ("subprocess.Popen",),
        _simple("subprocess", "Popen", lambda m, _f: (["touch", m],)),
    ),
    Payload(
        "subprocess.check_output",
        ("subprocess.check_output",),
        _simple("subprocess", "check_output", lambda m, _f: (["touch", m],)),
    ),
    Payload(
        "subprocess.getoutput",
        ("subprocess.getoutput",),
        _simple("subprocess", "getoutput", lambda m, _f: (f"touch {m}",)),
    ),
    Payload(
        "runpy._run_code",
        ("runpy._run_code",),
        _simple("runpy", "_run_code", lambda m, _f: (_touch_code(m), {})),
    ),
    Payload(
        "runpy.run_path",
        ("runpy.run_path",),
        _simple("runpy", "run_path", lambda _m, f: (str(Path(f) / "evilmod.py"),)),
    ),
    Payload(
        "importlib.import_module",
        ("importlib.import_module",),
        _simple("importlib", "import_module", lambda _m, _f: ("evilmod",)),
    ),
    Payload(
        "evilmod.boom",
        ("evilmod.boom",),
        _simple("evilmod", "boom", lambda _m, _f: ()),
    ),
    Payload("memo-trick", ("os.system",), _emit_memo_trick),
    Payload("getattr-chain", ("builtins.getattr", "builtins.__import__"), _emit_getattr_chain),
    Payload("INST", ("os.system",), _emit_inst),
    Payload("OBJ", ("subprocess.check_call",), _emit_obj, min_protocol=1),
    Payload("NEWOBJ", ("subprocess.Popen",), _emit_newobj, min_protocol=2),
)
"""Every payload kind; each creates ``marker`` (or imports evilmod, which creates its own marker)."""

EVILMOD_SOURCE = """\
# Written by biasinspect's hostile tests: importing this module, or calling boom(), leaves a mark.
import pathlib
pathlib.Path(__file__).with_name("IMPORTED_MARKER").write_text("imported")


def boom(*args):
    pathlib.Path(__file__).with_name("BOOM_MARKER").write_text("boom")
"""
"""A module that, if a reader imported it, would leave IMPORTED_MARKER next to itself."""


def payload_pickle(payload: Payload, protocol: int, marker: str, folder: str) -> bytes:
    """A whole pickle whose only object is the payload."""
    asm = PickleAsm(protocol).header()
    payload.emit(asm, marker, folder)
    return asm.stop()


def payload_fragment(
    payload: Payload, protocol: int, marker: str, folder: str, key: str = "payload"
) -> bytes:
    """Opcodes pushing ``key`` then the payload object (to be followed by SETITEM)."""
    asm = PickleAsm(protocol)
    asm.string(key)
    payload.emit(asm, marker, folder)
    return bytes(asm.out)


def _ops(data: bytes) -> list[tuple[str, int]]:
    """(opcode name, position) of one pickle, up to and including STOP."""
    return [(op.name, pos) for op, _arg, pos in pickletools.genops(io.BytesIO(data))]


def splice_into_dict_pickle(original: bytes, fragment: bytes) -> bytes:
    """Add one key to a pickle whose top-level object is a dict: insert ``fragment`` + SETITEM
    right before STOP.  ``fragment`` must push a key and a value."""
    ops = _ops(original)
    assert ops[-1][0] == "STOP"
    stop = ops[-1][1]
    return original[:stop] + fragment + b"s" + original[stop:]


def splice_before_last_build(original: bytes, fragment: bytes) -> bytes:
    """Add one attribute to the top-level object of a TorchScript data.pkl: its final BUILD takes
    a state dict from the stack; insert ``fragment`` + SETITEM just before that BUILD."""
    ops = _ops(original)
    builds = [pos for name, pos in ops if name == "BUILD"]
    assert builds, "no BUILD opcode"
    at = builds[-1]
    return original[:at] + fragment + b"s" + original[at:]


# ---------------------------------------------------------------------------------------------
# Seeds made with torch (imported lazily)
# ---------------------------------------------------------------------------------------------

SEED_CONV_SHAPE = (8, 3, 3, 3)
"""The seed models' single conv: Conv2d(3, 8, 3) with a bias -> tied, 8 x 27 + 8 = 224 params."""


def _seed_module() -> object:
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Seed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    return Seed()


def _state_dict() -> collections.OrderedDict[str, object]:
    module = _seed_module()
    return module.state_dict()


@functools.cache
def seed_torch_zip() -> bytes:
    """``torch.save(state_dict)`` of the seed conv (zip format)."""
    import torch

    buffer = io.BytesIO()
    torch.save(_state_dict(), buffer)
    return buffer.getvalue()


@functools.cache
def seed_torch_legacy() -> bytes:
    """``torch.save(state_dict, _use_new_zipfile_serialization=False)``: legacy (non-zip) format."""
    import torch

    buffer = io.BytesIO()
    torch.save(_state_dict(), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@functools.cache
def seed_plain_pickle(protocol: int) -> bytes:
    """``pickle.dumps(state_dict, protocol)`` of the seed conv's CPU tensors."""
    import pickle

    return pickle.dumps(_state_dict(), protocol=protocol)


@functools.cache
def seed_torchscript() -> bytes:
    """``torch.jit.save(torch.jit.script(model))`` of the seed model."""
    import torch

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_seed_module()), buffer)
    return buffer.getvalue()


@functools.cache
def seed_onnx() -> bytes:
    """A small valid ONNX model (one Conv with bias)."""
    return onnx_conv_model(check=True)


@functools.cache
def seed_safetensors() -> bytes:
    """The seed state dict as safetensors, written with the safetensors library."""
    from safetensors.torch import save

    return bytes(save(dict(_state_dict())))


def legacy_pickle_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the pickles at the head of a legacy torch file: magic, protocol, sys_info,
    object, storage keys."""
    spans = []
    start = 0
    for _ in range(5):
        ops = list(pickletools.genops(io.BytesIO(data[start:])))
        end = start + ops[-1][2] + 1
        spans.append((start, end))
        start = end
    return spans


def replace_zip_member(archive: bytes, suffix: str, make: Callable[[bytes], bytes]) -> bytes:
    """Rewrite a zip, replacing the member whose name ends with ``suffix`` by ``make(old)``.
    Members are stored uncompressed, as torch writes them."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        found = False
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith(suffix) and not found:
                data = make(data)
                found = True
            target.writestr(info.filename, data)
    assert found, suffix
    return out.getvalue()


def member_name(archive: bytes, suffix: str) -> str:
    """The first member name ending with ``suffix``."""
    return next(name for name in zipfile.ZipFile(io.BytesIO(archive)).namelist() if name.endswith(suffix))


# ---------------------------------------------------------------------------------------------
# Zips, by hand
# ---------------------------------------------------------------------------------------------


@dataclass
class ZipEntry:
    """One member as written: the central-directory fields, and optional local-header lies."""

    name: str
    data: bytes
    """The stored (possibly compressed) bytes."""
    method: int = 0
    crc: int = 0
    compressed_size: int | None = None
    uncompressed_size: int | None = None
    local_name: str | None = None
    local_method: int | None = None
    local_uncompressed_size: int | None = None
    local_compressed_size: int | None = None


def stored_entry(name: str, data: bytes) -> ZipEntry:
    """An honest uncompressed member."""
    return ZipEntry(name, data, 0, zlib.crc32(data), len(data), len(data))


def deflated_entry(name: str, data: bytes) -> ZipEntry:
    """An honest deflated member."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = compressor.compress(data) + compressor.flush()
    return ZipEntry(name, packed, 8, zlib.crc32(data), len(packed), len(data))


def build_zip(entries: Sequence[ZipEntry], central_offset_delta: int = 0) -> bytes:
    """Write local headers, data, central directory and end record exactly as told (no zip64)."""
    out = bytearray()
    central = bytearray()
    for entry in entries:
        offset = len(out)
        comp = len(entry.data) if entry.compressed_size is None else entry.compressed_size
        uncomp = len(entry.data) if entry.uncompressed_size is None else entry.uncompressed_size
        local_name = (entry.local_name if entry.local_name is not None else entry.name).encode()
        name = entry.name.encode()
        out += struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            20,
            0,
            entry.method if entry.local_method is None else entry.local_method,
            0,
            0x21,
            entry.crc,
            comp if entry.local_compressed_size is None else entry.local_compressed_size,
            uncomp if entry.local_uncompressed_size is None else entry.local_uncompressed_size,
            len(local_name),
            0,
        )
        out += local_name + entry.data
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            entry.method,
            0,
            0x21,
            entry.crc,
            comp,
            uncomp,
            len(name),
            0,
            0,
            0,
            0,
            0,
            offset + central_offset_delta,
        )
        central += name
    start = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), start, 0)
    return bytes(out)


_MIB = 1 << 20


@functools.cache
def _zero_block() -> bytes:
    # One MiB of zeros, deflated and ended with a full flush: the flush resets the compressor, so
    # the same bytes deflate identically every time and a stream can be made by repetition
    # (incrementally, without ever holding or compressing the inflated data).
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(bytes(_MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)


@functools.cache
def _zeros_crc(mebibytes: int) -> int:
    crc = 0
    block = bytes(_MIB)
    for _ in range(mebibytes):
        crc = zlib.crc32(block, crc)
    return crc


def zero_bomb_stream(mebibytes: int) -> bytes:
    """A raw deflate stream that inflates to ``mebibytes`` MiB of zeros (~1 KiB per MiB)."""
    return _zero_block() * mebibytes + b"\x03\x00"  # final empty fixed-Huffman block


def zip_bomb(
    mebibytes: int = 3 * 1024, *, honest_size: bool = True, member: str = "archive/data.pkl"
) -> bytes:
    """A torch-like zip whose ``member`` inflates to ``mebibytes`` MiB (default 3 GiB).

    With ``honest_size`` the headers declare the real inflated size (caught by size/ratio caps);
    otherwise they claim 100 bytes, so only a reader that bounds its inflation by what it
    expects stays safe.
    """
    stream = zero_bomb_stream(mebibytes)
    size = mebibytes * _MIB if honest_size else 100
    crc = _zeros_crc(mebibytes) if honest_size else 0
    bomb = ZipEntry(member, stream, 8, crc, len(stream), size)
    return build_zip(
        [stored_entry("archive/version", b"3\n"), bomb, stored_entry("archive/byteorder", b"little")]
    )


# ---------------------------------------------------------------------------------------------
# safetensors, by hand
# ---------------------------------------------------------------------------------------------


def safetensors_raw(header: bytes, data_len: int = 0, declared_len: int | None = None) -> bytes:
    """8-byte little-endian header length (``declared_len`` or the real one), header, zeros."""
    length = len(header) if declared_len is None else declared_len
    return struct.pack("<Q", length) + header + bytes(data_len)


def safetensors_json(tensors: dict[str, object], data_len: int | None = None) -> bytes:
    """A safetensors file from a header dict (values written as given, lies included)."""
    header = json.dumps(tensors).encode()
    if data_len is None:
        ends = [
            value["data_offsets"][1]
            for key, value in tensors.items()
            if key != "__metadata__" and isinstance(value, dict) and "data_offsets" in value
        ]
        data_len = max([0, *[end for end in ends if isinstance(end, int) and 0 <= end < 1 << 20]])
    return safetensors_raw(header, data_len)


# ---------------------------------------------------------------------------------------------
# Fuzzing: seeds per format and byte-level mutations (shared by tests/test_fuzz.py and
# benchmarks/fuzz_long.py)
# ---------------------------------------------------------------------------------------------

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"

Mutation = tuple[object, ...]
"""One mutation: ("flip", pos, bit) | ("truncate", pos) | ("insert", pos, bytes) |
("overwrite", pos, bytes) | ("delete", pos, count) | ("splice", pos, donor, start, count) |
("repeat", pos, count).  Positions are taken modulo the current length."""

INTERESTING_BYTES = (
    b"\xff",
    b"\x00",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x00\x00\x00\x80",
    b"\x7f\xff\xff\xff\xff\xff\xff\xff",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"{",
    b"}",
    b'"',
    b"-1",
    b"1e308",
    b"(",
    b".",
    b"PK\x03\x04",
    b"PK\x01\x02",
    b"PK\x05\x06",
)
"""Byte strings that tend to hit edge cases: varint/length extremes, JSON and pickle syntax, zip magics."""


FUZZ_FORMATS: dict[str, str] = {
    "onnx": ".onnx",
    "torch-zip": ".pt",
    "torch-zip-pickle": ".pt",
    "legacy-pickle": ".pt",
    "safetensors": ".safetensors",
    "numpy": ".npz",
    "npz-member": ".npz",
    "openvino": ".xml",
    "coreml": ".mlmodel",
    "module-tree": ".pkl",
    "archive-differential": ".pt",
    "tflite": ".tflite",
    "keras-h5": ".h5",
    "keras-zip-h5": ".keras",
}
"""Fuzzed formats and the file suffix their mutants get.  ``module-tree`` mutates pickles of deep
(nested convs) and wide module trees; ``archive-differential`` mutates the files torch.load reads
differently from a naive reader (two end records, zip storage blob, legacy tar, computed magic).  ``torch-zip-pickle`` mutates the
data.pkl member of a torch zip and re-zips it (valid zip, CRCs included), so mutations reach the
pickle reader instead of stopping at the zip layer; ``npz-member`` does the same with an .npy
member of a Lasagne-style .npz, and ``keras-zip-h5`` with the model.weights.h5 member of a
``.keras`` archive (the HDF5 parser runs in the isolated child)."""


def _numpy_params() -> list[object]:
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = [(4, 3, 3, 3), (4, 6, 6), (2, 4, 3, 3), (2,)]
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def _npz(arrays: Sequence[object], compression: int) -> bytes:
    """An .npz as np.savez / np.savez_compressed writes it, with a fixed timestamp."""
    import numpy as np

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for index, array in enumerate(arrays):
            info = zipfile.ZipInfo(f"arr_{index}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return out.getvalue()


@functools.cache
def seed_numpy_files() -> tuple[bytes, ...]:
    """A Lasagne-style .npz (stored and deflated), a lone .npy, and Theano-era pickles."""
    import pickle

    import numpy as np

    arrays = _numpy_params()
    npy = io.BytesIO()
    np.save(npy, arrays[0])
    return (
        _npz(arrays, zipfile.ZIP_STORED),
        _npz(arrays, zipfile.ZIP_DEFLATED),
        npy.getvalue(),
        pickle.dumps({"param_values": arrays}, protocol=2),
        pickle.dumps(arrays, protocol=5),
    )


@functools.cache
def fuzz_seeds(fmt: str) -> tuple[bytes, ...]:
    """Valid seed files of one fuzzed format (small models built in code, plus committed samples)."""
    if fmt == "onnx":
        samples = [SAMPLES_DIR / name for name in ("conv_bn.onnx", "depthwise.onnx", "quantized_conv.onnx")]
        return (seed_onnx(), nested_if_onnx(3), *[path.read_bytes() for path in samples if path.exists()])
    if fmt == "torch-zip":
        return (seed_torch_zip(), seed_torchscript())
    if fmt == "torch-zip-pickle":
        return (
            zipfile.ZipFile(io.BytesIO(seed_torch_zip())).read(member_name(seed_torch_zip(), "/data.pkl")),
        )
    if fmt == "legacy-pickle":
        return (seed_torch_legacy(), seed_plain_pickle(2), seed_plain_pickle(4))
    if fmt == "safetensors":
        return (seed_safetensors(),)
    if fmt == "numpy":
        return seed_numpy_files()
    if fmt == "npz-member":
        return tuple(zipfile.ZipFile(io.BytesIO(seed_numpy_files()[0])).read(f"arr_{i}.npy") for i in (0, 1))
    if fmt == "openvino":
        return tuple(path.read_bytes() for path in sorted((SAMPLES_DIR / "openvino").glob("*.xml")))
    if fmt == "coreml":
        coreml = SAMPLES_DIR / "coreml"
        program = coreml / "program.mlpackage" / "Data" / "com.apple.CoreML" / "model.mlmodel"
        return (*(path.read_bytes() for path in sorted(coreml.glob("*.mlmodel"))), program.read_bytes())
    if fmt == "module-tree":
        return (module_tree_pickle(depth=40, leaves=60), module_tree_pickle(depth=1, leaves=150))
    if fmt == "archive-differential":
        return differential_seeds()
    if fmt == "tflite":
        names = ("zoo_2d.tflite", "zoo_1d.tflite", "zoo_3d.tflite", "zoo_2d_int8.tflite")
        return (seed_tflite(), *[(SAMPLES_DIR / name).read_bytes() for name in names])
    if fmt == "keras-h5":
        return tuple(
            (SAMPLES_DIR / name).read_bytes() for name in ("nested_legacy.h5", "locally_connected.h5")
        )
    if fmt == "keras-zip-h5":
        archive = (SAMPLES_DIR / "seed_tied.keras").read_bytes()
        return (zipfile.ZipFile(io.BytesIO(archive)).read("model.weights.h5"),)
    raise ValueError(fmt)


FUZZ_MARKER = "/nonexistent-biasinspect-fuzz/PAYLOAD_RAN"
"""Where the differential seeds' payloads would write (a path that cannot be created)."""


@functools.cache
def differential_seeds() -> tuple[bytes, ...]:
    """The archive-differential files, each with a payload torch.load(weights_only=False) runs."""
    payload = mkdir_pickle(FUZZ_MARKER)
    evil_zip = torch_zip_with_data_pkl(payload)
    return (
        two_end_records(seed_torch_zip(), evil_zip),
        storage_blob_pickle(zip_blob_stopping_early(evil_zip)),
        legacy_tar(payload),
        computed_magic_legacy(payload),
    )


@functools.cache
def module_tree_pickle(depth: int, leaves: int) -> bytes:
    """A pickled module tree: ``depth`` bias-less Conv2d nested inside each other, the innermost
    holding ``leaves`` children alternating Conv2d and BatchNorm2d (module objects made without
    ``__init__``, two shared weights).  ``depth=1`` is a wide, flat tree."""
    import pickle
    import sys

    import torch
    from torch import nn

    weight = nn.Parameter(torch.zeros(4, 4, 1, 1), requires_grad=False)
    norm_weight = nn.Parameter(torch.zeros(4), requires_grad=False)

    def module(cls: type, children: dict[str, object], param: object, **attrs: object) -> object:
        obj = cls.__new__(cls)
        obj.__dict__.update({"_parameters": {"weight": param}, "_buffers": {}, "_modules": children, **attrs})
        return obj

    def conv(children: dict[str, object]) -> object:
        return module(nn.Conv2d, children, weight, kernel_size=(1, 1), stride=(1, 1), groups=1)

    children = {
        f"m{i}": conv({}) if i % 2 else module(nn.BatchNorm2d, {}, norm_weight, num_features=4)
        for i in range(leaves)
    }
    inner = conv(children)
    for _ in range(depth - 1):
        inner = conv({"inner": inner})
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 20 * depth + 1000))
    try:
        return pickle.dumps(inner, protocol=2)
    finally:
        sys.setrecursionlimit(old_limit)


def seed_tflite() -> bytes:
    """A TFLite flatbuffer built in code: a conv with its bias input, a conv with an ADDed
    constant behind DEQUANTIZE, a depthwise conv and a transposed conv."""
    import tflite_builders as tb
    from tflite_builders import Op, T

    tensors = [
        T("input", (1, 8, 8, 3)),
        T("w1", (4, 3, 3, 3), const=True),
        T("b1", (4,), const=True),
        T("c1", (1, 6, 6, 4)),
        T("w2", (4, 1, 1, 4), const=True),
        T("c2", (1, 6, 6, 4)),
        T("b2_16", (1, 6, 6, 4), tb.FLOAT16, const=True),
        T("b2", (1, 6, 6, 4)),
        T("a2", (1, 6, 6, 4)),
        T("dw", (1, 3, 3, 4), const=True),
        T("c3", (1, 4, 4, 4)),
        T("shape", (4,), tb.INT32, const=True),
        T("tw", (2, 3, 3, 4), const=True),
        T("c4", (1, 6, 6, 2)),
    ]
    ops = [
        Op(tb.CONV_2D, (0, 1, 2), (3,)),
        Op(tb.CONV_2D, (3, 4, -1), (5,)),
        Op(tb.DEQUANTIZE, (6,), (7,)),
        Op(tb.ADD, (5, 7), (8,)),
        Op(tb.DEPTHWISE_CONV_2D, (8, 9, -1), (10,), depth_multiplier=1),
        Op(tb.TRANSPOSE_CONV, (11, 12, 10, -1), (13,)),
    ]
    return tb.single(tensors, ops)


def finish_fuzz_case(fmt: str, mutated: bytes) -> bytes:
    """Turn mutated seed bytes into the file to inspect (re-zips a mutated data.pkl)."""
    if fmt == "torch-zip-pickle":
        return replace_zip_member(seed_torch_zip(), "/data.pkl", lambda _old: mutated)
    if fmt == "npz-member":
        return replace_zip_member(seed_numpy_files()[0], "arr_1.npy", lambda _old: mutated)
    if fmt == "keras-zip-h5":
        archive = (SAMPLES_DIR / "seed_tied.keras").read_bytes()
        return replace_zip_member(archive, "model.weights.h5", lambda _old: mutated)
    return mutated


def apply_mutations(data: bytes, mutations: Sequence[Mutation], donors: Sequence[bytes]) -> bytes:
    """Apply byte-level mutations in order; ``donors`` supply spliced chunks."""
    buf = bytearray(data)
    for mutation in mutations:
        kind = mutation[0]
        pos = int(mutation[1]) % (len(buf) + 1) if kind != "flip" else int(mutation[1])
        if kind == "flip":
            if buf:
                buf[pos % len(buf)] ^= 1 << (int(mutation[2]) % 8)
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = mutation[2]
        elif kind == "overwrite":
            chunk = mutation[2]
            assert isinstance(chunk, bytes)
            buf[pos : pos + len(chunk)] = chunk
        elif kind == "delete":
            del buf[pos : pos + int(mutation[2])]
        elif kind == "splice":
            donor = donors[int(mutation[2]) % len(donors)]
            start = int(mutation[3]) % (len(donor) + 1)
            buf[pos:pos] = donor[start : start + int(mutation[4])]
        elif kind == "repeat":
            chunk = bytes(buf[pos : pos + 16])
            buf[pos:pos] = chunk * int(mutation[2])
        else:
            raise ValueError(kind)
    return bytes(buf)


def random_mutations(rng: random.Random, max_count: int = 4) -> list[Mutation]:
    """A random list of 1..max_count mutations (the long fuzzer's counterpart of the
    hypothesis strategy in tests/test_fuzz.py)."""
    mutations: list[Mutation] = []
    for _ in range(rng.randint(1, max_count)):
        kind = rng.choice(
            ("flip", "flip", "flip", "truncate", "insert", "overwrite", "delete", "splice", "repeat")
        )
        pos = rng.randrange(1 << 32)
        if kind == "flip":
            mutations.append((kind, pos, rng.randrange(8)))
        elif kind == "truncate":
            mutations.append((kind, pos))
        elif kind in ("insert", "overwrite"):
            chunk = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 16))
            mutations.append((kind, pos, chunk))
        elif kind == "delete":
            mutations.append((kind, pos, rng.randint(1, 64)))
        elif kind == "splice":
            mutations.append((kind, pos, rng.randrange(64), rng.randrange(1 << 32), rng.randint(1, 256)))
        else:
            mutations.append((kind, pos, rng.randint(1, 64)))
    return mutations


def all_fuzz_donors() -> tuple[bytes, ...]:
    """Every seed of every format: splices may cross formats."""
    return tuple(seed for fmt in FUZZ_FORMATS for seed in fuzz_seeds(fmt))


# ---------------------------------------------------------------------------------------------
# Archive differentials: files torch.load reads differently from a naive inert reader
# ---------------------------------------------------------------------------------------------


def mkdir_pickle(target: str, protocol: int = 2) -> bytes:
    """A whole pickle whose loading runs ``os.mkdir(target)`` (text GLOBAL + REDUCE)."""
    raw = target.encode()
    call = b"cos\nmkdir\n(X" + len(raw).to_bytes(4, "little") + raw + b"tR"
    return bytes([0x80, protocol]) + call + b"."


def torch_zip_with_data_pkl(data_pkl: bytes) -> bytes:
    """The seed torch.save zip with its data.pkl replaced (stored members, as torch writes)."""
    return replace_zip_member(seed_torch_zip(), "/data.pkl", lambda _old: data_pkl)


def zip_blob_stopping_early(archive: bytes) -> bytes:
    """``archive`` with its first local header's modification time set to ``b"\\n."``: read as a
    pickle, ``PK`` is a PERSID whose line ends there and ``.`` a STOP -- a reader that treats any
    storage blob as a pickle stops after 12 harmless bytes.  Zip readers ignore the time field."""
    assert archive[:4] == b"PK\x03\x04"
    return archive[:10] + b"\n." + archive[12:]


def storage_blob_pickle(blob: bytes) -> bytes:
    """A plain pickle ``{"w": torch.storage._load_from_bytes(blob)}`` (protocol 3 BINBYTES)."""
    call = b"ctorch.storage\n_load_from_bytes\n(B" + len(blob).to_bytes(4, "little") + blob + b"tR"
    return b"\x80\x03}X\x01\x00\x00\x00w" + call + b"s."


def two_end_records(harmless: bytes, evil: bytes) -> bytes:
    """``harmless`` (a whole zip) followed by the members and directory of ``evil`` (another zip)
    and ``evil``'s end record, whose comment length (65,535) runs past the end of the file.

    torch's miniz and Python's zipfile take the last end record (``evil``); a reader that skips
    records whose comment does not fit falls back to ``harmless``'s."""
    source = zipfile.ZipFile(io.BytesIO(evil))
    entries = [stored_entry(info.filename, source.read(info)) for info in source.infolist()]
    tail = bytearray(build_zip(entries, central_offset_delta=len(harmless)))
    end = len(tail) - 22
    (cd_offset,) = struct.unpack_from("<I", tail, end + 16)
    struct.pack_into("<IH", tail, end + 16, cd_offset + len(harmless), 0xFFFF)
    return harmless + bytes(tail)


def legacy_tar(pickle_member: bytes, disguise: str = "}.") -> bytes:
    """A legacy tar-format torch checkpoint (torch < 0.1.10): members ``storages`` and
    ``tensors`` (empty) and ``pickle`` (``pickle_member``), preceded by a member named
    ``disguise``.  The default name ``}.`` makes the first header block read as a harmless
    pickle (EMPTY_DICT, STOP) to anything that does not check for tar first."""
    import pickle
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        members = [
            (disguise, b""),
            ("storages", pickle.dumps(0, 2) + pickle.dumps([], 2)),
            ("tensors", pickle.dumps(0, 2)),
            ("pickle", pickle_member),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def computed_magic_legacy(payload: bytes) -> bytes:
    """A legacy-format stream whose magic number is the global ``torch.serialization.MAGIC_NUMBER``
    (torch.load resolves it to the very number it compares with), then the protocol version,
    sys_info, ``payload`` as the object pickle, and the storage keys."""
    import pickle

    return (
        b"\x80\x02ctorch.serialization\nMAGIC_NUMBER\n."
        + pickle.dumps(1001, 2)
        + pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2)
        + payload
        + pickle.dumps([], 2)
    )
