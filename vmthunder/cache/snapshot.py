"""Per-VM copy-on-write snapshot over a shared (read-only) layer.

Writes land in the VM's own overlay file; reads of blocks the VM never
wrote fall through to the layer below (the image cache, shared by all VMs
of the image). Nothing is ever written below. Deleting the VM deletes its
overlay and nothing else.

Durability follows the NBD contract: a write is durable once a flush (or
a FUA write) completed. A flush makes the overlay's data durable first and
only then saves the block map, so a block marked written after a crash
always has its data; writes not yet flushed may be lost, never garbled
into zeros.

Virtual size: a snapshot may be larger than the layer below (a Nova
flavor's root disk is usually larger than its image). Past the end of the
layer below, a block the VM never wrote reads as zeros and a write lands
in the overlay like any other. The overlay file is always exactly the
virtual size, which is how a reopened snapshot knows its size: opened
without a size it keeps it; opened with a larger one it grows (the map is
extended first, durably, then the overlay, so an interrupted grow is
finished by opening with that size again); opened with a smaller one it
is refused, since shrinking would drop what the VM wrote past the new end.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re

from vmthunder import blockdev
from vmthunder import fileio
from vmthunder.cache import chunkmap

LOG = logging.getLogger(__name__)

# VM names become file names: keep them to a safe alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ZERO_PIECE = 1024 * 1024


def check_name(name: str) -> str:
    # fullmatch: "$" would let a trailing newline through.
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"snapshot name {name!r} is not valid: use 1-128 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit")
    return name


def snapshot_paths(directory: str, name: str) -> tuple[str, str]:
    base = os.path.join(directory, check_name(name))
    return base + ".overlay", base + ".map"


def remove_files(directory: str, name: str) -> list[str]:
    """Delete VM ``name``'s snapshot files in ``directory`` (its overlay
    and its map, when there); the paths removed."""
    removed = []
    for path in snapshot_paths(directory, name):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


class SnapshotLayer(blockdev.BlockDevice):
    capabilities = blockdev.Capabilities(writable=True, block_status=True)

    def __init__(self, lower: blockdev.BlockDevice, directory: str,
                 name: str, *, block_size: int = 4096,
                 size: int | None = None):
        """``size``: the virtual size, at least ``lower.size`` (None: the
        size the snapshot has on disk, or ``lower.size`` for a new one)."""
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two")
        self.lower = lower
        self.name = check_name(name)
        if size is not None and (isinstance(size, bool)
                                 or not isinstance(size, int)):
            raise ValueError(f"snapshot {name!r}: virtual size must be an "
                             f"integer number of bytes, not {size!r}")
        if size is not None and size < lower.size:
            raise ValueError(
                f"snapshot {name!r}: virtual size {size} bytes is smaller "
                f"than the image below it ({lower.size} bytes); give at "
                "least the image size")
        self.block_size = block_size
        os.makedirs(directory, exist_ok=True)
        self.overlay_path, map_path = snapshot_paths(directory, name)
        self._fd = os.open(self.overlay_path,
                           os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise blockdev.BlockError(
                errno.EBUSY, f"snapshot {name!r} ({self.overlay_path}) is "
                "open in another process") from None
        try:
            self._size_files(size, map_path)
        except BaseException:
            os.close(self._fd)
            raise
        self.map = chunkmap.ChunkMap(self.blocks, map_path)
        self._resident = fileio.ResidencyMap(self._fd, self.size)
        self._rmw_locks: dict[int, asyncio.Lock] = {}
        self._flush_lock = asyncio.Lock()
        self.counters = {"bytes_read": 0, "bytes_written": 0,
                         "read_requests": 0, "write_requests": 0,
                         "flushes": 0}
        # Who watches the VM's reads (a read_watch.VmReads: latency,
        # hits, stalls), or None.
        self.watch = None

    def _size_files(self, size: int | None, map_path: str) -> None:
        """Set size and blocks from ``size`` and the overlay's recorded
        size; grow the map and the overlay to them. Refuses (changing
        nothing) a shrink or a map of another block size."""
        bs = self.block_size
        # The overlay's length is the virtual size (0: new, never sized).
        recorded = os.fstat(self._fd).st_size
        if size is None:
            size = max(recorded, self.lower.size)
        elif recorded > size:
            raise blockdev.BlockError(
                errno.EINVAL, f"snapshot {self.name!r} has a virtual size "
                f"of {recorded} bytes ({self.overlay_path}); it cannot be "
                f"reopened with the smaller size {size} (the VM's data past "
                "that would be lost): give at least its size")
        self.size = size
        self.blocks = (size + bs - 1) // bs
        try:
            stored = os.path.getsize(map_path)
        except FileNotFoundError:
            stored = 0
        old_blocks = (recorded + bs - 1) // bs
        if stored not in (0, self.blocks):
            if not (0 < recorded < size and stored == old_blocks):
                # ChunkMap would start empty and the VM's writes would be
                # silently gone: refuse instead.
                raise blockdev.BlockError(
                    errno.EINVAL, f"snapshot {self.name!r}: its map "
                    f"{map_path} has {stored} entries, not {self.blocks} "
                    f"({size} bytes in blocks of {bs}); was it made with "
                    f"another block size than {bs} (the [snapshot] "
                    "block_size option), or was it being grown to a "
                    "larger virtual size? Open it with that block size or "
                    "size.")
            # Growing: the new blocks are absent (zero bytes). The map
            # grows first and durably: a crash before the overlay grows
            # leaves a map that opening with the new size accepts.
            fd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, self.blocks)
                os.fsync(fd)
            finally:
                os.close(fd)
        if recorded != size:
            if recorded:
                LOG.info("snapshot %s: virtual size %d -> %d bytes",
                         self.name, recorded, size)
            os.ftruncate(self._fd, size)

    def describe(self) -> str:
        return f"snapshot {self.name!r}"

    # -- reads ------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        return blockdev.joined(await self.read_parts(offset, length))

    async def read_parts(self, offset: int, length: int) -> list:
        self.check_range(offset, length)
        self.counters["read_requests"] += 1
        self.counters["bytes_read"] += length
        watch = self.watch
        if watch is None:
            return await self._read_parts(offset, length)
        token = watch.begin(offset, length)
        try:
            return await self._read_parts(offset, length)
        finally:
            watch.end(token)

    async def _read(self, offset: int, length: int) -> bytes:
        return blockdev.joined(await self._read_parts(offset, length))

    async def _read_parts(self, offset: int, length: int) -> list:
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs + 1
        if self.map.none_present(first, last):
            return await self._lower_parts(offset, length)
        pieces = []
        for start, end, present in self.map.runs(first, last):
            lo = max(offset, start * bs)
            hi = min(offset + length, end * bs)
            pieces.append(self._overlay_parts(lo, hi - lo) if present
                          else self._lower_parts(lo, hi - lo))
        return [part for parts in await asyncio.gather(*pieces)
                for part in parts]

    async def _lower_parts(self, offset: int, length: int) -> list:
        """What the VM sees where it wrote nothing: the layer below, and
        zeros past its end (a virtual size above the image's)."""
        base = self.lower.size
        if offset + length <= base:
            return await self.lower.read_parts(offset, length)
        if offset >= base:
            return [bytes(length)]
        return (await self.lower.read_parts(offset, base - offset)
                + [bytes(offset + length - base)])

    async def _overlay_parts(self, offset: int, length: int) -> list:
        return [await self._read_overlay(offset, length)]

    def read_now(self, offset: int, length: int):
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs + 1
        if self.map.none_present(first, last):
            data = (self.lower.read_now(offset, length)
                    if offset + length <= self.lower.size else None)
        elif self.map.all_present(first, last):
            data = fileio.pread_now(self._fd, length, offset)
        else:
            return None
        if data is not None:
            # Served without read_parts(): count it here.
            self.counters["read_requests"] += 1
            self.counters["bytes_read"] += length
            if self.watch is not None:
                self.watch.instant(offset, length)
        return data

    def local_extent(self, offset: int, length: int):
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs + 1
        if self.map.none_present(first, last):
            # Past the layer below there is no file to send zeros from.
            extent = (self.lower.local_extent(offset, length)
                      if offset + length <= self.lower.size else None)
        elif self.map.all_present(first, last) \
                and self._resident.resident(offset, length):
            extent = self._fd, offset
        else:
            return None
        if extent is not None:
            # Served without read(): count it here.
            self.counters["read_requests"] += 1
            self.counters["bytes_read"] += length
            if self.watch is not None:
                self.watch.instant(offset, length)
        return extent

    async def _read_overlay(self, offset: int, length: int) -> bytes:
        data = await fileio.pread(self._fd, length, offset)
        if len(data) != length:
            raise blockdev.BlockError(
                errno.EIO, f"{self.describe()}: overlay {self.overlay_path} "
                "is shorter than the snapshot's virtual size")
        return data

    # -- writes -----------------------------------------------------------

    async def write(self, offset: int, data: bytes, fua: bool = False):
        length = len(data)
        self.check_range(offset, length)
        self.counters["write_requests"] += 1
        self.counters["bytes_written"] += length
        bs = self.block_size
        end = offset + length
        head_block, tail_block = offset // bs, (end - 1) // bs
        # Whole blocks are written as they are; a partly covered block at
        # either end is completed from what the VM sees there now.
        if offset % bs or (end % bs and end != self.size):
            await self._write_partial(offset, data)
        else:
            await self._pwrite(offset, data)
            self.map.set(head_block, tail_block + 1)
        if fua:
            await self.flush()

    async def _write_partial(self, offset: int, data: bytes) -> None:
        bs = self.block_size
        end = offset + len(data)
        lo_block, hi_block = offset // bs, (end - 1) // bs + 1
        lo, hi = lo_block * bs, min(hi_block * bs, self.size)
        locks = [self._rmw_locks.setdefault(b, asyncio.Lock())
                 for b in sorted({lo_block, hi_block - 1})]
        held = []
        try:
            # Taken inside the try: a write cancelled while it waits for
            # its second lock gives back the first.
            for lock in locks:
                await lock.acquire()
                held.append(lock)
            merged = bytearray(await self._read(lo, hi - lo))
            merged[offset - lo:end - lo] = data
            await self._pwrite(lo, merged)
            self.map.set(lo_block, hi_block)
        finally:
            for lock in held:
                lock.release()
            for b in (lo_block, hi_block - 1):
                lock = self._rmw_locks.get(b)
                if lock is not None and not lock.locked() \
                        and not lock._waiters:
                    del self._rmw_locks[b]

    async def _pwrite(self, offset: int, data) -> None:
        try:
            await fileio.pwrite(self._fd, data, offset)
        except OSError as exc:
            err = errno.ENOSPC if exc.errno == errno.ENOSPC else errno.EIO
            raise blockdev.BlockError(
                err, f"{self.describe()}: writing overlay "
                f"{self.overlay_path}: {exc.strerror}") from None

    async def write_zeroes(self, offset: int, length: int,
                           fua: bool = False) -> None:
        self.check_range(offset, length)
        bs = self.block_size
        end = offset + length
        # Whole blocks past the end of the layer below read as zeros where
        # the VM wrote nothing: forgetting them writes their zeros without
        # filling the overlay (a guest zeroing its new disk space would
        # otherwise allocate all of it).
        first = max((offset + bs - 1) // bs,
                    (self.lower.size + bs - 1) // bs)
        last = self.blocks if end == self.size else end // bs
        if first < last:
            lo, hi = first * bs, min(last * bs, self.size)
            await self._write_zero_data(offset, lo)
            self.map.clear(first, last)
            self.counters["bytes_written"] += hi - lo
            await self._write_zero_data(hi, end)
        else:
            await self._write_zero_data(offset, end)
        if fua:
            await self.flush()

    async def _write_zero_data(self, pos: int, end: int) -> None:
        while pos < end:
            n = min(_ZERO_PIECE, end - pos)
            await self.write(pos, bytes(n))
            pos += n

    async def trim(self, offset: int, length: int) -> None:
        # After a trim the content is undefined (NBD spec): forgetting the
        # VM's own blocks, so the image shows through, is the cheap choice.
        # Only blocks the trim covers entirely are forgotten.
        self.check_range(offset, length)
        bs = self.block_size
        first = (offset + bs - 1) // bs
        end = offset + length
        last = self.blocks if end == self.size else end // bs
        if first < last:
            self.map.clear(first, last)

    async def flush(self) -> None:
        self.counters["flushes"] += 1
        async with self._flush_lock:
            try:
                # The marks to save are copied first, then the overlay is
                # synced, then they are written: a block written while the
                # sync runs is marked by the next flush, never by this one.
                await self.map.save(
                    sync=True, before=lambda: fileio.fdatasync(self._fd))
            except OSError as exc:
                raise blockdev.BlockError(
                    errno.EIO, f"{self.describe()}: flush failed: "
                    f"{exc.strerror}") from None

    # -- status -----------------------------------------------------------

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        self.check_range(offset, length)
        if context != blockdev.BASE_ALLOCATION:
            return await super().block_status(offset, length, context)
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs + 1
        extents = []
        for start, end, present in self.map.runs(first, last):
            lo = max(offset, start * bs)
            hi = min(offset + length, end * bs)
            if present:
                extents.append(blockdev.Extent(hi - lo, 0))
            else:
                extents.extend(await self._lower_status(lo, hi - lo,
                                                        context))
        return extents

    async def _lower_status(self, offset: int, length: int,
                            context: str) -> list:
        """The layer below's extents; past its end a hole reading as
        zeros (what the VM sees there until it writes)."""
        base = self.lower.size
        extents = []
        if offset < base:
            n = min(length, base - offset)
            extents.extend(await self.lower.block_status(offset, n, context))
            offset, length = offset + n, length - n
        if length:
            extents.append(blockdev.Extent(
                length, blockdev.STATE_HOLE | blockdev.STATE_ZERO))
        return extents

    def stats(self) -> dict:
        return dict(self.counters, blocks_written=self.map.count_present(),
                    block_size=self.block_size)

    async def close(self) -> None:
        """Close the overlay, keeping it (what was flushed stays)."""
        if self._fd is None:
            return
        await self.flush()
        self.map.close()
        self._resident.close()
        os.close(self._fd)
        self._fd = None

    async def delete(self) -> None:
        """Close and remove this VM's overlay; nothing below is touched."""
        if self._fd is not None:
            self.map.close()
            self._resident.close()
            os.close(self._fd)
            self._fd = None
        remove_files(os.path.dirname(self.overlay_path), self.name)
