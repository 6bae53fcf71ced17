"""The library entry point: paths in, :class:`~biasinspect.model.Report` out.

Every file is read by the reader its content calls for; every failure a file can cause becomes
an :class:`~biasinspect.model.InspectionFailure` in the report, so one bad file never hides the
others.  Nothing is printed here and no exit codes exist here (that is the CLI's job).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
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
class Candidate:
    """One file a run will read (or a path already known to be bad, with its ``problem``)."""

    path: str
    problem: str | None
    scanned: bool
    """Found by a folder scan (not named by the caller)."""
    timeout: float | None = None
    """Seconds each network request may take (URLs only)."""


def _remote_candidates(url: str, timeout: float | None) -> list[Candidate]:
    """A URL as candidates: a remote folder (an S3 prefix, any fsspec listing) scanned like a
    local one, or the one file it names."""
    from biasinspect.detect import scan_remote_folder
    from biasinspect.remote import list_remote_folder

    try:
        listing = list_remote_folder(url, timeout=timeout)
    except BiasInspectError as error:
        return [Candidate(url, _one_line(error), False, timeout)]
    if listing is None:
        return [Candidate(url, None, False, timeout)]
    found = scan_remote_folder(url, listing, timeout=timeout)
    if not found:
        return [Candidate(url, "no model files found in this folder", False, timeout)]
    return [Candidate(name, problem, True, timeout) for name, problem in found]


def plan(paths: Iterable[str | os.PathLike[str]], *, timeout: float | None = None) -> list[Candidate]:
    """The files a run will read, in report order: folders (local or remote) expanded, each with
    a problem or None."""
    expanded: list[Candidate] = []
    for raw in paths:
        text = os.fspath(raw)
        if not text:
            expanded.append(Candidate(text, "empty path", False))  # Path("") would silently mean "."
            continue
        if is_url(text):
            expanded.extend(_remote_candidates(text, timeout))
            continue
        path = Path(text)
        if _is_package(text):
            expanded.append(Candidate(text, None, False))  # a CoreML package is one model
        elif path.is_dir():
            found = list(scan_folder(path))
            if not found:
                expanded.append(Candidate(text, "no model files found in this folder", False))
            expanded.extend(Candidate(str(item.path), item.problem, True) for item in found)
        else:
            expanded.append(Candidate(text, None, False))
    return expanded


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str | None]]:
    """Turn command-line paths into files to read, folders expanded; each with a problem or None."""
    return [(_shown(candidate.path), candidate.problem) for candidate in plan(paths)]


def inspect(*paths: str | os.PathLike[str], jobs: int = 1, timeout: float | None = None) -> Report:
    """Inspect files and folders (scanned recursively); failures are collected, not raised.

    Each failure is an :class:`InspectionFailure` with a one-line reason.  An exception that is not
    a :class:`BiasInspectError` is a bug in biasinspect and propagates.  Paths may be URLs
    (``https://``, ``s3://``, any installed fsspec protocol); ``timeout`` bounds each request.
    ``jobs`` > 1 reads local files in that many worker processes and URLs in that many threads
    (:mod:`biasinspect.parallel`); the report is the same as with ``jobs=1``.
    """
    return assemble_report(iter_outcomes(plan(paths, timeout=timeout), contain_bugs=False, jobs=jobs))


def inspect_paths_for_cli(
    paths: Iterable[str | os.PathLike[str]], jobs: int = 1, *, timeout: float | None = None
) -> Report:
    """Like :func:`inspect`, but a bug met on one file is reported as that file's failure, so a
    batch run still reports every other file (the CLI's promise of one line per bad path)."""
    return assemble_report(iter_outcomes(plan(paths, timeout=timeout), contain_bugs=True, jobs=jobs))


@dataclass(frozen=True)
class FileOutcome:
    """What one candidate gave: its model reports, or its failure.  Picklable, since it comes
    back from worker processes."""

    candidate: Candidate
    models: tuple[ModelReport, ...] = ()
    failure: InspectionFailure | None = None
    companions: tuple[str, ...] = ()
    """Real paths of the files the models name as part of themselves (ONNX external data)."""


def inspect_candidate(candidate: Candidate, contain_bugs: bool) -> FileOutcome:
    """Read, analyse and dry-run render one candidate: one guard around the whole per-file
    pipeline, so whatever one file does ends as that file's failure and the other files are still
    reported.  A :class:`BiasInspectError` becomes the outcome's failure, and so does any other
    exception when ``contain_bugs`` (otherwise it propagates)."""
    path = candidate.path
    shown = _shown(path)
    if candidate.problem is not None:
        return FileOutcome(candidate, failure=InspectionFailure(shown, candidate.problem))
    try:
        descriptions = read_file(path, timeout=candidate.timeout)
        models = tuple(analyze(description) for description in descriptions)
        for model in models:
            check_renderable(model)
    except BiasInspectError as error:
        return FileOutcome(candidate, failure=InspectionFailure(shown, _one_line(error)))
    except Exception as error:
        if not contain_bugs:
            raise
        reason = f"internal error (please report): {type(error).__name__}: {error}"
        return FileOutcome(
            candidate, failure=InspectionFailure(shown, _redacted_text(" ".join(reason.split())))
        )
    companions = {_real(name) for description in descriptions for name in description.companion_files}
    return FileOutcome(candidate, models=models, companions=tuple(sorted(companions)))


def available_cores() -> int:
    """The CPU cores this process may run on (the ``--jobs`` default); here rather than in
    :mod:`biasinspect.parallel`, whose multiprocessing import a serial run never pays."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _in_daemon_process() -> bool:
    """A daemonic process (a multiprocessing worker that calls biasinspect) may not start the
    worker processes of a pool: it reads serially instead."""
    import multiprocessing

    return bool(multiprocessing.current_process().daemon)


def iter_outcomes(
    candidates: Sequence[Candidate], *, contain_bugs: bool, jobs: int = 1, command_line: bool = False
) -> Iterator[FileOutcome]:
    """Each candidate's outcome, in the candidates' order.  ``jobs`` == 1 (or a single file to
    read) reads them one after the other in this process, with no pool to start; more uses
    :func:`biasinspect.parallel.ordered_outcomes` (``command_line``: only the CLI's own process)."""
    to_read = sum(1 for candidate in candidates if candidate.problem is None)
    if jobs > 1 and to_read > 1 and not _in_daemon_process():
        from biasinspect.parallel import ordered_outcomes

        return ordered_outcomes(candidates, contain_bugs=contain_bugs, jobs=jobs, command_line=command_line)
    return (inspect_candidate(candidate, contain_bugs) for candidate in candidates)


def is_companion_failure(outcome: FileOutcome, companions: set[str]) -> bool:
    """A folder-scan find that failed only because it is a model's external data file."""
    candidate = outcome.candidate
    # Unless it is a model: a file with a model format's signature (a pickle torch.load would
    # run, a zip) that fails to read is reported whatever names it, so it cannot hide behind an
    # ONNX file.
    return (
        outcome.failure is not None
        and candidate.scanned
        and candidate.problem is None
        and _real(candidate.path) in companions
        and not _has_model_signature(candidate.path)
    )


def assemble_report(outcomes: Iterable[FileOutcome]) -> Report:
    """The report of a run: models and failures in the candidates' order."""
    models: list[ModelReport] = []
    failed: list[FileOutcome] = []
    companions: set[str] = set()
    for outcome in outcomes:
        companions.update(outcome.companions)
        models.extend(outcome.models)
        if outcome.failure is not None:
            failed.append(outcome)
    # A folder holding model.onnx and its external data (weights.bin, model.onnx.data...) is one
    # model: the data file the model names is not a bad model of its own.
    kept = [
        outcome.failure
        for outcome in failed
        if outcome.failure is not None and not is_companion_failure(outcome, companions)
    ]
    return Report(models=tuple(models), errors=tuple(kept))


def stream_items(outcomes: Iterable[FileOutcome]) -> Iterator[ModelReport | InspectionFailure]:
    """The report's models and failures one at a time, as the outcomes arrive (``--format jsonl``).

    A failure of a file found by a folder scan is held back to the end, since a model read later
    may name that file as its external data (then it is no failure at all, as in
    :func:`assemble_report`); every other item is yielded as soon as its outcome arrives.
    """
    companions: set[str] = set()
    held_back: list[FileOutcome] = []
    for outcome in outcomes:
        companions.update(outcome.companions)
        yield from outcome.models
        if outcome.failure is None:
            continue
        if outcome.candidate.scanned and outcome.candidate.problem is None:
            held_back.append(outcome)
        else:
            yield outcome.failure
    for outcome in held_back:
        if outcome.failure is not None and not is_companion_failure(outcome, companions):
            yield outcome.failure


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


__all__ = [
    "Candidate",
    "FileOutcome",
    "assemble_report",
    "inspect",
    "inspect_candidate",
    "inspect_file",
    "inspect_paths_for_cli",
    "iter_outcomes",
    "plan",
    "read_file",
    "stream_items",
]
