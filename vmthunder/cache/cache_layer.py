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
import errno
import fcntl
import hashlib
import json
import logging
import os
import time

from vmthunder import blockdev
from vmthunder import fileio
from vmthunder.cache import chunkmap

LOG = logging.getLogger(__name__)

META_VERSION = 1
# Chunks at least this large are digested in a worker thread.
_VERIFY_IN_THREAD = 64 * 1024


def cache_key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


class CacheInUse(blockdev.BlockError):
    pass


class CacheLayer(blockdev.BlockDevice):
    capabilities = blockdev.Capabilities(
        block_status=True,
        contexts=(blockdev.BASE_ALLOCATION, blockdev.VMTHUNDER_CACHE))

    def __init__(self, source: blockdev.BlockDevice, cache_dir: str, *,
                 chunk_size: int = 256 * 1024, max_pending_writes: int = 32,
                 verify=None, sync_interval: float = 0.0):
        """Open (or create) the cache of ``source`` under ``cache_dir``.

        ``verify(index, data)`` raises BlockError when a fetched chunk is
        wrong; None trusts the source. Fetched chunks are made durable
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
                "process per cache directory") from None
        self.chunk_size = self._load_meta(identity, chunk_size)
        self.chunks = (self.size + self.chunk_size - 1) // self.chunk_size
        self._data_fd = os.open(os.path.join(self.directory, "data"),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._data_fd).st_size != self.size:
            os.ftruncate(self._data_fd, self.size)
        self.map = chunkmap.ChunkMap(self.chunks,
                                     os.path.join(self.directory, "map"))
        self._resident = fileio.ResidencyMap(self._data_fd, self.size)
        # index -> Future resolved with the chunk's bytes; kept until the
        # chunk is durable and marked, so late readers are served from it.
        self._inflight: dict[int, asyncio.Future] = {}
        # Chunks written to the cache file but not yet durable (unmarked):
        # readable from the file, not yet to be trusted after a crash.
        self._unsynced: set[int] = set()
        self._write_slots = asyncio.Semaphore(max_pending_writes)
        self._store_tasks: set[asyncio.Task] = set()
        self.sync_interval = sync_interval
        self._last_sync = 0.0
        self._sync_now = asyncio.Event()
        self._syncer: asyncio.Task | None = None
        self._map_save: asyncio.Task | None = None
        self.counters = {"read_requests": 0, "bytes_read": 0,
                         "bytes_fetched": 0, "chunks_fetched": 0,
                         "fetch_errors": 0, "store_errors": 0,
                         "verify_errors": 0}
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
        return blockdev.joined(await self.read_parts(offset, length))

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
            else:
                # Each chunk serves only its own part of [lo, hi).
                pieces.extend(self._read_missing(i, max(lo, i * cs),
                                                 min(hi, (i + 1) * cs))
                              for i in range(start, end))
        return await asyncio.gather(*pieces)

    def local_extent(self, offset: int, length: int):
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs + 1
        if self.map.all_present(first, last) \
                and self._resident.resident(offset, length):
            # Served without read(): count it here.
            self.counters["read_requests"] += 1
            self.counters["bytes_read"] += length
            return self._data_fd, offset
        return None

    async def _read_local(self, offset: int, length: int) -> bytes:
        data = await fileio.pread(self._data_fd, length, offset)
        if len(data) != length:
            raise blockdev.BlockError(
                errno.EIO, f"{self.describe()}: cache file "
                f"{self.directory}/data is shorter than the image; delete "
                "the cache directory")
        return data

    async def _read_missing(self, index: int, lo: int, hi: int) -> bytes:
        data = await self.chunk(index)
        base = index * self.chunk_size
        if lo == base and hi - lo == len(data):
            return data
        return bytes(memoryview(data)[lo - base:hi - base])

    async def chunk(self, index: int) -> bytes:
        """The bytes of chunk ``index``, fetched once however many ask."""
        fut = self._inflight.get(index)
        if fut is None:
            if self.map.present(index) or index in self._unsynced:
                start = index * self.chunk_size
                return await self._read_local(
                    start, min(self.chunk_size, self.size - start))
            fut = asyncio.get_running_loop().create_future()
            self._inflight[index] = fut
            task = asyncio.ensure_future(self._fetch(index, fut))
            self._store_tasks.add(task)
            task.add_done_callback(self._store_tasks.discard)
        # shield: one reader giving up must not cancel the shared fetch.
        return await asyncio.shield(fut)

    async def _fetch(self, index: int, fut: asyncio.Future) -> None:
        start = index * self.chunk_size
        length = min(self.chunk_size, self.size - start)
        async with self._write_slots:
            LOG.debug("%s: fetching chunk %d", self.describe(), index)
            try:
                data = await self._fetch_verified(index, start, length)
            except asyncio.CancelledError:
                self._inflight.pop(index, None)
                fut.cancel()
                raise
            except Exception as exc:
                self.counters["fetch_errors"] += 1
                self._inflight.pop(index, None)
                fut.set_exception(exc)
                fut.exception()     # retrieved here; readers re-raise it
                return
            self.counters["bytes_fetched"] += length
            self.counters["chunks_fetched"] += 1
            fut.set_result(data)
            try:
                await fileio.pwrite(self._data_fd, data, start)
            except OSError as exc:
                self._store_failed(index, exc)
                return
            finally:
                self._inflight.pop(index, None)
            # Written: readers take it from the file from now on, and the
            # slot is free while the disk catches up (the page cache holds
            # the data, not us), so fetching runs ahead of the disk.
            self._unsynced.add(index)
            if self._syncer is None or self._syncer.done():
                self._syncer = asyncio.ensure_future(self._sync_loop())

    def _store_failed(self, index: int, exc: OSError) -> None:
        # Not marked: served from memory now, refetched next time.
        self.counters["store_errors"] += 1
        LOG.warning("%s: could not store chunk %d: %s", self.describe(),
                    index, exc)

    async def _fetch_verified(self, index: int, start: int,
                              length: int) -> bytes:
        """Read a chunk from below; a chunk failing ``verify`` is fetched
        once more, then the read fails (never wrong data)."""
        for attempt in (1, 2):
            data = await self.source.read(start, length)
            if self.verify is None:
                return data
            try:
                if length >= _VERIFY_IN_THREAD:
                    # hashlib releases the GIL: hashing runs on another
                    # core while the loop serves other requests.
                    await asyncio.to_thread(self.verify, index, data)
                else:
                    self.verify(index, data)
                return data
            except blockdev.BlockError as exc:
                self.counters["verify_errors"] += 1
                LOG.warning("%s: %s (attempt %d of 2)", self.describe(),
                            exc, attempt)
                if attempt == 2:
                    raise

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
            batch = set(self._unsynced)
            try:
                await fileio.fdatasync(self._data_fd)
            except OSError as exc:
                self._unsynced -= batch
                self.counters["store_errors"] += len(batch)
                LOG.warning("%s: fdatasync failed (%s); %d chunks will be "
                            "fetched again", self.describe(), exc,
                            len(batch))
                continue
            finally:
                self._last_sync = time.monotonic()
            for index in batch:
                self.map.set(index)
            self._unsynced -= batch
            self._schedule_map_save()

    def _schedule_map_save(self) -> None:
        # Marks are written in batches; without fdatasync, since a lost
        # mark is only a refetch (the data behind a mark is already
        # durable, so any mark that reaches the disk is a true one).
        if self._map_save is None or self._map_save.done():
            self._map_save = asyncio.ensure_future(self._save_map_soon())

    async def _save_map_soon(self) -> None:
        await asyncio.sleep(0.05)
        try:
            await self.map.save()
        except OSError as exc:
            LOG.warning("%s: could not save the chunk map: %s",
                        self.describe(), exc)

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
        await self.map.save(sync=True)
        self.map.close()
        self._resident.close()
        os.close(self._data_fd)
        os.close(self._lock_fd)
        self._lock_fd = None
        await self.source.close()
