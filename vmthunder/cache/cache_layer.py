"""Copy-on-read cache: a persistent, chunked local copy of a source.

One cache per image per host, shared by every VM of that image. A read of
a chunk the cache does not hold fetches the whole chunk from the layer
below, serves the reader from memory at once, and stores the chunk in the
background. The rules (docs/design.md):

- a chunk is marked present only after its data is durable: pwrite, then
  fdatasync, then the mark (a lost mark costs a refetch; a mark without
  data would serve garbage);
- concurrent reads of one missing chunk cause one fetch;
- a chunk that fails the check of ``verify`` (the manifest digest, when
  the source has one) is neither stored nor served.

On disk, under ``<cache_dir>/<key>/`` where the key is derived from the
source's identity: ``meta.json`` (what this cache is of), ``data`` (a
sparse file of the image's size, chunks at their own offsets), ``map``
(one byte per chunk, see chunkmap.py) and ``snapshots/`` (per-VM
overlays, snapshot.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import signal
import time

from vmthunder import aio
from vmthunder import blockdev
from vmthunder import fileio
from vmthunder.cache import chunkmap

LOG = logging.getLogger(__name__)

META_VERSION = 1
# Consecutive missing chunks of one read are fetched with one read of the
# source up to this many bytes: per-chunk work (a command, a thread hop, a
# pwrite) dominated cold sequential reads of 256 KiB chunks.
MAX_FETCH_BYTES = 2 * 1024 * 1024
# A fetch of a whole run (MAX_FETCH_BYTES: a sequential read) also loads
# the digests of the next window of this many runs (windows aligned on
# their size: one table read per window).
TABLE_AHEAD_RUNS = 8
# What one of max_pending_writes stands for, at the least (see __init__).
SLOT_UNIT = 256 * 1024
# A chunk map save that failed (a full disk) is retried this often.
MAP_SAVE_RETRY_S = 5.0
# chunk_states() values (MISSING and HELD are the chunk map's bytes).
MISSING, HELD, FETCHING = 0, 1, 2
assert (MISSING, HELD) == (chunkmap.ABSENT, chunkmap.PRESENT)
_STATE_RUNS = re.compile(rb"\x00+|\x01+|\x02+")


class _Fetch:
    """One read of the source covering chunks [first, first + count).

    ``future`` resolves to a read-only view of the bytes read, once they
    are verified; ``errors`` names the chunks in it that failed the check
    twice (their readers get the error, the others their data).
    """

    __slots__ = ("first", "count", "future", "errors")

    def __init__(self, first: int, count: int, future: asyncio.Future):
        self.first = first
        self.count = count
        self.future = future
        self.errors: dict[int, blockdev.BlockError] = {}


def _span(runs) -> str:
    """Chunks [a, b) of ``runs`` (sorted) as "first-last"."""
    if not runs:
        return "none"
    first, last = runs[0][0], runs[-1][1] - 1
    return str(first) if first == last else f"{first}-{last}"


def _runs_without(first: int, last: int, holes) -> list[tuple[int, int]]:
    """[a, b) runs of chunks [first, last) that are not in ``holes``."""
    runs, a = [], first
    for i in sorted(holes):
        if a < i:
            runs.append((a, i))
        a = i + 1
    if a < last:
        runs.append((a, last))
    return runs


class _Unsynced:
    """Chunks written to the cache file but not yet durable (unmarked):
    one byte per chunk for the lookups, and the runs written since the
    syncer last took them (it marks them run by run)."""

    __slots__ = ("_map", "_runs", "_count")

    def __init__(self, chunks: int):
        self._map = bytearray(chunks)
        self._runs: list[tuple[int, int]] = []
        self._count = 0

    def __contains__(self, index: int) -> bool:
        return self._map[index] == 1

    def __bool__(self) -> bool:
        return self._count > 0

    def __len__(self) -> int:
        return self._count

    def add(self, a: int, b: int) -> None:
        """Chunks [a, b), none of them in here yet."""
        self._map[a:b] = b"\x01" * (b - a)
        self._runs.append((a, b))
        self._count += b - a

    def take(self) -> list[tuple[int, int]]:
        """The runs added since the last take (they stay in until
        dropped)."""
        runs, self._runs = self._runs, []
        return runs

    def untake(self, runs) -> None:
        """Runs taken that are still to be made durable."""
        self._runs[:0] = runs

    def drop(self, runs) -> None:
        for a, b in runs:
            self._map[a:b] = bytes(b - a)
            self._count -= b - a

    def clear(self) -> None:
        self.drop(self.take())

    def runs(self, lo: int, hi: int):
        """Yield [a, b) runs of the chunks in here within [lo, hi)."""
        m = self._map
        while lo < hi:
            a = m.find(1, lo, hi)
            if a < 0:
                return
            b = m.find(0, a, hi)
            b = hi if b < 0 else b
            yield a, b
            lo = b


# A test hook (tests/functional/test_cache_capacity.py): the process
# kills itself with SIGKILL when it reaches the point of an eviction
# named by this variable ("NAME", or "NAME@N": the Nth time); never set
# in production.
_CRASH_AT, _, _CRASH_NTH = (os.environ.get("VMTHUNDER_TEST_CRASH_AT")
                            or "").partition("@")
_crash_count = [int(_CRASH_NTH or 1)]


def _crash_point(name: str) -> None:
    if _CRASH_AT == name:
        _crash_count[0] -= 1
        if _crash_count[0] <= 0:
            LOG.warning("test hook: SIGKILL at %s", name)
            os.kill(os.getpid(), signal.SIGKILL)


def cache_key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


class _FileLease(int):
    """The cache file's descriptor as local_extent hands it out: an int
    (the NBD server sends from it with sendfile, maybe much later: behind
    an upload limit, a slow client) that tells its cache when the last
    reference to it goes, i.e. when the reply was sent or dropped.
    evict() waits for every lease before it punches the file."""

    def __new__(cls, fd: int, cache: "CacheLayer"):
        lease = super().__new__(cls, fd)
        lease.cache = cache
        return lease

    def __del__(self):
        cache = self.cache
        cache._leases -= 1
        if not cache._leases:
            for waiter in cache._lease_waiters:
                if not waiter.done():
                    waiter.get_loop().call_soon_threadsafe(
                        _wake, waiter)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class CacheInUse(blockdev.BlockError):
    """The cache directory of this content is locked by another
    CacheLayer (``directory``)."""

    def __init__(self, code: int, message: str, directory: str = ""):
        super().__init__(code, message)
        self.directory = directory


class CacheLayer(blockdev.BlockDevice):
    capabilities = blockdev.Capabilities(
        block_status=True,
        contexts=(blockdev.BASE_ALLOCATION, blockdev.VMTHUNDER_CACHE))

    def __init__(self, source: blockdev.BlockDevice, cache_dir: str, *,
                 chunk_size: int = 256 * 1024, max_pending_writes: int = 32,
                 verify=None, verify_many=None, prepare_verify=None,
                 sync_interval: float = 0.0):
        """Open (or create) the cache of ``source`` under ``cache_dir``.

        ``verify(index, data)`` raises BlockError when a fetched chunk is
        wrong; None trusts the source. ``verify_many(first, data)``, when
        given, does the same check over the consecutive chunks of
        ``data`` at once, returning ``{index: BlockError}`` of the wrong
        ones (the manifest's verify_run: a fetched run is checked in one
        call, not chunk by chunk). ``prepare_verify(first, last)``,
        when given, is awaited before chunks [first, last) are checked
        (a lazily read manifest loads their digests; it runs while the
        chunks are fetched). Fetched chunks are made durable
        (and marked) at most every ``sync_interval`` seconds: a sync makes
        the kernel write back at once, which costs the CPU that a boot
        storm needs, while a chunk left unmarked by a crash costs only a
        refetch.
        """
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk size {chunk_size} is not a power of two")
        self.source = source
        self.size = source.size
        self.verify = verify
        self.verify_many = verify_many if verify is not None else None
        self.prepare_verify = prepare_verify
        identity = source.identity()
        self.directory = os.path.join(cache_dir, cache_key(identity))
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise CacheInUse(
                errno.EBUSY,
                f"cache {self.directory} of {source.describe()} is in use by "
                "another vmthunder process; serve each image from one "
                "process per cache directory", self.directory) from None
        self.chunk_size = self._load_meta(identity, chunk_size)
        self.chunks = (self.size + self.chunk_size - 1) // self.chunk_size
        self._data_fd = os.open(os.path.join(self.directory, "data"),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._data_fd).st_size != self.size:
            os.ftruncate(self._data_fd, self.size)
        # Its space reserved now: a cache disk that fills up later still
        # takes the marks (see close()).
        self.map = chunkmap.ChunkMap(self.chunks,
                                     os.path.join(self.directory, "map"),
                                     reserve=True)
        self._resident = fileio.ResidencyMap(self._data_fd, self.size)
        # index -> the _Fetch bringing it; kept until the chunk is written
        # to the cache file, so late readers are served from memory.
        self._inflight: dict[int, _Fetch] = {}
        # Chunks written to the cache file but not yet durable (unmarked):
        # readable from the file, not yet to be trusted after a crash.
        self._unsynced = _Unsynced(self.chunks)
        # Slots count chunks; with chunks smaller than SLOT_UNIT, a slot of
        # max_pending_writes is SLOT_UNIT worth of them (the memory bound
        # stays in bytes, and small chunks still fetch in long runs). A
        # run takes its slots at once, in turn (_take_slots).
        slots = max_pending_writes * max(1, SLOT_UNIT // self.chunk_size)
        self._slots_free = slots
        self._slot_waiters: collections.deque = collections.deque()
        self._max_run = max(1, min(slots,
                                   MAX_FETCH_BYTES // self.chunk_size))
        self._store_tasks: set[asyncio.Task] = set()
        self.sync_interval = sync_interval
        self._last_sync = 0.0
        self._sync_now = asyncio.Event()
        self._syncer: asyncio.Task | None = None
        self._map_save: asyncio.Task | None = None
        self.counters = {"read_requests": 0, "bytes_read": 0,
                         "bytes_fetched": 0, "chunks_fetched": 0,
                         "fetch_errors": 0, "store_errors": 0,
                         "verify_errors": 0, "chunks_evicted": 0,
                         "chunks_not_kept": 0}
        # The host's cache capacity (agent/capacity.py), or None (no cap):
        # reserve(cache, nbytes) is asked before fetched chunks are
        # written (False: they are served, not kept), stored(cache,
        # nbytes) told once written.
        self.space = None
        # Evictions in progress (evict()): [(runs, done)]; a fetch of
        # their chunks writes only once their holes are punched.
        self._evictions: list = []
        # While > 0, local_extent hands out no file ranges (an eviction
        # waits for the ones handed out to be sent).
        self._zero_copy_off = 0
        # File ranges handed out (local_extent) and not yet sent or
        # dropped (_FileLease), and the evictions waiting for none.
        self._leases = 0
        self._lease_waiters: list[asyncio.Future] = []
        # Reads of the cache file in progress, by generation: an eviction
        # waits for those started before its marks were cleared.
        self._read_gen = 0
        self._local_reads: dict[int, int] = {}
        self._read_waiters: list[asyncio.Future] = []
        LOG.info("cache %s for %s: %d of %d chunks of %d bytes present",
                 self.directory, source.describe(), self.map.count_present(),
                 self.chunks, self.chunk_size)

    def _load_meta(self, identity: str, chunk_size: int) -> int:
        path = os.path.join(self.directory, "meta.json")
        try:
            with open(path) as f:
                meta = json.load(f)
        except (FileNotFoundError, ValueError):
            meta = None
        if meta and meta.get("identity") == identity \
                and meta.get("size") == self.size \
                and meta.get("version") == META_VERSION:
            if meta["chunk_size"] != chunk_size:
                LOG.warning("cache %s was made with chunk size %d; keeping "
                            "it (asked for %d). Delete the directory to "
                            "change it.", self.directory, meta["chunk_size"],
                            chunk_size)
            return meta["chunk_size"]
        if meta:
            # Same key, other content: never serve it. Start afresh.
            LOG.warning("cache %s does not match %s; discarding it",
                        self.directory, identity)
        for name in ("map", "data"):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"version": META_VERSION, "identity": identity,
                       "size": self.size, "chunk_size": chunk_size}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        return chunk_size

    def describe(self) -> str:
        return f"cache of {self.source.describe()}"

    def identity(self) -> str:
        return self.source.identity()

    # -- reads ------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        data = blockdev.joined(await self.read_parts(offset, length))
        # A fetched piece is a view of the fetch's buffer: callers of
        # read() get bytes they may keep.
        return bytes(data) if isinstance(data, memoryview) else data

    async def read_parts(self, offset: int, length: int) -> list:
        self.check_range(offset, length)
        self.counters["read_requests"] += 1
        self.counters["bytes_read"] += length
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs + 1
        if self.map.all_present(first, last):
            return [await self._read_local(offset, length)]
        pieces = []
        for start, end, present in self.map.runs(first, last):
            lo = max(offset, start * cs)
            hi = min(offset + length, end * cs)
            if present:
                pieces.append(self._read_local(lo, hi - lo))
                continue
            for fetch, i0, i1 in self._sources_of(start, end):
                a, b = max(lo, i0 * cs), min(hi, i1 * cs)
                pieces.append(self._read_local(a, b - a) if fetch is None
                              else self._from_fetch(fetch, a, b))
        return await asyncio.gather(*pieces)

    def _sources_of(self, start: int, end: int) -> list:
        """Split the unmarked chunks [start, end) into runs served alike:
        ``(fetch, i0, i1)`` from a fetch in flight, started here for
        chunks nobody fetches yet (consecutive ones share one read of the
        source), or ``(None, i0, i1)`` from the cache file (written, not
        yet marked)."""
        runs = []
        i = start
        while i < end:
            fetch = self._inflight.get(i)
            j = i + 1
            if fetch is not None:
                while j < end and self._inflight.get(j) is fetch:
                    j += 1
            elif i in self._unsynced:
                while j < end and j in self._unsynced \
                        and j not in self._inflight:
                    j += 1
            else:
                while j < end and j - i < self._max_run \
                        and j not in self._inflight \
                        and j not in self._unsynced:
                    j += 1
                fetch = self._start_fetch(i, j - i)
            runs.append((fetch, i, j))
            i = j
        return runs

    async def _from_fetch(self, fetch: _Fetch, lo: int, hi: int):
        # shield: one reader giving up must not cancel the shared fetch.
        view = await asyncio.shield(fetch.future)
        cs = self.chunk_size
        if fetch.errors:
            for i in range(lo // cs, (hi - 1) // cs + 1):
                if i in fetch.errors:
                    raise fetch.errors[i]
        base = fetch.first * cs
        return view[lo - base:hi - base]

    def read_now(self, offset: int, length: int):
        cs = self.chunk_size
        if not self.map.all_present(offset // cs,
                                    (offset + length - 1) // cs + 1):
            return None
        data = fileio.pread_now(self._data_fd, length, offset)
        if data is not None:
            self.counters["read_requests"] += 1
            self.counters["bytes_read"] += length
        return data

    def local_extent(self, offset: int, length: int):
        if self._zero_copy_off:
            return None
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs + 1
        if self.map.all_present(first, last) \
                and self._resident.resident(offset, length):
            # Served without read(): count it here.
            self.counters["read_requests"] += 1
            self.counters["bytes_read"] += length
            self._leases += 1
            return _FileLease(self._data_fd, self), offset
        return None

    async def _read_local(self, offset: int, length: int) -> bytes:
        # Counted while it runs (evict() waits for it); a read served from
        # the page cache at once does not suspend, and counts for nothing.
        gen = self._read_gen
        reads = self._local_reads
        reads[gen] = reads.get(gen, 0) + 1
        try:
            data = await fileio.pread(self._data_fd, length, offset)
        finally:
            left = reads[gen] - 1
            if left:
                reads[gen] = left
            else:
                del reads[gen]
                for waiter in self._read_waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        if len(data) != length:
            raise blockdev.BlockError(
                errno.EIO, f"{self.describe()}: cache file "
                f"{self.directory}/data is shorter than the image; delete "
                "the cache directory")
        return data

    # -- what this cache holds (for peers) ---------------------------------

    def chunk_states(self, first: int, last: int) -> list[int]:
        """State of each chunk in [first, last): HELD (marked, or written
        and not yet durable), FETCHING (in flight here) or MISSING."""
        states = []
        for i in range(first, last):
            if i in self._inflight:
                states.append(FETCHING)
            elif self.map.present(i) or i in self._unsynced:
                states.append(HELD)
            else:
                states.append(MISSING)
        return states

    def landed(self, index: int) -> bool:
        """True when chunk ``index`` is FETCHING only because its fetch is
        being written to the cache file: its bytes are read and checked,
        and read_parts() serves them from memory at once (no wait)."""
        fetch = self._inflight.get(index)
        if fetch is None or not fetch.future.done() \
                or fetch.future.cancelled():
            return False
        return fetch.future.exception() is None \
            and index not in fetch.errors

    def chunk_state_runs(self, first: int, last: int) -> list[tuple]:
        """chunk_states() of [first, last) as (start, end, state) runs.

        Peers ask for the states of whole windows of chunks many times a
        second: the window's bytes of the chunk map, with the runs not yet
        durable and the (few) chunks in flight laid over them, are cut
        into runs by a regular expression, not chunk by chunk.
        """
        states = self.map.states(first, last)
        for a, b in self._unsynced.runs(first, last):
            states[a - first:b - first] = b"\x01" * (b - a)
        for i in self._inflight:
            if first <= i < last:
                states[i - first] = FETCHING
        return [(first + m.start(), first + m.end(), states[m.start()])
                for m in _STATE_RUNS.finditer(states)]

    async def read_held(self, offset: int, length: int, *,
                        wait=None) -> list:
        """Like :meth:`read_parts`, but never fetches.

        Every chunk of the range must be held or in flight (and, when
        ``wait`` is given, ``wait(index)`` true for the in-flight ones:
        the reader waits for those to land); otherwise BlockError(ENODATA)
        at once, and nothing is fetched.
        """
        self.check_range(offset, length)
        if length:
            cs = self.chunk_size
            first, last = offset // cs, (offset + length - 1) // cs + 1
            if not self.map.all_present(first, last):
                for i, state in enumerate(self.chunk_states(first, last),
                                          first):
                    if state == MISSING or (state == FETCHING and wait
                                            is not None and not wait(i)):
                        raise blockdev.BlockError(
                            errno.ENODATA, f"{self.describe()} does not "
                            f"hold chunk {i}")
        # No await since the check: read_parts starts no fetch.
        return await self.read_parts(offset, length)

    # -- fetching ---------------------------------------------------------

    def _start_fetch(self, first: int, count: int) -> _Fetch:
        fetch = _Fetch(first, count,
                       asyncio.get_running_loop().create_future())
        for i in range(first, first + count):
            self._inflight[i] = fetch
        task = asyncio.ensure_future(self._fetch(fetch))
        self._store_tasks.add(task)
        task.add_done_callback(self._store_tasks.discard)
        return fetch

    async def _fetch(self, fetch: _Fetch) -> None:
        """Read chunks [first, first+count) with one read of the source,
        check them, serve them, then write them to the cache file."""
        cs = self.chunk_size
        start = fetch.first * cs
        length = min(fetch.count * cs, self.size - start)
        indices = range(fetch.first, fetch.first + fetch.count)
        try:
            await self._take_slots(fetch.count)
        except asyncio.CancelledError:
            self._forget(indices, fetch)
            fetch.future.cancel()
            raise
        try:
            LOG.debug("%s: fetching chunks %d-%d", self.describe(),
                      fetch.first, fetch.first + fetch.count - 1)
            prepared = None
            if self.verify is not None and self.prepare_verify is not None:
                # Digests come while the data does.
                last = fetch.first + fetch.count
                prepared = asyncio.ensure_future(self.prepare_verify(
                    fetch.first, last))
                # Its error, if the read fails first, is not the news.
                prepared.add_done_callback(
                    lambda t: t.cancelled() or t.exception())
                window = TABLE_AHEAD_RUNS * fetch.count
                ahead_at = (last // window + 1) * window
                if fetch.count == self._max_run and ahead_at < self.chunks:
                    # A long run: a sequential read, most likely. The
                    # digests of the next window of runs come now, in
                    # one table read (asked again by the window's other
                    # runs, but read once), before those runs need them;
                    # an error there is for those runs to meet.
                    ahead = asyncio.ensure_future(self.prepare_verify(
                        ahead_at, min(self.chunks, ahead_at + window)))
                    ahead.add_done_callback(
                        lambda t: t.cancelled() or t.exception())
                    self._store_tasks.add(ahead)
                    ahead.add_done_callback(self._store_tasks.discard)
            try:
                buf = bytearray(length)
                await self.source.read_into(start, buf)
                if prepared is not None:
                    await prepared
                if self.verify is not None:
                    await self._check(fetch, buf)
            except asyncio.CancelledError:
                if prepared is not None:
                    prepared.cancel()
                self._forget(indices, fetch)
                fetch.future.cancel()
                raise
            except Exception as exc:
                if prepared is not None and not prepared.done():
                    prepared.cancel()
                self.counters["fetch_errors"] += 1
                self._forget(indices, fetch)
                fetch.future.set_exception(exc)
                fetch.future.exception()  # retrieved; readers re-raise it
                return
            errors = fetch.errors
            # Chunks that failed twice are not kept: the next read of one
            # fetches it afresh.
            good = _runs_without(fetch.first, fetch.first + fetch.count,
                                 errors)
            self._forget(errors, fetch)
            self.counters["fetch_errors"] += len(errors)
            self.counters["chunks_fetched"] += fetch.count - len(errors)
            self.counters["bytes_fetched"] += length - sum(
                min(cs, self.size - i * cs) for i in errors)
            view = memoryview(buf).toreadonly()
            fetch.future.set_result(view)
            try:
                if not await self._may_store(fetch, good):
                    return
                try:
                    await self._store(view, fetch.first, good)
                finally:
                    if self.space is not None:
                        self.space.stored(self, self._run_bytes(good))
            except OSError as exc:
                self._store_failed(good, exc)
                return
            finally:
                self._forget(indices, fetch)
            # Written: readers take it from the file from now on, and the
            # slots are free while the disk catches up (the page cache
            # holds the data, not us), so fetching runs ahead of the disk.
            for a, b in good:
                self._unsynced.add(a, b)
            if self._syncer is None or self._syncer.done():
                self._syncer = asyncio.ensure_future(self._sync_loop())
        finally:
            self._give_slots(fetch.count)

    async def _may_store(self, fetch: _Fetch, runs) -> bool:
        """Wait for evictions of the fetch's chunks to end (their holes
        punched: a write before would be punched out under a mark), then
        ask the host's capacity for room; False: not kept (served from
        memory now, fetched again next time)."""
        if self._evictions:
            last = fetch.first + fetch.count
            for evicting, done in list(self._evictions):
                if any(a < last and fetch.first < b for a, b in evicting):
                    await done.wait()
        if self.space is None or not runs:
            return True
        if self.space.reserve(self, self._run_bytes(runs)):
            return True
        self.counters["chunks_not_kept"] += sum(b - a for a, b in runs)
        return False

    def _run_bytes(self, runs) -> int:
        cs = self.chunk_size
        return sum(min(b * cs, self.size) - a * cs for a, b in runs)

    def _forget(self, indices, fetch: _Fetch) -> None:
        for i in indices:
            if self._inflight.get(i) is fetch:
                del self._inflight[i]

    async def _take_slots(self, count: int) -> None:
        """Reserve ``count`` write slots (memory for fetched chunks)."""
        # In turn, all at once: two runs each holding part of what they
        # need could otherwise wait for each other forever.
        if not self._slot_waiters and self._slots_free >= count:
            self._slots_free -= count
            return
        waiter = (count, asyncio.get_running_loop().create_future())
        self._slot_waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            if waiter[1].done() and not waiter[1].cancelled():
                self._give_slots(count)     # granted, then cancelled
            else:
                self._slot_waiters.remove(waiter)
                self._grant_slots()         # the next in turn may fit
            raise

    def _give_slots(self, count: int) -> None:
        self._slots_free += count
        self._grant_slots()

    def _grant_slots(self) -> None:
        waiters = self._slot_waiters
        while waiters and waiters[0][0] <= self._slots_free:
            count, future = waiters.popleft()
            if not future.done():
                self._slots_free -= count
                future.set_result(None)

    async def _check(self, fetch: _Fetch, buf: bytearray) -> None:
        """Verify every chunk of ``buf``; a chunk that fails is read once
        more; one that fails again goes into ``fetch.errors`` (never wrong
        data: its readers get the error)."""
        cs = self.chunk_size
        base = fetch.first * cs
        view = memoryview(buf)
        failed = await self._verify_chunks(fetch.first, view)
        for index, exc in failed.items():
            self._verify_failed(exc, 1)
            part = view[index * cs - base:
                        min((index + 1) * cs, self.size) - base]
            await self.source.read_into(index * cs, part)
            again = await self._verify_chunks(index, part)
            if again:
                self._verify_failed(again[index], 2)
                fetch.errors[index] = again[index]

    async def _verify_chunks(self, first: int, view: memoryview) -> dict:
        """{index: error} of the chunks in ``view`` (from chunk
        ``first``) that ``verify`` rejects."""
        if self.verify_many is not None:
            return await aio.run_hashing(
                functools.partial(self.verify_many, first, view),
                self.chunk_size)
        cs = self.chunk_size
        verify = self.verify

        def check() -> dict:
            failed = {}
            for pos in range(0, len(view), cs):
                index = first + pos // cs
                try:
                    verify(index, view[pos:pos + cs])
                except blockdev.BlockError as exc:
                    failed[index] = exc
            return failed
        # (Checked one by one: the run is what a thread takes back.)
        return await aio.run_hashing(check, len(view))

    def _verify_failed(self, exc: blockdev.BlockError, attempt: int) -> None:
        self.counters["verify_errors"] += 1
        LOG.warning("%s: %s (attempt %d of 2)", self.describe(), exc,
                    attempt)

    async def _store(self, view: memoryview, first: int, runs) -> None:
        """Write the chunk runs ``runs`` ([a, b) each) of ``view`` (chunk
        ``first`` at its start) to the cache file, one pwrite per run."""
        cs = self.chunk_size
        for a, b in runs:
            lo, hi = (a - first) * cs, min((b - first) * cs, len(view))
            await fileio.pwrite(self._data_fd, view[lo:hi], a * cs)

    def _store_failed(self, runs, exc: OSError) -> None:
        # Not marked: served from memory now, refetched next time.
        self.counters["store_errors"] += sum(b - a for a, b in runs)
        LOG.warning("%s: could not store chunks %s: %s", self.describe(),
                    _span(runs), exc)

    async def _sync_loop(self) -> None:
        """Make written chunks durable, then mark them, in batches.

        One fdatasync per ``sync_interval`` covers every chunk written
        before it started. When a sync fails, none of its batch is marked
        and the batch is dropped, to be fetched again: Linux reports a
        writeback error to one fdatasync only, so a later sync that
        succeeds says nothing about pages whose writeback already failed.
        """
        while self._unsynced:
            wait = self._last_sync + self.sync_interval - time.monotonic()
            if wait > 0 and not self._sync_now.is_set():
                # Let more chunks join this sync (close() cuts it short).
                try:
                    await asyncio.wait_for(self._sync_now.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            batch = self._unsynced.take()
            try:
                await fileio.fdatasync(self._data_fd)
            except asyncio.CancelledError:
                self._unsynced.untake(batch)
                raise
            except OSError as exc:
                self._unsynced.drop(batch)
                lost = sum(b - a for a, b in batch)
                self.counters["store_errors"] += lost
                LOG.warning("%s: fdatasync failed (%s); %d chunks will be "
                            "fetched again", self.describe(), exc, lost)
                continue
            finally:
                self._last_sync = time.monotonic()
            for a, b in batch:
                self.map.set(a, b)
            self._unsynced.drop(batch)
            self._schedule_map_save()

    def _schedule_map_save(self) -> None:
        # Marks are written in batches; without fdatasync, since a lost
        # mark is only a refetch (the data behind a mark is already
        # durable, so any mark that reaches the disk is a true one).
        if self._map_save is None or self._map_save.done():
            self._map_save = asyncio.ensure_future(self._save_map_soon())

    async def _save_map_soon(self) -> None:
        await asyncio.sleep(0.05)
        failures = 0
        while True:
            try:
                await self.map.save()
            except OSError as exc:
                # The marks stay in memory (and keep serving); the save
                # is retried, since no new mark may come to trigger one.
                failures += 1
                if failures == 1:
                    LOG.warning("%s: could not save the chunk map %s: %s; "
                                "its new marks are kept in memory and saved "
                                "once there is space (retrying every %g s)",
                                self.describe(), self.map.path,
                                exc.strerror or exc, MAP_SAVE_RETRY_S)
                # close() sets _sync_now, then saves the map itself.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._sync_now.wait(),
                                           MAP_SAVE_RETRY_S)
                if self._sync_now.is_set():
                    return
                continue
            if failures:
                LOG.info("%s: chunk map saved after %d failed attempt(s)",
                         self.describe(), failures)
            return

    # -- eviction -----------------------------------------------------------

    async def evict(self, runs=None, *, lease_timeout: float = 10.0) -> int:
        """Drop chunks of ``runs`` ([a, b) each; None: the whole image)
        from the cache, but none a fetch is bringing or that waits for
        its sync; the number of marked chunks dropped.

        Crash-safe, in this order (docs/design.md, "Cache capacity"):
        the chunks' marks are cleared and the map is made durable
        (fdatasync); reads of the cache file started before that end;
        file ranges handed out for zero-copy replies (none is handed out
        meanwhile) are sent or dropped (after ``lease_timeout`` seconds
        the data stays, unmarked); only then is the data punched out
        (fallocate PUNCH_HOLE). A crash at any
        point leaves no mark without its data, at worst data without a
        mark (a refetch). Readers meanwhile find the chunks missing and
        fetch them; such a fetch writes them once the holes are punched.
        Unmarked data in the runs (from a crash before a sync) goes too.
        """
        if self._lock_fd is None:
            raise blockdev.BlockError(errno.EBADF,
                                      f"{self.describe()} is closed")
        runs = [(0, self.chunks)] if runs is None else runs
        runs = [(max(0, a), min(self.chunks, b)) for a, b in runs]
        if self._unsynced or self._inflight or self._evictions:
            # Busy: in flight, written and not yet durable, or being
            # evicted already: left out.
            busy = bytearray(self._unsynced._map)
            for i in self._inflight:
                busy[i] = 1
            for evicting, _ in self._evictions:
                for a, b in evicting:
                    busy[a:b] = b"\x01" * (b - a)
            todo = []
            for a, b in runs:
                while a < b:
                    x = busy.find(0, a, b)
                    if x < 0:
                        break
                    y = busy.find(1, x, b)
                    y = b if y < 0 else y
                    todo.append((x, y))
                    a = y
        else:
            todo = [(a, b) for a, b in runs if a < b]
        if not todo:
            return 0
        cs = self.chunk_size
        dropped = sum(self.map.count_present(a, b) for a, b in todo)
        done = asyncio.Event()
        entry = (todo, done)
        self._evictions.append(entry)
        self._zero_copy_off += 1
        try:
            for a, b in todo:
                self.map.clear(a, b)
            _crash_point("evict-marks-cleared")
            await self.map.save(sync=True)
            _crash_point("evict-marks-durable")
            await self._drain_reads()
            if not await self._drain_leases(lease_timeout):
                LOG.warning("%s: zero-copy replies from its file still "
                            "queued after %g s; %d chunks unmarked, their "
                            "data not freed", self.describe(),
                            lease_timeout, dropped)
                self.counters["chunks_evicted"] += dropped
                return dropped
            # Whole chunks, the last one too (past the end of the file:
            # its partial block is freed, the size kept).
            await fileio.punch_holes(
                self._data_fd, [(a * cs, (b - a) * cs) for a, b in todo])
            _crash_point("evict-punched")
        finally:
            self._zero_copy_off -= 1
            self._evictions.remove(entry)
            done.set()
        self.counters["chunks_evicted"] += dropped
        LOG.info("%s: evicted %d chunks (%s)", self.describe(), dropped,
                 _span(todo))
        return dropped

    async def _drain_reads(self) -> None:
        """Wait for the reads of the cache file in progress now."""
        gen = self._read_gen
        self._read_gen += 1
        loop = asyncio.get_running_loop()
        while any(g <= gen for g in self._local_reads):
            waiter = loop.create_future()
            self._read_waiters.append(waiter)
            try:
                await waiter
            finally:
                self._read_waiters.remove(waiter)

    async def _drain_leases(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until no file range handed out is
        still to be sent; True if none is."""
        if not self._leases:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._lease_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._lease_waiters.remove(waiter)
        return not self._leases

    def allocated_bytes(self) -> int:
        """Bytes of the cache file on disk (its allocated blocks)."""
        return os.fstat(self._data_fd).st_blocks * 512

    # -- status -----------------------------------------------------------

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        self.check_range(offset, length)
        if context == blockdev.BASE_ALLOCATION:
            return await self.source.block_status(offset, length, context)
        if context != blockdev.VMTHUNDER_CACHE:
            return await super().block_status(offset, length, context)
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs + 1
        extents = []
        for start, end, present in self.map.runs(first, last):
            lo = max(offset, start * cs)
            hi = min(offset + length, end * cs)
            extents.append(blockdev.Extent(
                hi - lo, blockdev.STATE_CACHED if present else 0))
        return extents

    async def writes_landed(self) -> None:
        """Wait for the cache-file writes in flight now: a fetched chunk
        stays FETCHING until its write lands, and a read of it meanwhile
        is served from memory but counts as a miss."""
        if self._store_tasks:
            await asyncio.gather(*list(self._store_tasks),
                                 return_exceptions=True)

    async def durable(self, chunks, timeout: float | None = None) -> bool:
        """Wait until every chunk of ``chunks`` is marked: stored and
        made durable by a sync (at most ``sync_interval`` after its fetch
        ends). False if one is not by ``timeout`` (default: two sync
        intervals and 10 s): its store failed, or it was evicted."""
        await self.writes_landed()
        deadline = time.monotonic() + (
            timeout if timeout is not None else 2 * self.sync_interval + 10)
        present = self.map.present
        while not all(present(i) for i in chunks):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def fetch_counts(self) -> tuple[int, int]:
        """(in flight, queued) fetches, counted when asked (nothing is
        counted on the read path): a fetch is queued while it waits for
        write slots (memory for the chunks it brings), in flight from
        then until its chunks are checked and handed to the readers."""
        pending = {id(f) for f in self._inflight.values()
                   if not f.future.done()}
        queued = min(len(self._slot_waiters), len(pending))
        return len(pending) - queued, queued

    def stats(self) -> dict:
        return dict(self.counters, chunk_size=self.chunk_size,
                    chunks=self.chunks,
                    chunks_present=self.map.count_present(),
                    directory=self.directory)

    async def close(self) -> None:
        if self._lock_fd is None:
            return
        self._sync_now.set()
        if self._store_tasks:
            await asyncio.gather(*list(self._store_tasks),
                                 return_exceptions=True)
        if self._syncer is not None:
            await asyncio.gather(self._syncer, return_exceptions=True)
        if self._map_save is not None:
            await asyncio.gather(self._map_save, return_exceptions=True)
        try:
            await self.map.save(sync=True)
        except OSError as exc:
            # The map on disk is older, and right: every chunk it marks
            # is durable (marks follow their data). What is lost is only
            # the marks since its last save, i.e. refetches.
            lo, hi = self.map.dirty_range()
            LOG.error("%s: could not save the chunk map %s at close: %s; "
                      "the chunks marked since its last save (up to %d, "
                      "in chunks %d-%d) will be fetched again; the map on "
                      "disk is older but consistent", self.describe(),
                      self.map.path, exc.strerror or exc,
                      self.map.count_present(lo, hi), lo, hi - 1)
        self.map.close()
        self._resident.close()
        os.close(self._data_fd)
        os.close(self._lock_fd)
        self._lock_fd = None
        await self.source.close()
