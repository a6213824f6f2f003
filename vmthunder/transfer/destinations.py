"""Destinations: a file (raw, or qcow2 through qemu-img), a block
device, an NBD export.

A file is written under a temporary name in its own directory
(``.NAME.part-PID-RANDOM``), made durable, and renamed over NAME only
when the copy is complete and verified: a cancelled, failed or killed
copy leaves no file that looks finished, and a previous NAME stays as it
was until the rename. Temporary files of copies that were killed (their
process gone) are removed by the next copy to the same name. A block
device or an NBD export cannot be swapped in whole: they are written in
place, and commit only flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import stat

from vmthunder.nbd import client as nbd_client
from vmthunder.transfer.base import MiB, Destination, ThreadJobs
from vmthunder.transfer.errors import DestinationError

LOG = logging.getLogger(__name__)

_ZEROES = memoryview(bytes(4 * MiB))


def temp_prefix(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.part-")


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temporary files of earlier copies to ``path`` whose
    process is gone (killed mid-copy); those of live copies stay."""
    head, name = os.path.split(path)
    pattern = re.compile(r"^\." + re.escape(name) + r"\.part-(\d+)-\w+")
    removed = []
    try:
        entries = os.listdir(head or ".")
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue                      # its copy is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(head, entry))
            removed.append(entry)
    return removed


def _pwrite_full(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileDestination(Destination):
    """A raw file (PATH or file:///PATH), or a block device."""

    max_in_flight = 16

    def __init__(self, path: str, options: dict):
        super().__init__(path, options)
        self.path = os.path.abspath(path)
        self.fd: int | None = None
        self.temp: str | None = None       # None: written in place
        self._jobs = ThreadJobs()
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"

    def describe(self) -> str:
        return self.path

    def _stat(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            return None

    async def open(self, size: int) -> None:
        st = self._stat()
        if st is not None and stat.S_ISBLK(st.st_mode):
            await self._open_device(size)
            return
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise DestinationError(self.path, "exists and is neither a "
                                   "regular file nor a block device")
        if st is not None and not self.options.get("overwrite", True):
            raise DestinationError(self.path, "exists (overwrite=False)")
        head = os.path.dirname(self.path)
        if not os.path.isdir(head):
            raise DestinationError(self.path, f"directory {head} does not "
                                   "exist")
        for entry in remove_stale_temps(self.path):
            LOG.info("removed %s, left by a copy that was killed", entry)
        self.temp = self._temp_name()
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                          | os.O_CLOEXEC, 0o644)
        if st is not None:
            os.fchmod(self.fd, stat.S_IMODE(st.st_mode))
        os.ftruncate(self.fd, size)

    def _temp_name(self, suffix: str = "") -> str:
        return f"{temp_prefix(self.path)}{self.token}{suffix}"

    async def _open_device(self, size: int) -> None:
        self.fresh = False
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        have = os.lseek(self.fd, 0, os.SEEK_END)
        if have < size:
            raise DestinationError(self.path, f"block device of {have} "
                                   f"bytes is smaller than the source "
                                   f"({size} bytes)")

    async def write(self, offset: int, data) -> None:
        await self._jobs.run(_pwrite_full, self.fd, data, offset)

    async def zero(self, offset: int, length: int) -> None:
        while length:
            n = min(length, _ZEROES.nbytes)
            await self._jobs.run(_pwrite_full, self.fd, _ZEROES[:n], offset)
            offset += n
            length -= n

    async def flush(self) -> None:
        await self._jobs.run(os.fdatasync, self.fd)

    async def commit(self) -> None:
        await self.flush()
        if self.temp is not None:
            await self._publish(self.temp)

    async def _publish(self, temp: str) -> None:
        os.rename(temp, self.path)
        self.temp = None
        await asyncio.to_thread(_fsync_dir, os.path.dirname(self.path))

    async def abort(self) -> None:
        await self._jobs.drain()
        self._close_fd()
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            self.temp = None

    def _close_fd(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    async def close(self) -> None:
        await self._jobs.drain()
        self._close_fd()


class Qcow2FileDestination(FileDestination):
    """A qcow2 file: the raw copy goes to a temporary file beside it,
    then ``qemu-img convert -O qcow2`` writes a second temporary file,
    renamed over NAME when it is done (both temporary files are removed
    either way). Needs room for both for a moment."""

    def __init__(self, path: str, options: dict):
        super().__init__(path, options)
        self.qcow2_temp: str | None = None
        self.proc: asyncio.subprocess.Process | None = None

    async def open(self, size: int) -> None:
        st = self._stat()
        if st is not None and stat.S_ISBLK(st.st_mode):
            raise DestinationError(self.path, "qcow2 is written to files, "
                                   "not block devices")
        await super().open(size)

    async def commit(self) -> None:
        await self.flush()
        self._close_fd()
        self.qcow2_temp = self._temp_name(".qcow2")
        argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                self.temp, self.qcow2_temp]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise DestinationError(self.path, "qemu-img is not installed "
                                   "(Debian package qemu-utils); it "
                                   "writes qcow2") from None
        _, err = await self.proc.communicate()
        if self.proc.returncode != 0:
            raise DestinationError(self.path, "qemu-img convert to qcow2 "
                                   f"failed ({self.proc.returncode}): "
                                   f"{err.decode(errors='replace').strip()}")
        self.proc = None
        fd = os.open(self.qcow2_temp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await asyncio.to_thread(os.fdatasync, fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)
        self.temp = None
        qcow2, self.qcow2_temp = self.qcow2_temp, None
        await self._publish(qcow2)

    async def abort(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        await super().abort()
        if self.qcow2_temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.qcow2_temp)
            self.qcow2_temp = None


class NbdDestination(Destination):
    """A writable NBD export at least as large as the source, written in
    place (holes and zero blocks as write-zeroes, which lets the server
    keep them sparse); commit flushes."""

    fresh = False
    max_in_flight = 16

    def __init__(self, uri: str, options: dict):
        super().__init__(uri, options)
        self.device: nbd_client.NbdSource | None = None

    async def open(self, size: int) -> None:
        try:
            nbd_client.parse_nbd_uri(self.uri)
        except ValueError as exc:
            raise DestinationError(self.uri, str(exc)) from None
        self.device = await nbd_client.NbdSource.open(
            self.uri, meta_contexts=(),
            timeout=self.options.get("timeout")
            or nbd_client.DEFAULT_TIMEOUT)
        if self.device.client.read_only:
            raise DestinationError(self.describe(), "the export is "
                                   "read-only")
        if self.device.size < size:
            raise DestinationError(
                self.describe(), f"the export has {self.device.size} "
                f"bytes, the source {size}: too small")

    async def write(self, offset: int, data) -> None:
        await self.device.write(offset, data)

    async def zero(self, offset: int, length: int) -> None:
        await self.device.write_zeroes(offset, length)

    async def flush(self) -> None:
        await self.device.flush()

    async def commit(self) -> None:
        await self.flush()

    async def abort(self) -> None:
        """An export cannot be put back: what was written stays."""
        if self.device is not None:
            LOG.warning("%s: copy failed; the export keeps what was "
                        "written so far", self.describe())

    async def close(self) -> None:
        if self.device is not None:
            device, self.device = self.device, None
            await device.close()



class DiscardDestination(Destination):
    """Takes every byte and keeps none (nbdcopy's ``null:``): for copies
    whose work is the reading, such as filling a cache (the agent's
    precache), where the source keeps what it read."""

    max_in_flight = 64

    def __init__(self, uri: str = "null:", options: dict | None = None):
        super().__init__(uri, options or {})
        self.bytes_written = 0

    async def open(self, size: int) -> None:
        self.bytes_written = 0

    async def write(self, offset: int, data) -> None:
        self.bytes_written += memoryview(data).nbytes

    async def commit(self) -> None:
        pass

    async def abort(self) -> None:
        pass


__all__ = ["DiscardDestination", "FileDestination", "NbdDestination",
           "Qcow2FileDestination"]
