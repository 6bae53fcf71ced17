"""Reading many files at once on one machine, in the order a serial run reports them.

Local files are read in worker processes (a :class:`~concurrent.futures.ProcessPoolExecutor`):
the readers are CPU-bound Python and native parsers, and a native parser that crashes on a
stranger's file then takes down one worker, not the run.  URLs (any path containing ``://``) are
read in threads, since their cost is waiting for the network.

Results come back in the candidates' order through a bounded window of submitted tasks (each a
batch of up to 16 files), so a run over a million files holds at most a few hundred outcomes at a
time, and the first results are available as soon as the first batch is read.

When a worker process dies (a segfault in a native parser, the kernel's OOM killer, a CPU-time
limit), :class:`~concurrent.futures.process.BrokenProcessPool` fails every file the pool held.
Those files are then read again one by one, each in a process of its own, so the file that kills
its reader is found and reported as ``reader process crashed (signal N)`` while the files that
were merely waiting beside it are reported normally; the rest of the run continues in a fresh pool.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection

from biasinspect.api import Candidate, FileOutcome, available_cores, inspect_candidate
from biasinspect.model import InspectionFailure

_WINDOW_PER_JOB = 4
"""Tasks submitted ahead per job: enough to keep every worker busy while the head of the
window is slow, few enough that memory does not grow with the number of files."""

_MAX_BATCH = 16
"""Files per task at most.  Small files take about a millisecond of CPU each, less than a round
trip to a worker process, so a long run sends them in batches; short runs send one file per task
so that every worker gets some."""


def default_jobs() -> int:
    """The number of CPU cores this process may run on (``--jobs`` default)."""
    return available_cores()


def is_remote(path: str) -> bool:
    """A URL (``https://``, ``s3://``...): read in a thread, not a worker process."""
    return "://" in path


def _context(command_line: bool) -> multiprocessing.context.BaseContext:
    # Forking a process that has other threads can deadlock the child (a lock held by a thread
    # that does not exist in the child).  The command line's own process, while it has no other
    # thread, forks its workers: no interpreter to start, nothing to import again.  Otherwise
    # (a library caller such as a Dask worker or a web server, or URLs being read in threads) the
    # fork server starts once and forks workers from a clean process that has imported the readers.
    methods = multiprocessing.get_all_start_methods()
    if command_line and threading.active_count() == 1 and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["biasinspect.api"])
        return context
    return multiprocessing.get_context("spawn")


def _init_worker(command_line: bool) -> None:
    # The command line's processes (workers included) need only onnx's core modules.
    if command_line:
        from biasinspect.readers.onnx_reader import allow_light_onnx_import

        allow_light_onnx_import()
    # Ctrl-C reaches the whole process group: the parent alone decides what to do about it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_outcomes(
    candidates: Sequence[Candidate], *, contain_bugs: bool, jobs: int, command_line: bool = False
) -> Iterator[FileOutcome]:
    """Each candidate's outcome in the candidates' order, read by ``jobs`` workers.

    ``command_line`` is true only in biasinspect's own command-line process: its workers are
    forked and load only onnx's core modules (see :func:`_context`).

    A worker process that dies costs only the file it was reading: that file's outcome is the
    failure ``reader process crashed (signal N)``.  With ``contain_bugs`` false an unexpected
    exception from a reader propagates, as in a serial run.
    """
    to_read = sum(1 for candidate in candidates if candidate.problem is None)
    jobs = max(1, min(jobs, to_read))  # 3 files on a 64-core machine need 3 workers, not 64
    batch_size = max(1, min(_MAX_BATCH, to_read // (jobs * _WINDOW_PER_JOB * 2)))
    window = max(2, jobs * _WINDOW_PER_JOB)
    pending: deque[tuple[list[Candidate], Future[list[FileOutcome]]]] = deque()
    process_pool: ProcessPoolExecutor | None = None
    thread_pool: ThreadPoolExecutor | None = None
    batches = _batches(candidates, batch_size)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < window:
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                future: Future[list[FileOutcome]]
                if batch[0].problem is not None:
                    future = Future()
                    future.set_result(inspect_batch(batch, contain_bugs))
                elif is_remote(batch[0].path):
                    if thread_pool is None:
                        thread_pool = ThreadPoolExecutor(jobs, thread_name_prefix="biasinspect")
                    future = thread_pool.submit(inspect_batch, batch, contain_bugs)
                else:
                    if process_pool is None:
                        process_pool = ProcessPoolExecutor(
                            jobs,
                            mp_context=_context(command_line),
                            initializer=_init_worker,
                            initargs=(command_line,),
                        )
                    future = process_pool.submit(inspect_batch, batch, contain_bugs)
                pending.append((batch, future))
            if not pending:
                return
            batch, future = pending[0]
            try:
                outcomes = future.result()
            except BrokenProcessPool:
                if process_pool is not None:
                    process_pool.shutdown(wait=True, cancel_futures=True)
                process_pool = None
                _replace_broken(pending, contain_bugs, command_line)
                continue
            pending.popleft()
            yield from outcomes
    finally:
        for _, future in pending:
            future.cancel()
        if process_pool is not None:
            process_pool.shutdown(wait=True, cancel_futures=True)
        if thread_pool is not None:
            thread_pool.shutdown(wait=True, cancel_futures=True)


def inspect_batch(batch: Sequence[Candidate], contain_bugs: bool) -> list[FileOutcome]:
    """Read a few files in one task (one round trip to a worker process for all of them)."""
    return [inspect_candidate(candidate, contain_bugs) for candidate in batch]


def _batches(candidates: Sequence[Candidate], size: int) -> Iterator[list[Candidate]]:
    """Runs of up to ``size`` local files to read; a URL or a known problem is a batch of its own."""
    batch: list[Candidate] = []
    for candidate in candidates:
        if candidate.problem is None and not is_remote(candidate.path):
            batch.append(candidate)
            if len(batch) == size:
                yield batch
                batch = []
            continue
        if batch:
            yield batch
            batch = []
        yield [candidate]
    if batch:
        yield batch


def _replace_broken(
    pending: deque[tuple[list[Candidate], Future[list[FileOutcome]]]],
    contain_bugs: bool,
    command_line: bool,
) -> None:
    """After the pool died: read every file it failed again, each in a process of its own."""
    context = _context(command_line)
    # A broken pool fails all it held at once; URLs read by threads are left to finish.
    wait([future for batch, future in pending if not is_remote(batch[0].path)])
    for index, (batch, future) in enumerate(pending):
        if is_remote(batch[0].path) or not future.done():
            continue
        if future.cancelled() or isinstance(future.exception(), BrokenProcessPool):
            fresh: Future[list[FileOutcome]] = Future()
            fresh.set_result(
                [_read_isolated(candidate, context, contain_bugs, command_line) for candidate in batch]
            )
            pending[index] = (batch, fresh)


def _isolated_main(
    connection: Connection, candidate: Candidate, contain_bugs: bool, command_line: bool
) -> None:
    _init_worker(command_line)
    try:
        connection.send((True, inspect_candidate(candidate, contain_bugs)))
    except BaseException as error:  # handed to the parent, which raises it as a serial run would
        connection.send((False, error))
    finally:
        connection.close()


def _read_isolated(
    candidate: Candidate, context: multiprocessing.context.BaseContext, contain_bugs: bool, command_line: bool
) -> FileOutcome:
    """Read one file in a process of its own; its death becomes the file's failure."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(  # type: ignore[attr-defined]
        target=_isolated_main, args=(sender, candidate, contain_bugs, command_line), daemon=True
    )
    process.start()
    sender.close()
    try:
        succeeded, payload = receiver.recv()  # before join: a large result would block the child
    except EOFError:
        process.join()
        return FileOutcome(
            candidate, failure=InspectionFailure(candidate.path, _death_reason(process.exitcode))
        )
    finally:
        receiver.close()
    process.join()
    if not succeeded:
        raise payload
    outcome: FileOutcome = payload
    return outcome


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"reader process crashed (signal {-exitcode})"
    return f"reader process exited unexpectedly (exit code {exitcode})"


__all__ = ["default_jobs", "inspect_batch", "is_remote", "ordered_outcomes"]
