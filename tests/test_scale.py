"""Scale on one machine: --jobs (process pool), --format jsonl (streaming), the progress bar."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import resource
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from scale_fixtures import MODEL_FILES, build_folder, write_slow_pickle

import biasinspect
from biasinspect.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "biasinspect", *argv]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(tmp_path_factory.mktemp("scale"))


@pytest.fixture(scope="module")
def slow_pickle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slow_pickle(tmp_path_factory.mktemp("slow") / "slow.pkl")


@pytest.fixture(scope="module")
def slower_than_a_line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About a second of CPU: far longer than writing one line."""
    return write_slow_pickle(tmp_path_factory.mktemp("slow") / "second.pkl", items=500_000)


def test_jobs_gives_the_serial_report(folder: Path) -> None:
    serial = run(str(folder), "--format", "json", "--jobs", "1")
    pooled = run(str(folder), "--format", "json", "--jobs", "2")
    assert pooled == serial
    code, out, err = serial
    assert code == 2
    assert err == f"biasinspect: {folder / 'notes.pt'}: not a model file: the file is text\n"
    report = json.loads(out)
    assert [Path(model["path"]).name for model in report["models"]] == [
        *(f"conv_{index:02d}.onnx" for index in range(8)),
        *(f"state_{index}.safetensors" for index in range(4)),
    ]
    assert biasinspect.inspect(folder, jobs=2) == biasinspect.inspect(folder)


def test_jsonl_lines_carry_the_json_report(folder: Path) -> None:
    _, json_out, _ = run(str(folder), "--format", "json", "--jobs", "1")
    for jobs in ("1", "2"):
        code, out, err = run(str(folder), "--format", "jsonl", "--jobs", jobs)
        assert code == 2
        assert err == f"biasinspect: {folder / 'notes.pt'}: not a model file: the file is text\n"
        records = [json.loads(line) for line in out.splitlines()]
        report = json.loads(json_out)
        assert [{**model, "type": "model"} for model in report["models"]] == records[:MODEL_FILES]
        assert list(records[0]) == ["type", *report["models"][0]]
        assert records[MODEL_FILES] == {
            "type": "error",
            "path": str(folder / "notes.pt"),
            "message": "not a model file: the file is text",
        }
        assert records[-1] == {
            "type": "summary",
            "tool": "biasinspect",
            "version": biasinspect.__version__,
            "models": MODEL_FILES,
            "errors": 1,
        }
        assert len(records) == MODEL_FILES + 2


def test_jsonl_exit_codes_follow_the_policy(folder: Path) -> None:
    good = [str(folder / f"conv_{index:02d}.onnx") for index in range(3)]
    code, out, err = run(*good, "--format", "jsonl", "--fail-on", "absent")
    assert code == 1
    assert err == f"biasinspect: policy: {good[1]}: 1 absent layer(s) (--fail-on absent): conv\n"
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["model"] * 3 + ["summary"]
    assert run(*good, "--format", "jsonl", "--fail-on", "untied")[0] == 0


def test_jsonl_streams_before_the_last_file_is_read(folder: Path, slower_than_a_line: Path) -> None:
    """The first model's line is on stdout while a slow file (a second of CPU) is still being read."""
    argv = cli(str(folder / "conv_00.onnx"), str(slower_than_a_line), "--format", "jsonl", "--jobs", "2")
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env()) as process:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        still_running = process.poll() is None
        rest = process.stdout.read().decode().splitlines()
        process.wait(timeout=120)
    assert first["type"] == "model"
    assert first["path"].endswith("conv_00.onnx")
    assert still_running
    assert [json.loads(line)["type"] for line in rest] == ["model", "summary"]
    assert process.returncode == 0


def _cpu_limit() -> None:
    # The slow pickle needs about 5 s of CPU; a worker reading it is killed by the kernel
    # (SIGXCPU) at 1 s, a real death of a worker process. No core files.
    resource.setrlimit(resource.RLIMIT_CPU, (1, 2))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_a_dead_worker_costs_only_its_file(folder: Path, slow_pickle: Path) -> None:
    files = [str(folder / f"conv_{index:02d}.onnx") for index in range(8)]
    argv = cli(*files[:3], str(slow_pickle), *files[3:], "--format", "json", "--jobs", "2")
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env(), preexec_fn=_cpu_limit, timeout=180
    )
    assert (
        result.stderr
        == f"biasinspect: {slow_pickle}: reader process crashed (signal {int(signal.SIGXCPU)})\n"
    )
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert [model["path"] for model in report["models"]] == files
    assert report["errors"] == [
        {"path": str(slow_pickle), "message": f"reader process crashed (signal {int(signal.SIGXCPU)})"}
    ]


def _children_after(paths: list[Path], jobs: int) -> list[str]:
    code = (
        "import os, sys, biasinspect\n"
        "report = biasinspect.inspect(*sys.argv[2:], jobs=int(sys.argv[1]))\n"
        "assert len(report.models) == len(sys.argv) - 2, report\n"
        "print(open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split())\n"
    )
    argv = [sys.executable, "-c", code, str(jobs), *map(str, paths)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=120, check=True)
    children: list[str] = eval(result.stdout)  # a printed list of pid strings
    return children


def test_one_file_starts_no_pool(folder: Path) -> None:
    # The fork server that starts pool workers stays a child of the process once started.
    first, second = folder / "nested" / "state_0.safetensors", folder / "nested" / "state_1.safetensors"
    assert _children_after([first], jobs=4) == []
    assert _children_after([first, second], jobs=4) != []


def _run_with_pty_stderr(argv: list[str]) -> tuple[int, str, bytes]:
    """Run with stderr on a pseudo-terminal and stdout on a pipe; returns (code, stdout, stderr)."""
    controller, terminal = pty.openpty()
    # A terminal has a size (a fresh pseudo-terminal's is 0x0, where tqdm draws nothing).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=terminal, env=env())
    os.close(terminal)
    assert process.stdout is not None
    stderr = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer to the terminal has exited
            break
        if not chunk:
            break
        stderr += chunk
    out = process.stdout.read().decode()
    process.wait(timeout=60)
    os.close(controller)
    return process.returncode, out, stderr


def test_progress_bar_on_a_terminal_never_on_stdout(folder: Path) -> None:
    nested = str(folder / "nested")
    files = [str(folder / f"conv_{index:02d}.onnx") for index in range(8)]
    code, out, stderr = _run_with_pty_stderr(cli(*files, nested, "--format", "json", "--jobs", "1"))
    assert code == 0
    assert stderr.startswith(b"\r  0%|")
    assert b"| 0/12 [00:00<?, ?file/s]" in stderr
    assert stderr.endswith(b"\r")  # the bar is erased when the run ends
    assert len(json.loads(out)["models"]) == 12
    assert "\r" not in out
    code, out, stderr = _run_with_pty_stderr(cli(*files, nested, "--format", "json", "--no-progress"))
    assert (code, stderr) == (0, b"")
    assert len(json.loads(out)["models"]) == 12


def test_no_progress_bar_when_stderr_is_not_a_terminal(folder: Path) -> None:
    nested = str(folder / "nested")
    files = [str(folder / f"conv_{index:02d}.onnx") for index in range(8)]
    quiet = subprocess.run(
        cli(*files, nested, "-f", "jsonl"), capture_output=True, text=True, env=env(), timeout=120
    )
    assert (quiet.returncode, quiet.stderr) == (0, "")
    assert len(quiet.stdout.splitlines()) == 13
    forced = subprocess.run(
        cli(*files, nested, "-f", "jsonl", "--progress"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert forced.returncode == 0
    assert "| 0/12 [00:00<?, ?file/s]" in forced.stderr
    assert forced.stdout == quiet.stdout


@pytest.mark.parametrize(
    ("argv", "message"), [(["--jobs", "0"], "expected a positive whole number, not '0'")]
)
def test_bad_jobs_is_a_usage_error(folder: Path, argv: list[str], message: str) -> None:
    code, out, err = run(str(folder), *argv)
    assert (code, out) == (2, "")
    assert message in err


def test_jsonl_holds_back_folder_scan_failures_until_the_data_files_are_known(tmp_path: Path) -> None:
    """An ONNX model's external data file sorts before the model: streamed, it is still no error,
    and a stray file that is no model is reported after every model, once."""
    import onnx

    model = onnx.load(str(ROOT / "samples" / "seed_untied.onnx"))
    onnx.save(
        model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="a.bin", size_threshold=0
    )
    (tmp_path / "0_stray.bin").write_bytes(b"\x00" * 64)
    for jobs in ("1", "2"):
        code, out, err = run(str(tmp_path), "-f", "jsonl", "--jobs", jobs)
        records = [json.loads(line) for line in out.splitlines()]
        assert [(record["type"], record.get("path")) for record in records] == [
            ("model", str(tmp_path / "model.onnx")),
            ("error", str(tmp_path / "0_stray.bin")),
            ("summary", None),
        ]
        assert (records[-1]["models"], records[-1]["errors"]) == (1, 1)
        assert code == 2
        assert err.count("\n") == 1
        assert "0_stray.bin" in err


def _report_in_daemon(paths: list[str], queue: object) -> None:
    report = biasinspect.inspect(*paths, jobs=2)
    queue.put((len(report.models), len(report.errors)))  # type: ignore[attr-defined]


def test_a_daemonic_caller_reads_serially_instead_of_failing() -> None:
    """A multiprocessing worker (daemonic) may not start a pool's processes: ``jobs`` then reads
    serially rather than raising 'daemonic processes are not allowed to have children'."""
    import multiprocessing

    samples = Path(__file__).resolve().parent.parent / "samples"
    paths = [str(samples / "seed_tied.onnx"), str(samples / "seed_untied.onnx")]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_report_in_daemon, args=(paths, queue), daemon=True)
    worker.start()
    try:
        assert queue.get(timeout=120) == (2, 0)
    finally:
        worker.join(timeout=30)
    assert worker.exitcode == 0
