"""safetensors header reading/validation and sharded checkpoints (safetensors and PyTorch .bin)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from test_state_dict import RESNET_CONVS, ResNetish, n_params, vggish
from torch import nn

from biasinspect import limits
from biasinspect.api import inspect
from biasinspect.errors import (
    BiasInspectError,
    MalformedModelError,
    ResourceLimitError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from biasinspect.model import BiasSource, BiasTerm
from biasinspect.readers.safetensors_reader import read_safetensors, tensors_from_safetensors
from biasinspect.readers.sharded import read_sharded_index, shard_files
from biasinspect.readers.state_dict import describe_state_dict
from biasinspect.readers.tensors import TensorInfo
from biasinspect.source import LocalSource


def write_raw(path: Path, header: bytes | str, data: bytes = b"") -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def exactly(message: str) -> str:
    """A pytest ``match`` pattern for the whole message, literally."""
    return f"^{re.escape(message)}$"


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except Exception:
        return False
    return True


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# --- real files ----------------------------------------------------------------------------------


@pytest.fixture()
def resnet_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = ResNetish()
    path = tmp_path / "resnet.safetensors"
    save_file(model.state_dict(), str(path), metadata={"format": "pt"})
    return path, model


def test_resnet_file(resnet_file: tuple[Path, nn.Module]) -> None:
    path, model = resnet_file
    (description,) = read_safetensors(path)
    assert description.path == str(path)
    assert description.format == "safetensors"
    assert description.location is None
    assert [c.name for c in description.convs] == RESNET_CONVS
    assert all(c.followed_by == "BatchNorm" and c.bias_terms == () for c in description.convs)
    assert description.model_params == n_params(model)


def test_vgg_file_with_save_model(tmp_path: Path) -> None:
    model = vggish()
    path = tmp_path / "vgg.safetensors"
    save_model(model, str(path))
    (description,) = read_safetensors(path)
    assert [c.name for c in description.convs] == [
        "features.0", "features.4", "features.7", "features.11", "features.14",
    ]  # fmt: skip
    assert description.convs[0].bias_terms == (BiasTerm("features.0.bias", (8,), BiasSource.CONV),)
    assert description.model_params == n_params(model)


def test_header_order_is_not_registration_order(tmp_path: Path) -> None:
    """Why the reader passes registration_order=False: the header is sorted, so conv2 follows bn1."""
    model = nn.Module()
    model.conv2 = nn.Conv2d(3, 8, 3, bias=False)
    model.bn2 = nn.BatchNorm2d(8)
    model.conv1 = nn.Conv2d(8, 4, 3, bias=False)
    model.gate = nn.Conv2d(4, 4, 1)
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    names = list(tensors_from_safetensors(path))
    assert names.index("bn2.weight") < names.index("conv2.weight")
    (description,) = read_safetensors(path)
    convs = {c.name: c for c in description.convs}
    assert convs["conv2"].followed_by == "BatchNorm"  # name pairing conv2/bn2
    assert convs["conv1"].followed_by is None  # bn2 is claimed and of the wrong width


def test_untied_bias_and_transposed_in_file(tmp_path: Path) -> None:
    tensors = {
        "block.conv.weight": torch.zeros(8, 3, 5, 5),
        "block.bias": torch.zeros(1, 8, 28, 28),
        "up.weight": torch.zeros(8, 4, 2, 2),
        "up.bias": torch.zeros(4),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    (description,) = read_safetensors(path)
    block, up = description.convs
    assert block.bias_terms == (BiasTerm("block.bias", (1, 8, 28, 28), BiasSource.ADD),)
    assert up.op == "ConvTranspose2d" and up.transposed is True
    assert description.model_params == 8 * 75 + 8 * 28 * 28 + 8 * 4 * 4 + 4


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
        (torch.float64, "float64"), (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.float8_e5m2, "float8_e5m2"), (torch.int8, "int8"), (torch.uint8, "uint8"),
        (torch.int64, "int64"), (torch.int32, "int32"), (torch.bool, "bool"),
    ],
)  # fmt: skip
def test_dtype_names(tmp_path: Path, dtype: torch.dtype, name: str) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.zeros(2, 3, dtype=dtype)}, str(path))
    assert tensors_from_safetensors(path) == {"t": TensorInfo((2, 3), name)}


def test_int8_conv_weight_is_not_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "q.safetensors"
    save_file({"q.weight": torch.zeros(8, 3, 3, 3, dtype=torch.int8), "q.bias": torch.zeros(8)}, str(path))
    (description,) = read_safetensors(path)
    assert description.convs == ()
    assert description.model_params == 8
    assert description.warnings[0].startswith("q.weight: int8 tensor of shape [8, 3, 3, 3] skipped")


def test_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"conv.weight": torch.zeros(64, 64, 3, 3)}, str(path))
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    read_sizes: list[int] = []

    class Counting(LocalSource):
        def read_at(self, offset: int, length: int) -> bytes:
            data = super().read_at(offset, length)
            read_sizes.append(len(data))
            return data

    with Counting(path) as source:
        assert tensors_from_safetensors(source) == {"conv.weight": TensorInfo((64, 64, 3, 3), "float32")}
    assert read_sizes == [8, header_length]
    assert path.stat().st_size == 8 + header_length + 64 * 64 * 9 * 4


def test_empty_and_whitespace_headers_are_accepted(tmp_path: Path) -> None:
    empty = write_raw(tmp_path / "empty.safetensors", "{}      ")
    (description,) = read_safetensors(empty)
    assert description.convs == () and description.model_params == 0
    spaced = write_raw(tmp_path / "spaced.safetensors", ' \n{"a": {"dtype": "F32", "shape": [2],'
                       ' "data_offsets": [0, 8], "extra": 1}, "__metadata__": null}', b"\0" * 8)  # fmt: skip
    assert tensors_from_safetensors(spaced) == {"a": TensorInfo((2,), "float32")}
    assert library_accepts(spaced)
    zero = write_raw(tmp_path / "zero.safetensors", json.dumps({
        "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "a": F32_2, "__metadata__": {"format": "pt"},
    }), b"\0" * 8)  # fmt: skip
    assert tensors_from_safetensors(zero) == {
        "z": TensorInfo((0, 3), "float32"),
        "a": TensorInfo((2,), "float32"),
    }


# --- validation errors ---------------------------------------------------------------------------

BAD_HEADERS = [
    ("bad_utf8", b'{"\xff": 1}', b"", "header is not valid UTF-8 (byte 2)"),
    ("bad_json", b'{"a": }', b"", "header is not valid JSON: Expecting value: line 1 column 7 (char 6)"),
    ("not_brace", b'["a"]', b"", "header does not start with '{'"),
    ("not_brace_string", b'"{}"', b"", "header does not start with '{'"),
    ("nan", b'{"a": NaN}', b"", "header is not valid JSON: NaN is not valid JSON"),
    ("unknown_dtype", {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0",
     "tensor 'a': unknown dtype 'Q4'"),
    ("lowercase_dtype", {"a": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4,
     "tensor 'a': unknown dtype 'f32'"),
    ("entry_not_object", {"a": [1, 2]}, b"", "tensor 'a': header entry is not an object"),
    ("no_shape", {"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4, "tensor 'a': header entry has no 'shape'"),
    ("negative_dim", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4,
     "tensor 'a': shape [-1] is not a list of unsigned integers"),
    ("bool_dim", {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4,
     "tensor 'a': shape [True] is not a list of unsigned integers"),
    ("float_dim", {"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4,
     "tensor 'a': shape [1.0] is not a list of unsigned integers"),
    ("three_offsets", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8,
     "tensor 'a': data_offsets [0, 4, 8] is not a pair of unsigned integers"),
    ("overlap", {"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     "tensor 'b': data_offsets [4, 12] overlap the previous tensor, which ends at byte 8"),
    ("gap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     "tensor 'a': data_offsets [4, 12] leave a gap after byte 0"),
    ("end_before_begin", {"a": F32_2, "b": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8,
     "tensor 'b': data_offsets [8, 4] end before begin"),
    ("out_of_range", {"a": F32_2}, b"\0" * 4,
     "tensor 'a': data_offsets [0, 8] run past the end of the 4 data bytes"),
    ("size_mismatch", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
     "tensor 'a': data_offsets [0, 8] hold 8 bytes but shape [3] needs 12"),
    ("overflow", {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, b"",
     "tensor 'a': shape [4294967296, 4294967296] overflows a 64-bit size"),
    ("bits_overflow", {"a": {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 0]}}, b"",
     "tensor 'a': shape [4611686018427387904] overflows a 64-bit size"),
    ("huge_offset", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**64]}}, b"",
     "tensor 'a': data_offsets [0, 18446744073709551616] is not a pair of unsigned integers"),
    ("misaligned_f4", {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0",
     "tensor 'a': 3 elements of 4 bits do not fill whole bytes"),
    ("trailing_data", {"a": F32_2}, b"\0" * 12, "tensor data ends at byte 8 but the file has 12 data bytes"),
    ("bad_metadata", {"__metadata__": {"format": 1}, "a": F32_2}, b"\0" * 8,
     "__metadata__ is not an object of strings"),
    ("duplicate_key", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
                      b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8,
     "duplicate key 'a' in header"),
    ("nul_padding", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}\0\0', b"\0" * 8,
     "header is not valid JSON: Extra data"),
    ("lone_surrogate_key", b'{"conv\\ud800.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
     b"\0" * 8, "header is not valid JSON: lone surrogate in string 'conv\\ud800.weight'"),
    ("lone_low_surrogate_value", b'{"__metadata__": {"format": "\\uDC00"}, "a": {"dtype": "F32", "shape": [2],'
                                 b' "data_offsets": [0, 8]}}', b"\0" * 8,
     "header is not valid JSON: lone surrogate in string '\\udc00'"),
    ("deep_nesting", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"",
     "header JSON is nested too deeply"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "header", "data", "message"), BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_invalid_headers_are_malformed(
    tmp_path: Path, case: str, header: bytes | dict[str, object], data: bytes, message: str
) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = write_raw(tmp_path / f"{case}.safetensors", raw, data)
    with pytest.raises(MalformedModelError) as caught:
        read_safetensors(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    if case != "duplicate_key":  # the library lets a later duplicate overwrite an earlier one
        assert not library_accepts(path), "the safetensors library accepts what we reject"


def test_surrogate_pairs_and_escaped_backslashes_are_valid(tmp_path: Path) -> None:
    # A proper pair is one character; "\\\\ud800" is a backslash then "ud800": both are fine.
    raw = (
        b'{"__metadata__": {"note": "\\\\ud800"}, "emoji\\ud83d\\ude00": {"dtype": "F32", "shape": [2],'
        b' "data_offsets": [0, 8]}}'
    )
    path = write_raw(tmp_path / "pair.safetensors", raw, b"\0" * 8)
    assert library_accepts(path)
    assert tensors_from_safetensors(path) == {"emoji\U0001f600": TensorInfo((2,), "float32")}


@pytest.mark.timeout(20)
def test_overflow_is_found_without_multiplying_out_every_dim(tmp_path: Path) -> None:
    # 200,000 dims of 2**63 - 1: multiplying them all out first took quadratic time (an
    # 80,000-dim header took 16 s); the check stops at the second dim.  The message quotes
    # only the first dims, not a megabyte-long shape.
    dims = 200_000
    header = {"t": {"dtype": "F32", "shape": [2**63 - 1] * dims, "data_offsets": [0, 0]}}
    path = write_raw(tmp_path / "dos.safetensors", json.dumps(header))
    with pytest.raises(MalformedModelError) as caught:
        read_safetensors(path)
    big = 2**63 - 1
    assert str(caught.value) == (
        f"tensor 't': shape [{', '.join([str(big)] * 8)}, ... ({dims} items)] overflows a 64-bit size"
    )


def test_a_zero_dim_before_any_overflow_makes_an_empty_tensor(tmp_path: Path) -> None:
    header = {"z": {"dtype": "F32", "shape": [0, 2**63, 2**63], "data_offsets": [0, 0]}}
    path = write_raw(tmp_path / "zero.safetensors", json.dumps(header))
    assert library_accepts(path)
    assert tensors_from_safetensors(path) == {"z": TensorInfo((0, 2**63, 2**63), "float32")}
    header = {"z": {"dtype": "F32", "shape": [2**63, 2**63, 0], "data_offsets": [0, 0]}}
    path = write_raw(tmp_path / "late_zero.safetensors", json.dumps(header))
    assert not library_accepts(path)
    with pytest.raises(MalformedModelError, match="overflows a 64-bit size"):
        tensors_from_safetensors(path)


@pytest.mark.parametrize("where", ["name", "dtype", "shape"])
def test_messages_quote_huge_names_and_values_briefly(tmp_path: Path, where: str) -> None:
    name = "n" * 1_000_000 if where == "name" else "t"
    entry: dict[str, object] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}  # size mismatch
    if where == "dtype":
        entry["dtype"] = "Q" * 1_000_000
    elif where == "shape":
        entry["shape"] = [-1] * 1_000_000
    path = write_raw(tmp_path / "long.safetensors", json.dumps({name: entry}), b"\0" * 4)
    with pytest.raises(MalformedModelError) as caught:
        read_safetensors(path)
    assert len(str(caught.value)) < 500
    assert str(caught.value).startswith(f"tensor {name!r}"[:150])


def test_duplicate_key_inside_an_entry(tmp_path: Path) -> None:
    raw = b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}'
    path = write_raw(tmp_path / "d.safetensors", raw, b"\0" * 8)
    with pytest.raises(MalformedModelError, match="duplicate key 'dtype' in header"):
        tensors_from_safetensors(path)


def test_file_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x02\0\0")
    with pytest.raises(MalformedModelError, match=r"file too small for a safetensors header: 3 bytes"):
        read_safetensors(path)


def test_header_longer_than_file(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(MalformedModelError, match=r"^header length exceeds the 2 bytes after the 8-byte"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(MalformedModelError, match=r"^header length exceeds"):
        read_safetensors(path)


def test_header_over_the_cap_is_a_resource_limit(tmp_path: Path) -> None:
    path = tmp_path / "sparse.safetensors"
    length = limits.MAX_SAFETENSORS_HEADER_BYTES + 1
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", length) + b"{")
        handle.truncate(8 + length + 16)  # sparse: nothing is written or read
    with pytest.raises(ResourceLimitError, match=r"^safetensors header length exceeds the"):
        read_safetensors(path)


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match=exactly("is a directory")):
        read_safetensors(tmp_path)
    with pytest.raises(UnreadableFileError, match=exactly("no such file or directory")):
        read_safetensors(tmp_path / "missing.safetensors")


def _valid_file_bytes() -> bytes:
    header = json.dumps({
        "__metadata__": {"format": "pt"},
        "conv.weight": {"dtype": "F16", "shape": [2, 1, 1, 1], "data_offsets": [0, 4]},
        "conv.bias": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }).encode()  # fmt: skip
    return struct.pack("<Q", len(header)) + header + b"\0" * 12


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_files_fail_cleanly_and_never_more_leniently(
    tmp_path: Path, edits: list[tuple[int, int]]
) -> None:
    raw = bytearray(_valid_file_bytes())
    for position, value in edits:
        raw[position % len(raw)] = value
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        tensors = tensors_from_safetensors(path)
    except BiasInspectError as error:
        assert "\n" not in str(error)
        return
    assert library_accepts(path)
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(tensors)
        for name, info in tensors.items():
            assert tuple(handle.get_slice(name).get_shape()) == info.shape


# --- sharded checkpoints -------------------------------------------------------------------------


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    items = list(model.state_dict().items())
    half = len(items) // 2
    return dict(items[:half]), dict(items[half:])


def write_index(path: Path, weight_map: dict[str, str]) -> Path:
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, sort_keys=True))
    return path


def sharded_safetensors(folder: Path, model: nn.Module) -> Path:
    first, second = split_state(model)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map: dict[str, str] = {}
    for shard, state in zip(names, (first, second), strict=True):
        save_file(state, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, shard))
    return write_index(folder / "model.safetensors.index.json", weight_map)


def test_sharded_safetensors_matches_single_file(tmp_path: Path) -> None:
    model = ResNetish()
    index = sharded_safetensors(tmp_path, model)
    (description,) = read_sharded_index(index)
    single = tmp_path / "single.safetensors"
    save_file(model.state_dict(), str(single))
    (reference,) = read_safetensors(single)
    assert description.path == str(index)
    assert description.format == "safetensors"
    assert description.convs == reference.convs
    assert description.model_params == n_params(model)
    assert description.warnings == ()
    assert shard_files(index) == [
        tmp_path / "model-00001-of-00002.safetensors",
        tmp_path / "model-00002-of-00002.safetensors",
    ]


def test_folder_scan_reports_a_sharded_checkpoint_once(tmp_path: Path) -> None:
    model = ResNetish()
    index = sharded_safetensors(tmp_path, model)
    (tmp_path / "config.json").write_text("{}")
    report = inspect(tmp_path)
    assert report.errors == ()
    (only,) = report.models
    assert only.path == str(index)
    assert only.totals.model_params == n_params(model)


def test_a_shard_named_on_its_own_is_reported_alone(tmp_path: Path) -> None:
    sharded_safetensors(tmp_path, ResNetish())
    report = inspect(tmp_path / "model-00002-of-00002.safetensors")
    assert report.errors == ()
    assert [model.path for model in report.models] == [str(tmp_path / "model-00002-of-00002.safetensors")]


def test_sharded_pytorch_bin(tmp_path: Path) -> None:
    model = ResNetish()
    model.fc.weight = nn.Parameter(torch.zeros(10, 32))
    first, second = split_state(model)
    names = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
    weight_map: dict[str, str] = {}
    for shard, state in zip(names, (first, second), strict=True):
        torch.save(state, tmp_path / shard)
        weight_map.update(dict.fromkeys(state, shard))
    index = write_index(tmp_path / "pytorch_model.bin.index.json", weight_map)
    (description,) = read_sharded_index(index)
    assert description.format == "pytorch"
    assert description.path == str(index)
    assert [c.name for c in description.convs] == RESNET_CONVS
    assert all(c.followed_by == "BatchNorm" for c in description.convs)
    # Both shards have a storage "0": qualified per shard, they must not be merged as aliases.
    assert description.model_params == n_params(model)
    reference = describe_state_dict(
        {k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()},
        path=str(index), format="pytorch",
    )  # fmt: skip
    assert description.convs == reference.convs


def test_pytorch_shards_storage_keys_never_alias_across_files(tmp_path: Path) -> None:
    # Same storage key ("0"), offset, shape and dtype in both files, yet different tensors.
    torch.save({"a": torch.zeros(4)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.ones(4)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = write_index(
        tmp_path / "pytorch_model.bin.index.json",
        {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"},
    )
    (description,) = read_sharded_index(index)
    assert description.model_params == 8


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("/etc/passwd", "shard '/etc/passwd': absolute paths are not allowed"),
        ("C:\\model.safetensors", "absolute paths are not allowed"),
        ("\\\\server\\share\\m.safetensors", "absolute paths are not allowed"),
        ("../outside.safetensors", "shard '../outside.safetensors': '..' is not allowed in shard paths"),
        ("sub/../../outside.safetensors", "'..' is not allowed in shard paths"),
        ("..\\outside.safetensors", "'..' is not allowed in shard paths"),
        ("", "shard '': empty or invalid file name"),
    ],
)
def test_shard_paths_that_escape_are_rejected(tmp_path: Path, shard: str, message: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    index = write_index(folder / "model.safetensors.index.json", {"a": shard})
    for call in (read_sharded_index, shard_files):
        with pytest.raises(MalformedModelError) as caught:
            call(index)
        assert message in str(caught.value)


def test_symlinked_shards(tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, str(outside))
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside, folder / "escape.safetensors")
    index = write_index(folder / "model.safetensors.index.json", {"a": "escape.safetensors"})
    with pytest.raises(
        MalformedModelError, match=exactly("shard 'escape.safetensors': resolves outside the index's folder")
    ):
        read_sharded_index(index)
    os.symlink(folder, folder / "loop")  # a link that stays inside is fine
    save_file({"a": torch.zeros(2)}, str(folder / "inside.safetensors"))
    inside = write_index(folder / "model.safetensors.index.json", {"a": "loop/inside.safetensors"})
    (description,) = read_sharded_index(inside)
    assert description.model_params == 2


def test_missing_shard_and_missing_tensor(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    index = write_index(
        tmp_path / "model.safetensors.index.json", {"a": "one.safetensors", "b": "two.safetensors"}
    )
    with pytest.raises(
        MalformedModelError, match=exactly("shard 'two.safetensors' listed in the index does not exist")
    ):
        read_sharded_index(index)
    index = write_index(
        tmp_path / "model.safetensors.index.json", {"a": "one.safetensors", "b": "one.safetensors"}
    )
    with pytest.raises(
        MalformedModelError,
        match=exactly("tensor 'b' is listed for shard 'one.safetensors' but is not in it"),
    ):
        read_sharded_index(index)


def test_errors_inside_a_shard_name_the_shard(tmp_path: Path) -> None:
    write_raw(tmp_path / "bad.safetensors", b'{"a": }')
    index = write_index(tmp_path / "model.safetensors.index.json", {"a": "bad.safetensors"})
    with pytest.raises(MalformedModelError, match=r"^shard 'bad.safetensors': header is not valid JSON"):
        read_sharded_index(index)


def test_tensor_in_two_shards_keeps_the_mapped_one(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    index = write_index(
        tmp_path / "model.safetensors.index.json", {"a": "two.safetensors", "b": "one.safetensors"}
    )
    (description,) = read_sharded_index(index)
    assert description.model_params == 5
    assert description.warnings == (
        "shard 'one.safetensors' also holds 1 tensor ('a') that the index maps to other shards;"
        " those copies were ignored",
    )


def test_tensors_repeated_across_shards_make_one_warning_per_shard(tmp_path: Path) -> None:
    # The index maps only "keep"; 7 unlisted tensors appear in both shards and 7 listed ones
    # appear again in a shard they are not mapped to: two warnings, not fourteen.
    repeated = {f"r{index}": torch.zeros(1) for index in range(7)}
    listed = {f"m{index}": torch.zeros(1) for index in range(7)}
    save_file({**repeated, **listed}, str(tmp_path / "a.safetensors"))
    weight_map = dict.fromkeys(listed, "a.safetensors")
    weight_map["keep"] = "b.safetensors"
    save_file({**repeated, **listed, "keep": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    index = write_index(tmp_path / "model.safetensors.index.json", weight_map)
    (description,) = read_sharded_index(index)
    assert description.model_params == 15
    assert description.warnings == (
        "shard 'b.safetensors' also holds 7 tensors ('m0', 'm1', 'm2', 'm3', 'm4', ...) that the"
        " index maps to other shards; those copies were ignored",
        "shard 'b.safetensors' repeats 7 tensors ('r0', 'r1', 'r2', 'r3', 'r4', ...) already read"
        " from an earlier shard; the first copies were kept",
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[]", "index is not a JSON object"),
        (b'{"metadata": {}}', "index has no 'weight_map' object"),
        (b'{"weight_map": {"a": 3}}', "weight_map entry 'a' is not a file name"),
        (b'{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "duplicate key 'a' in index"),
        (
            b'{"weight_map": {"a\\ud800": "x.safetensors"}}',
            "index is not valid JSON: lone surrogate in string 'a\\ud800'",
        ),
        (
            b'{"weight_map": {"a": "\\udc00x.safetensors"}}',
            "index is not valid JSON: lone surrogate in string '\\udc00x",
        ),
        (b'{"weight_map": ', "index is not valid JSON: Expecting value"),
        (b'{"\xff": 1}', "index is not valid UTF-8"),
    ],
)
def test_malformed_index(tmp_path: Path, content: bytes, message: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(MalformedModelError) as caught:
        read_sharded_index(index)
    assert str(caught.value).startswith(message)


def test_index_format_comes_from_the_index_name(tmp_path: Path) -> None:
    # The format sniffer sends only biasinspect.detect.INDEX_SUFFIXES names here (one list,
    # shared with the sharded reader); nothing else is read as an index.
    save_file({"a": torch.zeros(2)}, str(tmp_path / "part1.safetensors"))
    index = write_index(tmp_path / "weights.index.json", {"a": "part1.safetensors"})
    with pytest.raises(
        UnsupportedFormatError, match=r"^not a shard index name: expected a name ending in one of"
    ):
        read_sharded_index(index)
    index = write_index(tmp_path / "Model.SafeTensors.Index.JSON", {"a": "part1.safetensors"})
    (description,) = read_sharded_index(index)
    assert description.format == "safetensors" and description.model_params == 2


def test_shard_names_with_non_ascii_digits(tmp_path: Path) -> None:
    # '²'.isdigit() is true but int('²') fails: natural order must not parse it.
    save_file({"a": torch.zeros(2)}, str(tmp_path / "\u00b2.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "\u0663-2.safetensors"))
    index = write_index(
        tmp_path / "model.safetensors.index.json", {"a": "\u00b2.safetensors", "b": "\u0663-2.safetensors"}
    )
    (description,) = read_sharded_index(index)
    assert description.model_params == 5
