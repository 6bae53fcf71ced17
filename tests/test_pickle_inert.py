"""The inert pickle interpreter: opcode coverage, stubs, global classification, caps, hostility."""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from torch_builders import deep_list_pickle, dup_bomb_pickle, p0_call, p4_call

from biasinspect import limits
from biasinspect.errors import BiasInspectError, MalformedModelError, ResourceLimitError
from biasinspect.readers import pickle_inert
from biasinspect.readers.pickle_inert import (
    Call,
    GlobalRef,
    PDict,
    StorageRef,
    TensorRef,
    classify_global,
    load_inert,
)


class _Point:
    """A plain class pickled by reference (NEWOBJ/REDUCE + BUILD)."""

    def __init__(self, x: int) -> None:
        self.x = x


def _plain_data() -> dict[str, object]:
    return {
        "ints": [0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**70, -(2**70)],
        "floats": [0.5, -1e300, float("inf")],
        "text": ["", "ascii", "ünïcödé", "x" * 300],
        "bytes": [b"", b"\x00\xff", b"y" * 300],
        "nested": {"t0": (), "t1": (1,), "t2": (1, 2), "t3": (1, 2, 3), "t4": (1, 2, 3, 4)},
        "flags": [None, True, False],
        "ba": bytearray(b"ab"),
    }


@pytest.mark.parametrize("protocol", range(6))
def test_plain_data_round_trips_in_every_protocol(protocol: int) -> None:
    data = _plain_data()
    result = load_inert(pickle.dumps(data, protocol=protocol))
    root = result.root
    assert isinstance(root, dict)
    assert root["ints"] == data["ints"]
    assert root["floats"] == data["floats"]
    assert root["text"] == data["text"]
    assert root["nested"] == data["nested"]
    assert root["flags"] == data["flags"]
    assert root["bytes"] == data["bytes"]
    if protocol < 3:  # protocols 0-2 pickle bytes as _codecs.encode(text, "latin1"), decoded inertly
        assert "_codecs.encode" in result.globals
        assert classify_global("_codecs.encode") == "safe"


@pytest.mark.parametrize("protocol", range(6))
def test_sets_memo_sharing_and_objects(protocol: int) -> None:
    shared = [1, 2]
    data = {"a": shared, "b": shared, "s": {3}, "fs": frozenset({4}), "obj": _Point(7)}
    root = load_inert(pickle.dumps(data, protocol=protocol)).root
    assert isinstance(root, dict)
    assert root["a"] is root["b"]  # memo references are shared, never copied
    obj = root["obj"]
    assert isinstance(obj, Call)
    assert obj.func_name in (f"{__name__}._Point", "copyreg._reconstructor")
    state = obj.state
    assert state == {"x": 7}
    if protocol >= 4:
        assert root["s"] == [3]  # EMPTY_SET + ADDITEMS: sets are kept as lists
        assert root["fs"] == (4,)
    else:
        assert isinstance(root["s"], Call) and root["s"].func_name == "builtins.set"
        assert root["s"].args == ([3],)


def test_ordered_dict_becomes_pdict_with_items_and_state() -> None:
    od = collections.OrderedDict([("k", 1), ("j", 2)])
    od.extra = "meta"  # type: ignore[attr-defined]
    root = load_inert(pickle.dumps(od, protocol=2)).root
    assert isinstance(root, PDict)
    assert list(root.items()) == [("k", 1), ("j", 2)]
    assert root.cls == "collections.OrderedDict"


def test_protocol0_text_opcodes() -> None:
    data = b"(dp0\nS'k'\np1\nI42\nsS'f'\nF1.5\nsVuni\nL12345678901234567890L\nsS'b'\nI01\ns."
    root = load_inert(data).root
    assert root == {"k": 42, "f": 1.5, "uni": 12345678901234567890, "b": True}


def test_inst_obj_newobj_ex_and_ext_are_stubs() -> None:
    inst = b"(S'a'\nimymod\nKlass\n."
    root = load_inert(inst).root
    assert isinstance(root, Call) and root.func_name == "mymod.Klass" and root.args == ("a",)
    obj = b"\x80\x02(cmymod\nKlass\nK\x01o."
    root = load_inert(obj).root
    assert isinstance(root, Call) and root.args == (1,)
    newobj_ex = b"\x80\x04cmymod\nKlass\n)}\x92."
    root = load_inert(newobj_ex).root
    assert isinstance(root, Call) and root.kwargs == {}
    ext = b"\x80\x02\x82\x05."
    result = load_inert(ext)
    assert isinstance(result.root, GlobalRef) and result.root.dotted == "copyreg.extension.5"
    assert result.unknown_globals() == ["copyreg.extension.5"]


def test_out_of_band_buffers_and_frames() -> None:
    data = pickle.dumps(pickle.PickleBuffer(b"abc"), protocol=5, buffer_callback=lambda b: False)
    root = load_inert(data).root
    assert isinstance(root, pickle_inert.OpaqueRef)
    framed = pickle.dumps(list(range(10000)), protocol=4)
    assert load_inert(framed).root == list(range(10000))


@pytest.mark.parametrize(
    ("dotted", "kind"),
    [
        ("os.system", "unsafe"),
        ("posix.system", "unsafe"),
        ("nt.system", "unsafe"),
        ("builtins.exec", "unsafe"),
        ("builtins.eval", "unsafe"),
        ("builtins.getattr", "unsafe"),
        ("__builtin__.eval", "unsafe"),
        ("subprocess.Popen", "unsafe"),
        ("runpy._run_code", "unsafe"),
        ("importlib.import_module", "unsafe"),
        ("types.CodeType", "unsafe"),
        ("operator.attrgetter", "unsafe"),
        ("torch.load", "unsafe"),
        ("torch.fx.graph_module.reduce_graph_module", "unsafe"),
        ("torch.nn.modules.conv.os.system", "unsafe"),
        ("somepkg.sub.system", "unsafe"),
        ("torch._utils._rebuild_tensor_v2", "safe"),
        ("torch.FloatStorage", "safe"),
        ("torch.float32", "safe"),
        ("collections.OrderedDict", "safe"),
        ("torch.nn.modules.conv.Conv2d", "safe"),
        ("torch.jit._pickle.build_intlist", "safe"),
        ("__main__.Net", "unknown"),
        ("torch.hub.load", "unsafe"),
        ("mymodule.MyConv", "unknown"),
    ],
)
def test_classify_global(dotted: str, kind: str) -> None:
    assert classify_global(dotted) == kind


@pytest.mark.parametrize(
    ("dotted", "attribute", "kind"),
    [
        # A user package whose submodule shares a standard-library name is the user's module.
        ("mypkg.code.Net", None, "unknown"),
        ("models.signal.trace.Block", None, "unknown"),
        # An attribute walk (protocol >= 4) reaching os through an allow-listed module is unsafe.
        ("torch.nn.modules.conv.os.path.join", "os.path.join", "unsafe"),
        ("torch.nn.modules.conv.F.torch.hub.load", "F.torch.hub.load", "unsafe"),
        # A dotted attribute is never safe, even when every part looks harmless.
        ("torch.nn.modules.conv.Conv2d.forward", "Conv2d.forward", "unknown"),
    ],
)
def test_classify_global_with_attribute_walk(dotted: str, attribute: str | None, kind: str) -> None:
    assert classify_global(dotted, attribute) == kind


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make", [p0_call, p4_call])
@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "exec"),
        ("subprocess", "Popen"),
        ("runpy", "_run_code"),
        ("importlib", "import_module"),
    ],
)
def test_dangerous_globals_are_recorded_never_called(tmp_path: Path, make, module: str, name: str) -> None:
    marker = tmp_path / "pwned"
    payload = make(module, name, f"touch {marker}" if name != "import_module" else "evil_never_imported")
    before = set(sys.modules)
    result = load_inert(payload)
    assert isinstance(result.root, Call)
    assert result.root.func_name == f"{module}.{name}"
    assert result.unsafe_callables() == [f"{module}.{name}"]
    assert not marker.exists()
    assert "evil_never_imported" not in sys.modules
    assert set(sys.modules) - before == set()


@pytest.mark.timeout(30)
def test_reduce_class_payload_is_inert(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            import os

            return (os.system, (f"touch {marker}",))

    for protocol in range(6):
        result = load_inert(pickle.dumps({"x": Evil()}, protocol=protocol))
        assert result.unsafe_callables() == [f"{__import__('os').system.__module__}.system"]
    assert not marker.exists()


def test_dynamic_call_of_a_call_result_is_flagged() -> None:
    # functools.partial(x)() -- calling the result of a call is a gadget chain.
    data = b"\x80\x02cfunctools\npartial\ncmymod\nf\n\x85R)R."
    result = load_inert(data)
    assert "functools.partial" in result.unsafe_callables()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch deprecates quantize_per_tensor
def test_torch_tensors_become_tensor_refs() -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "w": torch.zeros(4, 3, 3, 3),
            "p": torch.nn.Parameter(torch.zeros(5, dtype=torch.float16)),
            "view": torch.zeros(10)[2:6],
            "meta": torch.zeros(2, 7, device="meta"),
            "q": torch.quantize_per_tensor(torch.zeros(3, 2), 0.1, 0, torch.qint8),
        },
        buf,
    )
    import zipfile

    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        data = archive.read("archive/data.pkl")
    result = load_inert(data)
    root = result.root
    assert isinstance(root, dict)
    w, p, view, meta, q = (root[k] for k in ("w", "p", "view", "meta", "q"))
    assert isinstance(w, TensorRef) and w.info.shape == (4, 3, 3, 3) and w.info.dtype == "float32"
    assert not w.is_parameter
    assert isinstance(p, TensorRef) and p.is_parameter and p.info.dtype == "float16" and p.info.shape == (5,)
    assert isinstance(view, TensorRef) and view.info.shape == (4,) and view.info.storage_offset == 2
    assert isinstance(meta, TensorRef) and meta.info.shape == (2, 7) and meta.info.storage_key is None
    assert isinstance(q, TensorRef) and q.info.dtype == "qint8" and q.info.shape == (3, 2)
    assert all(isinstance(s, StorageRef) for s in result.storages)
    assert result.unsafe_callables() == [] and result.unknown_globals() == []


def test_new_dtypes_use_rebuild_tensor_v3() -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "u": torch.zeros(3, 4, dtype=torch.uint16),
            "f8": torch.zeros(2, 8, 3, 3, dtype=torch.float8_e4m3fn)[:, 2:],
        },
        buf,
    )
    import zipfile

    data = zipfile.ZipFile(io.BytesIO(buf.getvalue())).read("archive/data.pkl")
    result = load_inert(data)
    assert "torch._utils._rebuild_tensor_v3" in result.globals
    root = result.root
    assert isinstance(root, dict)
    u, f8 = root["u"], root["f8"]
    assert isinstance(u, TensorRef) and u.info.shape == (3, 4) and u.info.dtype == "uint16"
    assert isinstance(f8, TensorRef) and f8.info.shape == (2, 6, 3, 3) and f8.info.dtype == "float8_e4m3fn"
    assert f8.info.storage_offset == 18 and f8.info.is_parameter_dtype


@pytest.mark.parametrize("protocol", [2, 4])
def test_plain_pickle_of_tensor_reads_nested_storage_blob(protocol: int) -> None:
    t = torch.zeros(2, 3, dtype=torch.float64)
    root = load_inert(pickle.dumps({"t": t, "alias": t}, protocol=protocol)).root
    assert isinstance(root, dict)
    ref = root["t"]
    assert isinstance(ref, TensorRef)
    assert ref.info.shape == (2, 3) and ref.info.dtype == "float64"
    assert root["alias"] is ref


def test_numpy_arrays_become_tensor_refs() -> None:
    import numpy as np

    root = load_inert(pickle.dumps({"a": np.zeros((2, 5), dtype=np.float32)}, protocol=2)).root
    assert isinstance(root, dict)
    ref = pickle_inert.tensor_of(root["a"])
    assert ref is not None and ref.info.shape == (2, 5) and ref.info.dtype == "float32"


# --------------------------------------------------------------------------------------------
# Malformed streams


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"\x80\x02", "truncated"),
        (b"\x80\x02h\x05.", "memo key 5 is not defined"),
        (b"\x80\x02j\x00\x00\x01\x00.", "memo key 65536 is not defined"),
        (b"\x80\x02R.", "stack underflow"),
        (b"\x80\x02.", "stack underflow"),
        (b"\x80\x02u.", "MARK expected"),
        (b"\x80\x02\xff.", "unknown opcode at byte 2"),
        (b"\x80\x07N.", "unsupported protocol 7"),
        (b"\x80\x02X\xff\xff\xff\x7f.", "truncated"),
        (b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\x7f.", "truncated"),
        (b"Iabc\n.", "bad integer"),
        (b"S'unterminated\n.", "not quoted"),
        (b"\x80\x02K\x01K\x02R.", "REDUCE arguments are not a tuple"),
        (b"\x80\x02K\x00K\x01K\x02s.", "not a dict"),
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(NK\x00J\xff\xff\xff\xff\x85)\x89NtR.", "non-size"),
    ],
)
def test_malformed_streams_raise_malformed(data: bytes, message: str) -> None:
    with pytest.raises(MalformedModelError, match="malformed pickle") as info:
        load_inert(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_every_truncation_of_a_real_pickle_is_a_clean_error() -> None:
    buf = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3), "conv.bias": torch.zeros(2)}, buf)
    import zipfile

    data = zipfile.ZipFile(io.BytesIO(buf.getvalue())).read("archive/data.pkl")
    for cut in range(len(data) - 1):
        with pytest.raises(MalformedModelError):
            load_inert(data[:cut])


def test_random_byte_flips_only_raise_our_errors() -> None:
    data = pickle.dumps({"a": [1, 2, (3, "x")], "b": _plain_data()}, protocol=2)
    rng = random.Random(1234)
    for _ in range(400):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        with contextlib.suppress(BiasInspectError):
            load_inert(bytes(mutated))


# --------------------------------------------------------------------------------------------
# Caps and bombs


@pytest.mark.timeout(30)
def test_deep_nesting_is_built_without_recursion() -> None:
    start = time.perf_counter()
    root = load_inert(deep_list_pickle(100_000)).root
    depth = 0
    node = root
    while isinstance(node, list) and node:
        node = node[0]
        depth += 1
    assert depth == 99_999
    assert time.perf_counter() - start < 20  # generous: the point is "not pathological"


@pytest.mark.timeout(30)
def test_deep_tuple_dict_key_is_not_hashed() -> None:
    data = b"\x80\x02}K\x00" + b"\x85" * 100_000 + b"Ns."
    root = load_inert(data).root
    assert isinstance(root, dict) and len(root) == 1


@pytest.mark.timeout(30)
def test_dup_bomb_shares_references() -> None:
    # 40 levels x 10 references: 10**40 logical leaves, a few hundred objects in memory.
    root = load_inert(dup_bomb_pickle(40, 10)).root
    assert isinstance(root, list) and len(root) == 10
    assert root[0] is root[9]


def test_object_budget_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_PICKLE_OBJECTS", 1000)
    with pytest.raises(ResourceLimitError, match="node budget"):
        load_inert(pickle.dumps(list(range(5000)), protocol=2))


def test_byte_cap_is_enforced() -> None:
    data = pickle.dumps(b"z" * 5000, protocol=4)
    with pytest.raises(ResourceLimitError, match="limit"):
        load_inert(data, max_bytes=1000)
    assert load_inert(data, max_bytes=10_000).root == b"z" * 5000


def test_trailing_bytes_after_stop_are_ignored() -> None:
    # A pickle with a zip appended reads as the pickle.
    assert load_inert(pickle.dumps({"a": 1}) + b"PK\x03\x04junk").root == {"a": 1}


def test_file_source_reads_only_the_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2) + b"\x00" * 100_000)
    with open(path, "rb") as handle:
        result = load_inert(handle)
        assert result.root == [1, 2, 3]
        assert handle.tell() == result.bytes_read < 100
