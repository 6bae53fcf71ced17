"""The library entry point: paths in, :class:`~biasinspect.model.Report` out.

Every file is read by the reader its content calls for; every failure a file can cause becomes
an :class:`~biasinspect.model.InspectionFailure` in the report, so one bad file never hides the
others.  Nothing is printed here and no exit codes exist here (that is the CLI's job).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from biasinspect.analysis import analyze
from biasinspect.detect import scan_folder
from biasinspect.errors import BiasInspectError, ResourceLimitError
from biasinspect.model import InspectionFailure, ModelDescription, ModelReport, Report
from biasinspect.registry import reader_for
from biasinspect.render import check_renderable
from biasinspect.source import is_url, open_source


def _is_package(location: str | os.PathLike[str]) -> bool:
    """A local CoreML ``.mlpackage`` folder: one model, read from its manifest."""
    text = os.fspath(location)
    return not is_url(text) and text.lower().rstrip("/").endswith(".mlpackage") and Path(text).is_dir()


def read_file(location: str | os.PathLike[str], *, timeout: float | None = None) -> list[ModelDescription]:
    """Read one model file (or shard index, or ``.mlpackage`` folder), a local path or a URL, into
    descriptions; raises BiasInspectError subclasses.  The reader is the one
    :func:`biasinspect.registry.reader_for` picks from the file's first bytes."""
    if _is_package(location):
        from biasinspect.readers.coreml_reader import read_mlpackage

        return read_mlpackage(Path(location))
    source = open_source(location, timeout=timeout)
    try:
        spec = reader_for(source)
        return spec.read(source)
    except RecursionError as error:
        raise ResourceLimitError("structure nested too deeply to inspect") from error
    except MemoryError as error:
        raise ResourceLimitError("out of memory while reading the file structure") from error
    finally:
        source.close()


def inspect_file(location: str | os.PathLike[str], *, timeout: float | None = None) -> list[ModelReport]:
    """Read and analyse one file (a local path or a URL)."""
    return [analyze(description) for description in read_file(location, timeout=timeout)]


@dataclass(frozen=True)
class _Candidate:
    path: str
    problem: str | None
    scanned: bool
    """Found by a folder scan (not named by the caller)."""


def _remote_candidates(url: str, timeout: float | None) -> list[_Candidate]:
    """A URL as candidates: a remote folder (an S3 prefix, any fsspec listing) scanned like a
    local one, or the one file it names."""
    from biasinspect.detect import scan_remote_folder
    from biasinspect.remote import list_remote_folder

    try:
        listing = list_remote_folder(url, timeout=timeout)
    except BiasInspectError as error:
        return [_Candidate(url, _one_line(error), False)]
    if listing is None:
        return [_Candidate(url, None, False)]
    found = scan_remote_folder(url, listing, timeout=timeout)
    if not found:
        return [_Candidate(url, "no model files found in this folder", False)]
    return [_Candidate(name, problem, True) for name, problem in found]


def _candidates(paths: Iterable[str | os.PathLike[str]], timeout: float | None = None) -> list[_Candidate]:
    expanded: list[_Candidate] = []
    for raw in paths:
        text = os.fspath(raw)
        if not text:
            expanded.append(_Candidate(text, "empty path", False))  # Path("") would silently mean "."
            continue
        if is_url(text):
            expanded.extend(_remote_candidates(text, timeout))
            continue
        path = Path(text)
        if _is_package(text):
            expanded.append(_Candidate(text, None, False))  # a CoreML package is one model
        elif path.is_dir():
            found = list(scan_folder(path))
            if not found:
                expanded.append(_Candidate(text, "no model files found in this folder", False))
            expanded.extend(_Candidate(str(item.path), item.problem, True) for item in found)
        else:
            expanded.append(_Candidate(text, None, False))
    return expanded


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str | None]]:
    """Turn command-line paths into files to read, folders expanded; each with a problem or None."""
    return [(_shown(candidate.path), candidate.problem) for candidate in _candidates(paths)]


def inspect(*paths: str | os.PathLike[str], timeout: float | None = None) -> Report:
    """Inspect files and folders (scanned recursively); failures are collected, not raised.

    Each failure is an :class:`InspectionFailure` with a one-line reason.  An exception that is not
    a :class:`BiasInspectError` is a bug in biasinspect and propagates.  Paths may be URLs
    (``https://``, ``s3://``, any installed fsspec protocol); ``timeout`` bounds each request.
    """
    return _inspect_all(paths, contain_bugs=False, timeout=timeout)


def inspect_paths_for_cli(paths: Iterable[str | os.PathLike[str]], *, timeout: float | None = None) -> Report:
    """Like :func:`inspect`, but a bug met on one file is reported as that file's failure, so a
    batch run still reports every other file (the CLI's promise of one line per bad path)."""
    return _inspect_all(paths, contain_bugs=True, timeout=timeout)


def _inspect_all(
    paths: Iterable[str | os.PathLike[str]], *, contain_bugs: bool, timeout: float | None = None
) -> Report:
    models: list[ModelReport] = []
    errors: list[tuple[_Candidate, InspectionFailure]] = []
    companions: set[str] = set()
    for candidate in _candidates(paths, timeout):
        path = candidate.path
        shown = _shown(path)
        if candidate.problem is not None:
            errors.append((candidate, InspectionFailure(shown, candidate.problem)))
            continue
        # One guard around the whole per-file pipeline (read, analyse, a render dry run): whatever
        # one file does, it ends as that file's one line and the other files are still reported.
        try:
            descriptions = read_file(path, timeout=timeout)
            reports = [analyze(description) for description in descriptions]
            for report in reports:
                check_renderable(report)
        except BiasInspectError as error:
            errors.append((candidate, InspectionFailure(shown, _one_line(error))))
            continue
        except Exception as error:
            if not contain_bugs:
                raise
            reason = f"internal error (please report): {type(error).__name__}: {error}"
            errors.append((candidate, InspectionFailure(shown, _redacted_text(" ".join(reason.split())))))
            continue
        for description in descriptions:
            companions.update(_real(name) for name in description.companion_files)
        models.extend(reports)
    # A folder holding model.onnx and its external data (weights.bin, model.onnx.data...) is one
    # model: the data file the model names is not a bad model of its own.  Unless it is a model:
    # a file with a model format's signature (a pickle torch.load would run, a zip) that fails to
    # read is reported whatever names it, so it cannot hide behind an ONNX file.
    kept = [
        failure
        for candidate, failure in errors
        if not (
            candidate.scanned
            and candidate.problem is None
            and _real(candidate.path) in companions
            and not _has_model_signature(candidate.path)
        )
    ]
    return Report(models=tuple(models), errors=tuple(kept))


def _has_model_signature(path: str) -> bool:
    """Whether the file's content carries a model format's signature.

    An ONNX guess is only a first byte that could start a protobuf field, which raw tensor data
    often matches, so it does not count; zip, pickle, safetensors and shard-index names do.
    """
    try:
        source = open_source(path)
    except BiasInspectError:
        return False
    try:
        return reader_for(source).name != "onnx"
    except BiasInspectError:
        return False
    finally:
        source.close()


def _shown(path: str) -> str:
    """How a path is shown: a URL with its credentials redacted, a local path as given."""
    if is_url(path):
        from biasinspect.remote import redact

        return redact(path)
    return path


def _redacted_text(text: str) -> str:
    """``text`` with any URL in it redacted (a bug's message may quote one)."""
    if "://" not in text:
        return text
    from biasinspect.remote import redact

    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda match: redact(match.group(0)), text)


def _real(path: str) -> str:
    if is_url(path):
        return _shown(path)
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.normpath(path)


def _one_line(error: BiasInspectError) -> str:
    message = " ".join(str(error).split())
    return message or type(error).__name__


__all__ = ["inspect", "inspect_file", "inspect_paths_for_cli", "read_file"]
