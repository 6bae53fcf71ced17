"""Remote byte sources: a file behind a URL, read by ranges through a small block cache.

Two back ends fetch byte ranges; everything above them (the block cache, the caps, the buffer view,
siblings) is shared, so every reader works on a URL exactly as on a local file:

* ``http://`` and ``https://``: the standard library (``urllib``), with ``Range`` requests.  The
  first request asks for the first block and learns the size from ``Content-Range``, so a
  safetensors header usually costs one request.  Redirects are followed once and the final URL
  (a CDN's) is used for the following ranges.  A server that ignores ``Range`` is refused
  (unless the whole file is under :data:`MAX_UNRANGED_BYTES`), never downloaded.
* every other scheme (``s3://``, ``gs://``, ``az://``, ``hf://``...): fsspec, installed by the
  ``remote`` extra with s3fs; other protocols work when the user has installed their fsspec
  back end.  Only ``info`` (the size) and ranged ``cat_file`` calls are made, so fsspec's
  read-ahead of several MiB never applies.

Names shown anywhere are :func:`redact`-ed: user names and passwords in the URL and signed query
values (``X-Amz-Signature``, ``sig``, ``token``...) never reach a message or a report.
"""

from __future__ import annotations

import base64
import http.client
import posixpath
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from typing import Any, Protocol, SupportsIndex, overload

from biasinspect import __version__, limits
from biasinspect.errors import BiasInspectError, ResourceLimitError, UnreadableFileError, UsageError
from biasinspect.source import Buffer, NotFoundError, OutsideFolderError

BLOCK_SIZE = 64 * 1024
"""Bytes fetched per block: a typical safetensors header, zip end records and a protobuf field's
neighbourhood fit in one."""

MAX_CACHED_BLOCKS = 64
"""Blocks kept per source (4 MiB): readers revisit headers, not payloads."""

DIRECT_READ_BLOCKS = 4
"""A read spanning more blocks than this (a pickle, a central directory) is fetched as one exact
range and not cached."""

MAX_UNRANGED_BYTES = 16 * 1024 * 1024
"""A server that ignores ``Range`` requests is used only for files up to this size (downloaded
whole); a larger file is refused, never downloaded."""

DEFAULT_TIMEOUT = 30.0
"""Seconds each network operation may take (``--timeout``)."""

INSTALL_HINT = "pip install 'biasinspect[remote]'"

# Query parameters whose values are secrets in signed URLs (S3, GCS, Azure SAS, hubs, CDNs).
_SECRET_PARAM = re.compile(
    r"^(x-amz-.*|x-goog-.*|sig|signature|se|sv|sp|skoid|sktid|skt|ske|sks|skv|.*token.*|.*key.*|"
    r".*secret.*|.*password.*|.*passwd.*|.*credential.*|.*auth.*|.*session.*|policy|expires)$",
    re.IGNORECASE,
)


def redact(url: str) -> str:
    """``url`` with credentials removed: userinfo becomes ``***@``, secret query values ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{urllib.parse.quote(key, safe='-_.~')}="
            + ("***" if _SECRET_PARAM.match(key) else urllib.parse.quote(value, safe="-_.~/:"))
            for key, value in pairs
        )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def scheme_of(url: str) -> str:
    """The lower-cased scheme of a URL (``s3``, ``https``...)."""
    return url.split("://", 1)[0].lower()


# ------------------------------------------------------------------------------------------------
# Range fetchers (the only network code)


class _Fetcher(Protocol):
    """Fetches byte ranges of one remote file."""

    size: int
    url: str
    """The real URL (never shown)."""

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (``end <= size``), in one request."""
        ...

    def sibling(self, relative: str) -> _Fetcher:
        """A fetcher for the file ``relative`` to this one."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _join(url: str, relative: str) -> str:
    """``relative`` resolved against ``url``'s folder (query kept: a folder-wide token still
    applies); OutsideFolderError if the result leaves that folder."""
    parts = urllib.parse.urlsplit(url)
    folder = posixpath.dirname(parts.path) + "/"
    # A URL path is percent-encoded; an fsspec path (an S3 key) is not.
    encoded = urllib.parse.quote(relative, safe="/-_.~") if parts.scheme in ("http", "https") else relative
    joined = posixpath.normpath(posixpath.join(folder, encoded))
    if not joined.startswith(folder) or relative.startswith(("/", "\\")):
        raise OutsideFolderError(f"{relative!r} lies outside the model's folder")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, joined, parts.query, ""))


def _http_status_error(code: int, reason: str) -> UnreadableFileError:
    if code == 404 or code == 410:
        return NotFoundError(f"not found (HTTP {code})")
    if code == 401:
        return UnreadableFileError("authentication required (HTTP 401)")
    if code == 403:
        return UnreadableFileError("access denied (HTTP 403)")
    if code == 416:
        return UnreadableFileError("the server refused the byte range (HTTP 416)")
    if 500 <= code <= 599:
        return UnreadableFileError(f"server error (HTTP {code}{' ' + reason if reason else ''})")
    return UnreadableFileError(f"unexpected HTTP status {code}{' ' + reason if reason else ''}")


def _network_error(error: BaseException, timeout: float) -> UnreadableFileError:
    """One line for a failure below HTTP (no URL in it: messages may carry the real URL)."""
    reason: object = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
        return UnreadableFileError(f"timed out after {timeout:g} s (raise it with --timeout)")
    if isinstance(reason, ssl.SSLError):
        detail = getattr(reason, "verify_message", None) or reason.reason or type(reason).__name__
        return UnreadableFileError(f"TLS error: {detail}")
    if isinstance(reason, ConnectionRefusedError):
        return UnreadableFileError("cannot connect: connection refused")
    if isinstance(reason, socket.gaierror):
        return UnreadableFileError("cannot connect: unknown host")
    if isinstance(reason, (ConnectionError, http.client.HTTPException)):
        return UnreadableFileError(f"connection lost ({type(reason).__name__})")
    if isinstance(reason, OSError) and reason.strerror:
        return UnreadableFileError(f"network error: {reason.strerror}")
    return UnreadableFileError(f"network error ({type(reason).__name__})")


class _HttpFetcher:
    """HTTP(S) ranges with the standard library."""

    def __init__(self, url: str, timeout: float, first: int) -> None:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            raise UsageError("invalid URL: no host")
        self.url = url  # with any user:password (never shown: names are redacted)
        self._auth: str | None = None
        plain = url
        if parts.username is not None:
            # Sent to this host only: urllib does not forward unredirected headers on a redirect.
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
            plain = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        self._plain = plain
        self._timeout = timeout
        self._whole = False
        self._target = plain  # after the first redirect: the final URL
        self.first_block = b""
        self.size = self._open(first)

    def _request(self, start: int, end: int) -> http.client.HTTPResponse:
        request = urllib.request.Request(self._target, headers={"User-Agent": f"biasinspect/{__version__}"})
        request.add_header("Range", f"bytes={start}-{end - 1}")
        if self._auth is not None and self._target == self._plain:
            request.add_unredirected_header("Authorization", self._auth)
        try:
            response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=self._timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416 and start == 0:
                raise _EmptyFile from None
            raise _http_status_error(error.code, str(error.reason or "")) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise _network_error(error, self._timeout) from None
        return response

    def _read(self, response: http.client.HTTPResponse, count: int) -> bytes:
        try:
            return response.read(count)
        except (OSError, http.client.HTTPException) as error:
            raise _network_error(error, self._timeout) from None

    def _open(self, first: int) -> int:
        """Fetch the first block; return the file's size."""
        try:
            response = self._request(0, first)
        except _EmptyFile:
            return 0
        with response:
            self._target = response.geturl()
            if response.status == 206:
                total = _content_range_total(response.headers.get("Content-Range", ""))
                if total is None:
                    raise UnreadableFileError("the server does not tell the file's size (Content-Range)")
                self.first_block = self._read(response, min(first, total))
                return total
            length = response.headers.get("Content-Length")
            size = int(length) if length is not None and length.isdigit() else None
            if size is None or size > MAX_UNRANGED_BYTES:
                shown = f"{size:,}-byte file" if size is not None else "file of unknown size"
                raise UnreadableFileError(
                    "the server ignores HTTP Range requests (it sends the whole file); biasinspect "
                    f"reads only parts of a file and will not download this {shown} (the limit is "
                    f"{MAX_UNRANGED_BYTES // (1024 * 1024)} MiB)"
                )
            self.first_block = self._read(response, size + 1)
            if len(self.first_block) != size:
                raise UnreadableFileError("connection lost (the response ended early)")
            self._whole = True
            return size

    def fetch(self, start: int, end: int) -> bytes:
        if self._whole:
            return self.first_block[start:end]
        response = self._request(start, end)
        with response:
            if response.status != 206:
                raise UnreadableFileError(
                    f"the server ignored an HTTP Range request (status {response.status}); not downloading the file"
                )
            first = _content_range_start(response.headers.get("Content-Range", ""))
            if first != start:
                raise UnreadableFileError("the server answered a different byte range than asked")
            data = self._read(response, end - start)
        if len(data) != end - start:
            raise UnreadableFileError("connection lost (the response ended early)")
        return data

    def sibling(self, relative: str) -> _Fetcher:
        return _HttpFetcher(_join(self.url, relative), self._timeout, BLOCK_SIZE)

    def close(self) -> None:
        self.first_block = b""


class _EmptyFile(Exception):
    """HTTP 416 for the first range: the file has no bytes."""


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def _content_range_total(header: str) -> int | None:
    match = _CONTENT_RANGE.match(header)
    return int(match.group(3)) if match and match.group(3) != "*" else None


def _content_range_start(header: str) -> int | None:
    match = _CONTENT_RANGE.match(header)
    return int(match.group(1)) if match else None


def _fsspec_error(error: BaseException, timeout: float) -> BiasInspectError:
    """One line for an fsspec back end's failure (never its message: it may quote the URL)."""
    if isinstance(error, BiasInspectError):
        return error
    if isinstance(error, FileNotFoundError):
        return NotFoundError("not found")
    if isinstance(error, PermissionError):
        return UnreadableFileError("access denied")
    if isinstance(error, IsADirectoryError):
        return UnreadableFileError("is a folder")
    name = type(error).__name__
    if "Timeout" in name or isinstance(error, TimeoutError):
        return UnreadableFileError(f"timed out after {timeout:g} s (raise it with --timeout)")
    if "Credentials" in name:
        return UnreadableFileError("no credentials for this storage (configure them as its tools expect)")
    if "Connect" in name or isinstance(error, ConnectionError):
        return UnreadableFileError("cannot connect")
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return UnreadableFileError(f"cannot read: {error.strerror}")
    return UnreadableFileError(f"cannot read ({name})")


def _storage_options(protocol: str, timeout: float) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"max_attempts": 2},
            },
        }
    return {}


def fsspec_filesystem(url: str, timeout: float) -> tuple[Any, str]:
    """``(filesystem, path)`` for a URL through fsspec; one line naming the extra when missing."""
    protocol = scheme_of(url)
    try:
        import fsspec.core
    except ImportError as error:
        raise UnreadableFileError(
            f"reading {protocol}:// URLs needs the remote extra: {INSTALL_HINT}"
        ) from error
    try:
        return fsspec.core.url_to_fs(url, **_storage_options(protocol, timeout))  # type: ignore[no-any-return]
    except ImportError as error:
        raise UnreadableFileError(_missing_back_end(protocol)) from error
    except ValueError as error:
        if "protocol" in str(error).lower():
            raise UsageError(f"unknown URL scheme {protocol!r}") from error
        raise UsageError(f"invalid URL ({type(error).__name__})") from error


def _missing_back_end(protocol: str) -> str:
    """The one line for a protocol whose fsspec back end is not installed, naming its package."""
    if protocol in ("s3", "s3a"):
        return f"reading {protocol}:// URLs needs the remote extra: {INSTALL_HINT}"
    try:
        from fsspec.registry import known_implementations

        class_path = str(known_implementations.get(protocol, {}).get("class", ""))
    except ImportError:
        class_path = ""
    package = class_path.split(".", 1)[0] if class_path else ""
    if package:
        return f"reading {protocol}:// URLs needs the {package} package: pip install {package}"
    return f"reading {protocol}:// URLs needs an fsspec back end for {protocol}:// that is not installed"


class _FsspecFetcher:
    """Ranges through an fsspec filesystem (``info`` and ranged ``cat_file`` only)."""

    def __init__(self, url: str, timeout: float, filesystem: Any = None, path: str | None = None) -> None:
        self.url = url
        self._timeout = timeout
        if filesystem is None or path is None:
            filesystem, path = fsspec_filesystem(url, timeout)
        self._fs = filesystem
        self._path = path
        try:
            info = filesystem.info(path)
        except Exception as error:
            raise _fsspec_error(error, timeout) from None
        if info.get("type") == "directory":
            raise UnreadableFileError("is a folder")
        size = info.get("size")
        if not isinstance(size, int):
            raise UnreadableFileError("the storage does not tell the file's size")
        self.size = size

    def fetch(self, start: int, end: int) -> bytes:
        try:
            data: bytes = self._fs.cat_file(self._path, start=start, end=end)
        except Exception as error:
            raise _fsspec_error(error, self._timeout) from None
        if len(data) != end - start:
            raise UnreadableFileError("the storage answered a different byte range than asked")
        return data

    def sibling(self, relative: str) -> _Fetcher:
        return _FsspecFetcher(_join(self.url, relative), self._timeout)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# The source: block cache and caps over a fetcher


class RemoteSource:
    """A :class:`~biasinspect.source.ByteSource` over a URL: reads are served from a small LRU
    cache of :data:`BLOCK_SIZE` blocks; missing neighbouring blocks are fetched in one request.
    Counts ``requests`` and ``fetched`` bytes and stops at :data:`limits.MAX_FETCHED_BYTES`."""

    def __init__(self, fetcher: _Fetcher, first_block: bytes = b"") -> None:
        self._fetcher = fetcher
        self.name = redact(fetcher.url)
        self._size = fetcher.size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self.requests = 1
        self.fetched = len(first_block)
        if first_block:
            for index in range(0, len(first_block), BLOCK_SIZE):
                self._blocks[index // BLOCK_SIZE] = first_block[index : index + BLOCK_SIZE]

    @property
    def size(self) -> int:
        """Total size in bytes (from the server)."""
        return self._size

    def _fetch(self, start: int, end: int) -> bytes:
        if self.fetched + (end - start) > limits.MAX_FETCHED_BYTES:
            raise ResourceLimitError(
                f"reading this file would fetch more than {limits.MAX_FETCHED_BYTES:,} bytes"
                " (the limit for one remote file)"
            )
        self.requests += 1
        self.fetched += end - start
        return self._fetcher.fetch(start, end)

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            self._load(index, index + 1)
            block = self._blocks[index]
        else:
            self._blocks.move_to_end(index)
        return block

    def _load(self, first: int, last: int) -> None:
        """Fetch blocks ``[first, last)`` in one request and cache them."""
        start = first * BLOCK_SIZE
        data = self._fetch(start, min(last * BLOCK_SIZE, self._size))
        for index in range(first, last):
            offset = (index - first) * BLOCK_SIZE
            self._blocks[index] = data[offset : offset + BLOCK_SIZE]
            self._blocks.move_to_end(index)
        while len(self._blocks) > MAX_CACHED_BLOCKS:
            self._blocks.popitem(last=False)

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the file)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1
        if last - first > DIRECT_READ_BLOCKS:
            return self._fetch(offset, end)
        missing = [index for index in range(first, last) if index not in self._blocks]
        if missing:
            self._load(missing[0], missing[-1] + 1)
        data = b"".join(self._block(index) for index in range(first, last))
        skip = offset - first * BLOCK_SIZE
        return data[skip : skip + end - offset]

    def view(self) -> Buffer:
        """The whole file as a lazily fetched buffer (only indexed blocks are fetched)."""
        return RemoteBuffer(self)

    def locate(self, relative: str) -> str:
        """The (redacted) URL of ``relative`` next to this file."""
        return redact(_join(self._fetcher.url, relative))

    def sibling(self, relative: str) -> RemoteSource:
        """The file ``relative`` to this one (it may not leave this URL's folder)."""
        return _source(self._fetcher.sibling(relative))

    def close(self) -> None:
        """Drop the cache."""
        self._blocks.clear()
        self._fetcher.close()

    def __enter__(self) -> RemoteSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RemoteBuffer:
    """``len``/index/slice access over a :class:`RemoteSource`, fetching blocks on demand (for the
    protobuf walker, which indexes tags and copies runs but skips payloads)."""

    def __init__(self, source: RemoteSource) -> None:
        self._source = source
        self._cached_index = -1
        self._cached = b""

    def __len__(self) -> int:
        return self._source.size

    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> bytes: ...

    def __getitem__(self, index: SupportsIndex | slice) -> int | bytes:
        size = self._source.size
        if isinstance(index, slice):
            start, stop, step = index.indices(size)
            if step != 1:
                raise ValueError("only contiguous slices are supported")
            return self._source.read_at(start, max(0, stop - start))
        position = index.__index__()
        if position < 0:
            position += size
        if not 0 <= position < size:
            raise IndexError("index out of range")
        block = position // BLOCK_SIZE
        if block != self._cached_index:
            self._cached = self._source._block(block)
            self._cached_index = block
        return self._cached[position - block * BLOCK_SIZE]


def _source(fetcher: _Fetcher) -> RemoteSource:
    first = fetcher.first_block if isinstance(fetcher, _HttpFetcher) else b""
    return RemoteSource(fetcher, first)


def open_remote(url: str, *, timeout: float | None = None) -> RemoteSource:
    """A source for a URL: ``http(s)://`` with the standard library, anything else through fsspec."""
    seconds = DEFAULT_TIMEOUT if timeout is None else timeout
    if scheme_of(url) in ("http", "https"):
        return _source(_HttpFetcher(url, seconds, BLOCK_SIZE))
    return _source(_FsspecFetcher(url, seconds))


def list_remote_folder(url: str, *, timeout: float | None = None) -> list[str] | None:
    """Every file URL under a remote folder (an S3 prefix, any fsspec listing), sorted; ``None``
    when ``url`` names a file (or an http(s) URL, which has no listing).

    At most :data:`limits.MAX_SCAN_FILES` + 1 names are returned (the caller reports the cap).
    """
    if scheme_of(url) in ("http", "https"):
        return None
    seconds = DEFAULT_TIMEOUT if timeout is None else timeout
    filesystem, path = fsspec_filesystem(url, seconds)
    try:
        info = filesystem.info(path)
    except FileNotFoundError:
        return None  # reported when the file is opened
    except Exception as error:
        raise _fsspec_error(error, seconds) from None
    if info.get("type") != "directory":
        return None
    try:
        found = filesystem.find(path, withdirs=False)
    except Exception as error:
        raise _fsspec_error(error, seconds) from None
    names = sorted(str(name) for name in found)[: limits.MAX_SCAN_FILES + 1]
    protocol = scheme_of(url)
    return [f"{protocol}://{name.split('://', 1)[-1]}" for name in names]


def join_url(url: str, relative: str) -> str:
    """``relative`` resolved next to ``url`` (OutsideFolderError if it leaves that folder)."""
    return _join(url, relative)


__all__ = [
    "BLOCK_SIZE",
    "RemoteBuffer",
    "RemoteSource",
    "fsspec_filesystem",
    "join_url",
    "list_remote_folder",
    "open_remote",
    "redact",
]
