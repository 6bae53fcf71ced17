"""Ways past ``--fail-on unsafe`` through reading differentials (issue 10), huge integers
(issue 6) and quadratic module-tree walks (issue 4b).

Each archive case is a file that ``torch.load(weights_only=False)`` reads differently from a
naive inert reader: torch runs the payload (``test_torch_really_runs_every_payload`` proves it,
in a subprocess, with a harmless ``os.mkdir`` marker) while biasinspect used to report a clean
file and exit 0.  Now each is either reported with an unsafe callable (exit 1 under
``--fail-on unsafe``) or refused with one line saying it is treated as unsafe (exit 2).
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hostile_files as hf
import pytest

from biasinspect.api import read_file
from biasinspect.cli import main
from biasinspect.readers.pickle_inert import LEGACY_MAGIC

pytestmark = pytest.mark.timeout(120)


def run_cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(arg) for arg in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def refused_as_unsafe(path: Path, *fragments: str) -> str:
    """Exit 2 (also under --fail-on unsafe), one clean line that says the file counts as unsafe,
    and the JSON error entry carrying the same reason."""
    code, out, err = run_cli(path, "--fail-on", "unsafe", "--format", "json")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"biasinspect: {path}: "), err
    assert "Traceback" not in err and "internal error" not in err
    reason = err[len(f"biasinspect: {path}: ") :].rstrip("\n")
    assert "refused as unsafe" in reason, reason
    for fragment in fragments:
        assert fragment in reason, (fragment, reason)
    assert json.loads(out) == {"models": [], "errors": [{"path": str(path), "message": reason}]} or (
        json.loads(out)["errors"] == [{"path": str(path), "message": reason}]
    )
    return reason


def reported_unsafe(path: Path, callable_name: str) -> dict[str, Any]:
    """A report naming ``callable_name`` as unsafe, and exit 1 under --fail-on unsafe."""
    code, out, err = run_cli(path, "--format", "json")
    assert (code, err) == (0, ""), err
    (model,) = json.loads(out)["models"]
    assert callable_name in model["unsafe_callables"], model
    code, _out, err = run_cli(path, "--fail-on", "unsafe")
    assert code == 1 and callable_name in err, err
    return model  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# The hostile files (marker: a folder os.mkdir would create)


def nested_zip_blob(marker: Path) -> bytes:
    evil = hf.torch_zip_with_data_pkl(hf.mkdir_pickle(str(marker)))
    return hf.storage_blob_pickle(hf.zip_blob_stopping_early(evil))


def two_end_records(marker: Path) -> bytes:
    return hf.two_end_records(hf.seed_torch_zip(), hf.torch_zip_with_data_pkl(hf.mkdir_pickle(str(marker))))


def legacy_tar(marker: Path) -> bytes:
    return hf.legacy_tar(hf.mkdir_pickle(str(marker)))


def computed_magic(marker: Path) -> bytes:
    return hf.computed_magic_legacy(hf.mkdir_pickle(str(marker)))


def computed_magic_blob(marker: Path) -> bytes:
    blob = hf.computed_magic_legacy(hf.mkdir_pickle(str(marker))) + b"\x00" * 8
    return hf.storage_blob_pickle(blob)


def case_folded_data_pkl(marker: Path) -> bytes:
    """Two record pickles equal but for case, the evil one second: miniz's sorted lookup finds
    it (see the control test), we would have read the first."""
    source = zipfile.ZipFile(io.BytesIO(hf.seed_torch_zip()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
            if info.filename.endswith("/data.pkl"):
                target.writestr(info.filename.replace("data.pkl", "Data.pkl"), hf.mkdir_pickle(str(marker)))
    return out.getvalue()


CASES: dict[str, Callable[[Path], bytes]] = {
    "nested-zip-blob": nested_zip_blob,
    "two-end-records": two_end_records,
    "legacy-tar": legacy_tar,
    "computed-magic": computed_magic,
    "computed-magic-blob": computed_magic_blob,
    "case-folded-data-pkl": case_folded_data_pkl,
}


@pytest.mark.timeout(300)
def test_torch_really_runs_every_payload(tmp_path):
    """Control: ``torch.load(weights_only=False)`` on each case creates its marker (so every
    case below is a real way past a reader that reported it clean)."""
    for name, make in CASES.items():
        (tmp_path / f"{name}.pt").write_bytes(make(tmp_path / f"MARK-{name}"))
    script = textwrap.dedent(
        f"""
        import pathlib, warnings, torch
        warnings.simplefilter("ignore")
        for name in {list(CASES)!r}:
            try:
                torch.load(name + ".pt", weights_only=False)
            except Exception:
                pass
            print(name, pathlib.Path("MARK-" + name).exists())
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=280, check=True
    )
    ran = dict(line.split() for line in completed.stdout.splitlines())
    assert ran == dict.fromkeys(CASES, "True"), completed.stderr[-2000:]


def test_nested_zip_blob_is_unsafe(tmp_path):
    """A storage blob in the zip format (torch.load opens it as a checkpoint and unpickles its
    data.pkl) whose local header reads as a 12-byte harmless pickle: reported unsafe."""
    path = tmp_path / "nested.pkl"
    path.write_bytes(nested_zip_blob(tmp_path / "MARK"))
    reported_unsafe(path, "<zip storage blob not inspected>")
    assert not (tmp_path / "MARK").exists()


def test_storage_blob_with_computed_magic_is_unsafe(tmp_path):
    path = tmp_path / "blob.pkl"
    path.write_bytes(computed_magic_blob(tmp_path / "MARK"))
    reported_unsafe(path, "<storage blob torch.load would read differently>")


def test_storage_blob_that_is_not_a_byte_string_is_unsafe(tmp_path):
    """``_load_from_bytes`` given a computed argument: torch.load reads whatever it turns into."""
    data = b"\x80\x03}X\x01\x00\x00\x00wctorch.storage\n_load_from_bytes\n(cbuiltins\nbytearray\n)RtRs."
    path = tmp_path / "computed.pkl"
    path.write_bytes(data)
    reported_unsafe(path, "<storage blob torch.load would read differently>")


def test_two_end_records_refused(tmp_path):
    """The last end record's comment runs past the end of the file: torch and zipfile use it
    (the evil directory), an earlier record would give the harmless one -- refused."""
    path = tmp_path / "two.pt"
    path.write_bytes(two_end_records(tmp_path / "MARK"))
    refused_as_unsafe(path, "the last end record's comment length does not end at the end of the file")


def test_end_record_cut_short_or_trailing_data_refused(tmp_path):
    """The same class: an end-record signature in the last 21 bytes (miniz skips it, zipfile
    fails), or bytes after the comment (readers disagree on which record counts)."""
    seed = hf.seed_torch_zip()
    path = tmp_path / "cut.pt"
    path.write_bytes(seed + b"PK\x05\x06" + b"\x00" * 10)
    refused_as_unsafe(path, "cut short")
    path.write_bytes(seed + b"trailing")
    refused_as_unsafe(path, "the last end record's comment length does not end at the end of the file")


def test_names_equal_but_for_case_refused(tmp_path):
    """miniz looks names up ignoring ASCII case: ``data.pkl`` twice (a/data.pkl, a/Data.pkl)."""
    path = tmp_path / "case.pt"
    path.write_bytes(case_folded_data_pkl(tmp_path / "MARK"))
    refused_as_unsafe(path, "appears twice")


def test_record_name_in_other_case_refused(tmp_path):
    """Only ``a/DATA.PKL``: torch finds and unpickles it; we would not read it -- refused."""
    seed = zipfile.ZipFile(io.BytesIO(hf.seed_torch_zip()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in seed.infolist():
            target.writestr(info.filename.replace("data.pkl", "Data.pkl"), seed.read(info))
    path = tmp_path / "upper.pt"
    path.write_bytes(out.getvalue())
    refused_as_unsafe(path, "other letter case")


def test_legacy_tar_refused_whatever_the_first_header_looks_like(tmp_path):
    """torch.load tries tar before pickle: a tar whose first header reads as ``{}`` (a harmless
    pickle) used to be reported clean; any file with a valid tar header is refused."""
    path = tmp_path / "old.pt"
    path.write_bytes(legacy_tar(tmp_path / "MARK"))
    refused_as_unsafe(path, "tar")
    named_onnx = tmp_path / "old.onnx"  # the suffix does not matter: torch.load ignores it
    named_onnx.write_bytes(path.read_bytes())
    refused_as_unsafe(named_onnx, "tar")


def test_computed_magic_number_refused(tmp_path):
    """First pickle ``torch.serialization.MAGIC_NUMBER`` (a global, equal to the magic under
    torch.load) followed by more pickles: torch reads on; refused rather than reported as a
    one-object plain pickle."""
    path = tmp_path / "magic.pt"
    path.write_bytes(computed_magic(tmp_path / "MARK"))
    refused_as_unsafe(path, "legacy magic number")
    # The version pickle as a global (torch.serialization.PROTOCOL_VERSION equals 1001 too).
    seed = hf.seed_torch_legacy()
    (_, end1), (_, end2), *_ = hf.legacy_pickle_spans(seed)
    path.write_bytes(seed[:end1] + b"\x80\x02ctorch.serialization\nPROTOCOL_VERSION\n." + seed[end2:])
    refused_as_unsafe(path, "protocol version (computed by torch.serialization.PROTOCOL_VERSION)")


def test_pickle_broken_after_a_payload_says_unsafe(tmp_path):
    """A legacy stream whose object pickle calls os.mkdir and then breaks: torch would have run
    the call before failing, so the error line says so."""
    broken = hf.mkdir_pickle(str(tmp_path / "MARK"))[:-1] + b"\xff"
    data = pickle.dumps(LEGACY_MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2) + broken
    path = tmp_path / "broken.pt"
    path.write_bytes(data)
    code, _out, err = run_cli(path, "--fail-on", "unsafe")
    assert code == 2 and err.count("\n") == 1, err
    assert "os.mkdir" in err and "treated as unsafe" in err, err


# ---------------------------------------------------------------------------------------------
# Huge integers (issue 6): one clean "unsupported" line, the good file still reported


def _conv_with(**attrs: object) -> bytes:
    import torch

    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    conv.__dict__.update(attrs)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        ({"groups": 10**5000}, "integer of 16,616 bits, over the 8,192-bit limit"),
        ({"stride": (10**5000, 1)}, "integer of 16,616 bits"),
        ({"groups": 2**100}, "groups = (an integer of 101 bits), outside the 64-bit range"),
        ({"groups": -(2**64)}, "groups = (an integer of 65 bits)"),
    ],
    ids=["5000-digit-groups", "5000-digit-stride", "2**100-groups", "negative-groups"],
)
def test_huge_module_integers_are_unsupported(tmp_path, attrs, fragment):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_conv_with(**attrs))
    good = tmp_path / "good.pt"
    good.write_bytes(hf.seed_torch_zip())
    code, out, err = run_cli(bad, good, "--format", "json")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"biasinspect: {bad}: unsupported: ") and fragment in err, err
    assert "Traceback" not in err and "internal error" not in err
    report = json.loads(out)
    assert [model["path"] for model in report["models"]] == [str(good)]


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (10**5000, "unsupported: the pickle holds an integer of 16,616 bits"),
        (2**8000, "unsupported protocol version (an integer of 8,001 bits)"),
        (-(2**70), "unsupported protocol version (an integer of 71 bits)"),
    ],
    ids=["5000-digits", "8000-bits", "negative-71-bits"],
)
def test_huge_legacy_protocol_version_is_a_clean_error(tmp_path, version, fragment):
    """The legacy file's version pickle holding a huge integer gave "internal error (please
    report)" (its repr passed Python's 4,300-digit limit)."""
    seed = hf.seed_torch_legacy()
    (_, end1), (_, end2), *_ = hf.legacy_pickle_spans(seed)
    path = tmp_path / "version.pt"
    path.write_bytes(seed[:end1] + pickle.dumps(version, 2) + seed[end2:])
    code, _out, err = run_cli(path)
    assert code == 2 and err.count("\n") == 1, err
    assert fragment in err and "internal error" not in err, err


def test_text_pickle_integer_past_the_cap(tmp_path):
    """Protocol 0 spells integers in decimal: past the cap is the same clean line."""
    path = tmp_path / "text.pkl"
    path.write_bytes(b"(dp0\nVw\np1\nI" + b"9" * 5000 + b"\ns.")
    code, _out, err = run_cli(path)
    assert code == 2 and "unsupported: the pickle holds an integer of 5,000 digits" in err, err


# ---------------------------------------------------------------------------------------------
# Quadratic walks (issue 4b)


def test_deeply_nested_convs_cost_what_a_flat_tree_costs(tmp_path):
    """990 nested bias-less convs over 5,000 leaves: each conv's follower search used to re-walk
    its whole subtree (5 million steps; 5.9x the CPU time of a flat tree of as many modules on
    the 2026-12 main).  Now both cost the same, and the answers are unchanged: every nested conv
    is followed by the first BatchNorm inside it (the QAT ConvBn rule), each of the 2,500 leaf
    convs by the BatchNorm after it, except the last (nothing follows it).  CPU time, compared
    within the test, so machine load cancels out; the benchmark (benchmarks/bench_module_tree.py)
    covers 1k-100k modules."""
    flat = tmp_path / "flat.pkl"
    flat.write_bytes(hf.module_tree_pickle.__wrapped__(depth=1, leaves=5_990))
    nested = tmp_path / "nested.pkl"
    nested.write_bytes(hf.module_tree_pickle.__wrapped__(depth=990, leaves=5_000))
    seconds = {}
    for path in (flat, nested):
        start = time.process_time()
        (description,) = read_file(path)
        seconds[path.name] = time.process_time() - start
        followed = [conv.followed_by for conv in description.convs]
        if path is nested:
            assert followed == ["BatchNorm2d"] * (990 + 2_499) + [None]
    assert seconds["nested.pkl"] <= 2.5 * seconds["flat.pkl"] + 0.2, seconds


def test_torch_export_sizes_past_int64_are_unsupported(tmp_path):
    """A .pt2 whose weight size is a 4,000-digit integer (under JSON's 4,300-digit limit) was
    reported, its parameter count printed with 4,000 digits; now "unsupported"."""
    import re

    import torch

    real = tmp_path / "real.pt2"
    torch.export.save(torch.export.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),)), str(real))
    source = zipfile.ZipFile(real)
    for label, big, fragment in [("digits", "9" * 4000, "13,288 bits"), ("bits", str(2**100), "101 bits")]:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for name in source.namelist():
                data = source.read(name)
                if name.endswith("models/model.json"):
                    data, count = re.subn(
                        rb'\{"as_int": ?4\}', b'{"as_int": ' + big.encode() + b"}", data, count=1
                    )
                    assert count == 1
                target.writestr(name, data)
        path = tmp_path / f"{label}.pt2"
        path.write_bytes(out.getvalue())
        code, _out, err = run_cli(path)
        assert code == 2 and err.count("\n") == 1, err
        assert "unsupported: " in err and fragment in err and "64-bit range" in err, err
