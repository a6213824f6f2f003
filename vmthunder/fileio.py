"""Local file I/O that never blocks the event loop.

A read is first tried with ``RWF_NOWAIT``: when the data is in the page
cache (the common case for a warm cache) it is served right there, without
the cost of a thread hop; when it would have to wait for the disk the
kernel says EAGAIN and the read goes to a worker thread. Writes and syncs
always go to worker threads: they can wait on the disk at any time.
"""

from __future__ import annotations

import asyncio
import errno
import os

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_nowait_works = bool(_NOWAIT)


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread that keeps going on short reads until EOF."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pread_nowait(fd: int, length: int, offset: int) -> bytearray | None:
    """Read from the page cache only; None when that would block."""
    global _nowait_works
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, _NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            _nowait_works = False       # e.g. a filesystem without support
            return None
        raise
    if n == length:
        return buf
    # Partly cached, or EOF: a worker thread does the full read.
    return None


async def pread(fd: int, length: int, offset: int) -> bytes:
    """Read up to ``length`` bytes at ``offset``; short only at EOF.

    Returns a bytes-like object (bytes or bytearray) owned by the caller.
    """
    if _nowait_works:
        data = _pread_nowait(fd, length, offset)
        if data is not None:
            return data
    return await asyncio.get_running_loop().run_in_executor(
        None, _pread_full, fd, length, offset)


def _pwrite_full(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


async def pwrite(fd: int, data: bytes, offset: int) -> None:
    await asyncio.get_running_loop().run_in_executor(
        None, _pwrite_full, fd, data, offset)


async def fdatasync(fd: int) -> None:
    await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, fd)
