"""Which chunks of a device are present: one byte per chunk.

Both the copy-on-read cache (chunks held locally) and the copy-on-write
snapshot (blocks the VM wrote) keep their state here. One byte per chunk
rather than one bit costs 8x the memory (1 MiB for a 4 GiB image at 4 KiB
blocks) and buys C-speed run searches with ``bytearray.find``.

The map can be persisted to a file. Callers decide *when*: the crash rule
(a mark reaches the file only after the data it stands for is durable) is
theirs to keep, since only they know when that is.

With ``reserve``, the file's blocks are allocated when the map opens, so
saving it later needs no new space: a disk that fills up meanwhile does
not stop the marks from reaching it. When the space cannot be had at
open, each save tries again first (and fails, keeping its marks for the
next save, until the space is there).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from vmthunder import fileio

LOG = logging.getLogger(__name__)

ABSENT = 0
PRESENT = 1
_ABSENT_BYTE = b"\x00"
_PRESENT_BYTE = b"\x01"


def index_runs(indices) -> list[tuple[int, int]]:
    """[a, b) runs of consecutive ascending chunk indices, in the order
    given (any order: a trace's order is kept)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class ChunkMap:
    def __init__(self, count: int, path: str | None = None, *,
                 reserve: bool = False):
        self.count = count
        self.path = path
        self._map = bytearray(count)
        # Smallest range [lo, hi) of entries changed since the last save.
        self._dirty_lo = count
        self._dirty_hi = 0
        self._fd: int | None = None
        self._save_lock: asyncio.Lock | None = None
        # Blocks still to allocate before a save (see the module doc).
        self._to_reserve = False
        if path is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            stored = os.pread(self._fd, count + 1, 0)
            if len(stored) == count:
                # Anything but 0/1 is damage: treat it as absent (a refetch
                # costs time, a false mark would serve garbage).
                self._map[:] = stored.translate(_SANITIZE)
            elif stored:
                # Wrong length: not our map; start empty.
                os.ftruncate(self._fd, 0)
            if reserve and count:
                try:
                    _reserve(self._fd, count)
                except OSError as exc:
                    self._to_reserve = True
                    LOG.warning("chunk map %s: could not reserve its %d "
                                "bytes on disk (%s); saving it will fail "
                                "until there is space", path, count,
                                exc.strerror)

    def __len__(self) -> int:
        return self.count

    def present(self, index: int) -> bool:
        return self._map[index] == PRESENT

    def all_present(self, lo: int, hi: int) -> bool:
        return self._map.find(_ABSENT_BYTE, lo, hi) == -1

    def none_present(self, lo: int, hi: int) -> bool:
        return self._map.find(_PRESENT_BYTE, lo, hi) == -1

    def count_present(self, lo: int = 0, hi: int | None = None) -> int:
        return self._map.count(_PRESENT_BYTE, lo,
                               self.count if hi is None else hi)

    def runs(self, lo: int, hi: int):
        """Yield (start, end, present) for maximal runs within [lo, hi)."""
        pos = lo
        while pos < hi:
            present = self._map[pos] == PRESENT
            nxt = self._map.find(_ABSENT_BYTE if present else _PRESENT_BYTE,
                                 pos, hi)
            end = hi if nxt == -1 else nxt
            yield pos, end, present
            pos = end

    def states(self, lo: int, hi: int) -> bytearray:
        """A copy of entries [lo, hi): ABSENT or PRESENT, one byte each."""
        return self._map[lo:hi]

    def set(self, lo: int, hi: int | None = None,
            state: int = PRESENT) -> None:
        hi = lo + 1 if hi is None else hi
        self._map[lo:hi] = (_PRESENT_BYTE if state else _ABSENT_BYTE) \
            * (hi - lo)
        self._dirty_lo = min(self._dirty_lo, lo)
        self._dirty_hi = max(self._dirty_hi, hi)

    def clear(self, lo: int, hi: int | None = None) -> None:
        self.set(lo, hi, ABSENT)

    @property
    def dirty(self) -> bool:
        return self._dirty_lo < self._dirty_hi

    def dirty_range(self) -> tuple[int, int]:
        """[lo, hi) of the entries changed since the last save (lo >= hi:
        none)."""
        return self._dirty_lo, self._dirty_hi

    def _take_dirty(self):
        """Copy the changed range and mark it clean: marks set while the
        copy is being written stay dirty for the next save."""
        lo, hi = self._dirty_lo, self._dirty_hi
        self._dirty_lo, self._dirty_hi = self.count, 0
        return lo, hi, (bytes(self._map[lo:hi]) if lo < hi else b"")

    def _keep_dirty(self, lo: int, hi: int) -> None:
        """A save failed: the range it took is still to be written."""
        if lo < hi:
            self._dirty_lo = min(self._dirty_lo, lo)
            self._dirty_hi = max(self._dirty_hi, hi)

    async def save(self, sync: bool = False, before=None) -> None:
        """Write the changed part of the map; fdatasync it if ``sync``.

        ``before``, an async callable, runs after the marks to save are
        copied and before they are written: a caller makes the data they
        stand for durable there, so a mark set meanwhile (whose data that
        did not cover) waits for the next save.
        """
        if self._fd is None or (not self.dirty and not sync):
            return
        # Saves run one at a time, each copying the map when its turn
        # comes: two at once could land out of order, the older copy last
        # (a mark cleared for an eviction would come back on disk).
        if self._save_lock is None:
            self._save_lock = asyncio.Lock()
        async with self._save_lock:
            if self._fd is None or (not self.dirty and not sync):
                return
            # The copy is taken on the loop thread so the worker never
            # reads the map while the loop changes it.
            lo, hi, chunk = self._take_dirty()
            try:
                if before is not None:
                    await before()
                # Waited for even when cancelled: the lock (and close())
                # must not be had while the thread still writes.
                await fileio.finish(asyncio.get_running_loop()
                                    .run_in_executor(
                    None, _write_map, self._fd, self.count, chunk, lo, sync,
                    self._to_reserve))
            except BaseException:
                self._keep_dirty(lo, hi)
                raise
            self._to_reserve = False

    def save_now(self, sync: bool = True) -> None:
        """Blocking save, for shutdown paths outside the event loop."""
        if self._fd is None:
            return
        lo, hi, chunk = self._take_dirty()
        try:
            _write_map(self._fd, self.count, chunk, lo, sync,
                       self._to_reserve)
        except BaseException:
            self._keep_dirty(lo, hi)
            raise
        self._to_reserve = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _reserve(fd: int, size: int) -> None:
    """Allocate the map file's blocks (and its full length). A file
    system that cannot preallocate is left as it is."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def _write_map(fd: int, size: int, chunk: bytes, lo: int, sync: bool,
               reserve: bool = False):
    if reserve:
        _reserve(fd, size)
    if chunk:
        # Full length first: a crash never leaves a short map.
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        # A short write (the disk filled meanwhile) is finished or fails:
        # the save is then retried whole, never counted done half-way.
        view = memoryview(chunk)
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], lo + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
    if sync:
        os.fdatasync(fd)


_SANITIZE = bytes([1 if i == 1 else 0 for i in range(256)])
