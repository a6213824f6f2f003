"""A raw image file as the bottom layer (read-only)."""

from __future__ import annotations

import errno
import os
import stat

from vmthunder import blockdev
from vmthunder import fileio


def _check_kind(path: str, st: os.stat_result) -> None:
    """Only a regular file or a block device holds an image: a directory
    would read as a few KiB of nothing, a FIFO or socket would block."""
    mode = st.st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kind = fileio.file_kind(mode) or "not a regular file"
    raise blockdev.BlockError(
        errno.EINVAL, f"image {path!r} is {kind}; an image must be a raw "
        "image file or a block device")


class FileSource(blockdev.BlockDevice):
    """Reads a raw image file; its size is fixed when opened.

    If the file shrinks afterwards, reads past its new end fail with EIO
    (never zeros in place of data).
    """

    capabilities = blockdev.Capabilities(block_status=True)

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fd = None
        try:
            st = os.stat(self.path)
            _check_kind(path, st)
            # O_NONBLOCK: a path swapped for a FIFO after the stat must not
            # block the event loop in open(); fstat checks again below.
            self._fd = os.open(self.path,
                               os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            st = os.fstat(self._fd)
            _check_kind(path, st)
            self.size = (st.st_size if stat.S_ISREG(st.st_mode)
                         else os.lseek(self._fd, 0, os.SEEK_END))
        except FileNotFoundError:
            raise blockdev.BlockError(
                errno.ENOENT, f"image {path!r} does not exist") from None
        except PermissionError:
            raise blockdev.BlockError(
                errno.EACCES, f"image {path!r} is not readable by this "
                "user") from None
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
            raise
        if self.size == 0:
            os.close(self._fd)
            raise blockdev.BlockError(
                errno.EINVAL, f"image {path!r} is empty (0 bytes)")
        self._identity = (f"file:{self.path}:{st.st_size}:{st.st_mtime_ns}:"
                          f"{st.st_ino}")
        self.bytes_read = 0

    def identity(self) -> str:
        """Changes when the file is replaced or modified in place."""
        return self._identity

    def describe(self) -> str:
        return f"image file {self.path}"

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if self._fd is None:
            raise blockdev.BlockError(errno.EIO, f"{self.describe()} is "
                                      "closed")
        try:
            data = await fileio.pread(self._fd, length, offset)
        except OSError as exc:
            raise blockdev.BlockError(
                exc.errno or errno.EIO,
                f"reading {self.describe()} at offset {offset}: "
                f"{exc.strerror}") from None
        if len(data) != length:
            raise blockdev.BlockError(
                errno.EIO,
                f"{self.describe()} is shorter than its declared size "
                f"{self.size}: only {len(data)} of {length} bytes at offset "
                f"{offset}; was it truncated while served?")
        self.bytes_read += length
        return data

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        if context != blockdev.BASE_ALLOCATION:
            return await super().block_status(offset, length, context)
        # SEEK_DATA/SEEK_HOLE answer from file metadata: cheap, no data I/O.
        extents = []
        pos, end = offset, offset + length
        try:
            # A file that shrank while served: past its end nothing reads
            # as zeros (reads there fail with EIO), so that part is data,
            # never a hole a client could skip.
            end = max(pos, min(end, os.fstat(self._fd).st_size))
            while pos < end:
                try:
                    data_at = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data_at = end           # only a hole up to EOF
                if data_at > pos:
                    hole = min(data_at, end) - pos
                    extents.append(blockdev.Extent(
                        hole, blockdev.STATE_HOLE | blockdev.STATE_ZERO))
                    pos += hole
                    continue
                hole_at = os.lseek(self._fd, pos, os.SEEK_HOLE)
                # A file truncated under us can put the "hole" before pos.
                run = min(hole_at, end) - pos if hole_at > pos else end - pos
                extents.append(blockdev.Extent(run, 0))
                pos += run
        except OSError:
            return [blockdev.Extent(length, 0)]
        if end < offset + length:
            extents.append(blockdev.Extent(offset + length - end, 0))
        return extents

    def stats(self) -> dict:
        return {"bytes_read": self.bytes_read}

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
