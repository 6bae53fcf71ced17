"""Finding model files in folders (which reader a file needs is :mod:`biasinspect.registry`'s job).

Nothing here parses a model or opens anything that is not a regular file (a FIFO would block).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from biasinspect.errors import BiasInspectError, UnreadableFileError
from biasinspect.limits import MAX_SCAN_FILES
from biasinspect.readers.files import check_file_mode, unreadable
from biasinspect.registry import INDEX_SUFFIXES, SAFETENSORS_INDEX_SUFFIX, scanned

__all__ = ["INDEX_SUFFIXES", "SAFETENSORS_INDEX_SUFFIX", "FoundPath", "check_regular_file", "scan_folder"]


def check_regular_file(path: Path) -> os.stat_result:
    """stat ``path`` and insist on a regular file; never opens it."""
    try:
        info = path.stat()
    except OSError as error:
        raise unreadable(error, path) from error
    except ValueError as error:  # an embedded NUL byte
        raise UnreadableFileError("invalid path (contains a NUL byte)") from error
    check_file_mode(info.st_mode)
    return info


@dataclass(frozen=True)
class FoundPath:
    """A path a scan produced: either a model file to read or a problem to report."""

    path: Path
    problem: str | None = None


def scan_folder(folder: Path) -> Iterator[FoundPath]:
    """Model files under ``folder``, recursively, in sorted order.

    Symbolic links to files are followed; links to folders are not (so a link loop cannot trap the
    scan).  Shards covered by an ``*.index.json`` are left to that index.  Unreadable sub-folders
    are yielded as problems rather than skipped silently.
    """
    candidates: list[Path] = []
    problems: list[FoundPath] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError as error:
            problems.append(FoundPath(Path(current), f"cannot list folder: {error.strerror or error}"))
            continue
        for entry in entries:
            entry_path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                pending.append(entry_path)
                continue
            if scanned(entry.name):
                candidates.append(entry_path)
                if len(candidates) > MAX_SCAN_FILES:
                    problems.append(
                        FoundPath(folder, f"more than {MAX_SCAN_FILES:,} model files; scan stopped")
                    )
                    pending.clear()
                    break
    covered: set[Path] = set()
    for candidate in candidates:
        if candidate.name.lower().endswith(INDEX_SUFFIXES):
            covered.update(_shards_of(candidate))
    for candidate in sorted(candidates):
        if Path(os.path.normpath(candidate)) not in covered:
            yield FoundPath(candidate)
    yield from problems


def _shards_of(index_path: Path) -> list[Path]:
    try:
        from biasinspect.readers.sharded import shard_files

        return [Path(os.path.normpath(shard)) for shard in shard_files(index_path)]
    except (BiasInspectError, OSError, ValueError):
        return []  # a broken index is reported when it is read; its shards then stand alone


def scan_remote_folder(
    url: str, files: list[str], *, timeout: float | None = None
) -> list[tuple[str, str | None]]:
    """The model files among a remote folder's listing (``files``: URLs), with the rules of
    :func:`scan_folder`: the same suffixes, and shards an index covers left to that index.

    Returns ``(url, problem)`` pairs; the problem is ``None`` for a file to read.
    """
    from biasinspect.readers.sharded import shard_names
    from biasinspect.registry import base_name
    from biasinspect.remote import join_url, open_remote

    candidates = [name for name in files if scanned(base_name(name))]
    problems: list[tuple[str, str | None]] = []
    if len(candidates) > MAX_SCAN_FILES:
        candidates = candidates[:MAX_SCAN_FILES]
        problems.append((url, f"more than {MAX_SCAN_FILES:,} model files; scan stopped"))
    covered: set[str] = set()
    for candidate in candidates:
        if base_name(candidate).endswith(INDEX_SUFFIXES):
            try:
                with open_remote(candidate, timeout=timeout) as index:
                    covered.update(join_url(candidate, shard) for shard in shard_names(index))
            except BiasInspectError:
                pass  # a broken index is reported when it is read; its shards then stand alone
    found: list[tuple[str, str | None]] = [(name, None) for name in sorted(candidates) if name not in covered]
    return found + problems
