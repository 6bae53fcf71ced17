"""NumPy parameter lists: Lasagne ``np.savez`` archives, ``.npy`` arrays and Theano-era pickles,
every file written by numpy or pickle in the test itself; then hostile ``.npy``/``.npz`` files."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import biasinspect
from biasinspect.cli import main
from biasinspect.model import BiasKind, BiasSource, ModelReport
from biasinspect.readers.numpy_reader import NAMED_PAIRING_WARNING, PAIRING_WARNING, TRANSPOSED_WARNING


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def one_model(path: Path) -> ModelReport:
    report = biasinspect.inspect(path)
    assert report.errors == ()
    (model,) = report.models
    return model


def _f32(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


# The seed's untied layer as Lasagne saves it, then a second, tied conv.
SEED = [_f32(32, 3, 5, 5), _f32(32, 28, 28), _f32(8, 32, 3, 3), _f32(8)]


def _check_seed(model: ModelReport, names: list[str]) -> None:
    assert [layer.name for layer in model.layers] == names
    untied, tied = model.layers
    assert (untied.op, untied.bias.kind, untied.bias.shape, untied.bias.params) == (
        "Conv2d",
        BiasKind.UNTIED,
        (32, 28, 28),
        25_088,
    )
    assert untied.weight_params + untied.bias.params == 27_488
    assert untied.formula == "3x5x5 x 32 + 32x28x28 = 27,488"
    assert untied.output_spatial == (28, 28)
    assert untied.bias.source is BiasSource.ADD
    assert (tied.bias.kind, tied.bias.params, tied.bias.source, tied.output_spatial) == (
        BiasKind.TIED,
        8,
        BiasSource.CONV,
        None,
    )
    assert tied.formula == "(32x3x3 + 1) x 8 = 2,312"
    totals = model.totals
    assert (totals.conv_layers, totals.tied, totals.untied, totals.absent, totals.other) == (2, 1, 1, 0, 0)
    assert (totals.conv_weight_params, totals.conv_bias_params) == (2_400 + 2_304, 25_088 + 8)
    assert totals.model_params == 2_400 + 25_088 + 2_304 + 8
    assert PAIRING_WARNING in model.warnings
    assert TRANSPOSED_WARNING in model.warnings
    assert model.unsafe_callables == ()


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_lasagne_npz_reads_the_seeds_untied_layer(tmp_path: Path, writer: object) -> None:
    path = tmp_path / "net.npz"
    writer(path, *SEED)  # type: ignore[operator]
    model = one_model(path)
    assert model.format == "numpy"
    _check_seed(model, ["arr_0", "arr_2"])


def test_compressed_arrays_of_zeros_read_past_the_ratio_cap(tmp_path: Path) -> None:
    # A freshly initialised net: zero biases deflate far past the 200:1 cap, but only headers are
    # inflated, so the cap never applies.
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, *[np.zeros_like(array) for array in SEED])
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("arr_1.npy")
        assert info.file_size > 200 * info.compress_size
    _check_seed(one_model(path), ["arr_0", "arr_2"])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_theano_param_values_pickle(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "net.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"param_values": SEED}, handle, protocol=protocol)
    model = one_model(path)
    assert (model.format, model.location) == ("pickle", "param_values")
    _check_seed(model, ["param_values[0]", "param_values[2]"])
    # numpy's array globals are known-safe: no unknown-global warning.
    assert not [w for w in model.warnings if "outside the known-safe set" in w]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_list_pickle(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "net.pkl"
    with open(path, "wb") as handle:
        pickle.dump(SEED, handle, protocol=protocol)
    model = one_model(path)
    assert (model.format, model.location) == ("pickle", None)
    _check_seed(model, ["[0]", "[2]"])
    assert not [w for w in model.warnings if "known-safe" in w]


def test_lone_npy_files(tmp_path: Path) -> None:
    weight = tmp_path / "w.npy"
    np.save(weight, _f32(16, 3, 3, 3))
    model = one_model(weight)
    ((layer),) = model.layers
    assert (model.format, layer.name, layer.bias.kind, layer.weight_params) == (
        "numpy",
        "array",
        BiasKind.ABSENT,
        432,
    )
    assert model.totals.model_params == 432
    vector = tmp_path / "b.npy"
    np.save(vector, _f32(16))
    model = one_model(vector)
    assert (model.layers, model.totals.conv_layers, model.totals.model_params) == ((), 0, 16)
    assert model.warnings == ("no conv-like array (3-D to 5-D, floating point) in the parameter list",)


def test_pairing_patterns(tmp_path: Path) -> None:
    arrays = [
        _f32(16, 3, 5),  # conv1d, untied over 60 positions
        _f32(16, 60),
        _f32(4, 16, 3, 3, 3),  # conv3d, untied
        _f32(4, 6, 6, 6),
        _f32(8, 4, 3, 3),  # conv2d without bias, then a Lasagne BatchNormLayer
        *[_f32(8) for _ in range(4)],
        _f32(8, 8, 1, 1),  # conv2d with a bias, then a BatchNormLayer
        *[_f32(8) for _ in range(5)],
        _f32(6, 8, 3, 3),  # conv2d whose next array does not match C_out
        _f32(288, 10),  # dense W
        _f32(10),
        np.arange(24, dtype=np.int64).reshape(2, 3, 4),  # not floating: not a conv, not counted
    ]
    path = tmp_path / "patterns.npz"
    np.savez(path, *arrays)
    model = one_model(path)
    got = [
        (layer.name, layer.op, layer.bias.kind, layer.bias.params, layer.output_spatial, layer.followed_by)
        for layer in model.layers
    ]
    assert got == [
        ("arr_0", "Conv1d", BiasKind.UNTIED, 16 * 60, (60,), None),
        ("arr_2", "Conv3d", BiasKind.UNTIED, 4 * 216, (6, 6, 6), None),
        ("arr_4", "Conv2d", BiasKind.ABSENT, 0, None, "BatchNorm"),
        ("arr_9", "Conv2d", BiasKind.TIED, 8, None, None),
        ("arr_15", "Conv2d", BiasKind.ABSENT, 0, None, None),
    ]
    floating = sum(array.size for array in arrays if array.dtype.kind == "f")
    assert (
        model.totals.model_params == floating == 240 + 960 + 1728 + 864 + 288 + 32 + 64 + 40 + 432 + 2880 + 10
    )
    assert any("read as a batch norm's beta, gamma, mean and inv_std" in w for w in model.warnings)


def test_transposed_conv_recognised_only_by_its_bias_width(tmp_path: Path) -> None:
    # Lasagne's TransposedConv2DLayer: W [C_in=8, C_out=4, 4, 4], then b [4] or untied b [4, 16, 16].
    arrays = [_f32(8, 4, 4, 4), _f32(4), _f32(8, 4, 4, 4), _f32(4, 16, 16), _f32(6, 6, 3, 3), _f32(6)]
    path = tmp_path / "deconv.npz"
    np.savez(path, *arrays)
    model = one_model(path)
    got = [
        (
            layer.op,
            layer.in_channels,
            layer.out_channels,
            layer.bias.kind,
            layer.bias.params,
            layer.output_spatial,
        )
        for layer in model.layers
    ]
    assert got == [
        ("ConvTranspose2d", 8, 4, BiasKind.TIED, 4, None),
        ("ConvTranspose2d", 8, 4, BiasKind.UNTIED, 1024, (16, 16)),
        # C_in == C_out: the bias width says nothing, so it is read as a conv.
        ("Conv2d", None, 6, BiasKind.TIED, 6, None),
    ]
    assert model.layers[0].formula == "(8x4x4 + 1) x 4 = 516"
    assert any(
        "ConvTranspose inferred from the length of its bias (4 = weight dim 1" in w for w in model.warnings
    )
    assert TRANSPOSED_WARNING in model.warnings


def test_named_arrays_pair_by_scope(tmp_path: Path) -> None:
    # Chainer's save_npz order is not parameter order: a bias may come before its weight.
    named = {
        "predictor/conv1/b": _f32(8, 6, 6),  # untied, before its weight (and 3-D: not a conv weight)
        "predictor/conv1/W": _f32(8, 3, 3, 3),
        "predictor/conv2/W": _f32(4, 8, 3, 3),  # nobias=True, then a batch norm: no bias
        "predictor/bn2/gamma": _f32(4),
        "predictor/bn2/beta": _f32(4),
        "predictor/bn2/avg_mean": _f32(4),
        "predictor/bn2/avg_var": _f32(4),
        "conv3.bias": _f32(5),  # a state dict, bias first
        "conv3.weight": _f32(5, 4, 1, 1),
        "odd/W": _f32(2, 5, 1, 1),
        "odd/b": _f32(3),  # named as the bias, shaped like nothing: other
    }
    path = tmp_path / "chainer.npz"
    np.savez(path, **named)
    model = one_model(path)
    got = [(layer.name, layer.bias.kind, layer.bias.params, layer.output_spatial) for layer in model.layers]
    assert got == [
        ("predictor/conv1/W", BiasKind.UNTIED, 288, (6, 6)),
        ("predictor/conv2/W", BiasKind.ABSENT, 0, None),
        ("conv3.weight", BiasKind.TIED, 5, None),
        ("odd/W", BiasKind.OTHER, 3, None),
    ]
    assert PAIRING_WARNING not in model.warnings
    assert NAMED_PAIRING_WARNING in model.warnings


def test_arrays_are_taken_in_numeric_order(tmp_path: Path) -> None:
    # arr_10 sorts before arr_2 as text; np.savez numbers them in argument order.
    arrays = [_f32(2)] * 9 + [_f32(4, 2, 3, 3), _f32(4, 5, 5)]
    path = tmp_path / "many.npz"
    np.savez(path, *arrays)
    (layer,) = one_model(path).layers
    assert (layer.name, layer.bias.kind, layer.bias.params) == ("arr_9", BiasKind.UNTIED, 100)


def test_folder_scan_and_json(tmp_path: Path) -> None:
    np.savez(tmp_path / "net.npz", *SEED)
    np.save(tmp_path / "w.npy", SEED[0])
    (tmp_path / "notes.txt").write_text("not scanned")
    code, out, err = run(str(tmp_path), "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert [(Path(m["path"]).name, m["format"], m["totals"]["untied"]) for m in data["models"]] == [
        ("net.npz", "numpy", 1),
        ("w.npy", "numpy", 0),
    ]
    assert data["models"][0]["layers"][0]["output_spatial"] == [28, 28]
    assert data["errors"] == []


def test_fortran_order_is_the_same_shape(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    np.savez(path, np.asfortranarray(SEED[0]), np.asfortranarray(SEED[1]))
    with zipfile.ZipFile(path) as archive:
        assert b"'fortran_order': True" in archive.read("arr_0.npy")[:128]
    (layer,) = one_model(path).layers
    assert (layer.bias.kind, layer.bias.params) == (BiasKind.UNTIED, 25_088)


def test_object_array_is_flagged_not_read(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, SEED[0], SEED[1], np.array([{"a": 1}, None], dtype=object))
    model = one_model(path)
    assert model.unsafe_callables == ("<pickled object array not inspected: arr_2>",)
    assert any("arr_2 is an object array" in w for w in model.warnings)
    assert model.totals.untied == 1
    code, _, err = run(str(path), "--fail-on", "unsafe")
    assert code == 1 and "unsafe" in err
    lone = tmp_path / "object.npy"
    np.save(lone, np.array([object()] * 3, dtype=object), allow_pickle=True)
    assert one_model(lone).unsafe_callables == ("<pickled object array not inspected: array>",)


def test_zip_with_a_torch_record_is_read_as_torch(tmp_path: Path) -> None:
    # A zip whose first member is an .npy but which also holds archive/data.pkl: torch.load
    # would unpickle that, so it is a torch file and its callables are reported.
    path = tmp_path / "polyglot.npz"
    with zipfile.ZipFile(path, "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, SEED[0])
        archive.writestr("arr_0.npy", buffer.getvalue())
        archive.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00hi\x85R.")
    model = one_model(path)
    assert model.format == "pytorch"
    assert "os.system" in model.unsafe_callables


# --------------------------------------------------------------------------------------------
# Hostile files: one clean line and exit 2 each, never numpy.load.


def _npy(header: bytes, *, version: int = 1, data: bytes = b"", length: int | None = None) -> bytes:
    size = len(header) if length is None else length
    preamble = struct.pack("<H", size) if version == 1 else struct.pack("<I", size)
    return b"\x93NUMPY" + bytes([version, 0]) + preamble + header + data


def _dict(descr: str = "'<f4'", shape: str = "(2, 3, 3, 3)", fortran: str = "False") -> bytes:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n".encode()


HOSTILE = {
    "truncated_magic": (b"\x93NUM", "not a recognised model format"),
    "truncated_header": (_npy(_dict())[:30], "truncated .npy header"),
    "huge_header_length": (_npy(b"{}", version=2, length=0xFFFFFFF0), "over the 65,536-byte limit"),
    "not_a_literal": (_npy(b"__import__('os').system('echo hi')\n"), "not a Python literal"),
    "call_in_dict": (_npy(_dict(shape="eval('1')")), "not a Python literal"),
    "not_a_dict": (_npy(b"[1, 2, 3]\n"), "not a dict of exactly"),
    "extra_key": (
        _npy(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}\n"),
        "not a dict of exactly",
    ),
    "negative_dim": (_npy(_dict(shape="(2, -3, 3, 3)")), "holds a value that is not a size"),
    "float_dim": (_npy(_dict(shape="(2.0, 3)")), "holds a value that is not a size"),
    "huge_dims": (
        _npy(_dict(shape="(2**40, 2**40)".replace("2**40", str(2**40)))),
        "more than 2**63 elements",
    ),
    "deep_nesting": (_npy(b"(" * 5000 + b")" * 5000), "not a Python literal"),
    "huge_int": (_npy(_dict(shape="(" + "9" * 5000 + ",)")), "not a Python literal"),
    "fortran_not_bool": (_npy(_dict(fortran="'yes'")), "fortran_order is not True or False"),
    "descr_not_str": (_npy(_dict(descr="3")), "descr is not a dtype string"),
    "bad_version": (b"\x93NUMPY\x09\x00" + b"\x00" * 8, "format version 9.0 is not supported"),
    "data_truncated": (_npy(_dict(), data=b"\x00" * 100), "truncated array"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_npy_gives_one_line(tmp_path: Path, case: str) -> None:
    content, message = HOSTILE[case]
    path = tmp_path / f"{case}.npy"
    path.write_bytes(content)
    code, out, err = run(str(path))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"biasinspect: {path}: ")
    assert message in err


def test_hostile_npz_member_gives_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, SEED[0])
        archive.writestr("arr_0.npy", buffer.getvalue())
        archive.writestr("arr_1.npy", _npy(_dict(shape="(1, -1)")))
    code, _, err = run(str(path))
    assert code == 2
    assert "npz member 'arr_1.npy': .npy shape (1, -1) holds a value that is not a size" in err


def test_npz_bomb_member_inflates_only_its_header(tmp_path: Path) -> None:
    # 1 GiB of zeros behind a valid header, deflated to about 1 MiB: a full read would be refused
    # (over the 256 MiB member cap and the 200:1 ratio); the header is all that is inflated.
    count = 1 << 28
    header = _dict(shape=f"({count},)")
    padded = _npy(header[:-1] + b" " * (-(10 + len(header)) % 64) + b"\n")
    stream = zlib.compressobj(9, zlib.DEFLATED, -15)
    # Full flushes make byte-aligned segments with no back references: one segment of 16 MiB of
    # zeros, repeated, is a valid stream of 1 GiB.
    head = stream.compress(padded) + stream.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 24)
    segment = stream.compress(zeros) + stream.flush(zlib.Z_FULL_FLUSH)
    repeats = (count * 4) // len(zeros)
    compressed = head + segment * repeats + stream.flush()
    crc = zlib.crc32(padded)
    for _ in range(repeats):
        crc = zlib.crc32(zeros, crc)
    path = tmp_path / "bomb.npz"
    path.write_bytes(_zip_one("arr_0.npy", compressed, len(padded) + count * 4, crc))
    assert len(compressed) < (1 << 21)
    model = one_model(path)
    assert model.totals.model_params == count


def test_stalled_deflate_stream_is_refused(tmp_path: Path) -> None:
    # Empty stored deflate blocks never produce the header: refused after a bounded read.
    empty_blocks = b"\x00\x00\x00\xff\xff" * 400_000
    path = tmp_path / "stalled.npz"
    path.write_bytes(_zip_one("arr_0.npy", empty_blocks + b"\x03\x00", 1000, 0))
    code, _, err = run(str(path))
    assert code == 2
    assert "do not inflate from the first" in err


def _zip_one(name: str, compressed: bytes, size: int, crc: int) -> bytes:
    """A one-member deflated zip written byte by byte (zipfile will not write lying members)."""
    raw = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(compressed), size, len(raw), 0)
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        20,
        20,
        0,
        8,
        0,
        0,
        crc,
        len(compressed),
        size,
        len(raw),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    body = local + raw + compressed
    directory = central + raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(directory), len(body), 0)
    return body + directory + end
