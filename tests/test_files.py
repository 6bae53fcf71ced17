"""Opening files: OS errors become one-line reasons, and non-regular files are never read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from biasinspect.api import inspect
from biasinspect.errors import UnreadableFileError
from biasinspect.readers.files import open_regular_file

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def test_regular_file_opens(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with open_regular_file(path) as handle:
        assert handle.read() == b"abc"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "no such file or directory"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.symlink_to(p), "symbolic link loop"),
    ],
)
def test_os_errors_are_one_line_reasons(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "x.safetensors"
    make(path)
    with pytest.raises(UnreadableFileError, match=rf"^{reason}$"):
        open_regular_file(path)


@needs_fifo
@pytest.mark.timeout(20)
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.bin"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFileError, match=r"^not a regular file \(a FIFO\)$"):
        open_regular_file(fifo)


@needs_fifo
@pytest.mark.timeout(20)
def test_shard_index_naming_a_fifo_does_not_hang(tmp_path: Path) -> None:
    # The index itself is regular, so sniffing lets it through; the shard must not block the run.
    os.mkfifo(tmp_path / "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps({"metadata": {}, "weight_map": {"conv.weight": "model-00001-of-00001.safetensors"}})
    )
    report = inspect(index)
    assert report.models == ()
    (failure,) = report.errors
    assert failure.path == str(index)
    assert "not a regular file" in failure.message
