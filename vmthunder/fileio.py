"""Local file I/O that never blocks the event loop.

A read is first tried with ``RWF_NOWAIT``: when the data is in the page
cache (the common case for a warm cache) it is served right there, without
the cost of a thread hop; when it would have to wait for the disk the
kernel says EAGAIN and the read goes to a worker thread. Writes and syncs
always go to worker threads: they can wait on the disk at any time.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import stat

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


def pread_now(fd: int, length: int, offset: int) -> bytearray | None:
    """All ``length`` bytes at ``offset`` if the page cache holds them
    (no wait for the disk); None otherwise."""
    return _pread_nowait(fd, length, offset) if _nowait_works else None


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


# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of ``[offset, offset + length)`` (they read as
    zeros; the file keeps its size). OSError when the file system cannot
    (EOPNOTSUPP) or fails."""
    libc = _libc()
    if libc is None or not length:
        if length:
            raise OSError(errno.ENOSYS, "fallocate is not available")
        return
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                          ctypes.c_int64]
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                 length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"punching a hole at {offset} (+{length}): "
                           f"{os.strerror(err)}")


async def punch_holes(fd: int, ranges) -> None:
    """punch_hole() of each (offset, length) of ``ranges``, in a worker
    thread (waited for even when the caller is cancelled)."""
    def punch():
        for offset, length in ranges:
            punch_hole(fd, offset, length)
    await finish(asyncio.get_running_loop().run_in_executor(None, punch))


async def finish(future: asyncio.Future):
    """Await ``future`` (work in a worker thread) to its end even when
    the caller is cancelled meanwhile, then raise the cancellation: the
    thread keeps using its file descriptor, which the caller must not
    close (and see reused) before it is done."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
            break
        except asyncio.CancelledError:
            if future.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class ResidencyMap:
    """Tells whether a file range is in the page cache (mincore(2)).

    Lets the NBD server hand a range to sendfile(2) on the event loop only
    when sendfile cannot wait for the disk. The file is mapped read-only
    and never touched through the mapping, so the mapping costs address
    space, not memory.
    """

    _PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, fd: int, size: int):
        self._addr = None
        self._size = size
        libc = _libc()
        if libc is None or size <= 0:
            return
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return
        self._addr = addr
        self._libc = libc

    def resident(self, offset: int, length: int) -> bool:
        if self._addr is None or offset + length > self._size:
            return False
        page = self._PAGE
        start = offset - offset % page
        pages = (offset + length - start + page - 1) // page
        vec = ctypes.create_string_buffer(pages)
        if self._libc.mincore(ctypes.c_void_p(self._addr + start),
                              ctypes.c_size_t(pages * page), vec) != 0:
            return False
        # Bit 0 of each byte: page resident. Other bits are reserved, so
        # mask them off before asking whether any page is missing.
        return vec.raw.translate(_LOW_BIT).find(b"\x00") == -1

    def close(self) -> None:
        if self._addr is not None:
            self._libc.munmap(ctypes.c_void_p(self._addr),
                              ctypes.c_size_t(self._size))
            self._addr = None


_LIBC = []
_LOW_BIT = bytes(i & 1 for i in range(256))


def _libc():
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                     ctypes.c_char_p]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _LIBC.append(libc)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_buffers(limit: int = 64 * 1024 * 1024) -> bool:
    """Make glibc reuse freed large buffers instead of unmapping them.

    Each cold fetch allocates a buffer of up to a few MiB. By default
    glibc serves such sizes with a fresh mmap and unmaps them on free, so
    every fetch pays a page fault and the kernel's zeroing per 4 KiB
    (a fifth of the event loop's time in a cold sequential read). From
    the heap, a freed buffer is reused as it is. Buffers up to ``limit``
    come from the heap, and freed memory is kept up to that much, which
    bounds what this costs in RSS. False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)
                and mallopt(_M_TRIM_THRESHOLD, limit))


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str | None:
    """What a file of st_mode ``mode`` is, for messages ("a directory",
    "a FIFO", ...); None for a kind without a name here."""
    return next((name for test, name in _KINDS if test(mode)), None)
