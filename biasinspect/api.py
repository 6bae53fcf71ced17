"""The library entry point: paths in, :class:`~biasinspect.model.Report` out.

Every file is read by the reader its content calls for; every failure a file can cause becomes
an :class:`~biasinspect.model.InspectionFailure` in the report, so one bad file never hides the
others.  Nothing is printed here and no exit codes exist here (that is the CLI's job).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from biasinspect.analysis import analyze
from biasinspect.detect import FileFormat, scan_folder, sniff
from biasinspect.errors import BiasInspectError, ResourceLimitError
from biasinspect.model import InspectionFailure, ModelDescription, ModelReport, Report
from biasinspect.source import LocalSource


def _reader_for(file_format: FileFormat) -> Callable[[Path], list[ModelDescription]]:
    # Imported on demand so that start-up stays light and onnx is imported only for ONNX files.
    if file_format is FileFormat.ONNX:
        from biasinspect.readers.onnx_reader import read_onnx

        return read_onnx
    if file_format is FileFormat.ZIP:
        return _read_zip
    if file_format is FileFormat.TFLITE:
        return _read_tflite
    if file_format is FileFormat.HDF5:
        return _read_hdf5
    if file_format is FileFormat.PICKLE:
        from biasinspect.readers.torch_reader import read_pickle_file

        return read_pickle_file
    if file_format is FileFormat.SAFETENSORS:
        from biasinspect.readers.safetensors_reader import read_safetensors

        return read_safetensors
    from biasinspect.readers.sharded import read_sharded_index

    return read_sharded_index


def _read_zip(path: Path) -> list[ModelDescription]:
    from biasinspect.readers.keras_reader import is_keras_archive, read_keras_archive

    if is_keras_archive(path):
        with LocalSource(path) as source:
            return read_keras_archive(source)
    from biasinspect.readers.torch_reader import read_torch_zip

    return read_torch_zip(path)


def _read_tflite(path: Path) -> list[ModelDescription]:
    from biasinspect.readers.tflite_reader import read_tflite

    with LocalSource(path) as source:
        return read_tflite(source)


def _read_hdf5(path: Path) -> list[ModelDescription]:
    from biasinspect.readers.keras_reader import read_keras_h5

    with LocalSource(path) as source:
        return read_keras_h5(source)


def read_file(path: Path) -> list[ModelDescription]:
    """Read one model file (or shard index) into descriptions; raises BiasInspectError subclasses."""
    reader = _reader_for(sniff(path))
    try:
        return reader(path)
    except RecursionError as error:
        raise ResourceLimitError("structure nested too deeply to inspect") from error
    except MemoryError as error:
        raise ResourceLimitError("out of memory while reading the file structure") from error


def inspect_file(path: Path) -> list[ModelReport]:
    """Read and analyse one file."""
    return [analyze(description) for description in read_file(path)]


@dataclass(frozen=True)
class _Candidate:
    path: str
    problem: str | None
    scanned: bool
    """Found by a folder scan (not named by the caller)."""


def _candidates(paths: Iterable[str | os.PathLike[str]]) -> list[_Candidate]:
    expanded: list[_Candidate] = []
    for raw in paths:
        text = os.fspath(raw)
        if not text:
            expanded.append(_Candidate(text, "empty path", False))  # Path("") would silently mean "."
            continue
        path = Path(text)
        if path.is_dir():
            found = list(scan_folder(path))
            if not found:
                expanded.append(_Candidate(text, "no model files found in this folder", False))
            expanded.extend(_Candidate(str(item.path), item.problem, True) for item in found)
        else:
            expanded.append(_Candidate(text, None, False))
    return expanded


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str | None]]:
    """Turn command-line paths into files to read, folders expanded; each with a problem or None."""
    return [(candidate.path, candidate.problem) for candidate in _candidates(paths)]


def inspect(*paths: str | os.PathLike[str]) -> Report:
    """Inspect files and folders (scanned recursively); failures are collected, not raised.

    Each failure is an :class:`InspectionFailure` with a one-line reason.  An exception that is not
    a :class:`BiasInspectError` is a bug in biasinspect and propagates.
    """
    return _inspect_all(paths, contain_bugs=False)


def inspect_paths_for_cli(paths: Iterable[str | os.PathLike[str]]) -> Report:
    """Like :func:`inspect`, but a bug met on one file is reported as that file's failure, so a
    batch run still reports every other file (the CLI's promise of one line per bad path)."""
    return _inspect_all(paths, contain_bugs=True)


def _inspect_all(paths: Iterable[str | os.PathLike[str]], *, contain_bugs: bool) -> Report:
    models: list[ModelReport] = []
    errors: list[tuple[_Candidate, InspectionFailure]] = []
    companions: set[str] = set()
    for candidate in _candidates(paths):
        path = candidate.path
        if candidate.problem is not None:
            errors.append((candidate, InspectionFailure(path, candidate.problem)))
            continue
        try:
            descriptions = read_file(Path(path))
        except BiasInspectError as error:
            errors.append((candidate, InspectionFailure(path, _one_line(error))))
            continue
        except Exception as error:
            if not contain_bugs:
                raise
            reason = f"internal error (please report): {type(error).__name__}: {error}"
            errors.append((candidate, InspectionFailure(path, " ".join(reason.split()))))
            continue
        for description in descriptions:
            companions.update(_real(name) for name in description.companion_files)
            models.append(analyze(description))
    # A folder holding model.onnx and its external data (weights.bin, model.onnx.data...) is one
    # model: the data file the model names is not a bad model of its own.
    kept = [
        failure
        for candidate, failure in errors
        if not (candidate.scanned and candidate.problem is None and _real(candidate.path) in companions)
    ]
    return Report(models=tuple(models), errors=tuple(kept))


def _real(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.normpath(path)


def _one_line(error: BiasInspectError) -> str:
    message = " ".join(str(error).split())
    return message or type(error).__name__


__all__ = ["inspect", "inspect_file", "inspect_paths_for_cli", "read_file"]
