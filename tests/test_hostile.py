"""Hostile and broken files, end to end through the CLI (issue 4).

Whatever the input, biasinspect must end with a report or exactly one line
``biasinspect: PATH: reason`` and exit code 2 -- never a traceback, a hang, unbounded memory, or
anything executed or imported from the file.  Every file is generated here (see
tests/hostile_files.py); the would-be payloads only create marker files, and each test asserts
that no marker appears.  Time bounds are enforced by pytest-timeout, memory bounds (where a
bomb could blow memory) by running the CLI in a subprocess and reading its peak RSS.
"""

from __future__ import annotations

import io
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hostile_files as hf
import pytest

from biasinspect.cli import main

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
PEAK_RSS_LIMIT_MIB = 1024
"""A bomb that was inflated or expanded would need gigabytes; a capped reader needs ~100 MiB."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def run_cli(*argv: str | Path) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = main([str(arg) for arg in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: str | Path) -> tuple[int, dict[str, Any], str]:
    """Run the CLI with ``--format json``; return (exit code, parsed report, stderr)."""
    code, out, err = run_cli(*argv, "--format", "json")
    assert "Traceback" not in err
    return code, json.loads(out), err


def assert_one_line_error(code: int, err: str, path: Path, *fragments: str) -> str:
    """Exit 2 and exactly one clean stderr line naming ``path``; return the reason."""
    assert code == 2, err
    assert err.count("\n") == 1, err
    prefix = f"biasinspect: {path}: "
    assert err.startswith(prefix), err
    reason = err[len(prefix) :].rstrip("\n")
    assert reason, err
    assert "Traceback" not in err
    assert "internal error" not in reason, reason  # a non-BiasInspectError escaped a reader
    for fragment in fragments:
        assert fragment.lower() in reason.lower(), (fragment, reason)
    return reason


def expect_clean_error(path: Path, *fragments: str) -> str:
    """Inspect ``path`` and require exit 2 with one clean line; return the reason."""
    code, out, err = run_cli(path, "--format", "json")
    reason = assert_one_line_error(code, err, path, *fragments)
    data = json.loads(out)
    assert data["models"] == []
    assert data["errors"] == [{"path": str(path), "message": reason}]
    return reason


def expect_report_or_clean_error(path: Path) -> dict[str, Any] | None:
    """Where the issue allows either outcome: a report (returned) or one clean error line (None)."""
    code, out, err = run_cli(path, "--format", "json")
    if code == 0:
        assert err == ""
        (model,) = json.loads(out)["models"]
        return model  # type: ignore[no-any-return]
    assert_one_line_error(code, err, path)
    return None


def only_model(data: dict[str, Any]) -> dict[str, Any]:
    """The single model of a JSON report."""
    assert data["errors"] == []
    (model,) = data["models"]
    return model  # type: ignore[no-any-return]


def assert_seed_conv(model: dict[str, Any]) -> None:
    """The seed checkpoints hold one Conv2d(3, 8, 3) with a tied bias."""
    (layer,) = model["layers"]
    assert layer["name"] == "conv"
    assert layer["weight_shape"] == list(hf.SEED_CONV_SHAPE)
    assert layer["bias"]["kind"] == "tied"
    assert layer["bias"]["shape"] == [8]


def run_in_subprocess(argv: list[str], cwd: Path) -> dict[str, Any]:
    """Run the CLI in a fresh interpreter whose cwd (first on sys.path, as with ``python -c``) is
    ``cwd``; return its exit code, output, whether ``evilmod`` got imported, and peak RSS."""
    script = textwrap.dedent(
        """
        import io, json, sys
        from pathlib import Path
        from biasinspect.cli import main
        out, err = io.StringIO(), io.StringIO()
        code = main(sys.argv[2:], stdout=out, stderr=err)
        # VmHWM, not getrusage's ru_maxrss: that one keeps the forking pytest process's peak
        # across exec, so it would measure pytest (with torch loaded), not this run.
        status = Path("/proc/self/status").read_text().splitlines()
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        result = {"code": code, "out": out.getvalue(), "err": err.getvalue(),
                  "evilmod": "evilmod" in sys.modules,
                  "peak_rss_mib": peak_kib / 1024}
        with open(sys.argv[1], "w") as handle:
            json.dump(result, handle)
        """
    )
    result_file = cwd / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(result_file), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr  # the harness itself must not crash
    assert "Traceback" not in completed.stderr
    result: dict[str, Any] = json.loads(result_file.read_text())
    result_file.unlink()
    return result


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """Where a payload would leave its mark; asserted absent after every test that uses it."""
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a pickle payload was executed"


@pytest.fixture
def evil_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder holding ``evilmod.py``, which marks its import (and its ``boom()`` call)."""
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "evilmod.py").write_text(hf.EVILMOD_SOURCE)
    yield folder
    assert not (folder / "IMPORTED_MARKER").exists(), "evilmod was imported"
    assert not (folder / "BOOM_MARKER").exists(), "evilmod.boom was called"
    assert "evilmod" not in sys.modules


def assert_payload_reported(model: dict[str, Any], payload: hf.Payload) -> None:
    """The payload's callables are named in a warning, and (for the dangerous families: os,
    subprocess, builtins.exec, ...) listed in unsafe_callables."""
    for name in payload.callables:
        assert any(name in warning for warning in model["warnings"]), (name, model["warnings"])
        if payload.dangerous_family:
            assert name in model["unsafe_callables"], (name, model["unsafe_callables"])


def check_hostile_state_dict(path: Path, payload: hf.Payload) -> None:
    """A state dict with a payload entry: the conv is reported, the payload named, nothing run;
    ``--fail-on unsafe`` turns it into exit 1 with one policy line naming the callables."""
    code, data, err = run_json(path)
    assert (code, err) == (0, ""), err
    model = only_model(data)
    assert_seed_conv(model)
    assert_payload_reported(model, payload)
    code, _, err = run_cli(path, "--fail-on", "unsafe")
    if not payload.dangerous_family:
        assert (code, err) == (0, "")  # an unknown global is warned about, not an --fail-on unsafe match
        return
    assert code == 1
    assert err.count("\n") == 1 and "--fail-on unsafe" in err
    for name in payload.callables:
        assert name in err


PAYLOAD_IDS = [payload.name for payload in hf.PAYLOADS]


def _payload_protocols() -> list[tuple[hf.Payload, int]]:
    return [
        (payload, protocol)
        for payload in hf.PAYLOADS
        for protocol in range(payload.min_protocol, payload.max_protocol + 1)
    ]


# ---------------------------------------------------------------------------------------------
# Pickles that would run code
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "protocol"),
    _payload_protocols(),
    ids=[f"{payload.name}-p{protocol}" for payload, protocol in _payload_protocols()],
)
def test_plain_pickle_state_dict_with_payload(tmp_path, marker, evil_folder, payload, protocol):
    """pickle.dumps(state_dict, protocol) + a payload entry (GLOBAL below protocol 4, STACK_GLOBAL from 4)."""
    fragment = hf.payload_fragment(payload, protocol, str(marker), str(evil_folder))
    path = tmp_path / "model.pkl"
    path.write_bytes(hf.splice_into_dict_pickle(hf.seed_plain_pickle(protocol), fragment))
    check_hostile_state_dict(path, payload)


@pytest.mark.parametrize(
    ("payload", "protocol"),
    _payload_protocols(),
    ids=[f"{payload.name}-p{protocol}" for payload, protocol in _payload_protocols()],
)
def test_pickle_that_is_only_a_payload(tmp_path, marker, evil_folder, payload, protocol):
    """A .pkl holding nothing but the payload: a report naming the callables, or a clean error."""
    path = tmp_path / "payload.pkl"
    path.write_bytes(hf.payload_pickle(payload, protocol, str(marker), str(evil_folder)))
    model = expect_report_or_clean_error(path)
    if model is not None:
        assert model["layers"] == []
        assert_payload_reported(model, payload)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", hf.PAYLOADS, ids=PAYLOAD_IDS)
def test_torch_zip_with_payload_in_data_pkl(tmp_path, marker, evil_folder, payload, protocol):
    """A real torch.save zip whose data.pkl was rewritten to carry a payload entry."""
    fragment = hf.payload_fragment(payload, protocol, str(marker), str(evil_folder))
    path = tmp_path / "model.pt"
    path.write_bytes(
        hf.replace_zip_member(
            hf.seed_torch_zip(), "/data.pkl", lambda old: hf.splice_into_dict_pickle(old, fragment)
        )
    )
    check_hostile_state_dict(path, payload)


@pytest.mark.parametrize("payload", hf.PAYLOADS, ids=PAYLOAD_IDS)
def test_torch_zip_with_data_pkl_swapped_for_payload(tmp_path, marker, evil_folder, payload):
    """data.pkl replaced wholesale by a hand-written pickle: nothing runs; report or clean error."""
    protocol = max(2, payload.min_protocol)
    path = tmp_path / "model.pt"
    path.write_bytes(
        hf.replace_zip_member(
            hf.seed_torch_zip(),
            "/data.pkl",
            lambda _old: hf.payload_pickle(payload, protocol, str(marker), str(evil_folder)),
        )
    )
    model = expect_report_or_clean_error(path)
    if model is not None:
        assert_payload_reported(model, payload)


@pytest.mark.parametrize("payload", hf.PAYLOADS, ids=PAYLOAD_IDS)
def test_legacy_torch_file_with_payload(tmp_path, marker, evil_folder, payload):
    """torch.save(..., _use_new_zipfile_serialization=False) with the object pickle rewritten."""
    data = hf.seed_torch_legacy()
    start, end = hf.legacy_pickle_spans(data)[3]
    fragment = hf.payload_fragment(payload, 2, str(marker), str(evil_folder))
    path = tmp_path / "legacy.pt"
    path.write_bytes(data[:start] + hf.splice_into_dict_pickle(data[start:end], fragment) + data[end:])
    check_hostile_state_dict(path, payload)


@pytest.mark.parametrize("payload", hf.PAYLOADS, ids=PAYLOAD_IDS)
def test_torchscript_with_payload_attribute(tmp_path, marker, evil_folder, payload):
    """A torch.jit.save archive whose data.pkl gives the module one more attribute: a payload."""
    fragment = hf.payload_fragment(payload, 2, str(marker), str(evil_folder), key="evil_attribute")
    path = tmp_path / "scripted.pt"
    path.write_bytes(
        hf.replace_zip_member(
            hf.seed_torchscript(), "/data.pkl", lambda old: hf.splice_before_last_build(old, fragment)
        )
    )
    code, data, err = run_json(path)
    if code == 0:
        model = only_model(data)
        assert model["format"] == "torchscript"
        assert_seed_conv(model)
        assert_payload_reported(model, payload)
    else:
        assert_one_line_error(code, err, path)


def test_torchscript_with_data_pkl_swapped(tmp_path, marker, evil_folder):
    """TorchScript archive whose data.pkl is only an os.system call."""
    payload = hf.PAYLOADS[0]
    path = tmp_path / "scripted.pt"
    path.write_bytes(
        hf.replace_zip_member(
            hf.seed_torchscript(),
            "/data.pkl",
            lambda _old: hf.payload_pickle(payload, 2, str(marker), str(evil_folder)),
        )
    )
    model = expect_report_or_clean_error(path)
    if model is not None:
        assert_payload_reported(model, payload)


def test_polyglot_pickle_with_zip_appended(tmp_path, marker, evil_folder):
    """A hostile pickle followed by a whole torch zip: read as the pickle it starts with."""
    payload = hf.PAYLOADS[0]
    fragment = hf.payload_fragment(payload, 2, str(marker), str(evil_folder))
    hostile = hf.splice_into_dict_pickle(hf.seed_plain_pickle(4), fragment)
    path = tmp_path / "polyglot.pt"
    path.write_bytes(hostile + hf.seed_torch_zip())
    check_hostile_state_dict(path, payload)


@pytest.mark.parametrize(
    ("container", "payload_name"),
    [
        ("pkl", "evilmod.boom"),
        ("pkl", "importlib.import_module"),
        ("pkl", "runpy.run_path"),
        ("zip", "evilmod.boom"),
        ("legacy", "evilmod.boom"),
        ("torchscript", "evilmod.boom"),
    ],
)
def test_module_in_cwd_and_model_folder_is_never_imported(evil_folder, container, payload_name):
    """evilmod.py sits in the cwd (first on sys.path) and next to the model: never imported."""
    payload = next(item for item in hf.PAYLOADS if item.name == payload_name)
    marker = evil_folder / "PAYLOAD_RAN"
    fragment = hf.payload_fragment(payload, 2, str(marker), str(evil_folder))
    if container == "pkl":
        data = hf.splice_into_dict_pickle(hf.seed_plain_pickle(4), fragment)
    elif container == "zip":
        data = hf.replace_zip_member(
            hf.seed_torch_zip(), "/data.pkl", lambda old: hf.splice_into_dict_pickle(old, fragment)
        )
    elif container == "legacy":
        legacy = hf.seed_torch_legacy()
        start, end = hf.legacy_pickle_spans(legacy)[3]
        data = legacy[:start] + hf.splice_into_dict_pickle(legacy[start:end], fragment) + legacy[end:]
    else:
        data = hf.replace_zip_member(
            hf.seed_torchscript(), "/data.pkl", lambda old: hf.splice_before_last_build(old, fragment)
        )
    path = evil_folder / f"model.{'pkl' if container == 'pkl' else 'pt'}"
    path.write_bytes(data)
    result = run_in_subprocess([str(path), "--format", "json"], cwd=evil_folder)
    assert result["evilmod"] is False
    assert not marker.exists()
    if container == "torchscript" and result["code"] == 2:
        assert_one_line_error(result["code"], result["err"], path)
        return
    assert (result["code"], result["err"]) == (0, "")
    model = only_model(json.loads(result["out"]))
    assert_payload_reported(model, payload)


# ---------------------------------------------------------------------------------------------
# Pickle structure bombs
# ---------------------------------------------------------------------------------------------


def _junk_state_dict(tmp_path: Path, junk: bytes, name: str = "model.pt") -> Path:
    """A torch zip whose state dict has one more entry, ``junk`` (opcodes pushing key + value)."""
    path = tmp_path / name
    path.write_bytes(
        hf.replace_zip_member(
            hf.seed_torch_zip(), "/data.pkl", lambda old: hf.splice_into_dict_pickle(old, junk)
        )
    )
    return path


def _billion_laughs(levels: int = 40, fanout: int = 10) -> bytes:
    # Level k is a list holding `fanout` references to level k-1: 10**40 leaves if expanded.
    asm = hf.PickleAsm(2)
    asm.string("junk")
    asm.mark().string("lol").list_from_mark()
    slot = asm.put()
    for _ in range(levels):
        asm.pop().mark()
        for _ in range(fanout):
            asm.get(slot)
        asm.list_from_mark()
        slot = asm.put()
    return bytes(asm.out)


def _dup_self_reference(count: int = 100_000) -> bytes:
    # EMPTY_LIST, then (DUP, APPEND) x count: one list holding itself `count` times (a cycle).
    return b"X\x04\x00\x00\x00junk]" + b"2a" * count


def _nested(count: int, open_op: bytes, close_op: bytes) -> bytes:
    return b"X\x04\x00\x00\x00junk" + open_op * count + close_op * (count - 1)


@pytest.mark.parametrize(
    ("name", "junk"),
    [
        ("billion-laughs", _billion_laughs()),
        ("dup-self-reference", _dup_self_reference()),
        ("dup-wide", b"X\x04\x00\x00\x00junk(]" + b"2" * 1_000_000 + b"l"),
    ],
)
def test_shared_reference_bombs_are_walked_once(tmp_path, name, junk):
    """Shared and cyclic references: identity tracking keeps the walk small; the conv is reported."""
    path = _junk_state_dict(tmp_path, junk)
    code, data, err = run_json(path)
    assert (code, err) == (0, ""), err
    assert_seed_conv(only_model(data))


@pytest.mark.parametrize(
    ("name", "junk"),
    [
        ("nested-lists", _nested(100_000, b"]", b"a")),
        ("nested-tuples", b"X\x04\x00\x00\x00junk]" + b"\x85" * 100_000),
        ("nested-dicts", b"X\x04\x00\x00\x00junk" + b"}X\x01\x00\x00\x00k" * 100_000 + b"}" + b"s" * 100_000),
    ],
)
def test_deeply_nested_containers(tmp_path, name, junk):
    """10**5 levels of nesting: the walk is depth-capped -- a report of the conv or a clean error."""
    path = _junk_state_dict(tmp_path, junk)
    code, data, err = run_json(path)
    if code == 0:
        assert err == ""
        assert_seed_conv(only_model(data))
    else:
        assert_one_line_error(code, err, path)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("get-missing-memo", b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x07s."),
        ("long-get-missing", b"\x80\x02]j\xff\xff\xff\x7fa."),
        ("truncated", b"\x80\x02}q\x00(X\x10\x00\x00\x00conv."),
        ("bad-opcode", b"\x80\x02}\xff."),
        ("stack-underflow", b"\x80\x02s."),
        ("no-stop", b"\x80\x02}" + b"N0" * 1000),
        ("pop-mark-without-mark", b"\x80\x021N."),
        ("huge-binunicode-length", b"\x80\x02X\xff\xff\xff\xff."),
    ],
)
def test_malformed_pickles_are_clean_errors(tmp_path, name, data):
    """Memo tricks, truncation and invalid opcodes: MalformedModelError, one line."""
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    expect_clean_error(path)


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------


def _rebuilt_seed_zip(**lies: Any) -> bytes:
    """The seed torch zip re-written by hand (stored members); ``lies`` patch data.pkl's entry."""
    source = zipfile.ZipFile(io.BytesIO(hf.seed_torch_zip()))
    entries = []
    for info in source.infolist():
        entry = hf.stored_entry(info.filename, source.read(info))
        if info.filename.endswith("/data.pkl"):
            for key, value in lies.items():
                setattr(entry, key, value)
        entries.append(entry)
    return hf.build_zip(entries)


def test_hand_built_zip_control_is_read(tmp_path):
    """Control for the header-disagreement cases: the same zip without lies is a normal report."""
    path = tmp_path / "honest.pt"
    path.write_bytes(_rebuilt_seed_zip())
    code, data, err = run_json(path)
    assert (code, err) == (0, "")
    assert_seed_conv(only_model(data))


@pytest.mark.parametrize(
    ("name", "lies"),
    [
        ("local-name", {"local_name": "archive/data.pkX"}),
        ("local-uncompressed-size", {"local_uncompressed_size": 5}),
        ("local-compressed-size", {"local_compressed_size": 1 << 30}),
        ("local-method", {"local_method": 8}),
        ("central-size", {"uncompressed_size": 3, "compressed_size": 3}),
        ("crc", {"crc": 12345}),
    ],
)
def test_local_and_central_headers_disagree(tmp_path, name, lies):
    """Local header vs central directory (or CRC) disagreement: refused, naming the member."""
    path = tmp_path / f"{name}.pt"
    path.write_bytes(_rebuilt_seed_zip(**lies))
    expect_clean_error(path, "data.pkl")


def test_central_directory_offset_points_elsewhere(tmp_path):
    """Every central entry's offset shifted: local headers are not where the directory says."""
    source = zipfile.ZipFile(io.BytesIO(hf.seed_torch_zip()))
    entries = [hf.stored_entry(info.filename, source.read(info)) for info in source.infolist()]
    path = tmp_path / "shifted.pt"
    path.write_bytes(hf.build_zip(entries, central_offset_delta=7))
    expect_clean_error(path)


@pytest.mark.parametrize("honest_size", [True, False], ids=["declared-3GiB", "declared-100B"])
def test_zip_bomb_is_capped(tmp_path, honest_size):
    """data.pkl deflates from ~3 MB to 3 GiB: refused quickly, with bounded memory."""
    path = tmp_path / "bomb.pt"
    path.write_bytes(hf.zip_bomb(honest_size=honest_size))
    assert path.stat().st_size < 4 * 1024 * 1024
    result = run_in_subprocess([str(path)], cwd=tmp_path)
    assert result["out"] == ""
    assert_one_line_error(result["code"], result["err"], path, "data.pkl")
    assert result["peak_rss_mib"] < PEAK_RSS_LIMIT_MIB


def test_zip_bomb_in_a_non_pickle_member_is_never_inflated(tmp_path):
    """A bomb in a storage member (data/0): storages are never read, so the conv is reported."""
    source = zipfile.ZipFile(io.BytesIO(hf.seed_torch_zip()))
    entries = []
    for info in source.infolist():
        if info.filename.endswith("/data/0"):
            stream = hf.zero_bomb_stream(2048)
            entries.append(hf.ZipEntry(info.filename, stream, 8, 0, len(stream), 2048 << 20))
        else:
            entries.append(hf.stored_entry(info.filename, source.read(info)))
    path = tmp_path / "storage_bomb.pt"
    path.write_bytes(hf.build_zip(entries))
    result = run_in_subprocess([str(path), "--format", "json"], cwd=tmp_path)
    assert result["peak_rss_mib"] < PEAK_RSS_LIMIT_MIB
    assert (result["code"], result["err"]) == (0, "")
    assert_seed_conv(only_model(json.loads(result["out"])))


@pytest.mark.parametrize("cut", ["half", "no-end-record", "last-byte", "first-100"])
def test_truncated_torch_zip(tmp_path, cut):
    """A torch zip cut short loses its central directory: a clean error."""
    data = hf.seed_torch_zip()
    keep = {
        "half": len(data) // 2,
        "no-end-record": len(data) - 22,
        "last-byte": len(data) - 1,
        "first-100": 100,
    }
    path = tmp_path / f"{cut}.pt"
    path.write_bytes(data[: keep[cut]])
    expect_clean_error(path)


def test_png_renamed_pt(tmp_path):
    path = tmp_path / "photo.pt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    expect_clean_error(path, "PNG")


def test_text_renamed_pt(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("These are my notes, not a model.\n")
    expect_clean_error(path, "text")


def test_zip_that_is_not_a_model(tmp_path):
    """A plain zip of text files, named .pt."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    path = tmp_path / "archive.pt"
    path.write_bytes(buffer.getvalue())
    expect_clean_error(path)


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["first-10", "half", "last-byte"])
def test_truncated_onnx(tmp_path, cut):
    data = hf.seed_onnx()
    keep = {"first-10": 10, "half": len(data) // 2, "last-byte": len(data) - 1}[cut]
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:keep])
    expect_clean_error(path)


def test_random_bytes_onnx(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(random.Random(4).randbytes(4096))
    expect_clean_error(path)


def test_empty_onnx(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    expect_clean_error(path, "empty")


def test_text_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("graph {\n  node { op_type: 'Conv' }\n}\n")
    expect_clean_error(path, "text")


def test_if_nested_past_protobuf_depth_limit(tmp_path):
    """300 nested If levels (900 message levels), written by hand: a clean limit error."""
    path = tmp_path / "deep.onnx"
    path.write_bytes(hf.deeply_nested_if_onnx(300))
    expect_clean_error(path)


def test_if_nested_25_levels_is_reported_exactly(tmp_path):
    """Moderate nesting still works: exactly one tied conv per level."""
    path = tmp_path / "nested25.onnx"
    path.write_bytes(hf.nested_if_onnx(25))
    code, data, err = run_json(path)
    assert (code, err) == (0, "")
    model = only_model(data)
    assert model["totals"]["conv_layers"] == 25
    assert model["totals"]["tied"] == 25
    names = [layer["name"] for layer in model["layers"]]
    assert len(set(names)) == 25
    assert any(name.endswith("conv24") and name.count("then_branch") == 25 for name in names)


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("negative", [-4, 3, 3, 3]),
        ("overflow", [1 << 40, 1 << 40, 3, 3]),
        ("overflow-many", [1 << 16] * 5),
    ],
)
def test_onnx_hostile_initializer_dims(tmp_path, name, dims):
    """Negative dims or a product past int64: MalformedModelError naming the tensor."""
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(
        hf.onnx_conv_model(hf.onnx_tensor("W_hostile", dims), conv_inputs=("X", "W_hostile", "B"))
    )
    expect_clean_error(path, "W_hostile")


def test_onnx_dangling_weight_name(tmp_path):
    """A conv whose weight has no producer: the layer is reported with an unknown weight shape."""
    path = tmp_path / "dangling.onnx"
    path.write_bytes(hf.onnx_conv_model(conv_inputs=("X", "W_nowhere", "B")))
    code, data, err = run_json(path)
    assert (code, err) == (0, "")
    model = only_model(data)
    (layer,) = model["layers"]
    assert layer["weight_shape"] is None
    assert any("W_nowhere" in warning for warning in model["warnings"]), model["warnings"]


def test_onnx_cyclic_graph(tmp_path):
    """Conv -> Add -> back into the Conv: no hang; the conv is reported, or a clean error."""
    path = tmp_path / "cyclic.onnx"
    path.write_bytes(hf.onnx_cyclic())
    model = expect_report_or_clean_error(path)
    if model is not None:
        assert len(model["layers"]) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "inside"])
def test_onnx_external_data_is_never_opened(tmp_path, how):
    """External data at an absolute path, outside via '../', or via a symlink escaping the folder:
    each points at a FIFO, which would block an open() forever.  The report needs no weight data."""
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = outside / "weights.bin"
    os.mkfifo(fifo)
    folder = tmp_path / "model"
    folder.mkdir()
    if how == "absolute":
        location = str(fifo)
    elif how == "dotdot":
        location = "../outside/weights.bin"
    elif how == "symlink":
        (folder / "weights.bin").symlink_to(fifo)
        location = "weights.bin"
    else:
        os.mkfifo(folder / "weights.bin")  # even a plain relative location is never opened
        location = "weights.bin"
    path = folder / "external.onnx"
    path.write_bytes(hf.onnx_conv_model(hf.onnx_external_tensor("W", [4, 3, 3, 3], location)))
    code, data, err = run_json(path)
    assert (code, err) == (0, "")
    model = only_model(data)
    (layer,) = model["layers"]
    assert layer["weight_shape"] == [4, 3, 3, 3]
    assert layer["bias"]["kind"] == "tied"
    if how != "inside":
        assert any("W" in warning and "external" in warning.lower() for warning in model["warnings"]), model[
            "warnings"
        ]


@pytest.mark.timeout(120)
def test_onnx_over_2gib_sparse(tmp_path):
    """A 2.25 GiB ONNX file (a hole for the weight payload) is reported from its structure."""
    path = tmp_path / "huge.onnx"
    size = hf.huge_initializer_onnx(path, [1024, 1024, 24, 24])
    assert size > 2 * 1024**3
    result = run_in_subprocess([str(path), "--format", "json"], cwd=tmp_path)
    assert (result["code"], result["err"]) == (0, "")
    assert result["peak_rss_mib"] < PEAK_RSS_LIMIT_MIB
    (layer,) = only_model(json.loads(result["out"]))["layers"]
    assert layer["weight_shape"] == [1024, 1024, 24, 24]
    assert layer["output_spatial"] == [9, 9]
    assert layer["bias"]["kind"] == "absent"


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

_F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("header-longer-than-file", hf.safetensors_raw(b'{"a": 1}', 0, declared_len=1_000_000), ""),
        ("header-not-object", hf.safetensors_raw(b"[1, 2, 3]"), ""),
        ("header-not-brace", hf.safetensors_raw(b'  "x"   '), ""),
        ("invalid-json", hf.safetensors_raw(b'{"conv.weight": {"dtype": "F32", '), ""),
        ("invalid-utf8", hf.safetensors_raw(b'{"conv.\xff\xfe": {"dtype": "F32"}}'), ""),
        ("length-zero", hf.safetensors_raw(b"", 64, declared_len=0), ""),
        ("tiny-file", b"\x08\x00\x00", ""),
        (
            "overlapping",
            hf.safetensors_json(
                {"conv_a": _F32_2x2, "conv_b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, 24
            ),
            "conv_",
        ),
        (
            "out-of-range",
            hf.safetensors_json({"conv_far": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, 8),
            "conv_far",
        ),
        (
            "size-mismatch",
            hf.safetensors_json({"conv_odd": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, 12),
            "conv_odd",
        ),
        (
            "shape-overflow",
            hf.safetensors_json(
                {"conv_big": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, 16
            ),
            "conv_big",
        ),
        (
            "negative-dim",
            hf.safetensors_json(
                {"conv_neg": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, 16
            ),
            "conv_neg",
        ),
        (
            "unknown-dtype",
            hf.safetensors_json({"conv_dt": {"dtype": "F31", "shape": [2, 2], "data_offsets": [0, 16]}}, 16),
            "conv_dt",
        ),
        (
            "offsets-not-ints",
            hf.safetensors_json(
                {"conv_str": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}}, 16
            ),
            "conv_str",
        ),
        (
            "gap",
            hf.safetensors_json({"conv_gap": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]}}, 20),
            "conv_gap",
        ),
        (
            "duplicate-key",
            hf.safetensors_raw(
                b'{"conv_dup": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                b'"conv_dup": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
                8,
            ),
            "conv_dup",
        ),
    ],
)
def test_hostile_safetensors(tmp_path, name, data, fragment):
    """Every safetensors validation rule: a clean error, naming the tensor where there is one."""
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    expect_clean_error(path, *([fragment] if fragment else []))


def test_safetensors_header_over_100_mb(tmp_path):
    """A header length of 150 MB in a (sparse) file that is big enough: refused by the cap, unread."""
    path = tmp_path / "big_header.safetensors"
    declared = 150 * 1024 * 1024
    with open(path, "wb") as handle:
        handle.write(hf.safetensors_raw(b'{"a":', declared_len=declared))
        handle.truncate(8 + declared + 16)
    result = run_in_subprocess([str(path)], cwd=tmp_path)
    assert_one_line_error(result["code"], result["err"], path)
    assert result["peak_rss_mib"] < 512


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def test_path_that_does_not_exist(tmp_path):
    path = tmp_path / "missing" / "model.onnx"
    code, _, err = run_cli(path)
    assert_one_line_error(code, err, path, "no such file")


def _is_readable_despite_chmod(path: Path) -> bool:
    # Root (as in CI containers) ignores permission bits: find out instead of assuming.
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError:
        return False
    return True


def test_unreadable_file_chmod_000(tmp_path):
    path = tmp_path / "locked.onnx"
    path.write_bytes(hf.seed_onnx())
    path.chmod(0)
    try:
        code, out, err = run_cli(path, "--format", "json")
        if _is_readable_despite_chmod(path):
            assert (code, err) == (0, "")  # running as root: the file really is readable
            assert len(only_model(json.loads(out))["layers"]) == 1
        else:
            assert_one_line_error(code, err, path, "permission denied")
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_file_whose_read_fails_even_for_root(tmp_path):
    """A symlink to /proc/self/mem: a regular file that open() accepts but read() refuses (EIO)."""
    path = tmp_path / "mem.onnx"
    path.symlink_to("/proc/self/mem")
    code, _, err = run_cli(path)
    assert_one_line_error(code, err, path)


def test_folder_with_unreadable_files_reports_the_rest(tmp_path):
    good = tmp_path / "good.onnx"
    good.write_bytes(hf.seed_onnx())
    locked = tmp_path / "locked.onnx"
    locked.write_bytes(hf.seed_onnx())
    locked.chmod(0)
    (tmp_path / "mem.pt").symlink_to("/proc/self/mem")
    try:
        code, data, err = run_json(tmp_path)
        assert code == 2
        failed = {Path(error["path"]).name for error in data["errors"]}
        reported = {Path(model["path"]).name for model in data["models"]}
        if _is_readable_despite_chmod(locked):
            assert (failed, reported) == ({"mem.pt"}, {"good.onnx", "locked.onnx"})
        else:
            assert (failed, reported) == ({"mem.pt", "locked.onnx"}, {"good.onnx"})
        assert err.count("\n") == len(failed)
    finally:
        locked.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_a_scanned_folder_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.onnx")
    (tmp_path / "good.onnx").write_bytes(hf.seed_onnx())
    code, data, err = run_json(tmp_path)
    assert code == 2
    assert [Path(model["path"]).name for model in data["models"]] == ["good.onnx"]
    assert data["errors"] == [{"path": str(tmp_path / "pipe.onnx"), "message": "not a regular file (a FIFO)"}]
    assert err == f"biasinspect: {tmp_path / 'pipe.onnx'}: not a regular file (a FIFO)\n"


def test_device_file_named_explicitly_and_linked_in_a_folder(tmp_path):
    code, _, err = run_cli("/dev/zero")
    assert_one_line_error(code, err, Path("/dev/zero"), "device")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "good.onnx").write_bytes(hf.seed_onnx())
    code, data, err = run_json(tmp_path)
    assert code == 2
    assert [Path(model["path"]).name for model in data["models"]] == ["good.onnx"]
    assert [Path(error["path"]).name for error in data["errors"]] == ["zero.pt"]
    # A link leading outside the scanned folder is not followed, device or not.
    assert data["errors"][0]["message"].startswith("symbolic link leading outside the scanned folder")


def test_symlink_loops_in_a_scanned_folder(tmp_path):
    """A file-symlink loop (a.pt -> b.pt -> a.pt) and a folder link to its parent: no hang."""
    (tmp_path / "good.onnx").write_bytes(hf.seed_onnx())
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "up").symlink_to(tmp_path, target_is_directory=True)
    code, data, err = run_json(tmp_path)
    assert code == 2
    assert [Path(model["path"]).name for model in data["models"]] == ["good.onnx"]
    assert sorted(Path(error["path"]).name for error in data["errors"]) == ["a.pt", "b.pt"]
    assert all("loop" in error["message"] for error in data["errors"])
    assert err.count("\n") == 2


def test_symlink_loop_named_explicitly(tmp_path):
    loop = tmp_path / "self.onnx"
    loop.symlink_to(loop)
    code, _, err = run_cli(loop)
    assert_one_line_error(code, err, loop, "loop")


# ---------------------------------------------------------------------------------------------
# Batches never stop at a bad file
# ---------------------------------------------------------------------------------------------


def test_folder_mixing_bad_files_with_good_models(tmp_path, marker, evil_folder):
    """Bad files of every family next to good models: the good ones are reported, exit 2."""
    good = {
        "good.onnx": hf.seed_onnx(),
        "good.pt": hf.seed_torch_zip(),
        "good.safetensors": hf.seed_safetensors(),
    }
    bad = {
        "bad_truncated.onnx": hf.seed_onnx()[:40],
        "bad_bomb.pt": hf.zip_bomb(512),
        "bad_header.safetensors": hf.safetensors_raw(b"{", declared_len=1 << 40),
        "bad_memo.pkl": b"\x80\x02h\x09.",
        "bad_empty.pth": b"",
        "bad_image.onnx": b"\x89PNG\r\n\x1a\n" + bytes(64),
    }
    for name, data in {**good, **bad}.items():
        (tmp_path / name).write_bytes(data)
    hostile = hf.splice_into_dict_pickle(
        hf.seed_plain_pickle(4), hf.payload_fragment(hf.PAYLOADS[0], 4, str(marker), str(evil_folder))
    )
    (tmp_path / "hostile.pkl").write_bytes(hostile)
    code, data, err = run_json(tmp_path)
    assert code == 2
    reported = sorted(Path(model["path"]).name for model in data["models"])
    assert reported == sorted([*good, "hostile.pkl"])
    failed = sorted(Path(error["path"]).name for error in data["errors"])
    assert failed == sorted(bad)
    assert err.count("\n") == len(bad)
    for line in err.splitlines():
        assert line.startswith(f"biasinspect: {tmp_path}/bad_")
        assert "internal error" not in line
    for model in data["models"]:
        assert model["totals"]["conv_layers"] == 1


def test_batch_of_explicit_paths_never_stops(tmp_path):
    """Explicit paths: good, missing, bad, good -> both good ones reported in order, exit 2."""
    first = tmp_path / "first.onnx"
    first.write_bytes(hf.seed_onnx())
    missing = tmp_path / "missing.pt"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(hf.safetensors_raw(b'{"x": 1', 0))
    code, data, err = run_json(first, missing, bad, SAMPLES / "seed_tied.onnx")
    assert code == 2
    assert [Path(model["path"]).name for model in data["models"]] == ["first.onnx", "seed_tied.onnx"]
    assert [error["path"] for error in data["errors"]] == [str(missing), str(bad)]
    assert err.count("\n") == 2


def test_payloads_are_live_controls(tmp_path):
    """Control for every "no marker" assertion above: under the real unpickler (in a throwaway
    subprocess, inside tmp_path) each payload except NEWOBJ really does leave its mark -- so a
    marker that stays absent under biasinspect proves that nothing ran."""
    folder = tmp_path / "control"
    folder.mkdir()
    (folder / "evilmod.py").write_text(hf.EVILMOD_SOURCE)
    live = [payload for payload in hf.PAYLOADS if payload.name != "NEWOBJ"]
    for number, payload in enumerate(live):
        (folder / f"p{number}.pkl").write_bytes(
            hf.payload_pickle(payload, payload.min_protocol, str(folder / f"M{number}"), str(folder))
        )
    script = textwrap.dedent(
        f"""
        import pathlib, pickle, sys, time
        for number in range({len(live)}):
            for name in ("IMPORTED_MARKER", "BOOM_MARKER"):
                pathlib.Path(name).unlink(missing_ok=True)
            sys.modules.pop("evilmod", None)
            try:
                pickle.loads(pathlib.Path(f"p{{number}}.pkl").read_bytes())
            except Exception:
                pass
            deadline = time.monotonic() + 10
            marks = [pathlib.Path(f"M{{number}}"), pathlib.Path("IMPORTED_MARKER"), pathlib.Path("BOOM_MARKER")]
            while not any(mark.exists() for mark in marks) and time.monotonic() < deadline:
                time.sleep(0.01)  # Popen runs its command asynchronously
            print(number, any(mark.exists() for mark in marks))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=55, check=True
    )
    ran = dict(line.split() for line in completed.stdout.splitlines())
    assert {live[int(number)].name: flag for number, flag in ran.items()} == {
        payload.name: "True" for payload in live
    }


# ---------------------------------------------------------------------------------------------
# Review regressions (TORCH_FIXES 1-5): pickles torch.load would run that we once missed
# ---------------------------------------------------------------------------------------------


def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _mkdir_call(module: str, name: str, target: Path) -> bytes:
    """GLOBAL module/name called with (target,) -- the protocol-4 dotted-attribute trick when
    ``name`` holds dots (pickle resolves it through module attributes)."""
    return f"c{module}\n{name}\n".encode() + b"(" + _binunicode(str(target)) + b"tR"


def _pickle_report(tmp_path: Path, data: bytes, name: str = "payload.pkl") -> dict[str, Any]:
    path = tmp_path / name
    path.write_bytes(data)
    code, report, err = run_json(path)
    assert (code, err) == (0, ""), err
    return only_model(report)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.nn.modules.module", "torch.hub.os.mkdir"),
        ("torch.nn.modules.conv", "torch.hub.load"),
        ("torch.nn.functional", "torch.ops.load_library"),
        ("numpy.dtypes", "np.load"),
        ("torch.jit._pickle", "os.mkdir"),
    ],
)
def test_dotted_attribute_global_is_never_safe(tmp_path, marker, module, name):
    """Protocol >= 4 find_class walks a dotted attribute out of an allow-listed module
    (``torch.nn.modules.module`` + ``torch.hub.os.mkdir`` is ``os.mkdir``): called, it is unsafe."""
    data = b"\x80\x04" + _mkdir_call(module, name, marker) + b"}" + _binunicode("w") + b"K\x01s\x86."
    model = _pickle_report(tmp_path, data)
    assert f"{module}.{name}" in model["unsafe_callables"]
    assert any(f"{module}.{name}" in warning for warning in model["warnings"])


@pytest.mark.timeout(120)
def test_torch_export_archive_with_hidden_data_pkl(tmp_path, marker):
    """A .pt2 with a planted <prefix>/data.pkl: torch.load would unpickle it, so it is read
    inertly and its callables reported next to the export program's conv."""
    import torch

    export = tmp_path / "real.pt2"
    program = torch.export.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),))
    torch.export.save(program, str(export))
    with zipfile.ZipFile(export) as source:
        names = source.namelist()
        members = {name: source.read(name) for name in names}
    prefix = names[0].split("/")[0]
    assert f"{prefix}/data.pkl" not in members
    members[f"{prefix}/data.pkl"] = b"\x80\x02" + _mkdir_call("os", "mkdir", marker) + b"."
    path = tmp_path / "hidden.pt2"
    with zipfile.ZipFile(path, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    code, report, err = run_json(path)
    assert (code, err) == (0, ""), err
    model = only_model(report)
    assert model["format"] == "torch-export"
    assert len(model["layers"]) == 1
    assert model["unsafe_callables"] == ["os.mkdir"]
    assert any("data.pkl" in warning for warning in model["warnings"])


@pytest.mark.timeout(30)
def test_legacy_storage_keys_pickle_with_payload(tmp_path, marker):
    """The 5th pickle of a legacy torch.save file (storage keys) is unpickled by torch.load too."""
    data = hf.seed_torch_legacy()
    start, end = hf.legacy_pickle_spans(data)[4]
    keys = data[start:end]
    assert keys[:2] == b"\x80\x02"
    evil = b"\x80\x02" + _mkdir_call("os", "mkdir", marker) + b"0" + keys[2:]
    path = tmp_path / "legacy.pt"
    path.write_bytes(data[:start] + evil + data[end:])
    code, report, err = run_json(path)
    assert (code, err) == (0, ""), err
    model = only_model(report)
    assert_seed_conv(model)
    assert model["unsafe_callables"] == ["os.mkdir"]


def _legacy_blob(obj: bytes, keys: bytes) -> bytes:
    """A legacy torch.save stream as torch.storage._load_from_bytes receives it."""
    import pickle

    from biasinspect.readers.pickle_inert import LEGACY_MAGIC

    head = pickle.dumps(LEGACY_MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2)
    return head + obj + keys + b"\x00" * 16


def _load_from_bytes(blob: bytes) -> bytes:
    return b"ctorch.storage\n_load_from_bytes\n(B" + len(blob).to_bytes(4, "little") + blob + b"tR"


@pytest.mark.timeout(30)
def test_nested_blob_keys_pickle_and_depth_are_reported(tmp_path, marker):
    """(a) a payload in a nested blob's storage-keys pickle is reported; (b) blobs nested past
    the follow limit are reported as not inspected, never dropped silently."""
    import pickle

    keys = b"\x80\x02" + _mkdir_call("os", "mkdir", marker) + b"0" + pickle.dumps([], 2)[2:]
    blob = _legacy_blob(pickle.dumps(None, 2), keys)
    model = _pickle_report(tmp_path, b"\x80\x03" + _load_from_bytes(blob) + b".", "keys.pkl")
    assert model["unsafe_callables"] == ["os.mkdir"]

    inner = b"\x80\x03" + _mkdir_call("os", "mkdir", marker) + b"."
    for _ in range(3):  # deeper than MAX_NESTED_BLOBS
        inner = _legacy_blob(b"\x80\x03" + _load_from_bytes(inner) + b".", pickle.dumps([], 2))
    model = _pickle_report(tmp_path, b"\x80\x03" + _load_from_bytes(inner) + b".", "deep.pkl")
    assert "<nested storage blob not inspected>" in model["unsafe_callables"]


@pytest.mark.timeout(30)
def test_functions_called_by_allow_listed_helpers(tmp_path, marker):
    """_rebuild_from_type_v2(func, type, args, state) calls func(*args); copyreg._reconstructor
    runs base.__init__: both callables are reported."""
    rebuild = (
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(cnumpy\nsave\nctorch\nTensor\n("
        + _binunicode(str(marker))
        + b"K\x00tNtR."
    )
    model = _pickle_report(tmp_path, rebuild, "rebuild.pkl")
    assert "numpy.save" in model["unsafe_callables"]
    reconstruct = b"ccopyreg\n_reconstructor\n(cmymodels\nNet\ncevilmod\nBase\nNtR."
    model = _pickle_report(tmp_path, reconstruct, "reconstruct.pkl")
    assert "evilmod.Base" in model["unsafe_callables"]
    assert "mymodels.Net" not in model["unsafe_callables"]  # only __new__'d, like NEWOBJ


@pytest.mark.timeout(30)
def test_storage_location_object_graph_is_not_stringified(tmp_path):
    """A storage persistent id whose location is a 100M-element shared list graph (a 200 KB
    file) is read quickly: the location is never turned into text."""
    data = bytearray(b"\x80\x02](" + b"K\x00" * 100_000 + b"eq\x00")  # L = [0] * 100k
    data += b"0](" + b"h\x00" * 1000 + b"eq\x01"  # M = [L] * 1000
    data += b"0}(" + _binunicode("conv.weight")
    data += b"ctorch._utils\n_rebuild_tensor_v2\n((" + _binunicode("storage")
    data += b"ctorch\nFloatStorage\n" + _binunicode("0") + b"h\x01K\x10tQK\x00(K\x10t(K\x01tI00\nNtRu."
    model = _pickle_report(tmp_path, bytes(data), "location.pkl")
    assert model["unsafe_callables"] == []
