"""The reader registry: one FormatSpec per format, found the same way for files and URLs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_servers import web_server

from biasinspect import registry
from biasinspect.api import inspect
from biasinspect.errors import UnsupportedFormatError
from biasinspect.model import ModelDescription
from biasinspect.registry import FORMATS, FormatSpec, SniffInput, Stage, reader_for, scanned, sniff
from biasinspect.source import ByteSource, LocalSource

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

MAGIC = b"TOYMODEL"


def read_toy(source: ByteSource) -> list[ModelDescription]:
    """A toy reader: the bytes after the magic are the model's parameter count."""
    count = int(source.read_at(len(MAGIC), 32).decode().strip())
    return [ModelDescription(path=source.name, format="toy", convs=(), model_params=count)]


def _sniff_toy(sample: SniffInput) -> Stage | None:
    return Stage.MAGIC if sample.head.startswith(MAGIC) else None


@pytest.fixture
def toy_format(monkeypatch: pytest.MonkeyPatch) -> Iterator[FormatSpec]:
    spec = FormatSpec("toy", _sniff_toy, (".toy",), f"{__name__}:read_toy", priority=45)
    monkeypatch.setattr(registry, "FORMATS", [*FORMATS, spec])
    yield spec


@pytest.fixture
def toy_folder(tmp_path: Path) -> Path:
    (tmp_path / "model.toy").write_bytes(MAGIC + b"1234\n")
    return tmp_path


def test_one_entry_adds_a_format_for_files_folders_and_urls(toy_format: FormatSpec, toy_folder: Path) -> None:
    assert scanned("model.toy") and not scanned("model.txt")
    with LocalSource(toy_folder / "model.toy") as source:
        assert reader_for(source) is toy_format
    by_file = inspect(toy_folder / "model.toy")
    by_folder = inspect(toy_folder)
    assert [(m.path, m.format, m.totals.model_params) for m in by_file.models] == [
        (str(toy_folder / "model.toy"), "toy", 1234)
    ]
    assert [m.totals.model_params for m in by_folder.models] == [1234]
    with web_server(toy_folder) as web:
        by_url = inspect(web.url("model.toy"))
        assert [(m.path, m.format, m.totals.model_params) for m in by_url.models] == [
            (web.url("model.toy"), "toy", 1234)
        ]
        assert web.log.requests == 1


def test_stages_keep_the_tie_breaking_order() -> None:
    """Content beats names, known non-model content is refused before any name is trusted, text is
    refused unless a TEXT rule claims it, and a name alone is the last resort."""
    zip_head = b"PK\x03\x04" + bytes(60)
    assert sniff(zip_head, "weights.safetensors", 64).name == "zip"
    assert sniff(b"\x80\x02}q\x00.", "x.onnx", 6).name == "pickle"
    assert sniff(b"\x08\x07\x12\x04test", "model.bin", 10).name == "onnx"
    assert sniff(b"\x00\x01\x02", "model.onnx", 3).name == "onnx"
    assert sniff(b"(dp0\nS'a'\n", "state.pt", 10).name == "pickle"
    assert sniff(b"x", "model.safetensors.index.json", 1).name == "shard-index"
    for head, name, message in [
        (b"\x89PNG\r\n\x1a\n....", "model.safetensors", "not a model file: the content is a PNG image"),
        (b"hello world\n", "model.onnx", "not an ONNX model: the file is text"),
        (b"hello world\n", "model.pt", "not a model file: the file is text"),
        (b"", "model.onnx", "empty file (0 bytes)"),
        (b"\x00\x01\x02", "model.dat", "not a recognised model format"),
    ]:
        with pytest.raises(UnsupportedFormatError, match=re.escape(message)):
            sniff(head, name, len(head))
    with LocalSource(SAMPLES / "seed_tied.safetensors") as source:
        assert reader_for(source).name == "safetensors"
