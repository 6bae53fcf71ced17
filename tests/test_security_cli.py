"""Security of the command line and folder scans (issue 8): what runs, what is opened, what is printed.

* ``python -m biasinspect`` run from inside a model folder imports nothing from that folder;
* a folder scan does not follow links that leave the folder, and no message quotes file bytes;
* read -> analyse -> render of one file is one guarded step: a bug there is that file's line;
* an ONNX model's external data file is skipped only when it is not itself a model;
* files are opened without blocking and checked on the open descriptor (no stat-then-open);
* control characters from files and paths never reach the terminal raw.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tree_cases import LINK_OUT, SECRET, leaked_forms, safetensors_bytes

from biasinspect.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# --- 1. python -m biasinspect imports nothing from the current folder ------------------------

PLANTED_MODULES = (
    # run-time dependencies and what they import
    "tabulate", "onnx", "numpy", "google", "typing_extensions", "wcwidth",
    # stdlib modules not loaded at interpreter start-up, imported by biasinspect or its deps later
    "__future__", "typing", "json", "csv", "argparse", "struct", "zlib", "mmap", "dataclasses",
    "enum", "pathlib", "ast", "zipfile", "re", "errno", "math", "textwrap", "stat", "io", "os",
)  # fmt: skip
"""Names planted in the working folder; each would drop a marker file when imported.

Not planted: what Python's own ``runpy`` imports for ``-m`` before any biasinspect code runs
(``importlib``, ``warnings``, ``contextlib``...); nothing in a package can prevent that, which is
why the README recommends the console script or ``python -P -m`` in untrusted folders."""


def _plant(folder: Path, name: str, marker: Path) -> None:
    body = f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
    if name in ("onnx", "numpy", "google"):
        package = folder / name
        package.mkdir()
        (package / "__init__.py").write_text(body)
        if name == "google":
            (package / "protobuf").mkdir()
            (package / "protobuf" / "__init__.py").write_text(body)
    else:
        (folder / f"{name}.py").write_text(body)


@pytest.mark.timeout(120)
def test_module_entry_point_imports_nothing_from_the_working_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for sample in ("seed_untied.onnx", "seed_tied.safetensors", "small_cnn.pt"):
        shutil.copy(SAMPLES / sample, models / sample)
    marker = tmp_path / "IMPORTED-FROM-CWD"
    for name in PLANTED_MODULES:
        _plant(models, name, marker)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONSAFEPATH", None)
    outputs = {}
    for fmt in ("table", "csv", "json"):
        result = subprocess.run(
            [sys.executable, "-m", "biasinspect", ".", "-f", fmt],
            cwd=models,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert not marker.exists(), marker.read_text()
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        outputs[fmt] = result.stdout
    assert "seed_untied.onnx (onnx)\n" in outputs["table"]
    assert "3x5x5 x 32 + 32x28x28 = 27,488" in outputs["table"]
    rows = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert sorted({row["path"] for row in rows}) == [
        "seed_tied.safetensors",
        "seed_untied.onnx",
        "small_cnn.pt",
    ]
    report = json.loads(outputs["json"])
    assert [model["path"] for model in report["models"]] == [
        "seed_tied.safetensors",
        "seed_untied.onnx",
        "small_cnn.pt",
    ]
    assert report["errors"] == []
    calc = subprocess.run(
        [sys.executable, "-m", "biasinspect", "calc", "--input", "3x32x32", "--filters", "32x5x5"],
        cwd=models,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert not marker.exists(), marker.read_text()
    assert calc.returncode == 0 and "27,488" in calc.stdout


def test_package_init_runs_no_import_statement() -> None:
    # runpy imports biasinspect/__init__.py before __main__ can clean sys.path.
    import ast

    tree = ast.parse((REPO / "biasinspect" / "__init__.py").read_text())
    top_level_imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert top_level_imports == []


# --- 8. files are opened without blocking and checked on the open descriptor -------------------

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")

_SWAP_RACE = """
import os, sys, threading
from pathlib import Path
from biasinspect.errors import BiasInspectError
from biasinspect.registry import reader_for
from biasinspect.source import open_source

def sniff(path):
    source = open_source(path)
    try:
        return reader_for(source)
    finally:
        source.close()
folder = Path(sys.argv[1])
regular = folder / "regular"
regular.write_bytes(b"\\x80\\x02}q\\x00.")
fifo = folder / "fifo"
os.mkfifo(fifo)
target = folder / "model.pkl"
os.link(regular, target)
stop = False
def swap():
    while not stop:
        for source in (fifo, regular):
            os.link(source, folder / "next")
            os.replace(folder / "next", target)
threading.Thread(target=swap, daemon=True).start()
seen = set()
for _ in range(3000):
    try:
        seen.add(sniff(target).name)
    except BiasInspectError as error:
        seen.add(str(error))
stop = True
print(sorted(seen))
"""


@needs_fifo
def test_a_fifo_swapped_in_while_sniffing_never_blocks(tmp_path: Path) -> None:
    # A thread keeps replacing the name with a FIFO and back; a check on the name followed by a
    # blocking open() hangs within a few hundred rounds (measured: always, before the fix).
    result = subprocess.run(
        [sys.executable, "-c", _SWAP_RACE, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout.replace("'", '"'))) <= {"pickle", "not a regular file (a FIFO)"}


@needs_fifo
@pytest.mark.timeout(20)
def test_read_head_refuses_a_fifo_from_the_descriptor(tmp_path: Path) -> None:
    from biasinspect.detect import read_head
    from biasinspect.errors import UnreadableFileError

    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFileError, match=r"^not a regular file \(a FIFO\)$"):
        read_head(fifo)


_OPENING_CALLS = {"open", "read_bytes", "read_text", "stat", "lstat", "is_file", "exists", "fdopen"}
"""Calls that open a file, or check a name in a way a later open would rely on."""

_ALLOWED_OPENING_CALLS = {
    ("readers/files.py", "os.open"),  # open_regular_file: O_NONBLOCK, then fstat
    ("readers/files.py", "os.fdopen"),
    ("cli.py", "os.open"),  # os.devnull, to silence a broken stdout
    ("readers/_h5worker.py", "os.open"),  # the isolated HDF5 child: O_NONBLOCK, then fstat (no imports)
    ("cli.py", "open"),  # --output: the report file the user names, written, never read
    ("dask_adapter.py", "fsspec.open"),  # the JSONL/Parquet partitions the user asks for, written only
    ("readers/onnx_core.py", "pb_path.is_file"),  # the onnx package's own file, not a user's
}


def _call_name(node: object) -> str | None:
    import ast

    assert isinstance(node, ast.Call)
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{ast.unparse(func.value)}.{func.attr}"
    return None


def test_every_file_is_opened_through_open_regular_file() -> None:
    import ast

    package = REPO / "biasinspect"
    found = []
    for source in sorted(package.rglob("*.py")):
        relative = source.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name is None or name.rsplit(".", 1)[-1] not in _OPENING_CALLS:
                continue
            if (relative, name) not in _ALLOWED_OPENING_CALLS:
                found.append(f"{relative}:{node.lineno}: {name}(...)")
    assert found == []


# --- 9. control characters from files and paths never reach the terminal raw --------------------

HOSTILE_TEXT = "\x1b]0;pwned\x07\x1b[2J\nbiasinspect: other.pt: forged\r\x9b31m\x7f\u202e\u2028\u2029\u2066|x"
"""ESC sequences (window title, clear screen), BEL, a forged line, CR, C1 CSI, DEL, a bidi override,
line/paragraph separators, a bidi isolate and a markdown pipe."""


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A minimal valid safetensors file (float32 zeros) holding tensors of these shapes."""
    path.write_bytes(safetensors_bytes(shapes))


def assert_all_printable(text: str) -> None:
    for line in text.split("\n"):
        assert line.isprintable(), repr(line)


@pytest.fixture
def hostile_names(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    write_safetensors(
        path,
        {
            f"{HOSTILE_TEXT}.weight": [8, 3, 3, 3],
            f"{HOSTILE_TEXT}.bias": [8],
            "=HYPERLINK(1).weight": [4, 8, 1, 1],
        },
    )
    return path


def test_names_from_a_file_are_escaped_in_the_table(hostile_names: Path) -> None:
    code, out, err = run(str(hostile_names))
    assert (code, err) == (0, "")
    assert_all_printable(out)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\nbiasinspect: other.pt: forged\\r\\x9b31m\\x7f\\u202e\\u2028" in out
    assert not any(line.startswith("biasinspect:") for line in out.splitlines())


def test_names_from_a_file_are_escaped_in_markdown(hostile_names: Path) -> None:
    code, out, err = run(str(hostile_names), "-f", "markdown")
    assert (code, err) == (0, "")
    assert_all_printable(out)
    rows = [line for line in out.splitlines() if line.startswith("|")]
    header_columns = rows[0].count("|")
    # A pipe in a name is escaped, so every row has the header's number of column separators.
    assert [row.replace("\\|", "").count("|") for row in rows] == [header_columns] * len(rows)
    assert "\\u2066\\|x" in out


def test_names_from_a_file_are_escaped_in_csv(hostile_names: Path) -> None:
    code, out, err = run(str(hostile_names), "-f", "csv")
    assert (code, err) == (0, "")
    assert_all_printable(out)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2
    names = sorted(row["layer"] for row in rows)
    assert names[0] == "'=HYPERLINK(1)"  # never a spreadsheet formula
    assert names[1].startswith("\\x1b]0;pwned\\x07")


def test_json_keeps_names_exact(hostile_names: Path) -> None:
    code, out, _ = run(str(hostile_names), "-f", "json")
    assert code == 0
    assert out.isascii()
    names = sorted(layer["name"] for layer in json.loads(out)["models"][0]["layers"])
    assert names == sorted(["=HYPERLINK(1)", HOSTILE_TEXT])


def test_a_file_name_cannot_forge_an_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.onnx\nbiasinspect: other.pt: looks fine\x1b[2K"
    bad.write_bytes(b"")
    good = SAMPLES / "seed_tied.onnx"
    for fmt in ("table", "markdown", "csv"):
        code, out, err = run(str(bad), str(good), "-f", fmt)
        assert code == 2
        assert_all_printable(out)
        assert err == (
            f"biasinspect: {tmp_path}/x.onnx\\nbiasinspect: other.pt: looks fine\\x1b[2K: empty file (0 bytes)\n"
        )


def test_a_path_in_a_folder_scan_is_escaped_everywhere(tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    folder.mkdir()
    shutil.copy(SAMPLES / "seed_tied.safetensors", folder / "a\x1b]2;title\x07.safetensors")
    (folder / "b\u202egnp.pt").write_bytes(b"not a model at all, only text\n")
    code, out, err = run(str(folder))
    assert code == 2
    assert_all_printable(out)
    assert_all_printable(err.rstrip("\n"))
    assert f"{folder}/a\\x1b]2;title\\x07.safetensors (safetensors)" in out
    assert err == f"biasinspect: {folder}/b\\u202egnp.pt: not a model file: the file is text\n"
    code, out, _ = run(str(folder), "-f", "csv")
    assert_all_printable(out)


def test_a_reason_taken_from_a_file_is_escaped(tmp_path: Path) -> None:
    # The ONNX reader names the initializer in its reason; the name is the file's, ESC and all.
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto(name=HOSTILE_TEXT, data_type=TensorProto.FLOAT, dims=[-1, 3, 3, 3])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", HOSTILE_TEXT], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[weight],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    for fmt in ("table", "markdown", "csv"):
        code, out, err = run(str(path), str(SAMPLES / "seed_tied.onnx"), "-f", fmt)
        assert code == 2
        assert_all_printable(out)
        assert err.count("\n") == 1 and err.startswith(f"biasinspect: {path}: "), err
        assert_all_printable(err[:-1])
        assert "\\x1b]0;pwned\\x07" in err


# --- 5. no message carries bytes from a file -------------------------------------------------------

LEAK_PROBES = {
    # name: (file name, bytes) chosen to reach each reader's first checks
    "safetensors length": ("a.safetensors", SECRET),
    "onnx first field": ("b.onnx", b"\x08" + SECRET),
    "onnx length": ("c.onnx", b"\x3a\xf7\x9d\x01" + SECRET),
    "onnx anything": ("d.onnx", b"\x9c" + SECRET),
    "pickle length": ("e.pkl", b"\x80\x02X" + SECRET),
    "pickle opcode": ("f.pt", b"\x80\x02" + SECRET[5:]),
    "text pickle length": ("g.pkl", b"(X" + b"hunter2-password\n"),
    "zip": ("h.pt", b"PK\x03\x04" + SECRET),
    "zip end": ("i.pt", b"PK\x05\x06" + SECRET),
    "index": ("j.safetensors.index.json", SECRET),
}


@pytest.mark.parametrize("probe", sorted(LEAK_PROBES))
def test_no_message_quotes_the_bytes_of_a_file(tmp_path: Path, probe: str) -> None:
    name, data = LEAK_PROBES[probe]
    path = tmp_path / name
    path.write_bytes(data)
    code, out, err = run(str(path), "-f", "json")
    assert code == 2, out
    message = json.loads(out)["errors"][0]["message"]
    assert err == f"biasinspect: {path}: {message}\n"
    leaked = [form for form in leaked_forms(data) if form in message]
    assert leaked == [], message


# --- 5. a folder scan does not follow links out of the folder ----------------------------------


def test_a_folder_scan_does_not_follow_links_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_bytes(SECRET)
    shutil.copy(SAMPLES / "seed_tied.onnx", outside / "real.onnx")
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "seed_untied.onnx", folder / "good.onnx")
    (folder / "leak.safetensors").symlink_to(secret)  # the case
    (folder / "sub" / "relative.onnx").symlink_to("../../outside/real.onnx")  # a model, but outside
    (folder / "hop.pt").symlink_to(folder / "sub" / "hop2.pt")  # inside, then out
    (folder / "sub" / "hop2.pt").symlink_to(secret)
    (folder / "inside.onnx").symlink_to("good.onnx")  # inside: followed
    (folder / "dangling.onnx").symlink_to("missing.onnx")
    (folder / "loop.pt").symlink_to("loop.pt")
    (folder / "dir-link").symlink_to(outside)  # folders: never followed
    for fmt in ("table", "csv", "markdown", "json"):
        code, out, err = run(str(folder), "-f", fmt)
        assert code == 2
        assert err.splitlines() == [
            f"biasinspect: {folder}/dangling.onnx: broken symbolic link",
            f"biasinspect: {folder}/loop.pt: symbolic link loop",
            f"biasinspect: {folder}/hop.pt: {LINK_OUT}",
            f"biasinspect: {folder}/leak.safetensors: {LINK_OUT}",
            f"biasinspect: {folder}/sub/hop2.pt: {LINK_OUT}",
            f"biasinspect: {folder}/sub/relative.onnx: {LINK_OUT}",
        ]
        leaked = [form for form in leaked_forms(SECRET) if form in out + err]
        assert leaked == []
        assert "real.onnx" not in out
    models = json.loads(out)["models"]
    assert [model["path"] for model in models] == [f"{folder}/good.onnx", f"{folder}/inside.onnx"]


def test_a_named_link_is_still_read(tmp_path: Path) -> None:
    # The rule is the scan's: a file named on the command line is read wherever it leads.
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(SAMPLES / "seed_untied.onnx", outside / "real.onnx")
    link = tmp_path / "models" / "model.onnx"
    link.parent.mkdir()
    link.symlink_to(outside / "real.onnx")
    code, out, err = run(str(link))
    assert (code, err) == (0, "")
    assert "3x5x5 x 32 + 32x28x28 = 27,488" in out


def test_a_scanned_folder_given_through_a_link_keeps_its_own_links(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(SAMPLES / "seed_untied.onnx", real / "a.onnx")
    (real / "b.onnx").symlink_to("a.onnx")
    (tmp_path / "alias").symlink_to(real)
    code, out, err = run(str(tmp_path / "alias"), "-f", "json")
    assert (code, err) == (0, "")
    assert len(json.loads(out)["models"]) == 2


# --- 6. read -> analyse -> render is one guarded step per file -----------------------------------


def _save_module_with_groups(path: Path, groups: int) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    model[0].groups = groups  # a plain int attribute: torch.save pickles whatever it holds
    torch.save(model, path)


@pytest.mark.parametrize(
    ("groups", "digits"),
    [
        (
            2**70,
            "module '0' has groups = (an integer of 71 bits), outside the 64-bit range torch itself can hold",
        ),
        (
            10**5000,
            "the pickle holds an integer of 16,616 bits, over the 8,192-bit limit (no model value is that large)",
        ),
    ],
    ids=["past-int64", "past-str-limit"],
)
def test_a_number_no_model_has_is_that_files_one_line(tmp_path: Path, groups: int, digits: str) -> None:
    # 10**5000 cannot even be printed (str() refuses ints of over 4,300 digits): it used to end
    # the whole batch in a traceback from the renderer; 2**70 gave a nonsense in_channels.
    bad = tmp_path / "bad.pt"
    _save_module_with_groups(bad, groups)
    good = SAMPLES / "seed_untied.onnx"
    for fmt in ("table", "markdown", "csv", "json"):
        code, out, err = run(str(bad), str(good), "-f", fmt)
        assert code == 2
        assert err == f"biasinspect: {bad}: unsupported: {digits}\n"
        assert "27,488" in out or "27488" in out  # the good file is still reported


def test_the_library_reports_it_too(tmp_path: Path) -> None:
    from biasinspect.api import inspect

    bad = tmp_path / "bad.pt"
    _save_module_with_groups(bad, 10**5000)
    report = inspect(bad, SAMPLES / "seed_tied.onnx")
    assert [model.path for model in report.models] == [str(SAMPLES / "seed_tied.onnx")]
    assert [failure.message for failure in report.errors] == [
        "unsupported: the pickle holds an integer of 16,616 bits, over the 8,192-bit limit (no model value is "
        "that large)"
    ]


# --- 7. an ONNX model's external data is skipped only when it is not a model ---------------------

CODE_RUNNING_PICKLE = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00echo\x85Rh\x09."
"""REDUCE runs posix.system('echo') under pickle.load; then an undefined memo key makes both the
inert reader and pickle fail, after the code has run."""


def _onnx_with_external_data(folder: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[8, 3, 3, 3])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(8 * 27 * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[weight],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_a_model_named_as_external_data_is_still_reported(tmp_path: Path) -> None:
    _onnx_with_external_data(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(CODE_RUNNING_PICKLE)
    code, out, err = run(str(tmp_path), "--fail-on", "unsafe", "-f", "json")
    assert code == 2
    assert err == (
        f"biasinspect: {tmp_path}/weights.bin: malformed pickle: memo key 9 is not defined; before that point "
        "the pickle calls posix.system, which torch.load(weights_only=False) would already have run: treated "
        "as unsafe\n"
    )
    assert [model["path"] for model in json.loads(out)["models"]] == [f"{tmp_path}/model.onnx"]


def test_real_external_data_is_still_part_of_its_model(tmp_path: Path) -> None:
    _onnx_with_external_data(tmp_path, "weights.bin")
    # Float data whose first byte happens to look like a protobuf field (0x08) is data, not a model.
    (tmp_path / "weights.bin").write_bytes(b"\x08" + bytes(8 * 27 * 4 - 1))
    code, out, err = run(str(tmp_path), "-f", "json")
    assert (code, err) == (0, "")
    assert [model["path"] for model in json.loads(out)["models"]] == [f"{tmp_path}/model.onnx"]
