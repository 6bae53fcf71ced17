"""Inspection on a Dask cluster: ``pip install 'biasinspect[dask]'`` (dask[distributed], pyarrow).

Dask does the scheduling, the retries and the data movement; this module only cuts the file list
into tasks and puts the results back in report order.  A task reads a few files with the same
:func:`biasinspect.api.inspect_candidate` as a local run, so the results equal a serial run's.

* :func:`inspect_on_cluster` returns the :class:`~biasinspect.model.Report`.
* :func:`write_partitions` has the workers write JSONL or Parquet partitions and returns their
  paths, so nothing but counts comes back to the client.
* :func:`iter_outcomes_on_cluster` yields each file's outcome in order (the CLI's
  ``--dask-scheduler`` streams from it).

Paths are read *by the workers*: local paths must name the same files on every worker (a shared
file system, or a ``LocalCluster``); URLs are read wherever the task runs.  A worker that dies on a
file is replaced by Dask and the task is tried again on another worker; when Dask gives up on a
task (``KilledWorker``), its files are tried one per task, and the file that still kills its
workers is reported as ``reader process crashed on the Dask workers (KilledWorker)``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from biasinspect.api import (
    Candidate,
    FileOutcome,
    assemble_report,
    inspect_candidate,
    is_companion_failure,
    plan,
)
from biasinspect.jsonl import error_record, line, model_record
from biasinspect.model import InspectionFailure, ModelReport, Report
from biasinspect.render import model_to_json

if TYPE_CHECKING:
    from distributed import Client

PARTITION_FORMATS = ("jsonl", "parquet")

_CONNECT_TIMEOUT_S = 30
"""How long ``--dask-scheduler`` waits for the scheduler to answer."""

_FILES_PER_TASK = 64
"""Enough files per task that a task's round trip through the scheduler (milliseconds, more on a
busy cluster) is small beside the reading (about a millisecond of CPU per small file)."""


def expand(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Candidate]:
    """The files to read, in report order: a path, a list of paths/URLs, or a prefix.

    Local folders are scanned as the CLI scans them.  A URL ending in ``/`` is a prefix: every
    object under it with a model file name (``*.onnx``, ``*.safetensors``, ...) is listed with
    fsspec, in sorted order.  Any other URL names one file.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    # plan() scans local folders and remote prefixes (fsspec listings) with the same rules.
    return plan(items)


def _inspect_chunk(candidates: Sequence[Candidate]) -> list[FileOutcome]:
    return [inspect_candidate(candidate, True) for candidate in candidates]


def _chunks(candidates: Sequence[Candidate], size: int) -> list[list[Candidate]]:
    return [list(candidates[start : start + size]) for start in range(0, len(candidates), size)]


def _killed(candidate: Candidate, error: BaseException) -> FileOutcome:
    message = f"reader process crashed on the Dask workers ({type(error).__name__})"
    return FileOutcome(candidate, failure=InspectionFailure(candidate.path, message))


def iter_outcomes_on_cluster(
    client: Client, candidates: Sequence[Candidate], *, files_per_task: int = _FILES_PER_TASK
) -> Iterator[FileOutcome]:
    """Each candidate's outcome in order, read on the cluster; a bounded number of tasks is in
    flight at a time, so the client holds a few results, not the whole run's."""
    from distributed import KilledWorker

    threads = sum(client.nthreads().values()) or 1
    window = max(4, 4 * threads)
    chunks = iter(_chunks(candidates, max(1, files_per_task)))
    pending: deque[tuple[list[Candidate], Any]] = deque()
    try:
        while True:
            while len(pending) < window:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                pending.append((chunk, client.submit(_inspect_chunk, chunk, pure=False)))
            if not pending:
                return
            chunk, future = pending.popleft()
            try:
                outcomes: list[FileOutcome] = future.result()
            except KilledWorker:
                outcomes = _one_file_per_task(client, chunk)
            future.release()
            yield from outcomes
    finally:
        for _, future in pending:
            future.cancel()


def _one_file_per_task(client: Client, chunk: list[Candidate]) -> list[FileOutcome]:
    """After Dask gave up on a task: its files one per task, so only the killer is lost."""
    from distributed import KilledWorker

    futures = [client.submit(_inspect_chunk, [candidate], pure=False) for candidate in chunk]
    outcomes: list[FileOutcome] = []
    for candidate, future in zip(chunk, futures, strict=True):
        try:
            outcomes.extend(future.result())
        except KilledWorker as error:
            outcomes.append(_killed(candidate, error))
        future.release()
    return outcomes


def iter_outcomes_on_scheduler(address: str, candidates: Sequence[Candidate]) -> Iterator[FileOutcome]:
    """:func:`iter_outcomes_on_cluster` on the scheduler at ``address`` (``tcp://host:8786``)."""
    try:
        from distributed import Client
    except ImportError as error:
        from biasinspect.errors import UsageError

        raise UsageError("--dask-scheduler needs Dask: pip install 'biasinspect[dask]'") from error
    try:
        client = Client(address, set_as_default=False, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as error:  # unreachable, refused, timed out, malformed address
        from biasinspect.errors import UsageError

        reason = " ".join(str(error).split()) or type(error).__name__
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {reason}") from error
    with client:
        yield from iter_outcomes_on_cluster(client, candidates)


def inspect_on_cluster(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    client: Client,
    *,
    files_per_task: int = _FILES_PER_TASK,
) -> Report:
    """Inspect files, folders, URLs or a URL prefix (see :func:`expand`) on the cluster; the
    report equals ``biasinspect.inspect`` on the same paths (bugs in a reader are contained as
    that file's failure, as on the command line)."""
    return assemble_report(iter_outcomes_on_cluster(client, expand(paths), files_per_task=files_per_task))


def write_partitions(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    client: Client,
    output: str | os.PathLike[str],
    *,
    format: str = "jsonl",
    files_per_partition: int = 256,
) -> list[str]:
    """Inspect on the cluster and have the workers write the results under ``output`` (a folder
    or an fsspec URL every worker can write to), one partition per ``files_per_partition`` files:
    ``part-00000.jsonl`` (lines as ``--format jsonl``, without the summary line) or
    ``part-00000.parquet`` (one row per layer, see README).  Returns the partition paths in order.

    A file found by a folder scan that failed is written last, in a partition of its own, once
    every model has been read (it may be a model's external data file, then it is no failure).
    """
    if format not in PARTITION_FORMATS:
        raise ValueError(f"format must be one of {', '.join(PARTITION_FORMATS)}, not {format!r}")
    import fsspec

    target = os.fspath(output).rstrip("/")
    filesystem, root = fsspec.core.url_to_fs(target)
    filesystem.makedirs(root, exist_ok=True)
    chunks = _chunks(expand(paths), max(1, files_per_partition))
    names = [f"{target}/part-{index:05d}.{format}" for index in range(len(chunks) + 1)]
    futures = client.map(_write_partition, chunks, names[:-1], [format] * len(chunks), pure=False)
    held_back: list[FileOutcome] = []
    companions: set[str] = set()
    for partition_held_back, partition_companions in client.gather(futures):
        held_back.extend(partition_held_back)
        companions.update(partition_companions)
    kept = [outcome for outcome in held_back if not is_companion_failure(outcome, companions)]
    written = names[:-1]
    if kept:
        _write_items(names[-1], format, [outcome.failure for outcome in kept if outcome.failure])
        written.append(names[-1])
    return written


def _write_partition(
    candidates: list[Candidate], name: str, format: str
) -> tuple[list[FileOutcome], list[str]]:
    """Runs on a worker: read the files, write the partition, hand back only what the client
    needs to settle folder-scan failures."""
    items: list[ModelReport | InspectionFailure] = []
    held_back: list[FileOutcome] = []
    companions: set[str] = set()
    for outcome in _inspect_chunk(candidates):
        companions.update(outcome.companions)
        items.extend(outcome.models)
        if outcome.failure is None:
            continue
        if outcome.candidate.scanned and outcome.candidate.problem is None:
            held_back.append(outcome)
        else:
            items.append(outcome.failure)
    _write_items(name, format, items)
    return held_back, sorted(companions)


def _write_items(name: str, format: str, items: Sequence[ModelReport | InspectionFailure]) -> None:
    import fsspec

    if format == "jsonl":
        with fsspec.open(name, "w", encoding="utf-8") as stream:
            for item in items:
                record = model_record(item) if isinstance(item, ModelReport) else error_record(item)
                stream.write(line(record))
        return
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.Table.from_pylist([row for item in items for row in parquet_rows(item)], parquet_schema())
    with fsspec.open(name, "wb") as stream:
        pyarrow.parquet.write_table(table, stream)


def parquet_schema() -> Any:
    """The ``pyarrow.Schema`` of the Parquet partitions (every partition has all the columns)."""
    import pyarrow

    dims = pyarrow.list_(pyarrow.int64())
    return pyarrow.schema(
        [
            ("path", pyarrow.string()),
            ("location", pyarrow.string()),
            ("format", pyarrow.string()),
            ("layer", pyarrow.string()),
            ("op", pyarrow.string()),
            ("in_channels", pyarrow.int64()),
            ("out_channels", pyarrow.int64()),
            ("groups", pyarrow.int64()),
            ("kernel_shape", dims),
            ("output_spatial", dims),
            ("weight_shape", dims),
            ("weight_params", pyarrow.int64()),
            ("transposed", pyarrow.bool_()),
            ("bias_kind", pyarrow.string()),
            ("bias_shape", dims),
            ("bias_params", pyarrow.int64()),
            ("bias_source", pyarrow.string()),
            ("followed_by", pyarrow.string()),
            ("formula", pyarrow.string()),
            ("model_params", pyarrow.int64()),
            ("error", pyarrow.string()),
        ]
    )


def parquet_rows(item: ModelReport | InspectionFailure) -> list[dict[str, Any]]:
    """The Parquet rows of a model (one per conv layer; one with an empty ``layer`` when it has
    none) or of a failure (one, with ``error`` set)."""
    if isinstance(item, InspectionFailure):
        return [{"path": item.path, "error": item.message}]
    model = model_to_json(item)
    base = {
        "path": model["path"],
        "location": model["location"],
        "format": model["format"],
        "model_params": model["totals"]["model_params"],
    }
    if not model["layers"]:
        return [base]
    rows: list[dict[str, Any]] = []
    for layer in model["layers"]:
        bias = layer["bias"]
        rows.append(
            {
                **base,
                "layer": layer["name"],
                "op": layer["op"],
                "in_channels": layer["in_channels"],
                "out_channels": layer["out_channels"],
                "groups": layer["groups"],
                "kernel_shape": layer["kernel_shape"],
                "output_spatial": layer["output_spatial"],
                "weight_shape": layer["weight_shape"],
                "weight_params": layer["weight_params"],
                "transposed": layer["transposed"],
                "bias_kind": bias["kind"],
                "bias_shape": bias["shape"],
                "bias_params": bias["params"],
                "bias_source": bias["source"],
                "followed_by": layer["followed_by"],
                "formula": layer["formula"],
            }
        )
    return rows


__all__ = [
    "PARTITION_FORMATS",
    "expand",
    "inspect_on_cluster",
    "iter_outcomes_on_cluster",
    "iter_outcomes_on_scheduler",
    "parquet_rows",
    "parquet_schema",
    "write_partitions",
]
