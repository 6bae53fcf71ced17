"""Finding model files in folders (which reader a file needs is :mod:`biasinspect.registry`'s job).

Nothing here parses a model; it opens a file only to read its first bytes (an ``.xml`` found by a
scan, to see whether it is an OpenVINO IR), without blocking, and reads nothing from what is not
a regular file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from biasinspect.errors import BiasInspectError, UnreadableFileError
from biasinspect.limits import MAX_SCAN_FILES
from biasinspect.readers.files import open_regular_file
from biasinspect.readers.openvino_reader import sniff_openvino
from biasinspect.registry import INDEX_SUFFIXES, SAFETENSORS_INDEX_SUFFIX, SNIFF_BYTES, scanned

__all__ = [
    "INDEX_SUFFIXES",
    "SAFETENSORS_INDEX_SUFFIX",
    "FoundPath",
    "read_head",
    "scan_folder",
    "scan_remote_folder",
]


def read_head(path: Path, count: int = SNIFF_BYTES) -> tuple[bytes, int]:
    """The first ``count`` bytes of a regular file, and its size.

    The file is opened without blocking and checked on the open descriptor (never stat-then-open:
    a FIFO swapped in between the two would block the run forever).
    """
    with open_regular_file(path) as handle:
        try:
            return handle.read(count), os.fstat(handle.fileno()).st_size
        except OSError as error:
            raise UnreadableFileError(f"cannot read: {error.strerror or error}") from error


@dataclass(frozen=True)
class FoundPath:
    """A path a scan produced: either a model file to read or a problem to report."""

    path: Path
    problem: str | None = None


LINK_OUTSIDE_PROBLEM = (
    "symbolic link leading outside the scanned folder: not followed (name the file itself to read it)"
)
"""The one line a folder scan gives for each link it does not follow."""


def scan_folder(folder: Path) -> Iterator[FoundPath]:
    """Model files under ``folder``, recursively, in sorted order.

    The scan reads only what is inside the folder: a symbolic link to a file is followed only when
    its target resolves inside ``folder`` (a link to ``/etc/shadow`` named ``model.safetensors``
    is yielded as a problem, :data:`LINK_OUTSIDE_PROBLEM`, and never opened); links to folders are
    not followed at all, so a link loop cannot trap the scan.  Dangling links and link loops are
    yielded as files, so reading them reports them.  Shards covered by an ``*.index.json`` are left
    to that index.  Unreadable sub-folders are yielded as problems rather than skipped silently.
    """
    root = os.path.realpath(folder)
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
            if is_dir and entry.name.lower().endswith(".mlpackage"):
                candidates.append(entry_path)  # a CoreML package is one model, read as a whole
                continue
            if is_dir:
                pending.append(entry_path)
                continue
            if entry_path.suffix.lower() == ".xml" and not _is_openvino_xml(entry_path):
                continue  # only XML whose root is an OpenVINO <net> is a model
            if scanned(entry.name):
                if _link_leaves(entry, root):
                    problems.append(FoundPath(entry_path, LINK_OUTSIDE_PROBLEM))
                    continue
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
    yield from sorted(problems, key=lambda found: found.path)


def _link_leaves(entry: os.DirEntry[str], root: str) -> bool:
    """Whether ``entry`` is a symbolic link whose target resolves outside ``root``.

    Dangling links and loops resolve (non-strictly) to a path too: inside the folder they are
    left to the reader, which names them; pointing outside, they are not followed either.
    """
    try:
        if not entry.is_symlink():
            return False
        target = os.path.realpath(entry.path)
    except (OSError, ValueError):
        return True  # cannot tell where it leads: not followed
    return os.path.commonpath([root, target]) != root


def _is_openvino_xml(path: Path) -> bool:
    try:
        return sniff_openvino(read_head(path)[0])
    except BiasInspectError:
        return True  # unreadable: reported when read, never silently skipped


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
