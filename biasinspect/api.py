"""The library entry point: paths in, :class:`~biasinspect.model.Report` out.

Every file is read by the reader its content calls for; every failure a file can cause becomes
an :class:`~biasinspect.model.InspectionFailure` in the report, so one bad file never hides the
others.  Nothing is printed here and no exit codes exist here (that is the CLI's job).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from biasinspect.analysis import analyze
from biasinspect.detect import FileFormat, scan_folder, sniff
from biasinspect.errors import BiasInspectError, ResourceLimitError
from biasinspect.model import InspectionFailure, ModelDescription, ModelReport, Report


def _reader_for(file_format: FileFormat) -> Callable[[Path], list[ModelDescription]]:
    # Imported on demand so that start-up stays light and onnx is imported only for ONNX files.
    if file_format is FileFormat.ONNX:
        from biasinspect.readers.onnx_reader import read_onnx

        return read_onnx
    if file_format is FileFormat.ZIP:
        from biasinspect.readers.torch_reader import read_torch_zip

        return read_torch_zip
    if file_format is FileFormat.PICKLE:
        from biasinspect.readers.torch_reader import read_pickle_file

        return read_pickle_file
    if file_format is FileFormat.SAFETENSORS:
        from biasinspect.readers.safetensors_reader import read_safetensors

        return read_safetensors
    from biasinspect.readers.sharded import read_sharded_index

    return read_sharded_index


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
class Candidate:
    """One file a run will read (or a path already known to be bad, with its ``problem``)."""

    path: str
    problem: str | None
    scanned: bool
    """Found by a folder scan (not named by the caller)."""


def _candidates(paths: Iterable[str | os.PathLike[str]]) -> list[Candidate]:
    expanded: list[Candidate] = []
    for raw in paths:
        text = os.fspath(raw)
        if not text:
            expanded.append(Candidate(text, "empty path", False))  # Path("") would silently mean "."
            continue
        path = Path(text)
        if path.is_dir():
            found = list(scan_folder(path))
            if not found:
                expanded.append(Candidate(text, "no model files found in this folder", False))
            expanded.extend(Candidate(str(item.path), item.problem, True) for item in found)
        else:
            expanded.append(Candidate(text, None, False))
    return expanded


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str | None]]:
    """Turn command-line paths into files to read, folders expanded; each with a problem or None."""
    return [(candidate.path, candidate.problem) for candidate in _candidates(paths)]


def inspect(*paths: str | os.PathLike[str], jobs: int = 1) -> Report:
    """Inspect files and folders (scanned recursively); failures are collected, not raised.

    Each failure is an :class:`InspectionFailure` with a one-line reason.  An exception that is not
    a :class:`BiasInspectError` is a bug in biasinspect and propagates.  ``jobs`` > 1 reads local
    files in that many worker processes and URLs in that many threads
    (:mod:`biasinspect.parallel`); the report is the same as with ``jobs=1``.
    """
    return assemble_report(iter_outcomes(plan(paths), contain_bugs=False, jobs=jobs))


def inspect_paths_for_cli(paths: Iterable[str | os.PathLike[str]], jobs: int = 1) -> Report:
    """Like :func:`inspect`, but a bug met on one file is reported as that file's failure, so a
    batch run still reports every other file (the CLI's promise of one line per bad path)."""
    return assemble_report(iter_outcomes(plan(paths), contain_bugs=True, jobs=jobs))


@dataclass(frozen=True)
class FileOutcome:
    """What one candidate gave: its model reports, or its failure.  Picklable, since it comes
    back from worker processes."""

    candidate: Candidate
    models: tuple[ModelReport, ...] = ()
    failure: InspectionFailure | None = None
    companions: tuple[str, ...] = ()
    """Real paths of the files the models name as part of themselves (ONNX external data)."""


def plan(paths: Iterable[str | os.PathLike[str]]) -> list[Candidate]:
    """The files a run will read, in report order: folders expanded, each with a problem or None."""
    return _candidates(paths)


def inspect_candidate(candidate: Candidate, contain_bugs: bool) -> FileOutcome:
    """Read and analyse one candidate; a :class:`BiasInspectError` becomes the outcome's failure,
    and so does any other exception when ``contain_bugs`` (otherwise it propagates)."""
    path = candidate.path
    if candidate.problem is not None:
        return FileOutcome(candidate, failure=InspectionFailure(path, candidate.problem))
    try:
        descriptions = read_file(Path(path))
    except BiasInspectError as error:
        return FileOutcome(candidate, failure=InspectionFailure(path, _one_line(error)))
    except Exception as error:
        if not contain_bugs:
            raise
        reason = f"internal error (please report): {type(error).__name__}: {error}"
        return FileOutcome(candidate, failure=InspectionFailure(path, " ".join(reason.split())))
    companions = {_real(name) for description in descriptions for name in description.companion_files}
    models = tuple(analyze(description) for description in descriptions)
    return FileOutcome(candidate, models=models, companions=tuple(sorted(companions)))


def iter_outcomes(
    candidates: Sequence[Candidate], *, contain_bugs: bool, jobs: int = 1, command_line: bool = False
) -> Iterator[FileOutcome]:
    """Each candidate's outcome, in the candidates' order.  ``jobs`` == 1 (or a single file to
    read) reads them one after the other in this process, with no pool to start; more uses
    :func:`biasinspect.parallel.ordered_outcomes` (``command_line``: only the CLI's own process)."""
    to_read = sum(1 for candidate in candidates if candidate.problem is None)
    if jobs > 1 and to_read > 1:
        from biasinspect.parallel import ordered_outcomes

        return ordered_outcomes(candidates, contain_bugs=contain_bugs, jobs=jobs, command_line=command_line)
    return (inspect_candidate(candidate, contain_bugs) for candidate in candidates)


def is_companion_failure(outcome: FileOutcome, companions: set[str]) -> bool:
    """A folder-scan find that failed only because it is a model's external data file."""
    candidate = outcome.candidate
    return (
        outcome.failure is not None
        and candidate.scanned
        and candidate.problem is None
        and _real(candidate.path) in companions
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


def _real(path: str) -> str:
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
