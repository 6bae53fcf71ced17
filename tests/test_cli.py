"""The command line: exit codes, one-line errors, formats, --fail-on and calc."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from biasinspect import __version__
from biasinspect.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_calc_answers_the_seed_question():
    code, out, err = run("calc", "--input", "3x32x32", "--filters", "32x5x5")
    assert (code, err) == (0, "")
    assert "-> output 32x28x28" in out
    assert "(3x5x5 + 1) x 32 = 2,432" in out
    assert "3x5x5 x 32 + 32x28x28 = 27,488" in out
    assert "25,088" in out


def test_calc_json_and_options():
    code, out, _ = run(
        "calc", "--input", "16x32x32", "--filters", "32x3x3", "--stride", "2", "--padding", "1", "--groups", "4",
        "--format", "json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["output"] == [32, 16, 16]
    assert data["weight_params"] == 4 * 3 * 3 * 32
    assert data["tied"] == {"bias_params": 32, "total": 1184, "formula": "(4x3x3 + 1) x 32 = 1,184"}
    assert data["untied"]["bias_params"] == 32 * 16 * 16


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calc", "--input", "3x32x32"], "the following arguments are required: --filters"),
        (["calc", "--input", "3xAx32", "--filters", "32x5x5"], "expected sizes like 3x32x32"),
        (["calc", "--input", "3x32x32", "--filters", "32x5x5", "--groups", "2"], "must divide"),
        (["--fail-on", "bogus", "x.onnx"], "invalid kind bogus"),
        (["--format", "xml", "x.onnx"], "invalid choice: 'xml'"),
        ([], "the following arguments are required: PATH"),
    ],
)
def test_usage_errors_exit_2_without_traceback(argv, message):
    code, out, err = run(*argv)
    assert code == 2
    assert out == ""
    assert err.startswith("biasinspect: error: ")
    assert message in err
    assert "Traceback" not in err


def test_version_and_help_exit_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"biasinspect {__version__}"
    assert main(["--help"]) == 0
    assert "--fail-on" in capsys.readouterr().out
    assert main(["calc", "--help"]) == 0
    assert "--filters" in capsys.readouterr().out


def test_missing_path_is_one_line(tmp_path):
    missing = tmp_path / "nope.onnx"
    code, out, err = run(str(missing))
    assert (code, out) == (2, "")
    assert err == f"biasinspect: {missing}: no such file or directory\n"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.onnx", b"", "empty file (0 bytes)"),
        ("notes.onnx", b"this is not a model\n", "not an ONNX model: the file is text"),
        ("image.pt", b"\x89PNG\r\n\x1a\n" + bytes(100), "not a model file: the content is a PNG image"),
        ("random.bin", bytes(range(7, 200)), "not a recognised model format"),
    ],
)
def test_non_models_get_one_clean_line(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    code, out, err = run(str(path))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith(f"biasinspect: {path}: {reason}")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.timeout(20)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    code, _, err = run(str(fifo))
    assert code == 2
    assert err == f"biasinspect: {fifo}: not a regular file (a FIFO)\n"


def test_device_file_is_refused():
    code, _, err = run("/dev/null")
    assert code == 2
    assert err == "biasinspect: /dev/null: not a regular file (a device file)\n"


def test_empty_folder_is_an_error(tmp_path):
    code, _, err = run(str(tmp_path))
    assert code == 2
    assert err == f"biasinspect: {tmp_path}: no model files found in this folder\n"


def test_seed_untied_sample_prints_25088_biases():
    code, out, err = run(str(SAMPLES / "seed_untied.onnx"))
    assert (code, err) == (0, "")
    assert "untied" in out
    assert "25,088" in out
    assert "3x5x5 x 32 + 32x28x28 = 27,488" in out
    assert "1 conv layer: 0 tied (one bias per output channel), 1 untied" in out


def test_json_contract_keys():
    code, out, _ = run(str(SAMPLES / "seed_tied.onnx"), "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"tool", "version", "models", "errors"}
    assert data["tool"] == "biasinspect" and data["version"] == __version__ and data["errors"] == []
    (model,) = data["models"]
    assert set(model) >= {"path", "format", "layers", "totals", "warnings"}
    assert model["format"] == "onnx"
    (layer,) = model["layers"]
    assert set(layer) >= {
        "name", "op", "in_channels", "out_channels", "groups", "kernel_shape", "output_spatial",
        "weight_shape", "weight_params", "bias", "followed_by", "formula",
    }  # fmt: skip
    assert set(layer["bias"]) >= {"kind", "shape", "params", "source"}
    assert layer["bias"] | {"terms": None} == {
        "kind": "tied", "shape": [32], "params": 32, "source": "conv", "terms": None,
    }  # fmt: skip
    assert set(model["totals"]) >= {
        "conv_layers", "conv_weight_params", "conv_bias_params", "tied", "untied", "absent", "other", "model_params",
    }  # fmt: skip
    assert model["totals"]["model_params"] == 2432


def test_fail_on_untied_exits_1_after_the_report():
    code, out, err = run(str(SAMPLES / "seed_untied.onnx"), "--fail-on", "untied")
    assert code == 1
    assert "27,488" in out
    assert "1 untied layer(s) (--fail-on untied)" in err
    assert run(str(SAMPLES / "seed_tied.onnx"), "--fail-on", "untied")[0] == 0
    assert run(str(SAMPLES / "seed_tied.onnx"), "--fail-on", "absent,tied")[0] == 1
    assert run(str(SAMPLES / "conv_bn.onnx"), "--fail-on", "untied", "--fail-on", "absent")[0] == 1


def test_batch_reports_good_files_and_lists_bad_ones(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07\x3a\xff\xff")  # ir_version then a graph field whose length runs past the end
    code, out, err = run(
        str(SAMPLES / "seed_tied.onnx"), str(bad), str(SAMPLES / "seed_untied.onnx"), "-f", "json"
    )
    assert code == 2
    data = json.loads(out)
    assert [Path(model["path"]).name for model in data["models"]] == ["seed_tied.onnx", "seed_untied.onnx"]
    assert [error["path"] for error in data["errors"]] == [str(bad)]
    assert err.count("\n") == 1 and err.startswith(f"biasinspect: {bad}: ")


def test_error_beats_policy_failure(tmp_path):
    missing = tmp_path / "missing.onnx"
    code, _, _ = run(str(SAMPLES / "seed_untied.onnx"), str(missing), "--fail-on", "untied")
    assert code == 2


def test_folder_is_scanned_recursively(tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "seed.onnx").write_bytes((SAMPLES / "seed_untied.onnx").read_bytes())
    (tmp_path / "README.txt").write_text("not a model")
    code, out, err = run(str(tmp_path), "-f", "json")
    assert (code, err) == (0, "")
    (model,) = json.loads(out)["models"]
    assert model["path"] == str(nested / "seed.onnx")
    assert model["totals"]["untied"] == 1


def test_folder_scan_skips_the_external_data_its_onnx_model_names(tmp_path):
    import onnx

    model = onnx.load(str(SAMPLES / "seed_untied.onnx"))
    onnx.save(
        model,
        str(tmp_path / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (tmp_path / "weights.bin").stat().st_size > 0
    (tmp_path / "stray.bin").write_bytes(b"\x00" * 64)  # named by no model: still an error
    code, out, err = run(str(tmp_path), "-f", "json")
    report = json.loads(out)
    assert [m["path"] for m in report["models"]] == [str(tmp_path / "model.onnx")]
    assert report["models"][0]["totals"]["untied"] == 1
    assert [e["path"] for e in report["errors"]] == [str(tmp_path / "stray.bin")]
    assert code == 2
    assert err.count("\n") == 1 and "stray.bin" in err
    # Named on the command line, the data file is still reported for what it is.
    code, _, err = run(str(tmp_path / "weights.bin"))
    assert code == 2 and "not a recognised model format" in err


def test_csv_and_markdown_formats():
    code, out, _ = run(str(SAMPLES / "depthwise.onnx"), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["groups"] for row in rows] == ["8", "1"]
    assert [row["bias_kind"] for row in rows] == ["tied", "tied"]
    assert rows[0]["formula"] == "(1x3x3 + 1) x 8 = 80"
    code, out, _ = run(str(SAMPLES / "depthwise.onnx"), "--format", "markdown")
    assert code == 0
    assert out.startswith("## ")
    assert "| layer" in out


def test_module_entry_point_runs_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "biasinspect", "calc", "--input", "3x32x32", "--filters", "32x5x5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "2,432" in result.stdout and "27,488" in result.stdout


def test_startup_does_not_import_onnx_or_torch():
    code = "import sys, biasinspect.cli; print('onnx' in sys.modules, 'torch' in sys.modules, 'numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "False"]


def test_policy_lines_are_marked_as_policy():
    code, _, err = run(str(SAMPLES / "seed_untied.onnx"), "--fail-on", "untied")
    assert code == 1
    assert (
        err
        == f"biasinspect: policy: {SAMPLES / 'seed_untied.onnx'}: 1 untied layer(s) (--fail-on untied): /conv/Conv\n"
    )


def test_empty_path_is_an_error_not_the_current_folder():
    code, out, err = run("")
    assert (code, out) == (2, "")
    assert err == 'biasinspect: "": empty path\n'


def test_a_newline_in_a_file_name_stays_on_one_line(tmp_path):
    path = tmp_path / "two\nlines.onnx"
    path.write_bytes(b"")
    code, _, err = run(str(path))
    assert code == 2
    assert err == f"biasinspect: {tmp_path}/two\\nlines.onnx: empty file (0 bytes)\n"


def test_nul_in_a_path_is_a_failure_not_an_exception():
    from biasinspect.api import inspect

    report = inspect("a\0b.onnx")
    assert report.models == ()
    assert [(failure.path, failure.message) for failure in report.errors] == [
        ("a\0b.onnx", "invalid path (contains a NUL byte)")
    ]


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError


def test_a_closed_stdout_keeps_the_exit_code_and_the_error_lines(tmp_path):
    missing = tmp_path / "missing.onnx"
    err = io.StringIO()
    code = main([str(missing), str(SAMPLES / "seed_tied.onnx")], stdout=_ClosedPipe(), stderr=err)
    assert code == 2
    assert err.getvalue() == f"biasinspect: {missing}: no such file or directory\n"


def test_unencodable_names_are_escaped_not_a_traceback(tmp_path):
    missing = tmp_path / "modèle.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "biasinspect", str(missing)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii:strict"},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"biasinspect: {tmp_path}/mod\\xe8le.onnx: no such file or directory\n".encode()


def test_safetensors_whose_header_length_looks_like_a_pickle_opcode(tmp_path):
    # A header of 640 bytes starts the file with 0x80 0x02: the PROTO opcode of a pickle.
    header = b'{"conv.weight":{"dtype":"F32","shape":[2,1,1,1],"data_offsets":[0,8]}}'
    header += b" " * (640 - len(header))
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    assert path.read_bytes()[:2] == b"\x80\x02"
    code, out, err = run(str(path), "-f", "json")
    assert (code, err) == (0, "")
    (model,) = json.loads(out)["models"]
    assert model["format"] == "safetensors"
    assert model["layers"][0]["weight_shape"] == [2, 1, 1, 1]
