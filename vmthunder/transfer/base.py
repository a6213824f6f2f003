"""The one interface of transfer drivers, and the choice by URI scheme.

A source says how big it is, where its data is and reads it; a
destination writes, flushes, and either commits (the copy becomes
visible under its name) or aborts (nothing that looks finished is left).
Each transport is one small class behind these (sources.py, http.py,
agent.py, destinations.py); the engine (engine.py) gives every copy the
same properties whichever drivers it joins.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import os
import urllib.parse

from vmthunder.redaction import redact_url

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset``: data, or (``data`` False) a range
    the source knows reads as zeros (a hole), which is neither read nor
    written."""

    offset: int
    length: int
    data: bool = True


class ThreadJobs:
    """Blocking calls on a descriptor, run in the loop's worker threads
    and tracked: a cancelled caller does not stop a call that started,
    so :meth:`drain` waits for them all before the descriptor is closed
    (a late pread or pwrite must never meet a reused descriptor)."""

    def __init__(self):
        self.pending: set[asyncio.Future] = set()

    async def run(self, fn, *args):
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)
        return await asyncio.shield(fut)

    async def drain(self) -> None:
        while self.pending:
            await asyncio.gather(*list(self.pending),
                                 return_exceptions=True)


class Source(abc.ABC):
    """Where the bytes come from.

    Set by :meth:`open`: ``size``; optionally ``manifest`` (a
    :class:`~vmthunder.volume.manifest.Manifest`: every chunk read is
    checked against it) and ``whole_digest`` (``(algorithm, hex)``: the
    whole image is hashed in order and checked before commit).
    """

    size: int = 0
    manifest = None
    whole_digest: tuple[str, str] | None = None
    # Reads of this size, this many in flight (the engine's defaults).
    request_size: int = 2 * MiB
    max_in_flight: int = 8
    # True: read() must be called in offset order (a stream); the engine
    # still overlaps writes and hashing with it.
    sequential: bool = False

    def __init__(self, uri: str, options: dict):
        self.uri = uri
        self.options = options
        self.bytes_read = 0

    def describe(self) -> str:
        """The URI for messages, without passwords."""
        return redact_url(self.uri)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, learn the size (raise SourceError, or OSError and
        BlockError, which the engine words)."""

    async def prepare(self, report) -> None:
        """Work before the bytes flow (the agent's precache): call
        ``report(stage, done, total)`` as it goes."""

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Extents covering ``[offset, offset+length)`` in order (the
        default: all data). May describe less; the engine asks again."""
        return [Extent(offset, length, True)]

    @abc.abstractmethod
    async def read(self, offset: int, length: int):
        """Exactly ``length`` bytes at ``offset`` (a bytes-like object)."""

    # True: read_into() receives straight into the caller's buffer, and
    # the engine reads into buffers it reuses (no allocation, no copy).
    zero_copy = False

    async def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset`` (raise on a short
        read). After a failure the buffer may still be written to: the
        caller drops it."""
        view[:] = await self.read(offset, view.nbytes)

    def bytes_by_source(self) -> dict[str, int]:
        """Bytes read so far, by where they came from."""
        return {self.describe(): self.bytes_read}

    async def close(self) -> None:
        """Release connections; idempotent."""


class Destination(abc.ABC):
    """Where the bytes go. ``open(size)`` prepares it (a new file under a
    temporary name), ``write`` and ``zero`` fill it, ``commit`` makes it
    durable and visible under its name, ``abort`` removes what was made."""

    # The destination reads as zeros wherever nothing is written (a new
    # sparse file): holes and zero blocks are simply skipped.
    fresh: bool = True
    max_in_flight: int = 16

    def __init__(self, uri: str, options: dict):
        self.uri = uri
        self.options = options

    def describe(self) -> str:
        return redact_url(self.uri)

    @abc.abstractmethod
    async def open(self, size: int) -> None:
        """Prepare to receive ``size`` bytes."""

    @abc.abstractmethod
    async def write(self, offset: int, data) -> None:
        """Write ``data`` (bytes-like) at ``offset``."""

    async def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros (nothing to do
        on a fresh destination)."""
        if not self.fresh:
            raise NotImplementedError

    async def flush(self) -> None:
        """Make what was written durable."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Flush and make the copy visible under its name."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Remove what open() made; idempotent, never raises for a
        missing file."""

    async def close(self) -> None:
        """Release resources after commit or abort."""


SOURCE_FORMS = (
    "a file or block device (PATH or file:///PATH)",
    "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
    "iscsi://[USER@]HOST[:PORT]/IQN/LUN (chunks checked against the "
    "manifest LUN)",
    "export:NAME (an image `vmthunder export` published)",
    "cinder://VOLUME_ID (an image volume `vmthunder export glance://ID "
    "--cinder` made: attached read-only through Cinder, chunks checked "
    "against its manifest volume, detached after)",
    "http(s)://URL (range requests in parallel where the server offers "
    "them, else one stream)",
    "glance://IMAGE_ID (Glance v2 image data, its os_hash_value checked)",
    "vmthunder://IMAGE (the local agent: precached through peers and the "
    "origin, then read from its cache)",
)
DESTINATION_FORMS = (
    "a file (PATH or file:///PATH; raw, or qcow2 with dst_format='qcow2'), "
    "written under a temporary name and renamed when complete",
    "a block device (written in place)",
    "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (a "
    "writable export at least as large as the source; written in place)",
)


def scheme_of(uri: str) -> str:
    """``file`` for paths and file://, the URI scheme otherwise, and
    ``export`` for export:NAME."""
    if not isinstance(uri, str) or not uri:
        raise ValueError("a source or destination must be a non-empty "
                         "string")
    if uri.startswith("export:") and "://" not in uri:
        return "export"
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def file_path(uri: str) -> str:
    """The path of a file URI or plain path."""
    if uri.startswith("file://"):
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: file:// URIs name local files "
                             "(file:///PATH)")
        return urllib.parse.unquote(parts.path)
    return uri


def strerror(exc: BaseException) -> str:
    """An OSError or BlockError in words (its message, else its errno's
    text, else its type)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc)
    if text:
        return text
    err = getattr(exc, "errno", None)
    return os.strerror(err) if err else type(exc).__name__


__all__ = ["DESTINATION_FORMS", "SOURCE_FORMS", "Destination", "Extent",
           "Source", "ThreadJobs", "file_path", "scheme_of", "strerror"]
