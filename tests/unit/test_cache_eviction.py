"""CacheLayer.evict: marks cleared and durable before the data is punched
out, readers during an eviction get the right bytes, zero-copy file
ranges handed out delay the punch, the host capacity's admission."""

import asyncio
import gc
import os

import pytest

from vmthunder import fileio
from vmthunder.cache.cache_layer import CacheLayer

from tests.unit.test_cache_layer import CS, SIZE, CountingSource, \
    drain, make_image, run


def disk_marks(layer) -> bytes:
    with open(layer.map.path, "rb") as f:
        return f.read()


def allocated(layer) -> int:
    return os.fstat(layer._data_fd).st_blocks * 512


async def filled(tmp_path, **kw):
    path, data = make_image(tmp_path / "img")
    layer = CacheLayer(CountingSource(path, **kw), str(tmp_path / "c"),
                       chunk_size=CS)
    assert await layer.read(0, SIZE) == data
    await drain(layer)
    await layer.map.save(sync=True)
    return layer, data


def test_evict_whole_frees_the_file_and_refetches_right(tmp_path):
    async def main():
        layer, data = await filled(tmp_path)
        assert disk_marks(layer).count(1) == layer.chunks
        assert allocated(layer) >= SIZE - CS
        dropped = await layer.evict()
        assert dropped == layer.chunks
        assert layer.map.count_present() == 0
        assert disk_marks(layer).count(1) == 0
        assert allocated(layer) == 0
        assert layer.counters["chunks_evicted"] == layer.chunks
        before = len(layer.source.reads)
        assert await layer.read(0, SIZE) == data
        assert len(layer.source.reads) - before == layer.chunks
        await drain(layer)
        assert layer.map.count_present() == layer.chunks
        await layer.close()
    run(main())


def test_marks_are_durable_before_the_punch(tmp_path, monkeypatch):
    """At the moment of the punch, the map on disk no longer marks the
    chunks punched (a crash there leaves data without marks)."""
    seen = []
    synced = []
    real = fileio.punch_holes
    real_sync = os.fdatasync

    def fdatasync(fd):
        synced.append(fd)
        real_sync(fd)

    async def watching(fd, ranges):
        # The map file was synced since the eviction began.
        seen.append((disk_marks(layer), list(ranges),
                     layer.map._fd in synced))
        await real(fd, ranges)

    monkeypatch.setattr(fileio, "punch_holes", watching)
    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def main():
        nonlocal layer
        layer, data = await filled(tmp_path)
        synced.clear()
        await layer.evict([(3, 7), (20, 22)])
        [(marks, ranges, map_synced)] = seen
        assert map_synced
        assert ranges == [(3 * CS, 4 * CS), (20 * CS, 2 * CS)]
        for i in range(layer.chunks):
            assert marks[i] == (0 if 3 <= i < 7 or 20 <= i < 22 else 1), i
        with open(os.path.join(layer.directory, "data"), "rb") as f:
            f.seek(3 * CS)
            assert f.read(CS) == bytes(CS)          # a hole now
        assert await layer.read(0, SIZE) == data
        await layer.close()
    layer = None
    run(main())


def test_reads_during_an_eviction_get_the_image(tmp_path, monkeypatch):
    """Readers racing a slow punch: each read is the image; a chunk
    fetched again while the punch runs is written after it (kept)."""
    real = fileio.punch_holes
    punching = []

    async def slow(fd, ranges):
        punching.append(True)
        await asyncio.sleep(0.2)
        await real(fd, ranges)

    monkeypatch.setattr(fileio, "punch_holes", slow)

    async def main():
        layer, data = await filled(tmp_path, delay=0.01)
        eviction = asyncio.ensure_future(layer.evict())
        reads = []
        for k in range(40):
            off = (k * 7919) % (SIZE - 3 * CS)
            reads.append(layer.read(off, 2 * CS + 17))
            if k == 5:
                await asyncio.sleep(0.05)
        got = await asyncio.gather(*reads)
        for k, chunk in enumerate(got):
            off = (k * 7919) % (SIZE - 3 * CS)
            assert chunk == data[off:off + 2 * CS + 17], k
        await eviction
        assert punching
        await drain(layer)
        # Whatever is marked now holds the image's bytes.
        with open(os.path.join(layer.directory, "data"), "rb") as f:
            disk = f.read()
        for i in range(layer.chunks):
            if layer.map.present(i):
                assert disk[i * CS:(i + 1) * CS] == \
                    data[i * CS:(i + 1) * CS], i
        assert await layer.read(0, SIZE) == data
        await layer.close()
    run(main())


def test_zero_copy_lease_holds_the_punch_back(tmp_path):
    async def main():
        layer, data = await filled(tmp_path)
        # local_extent wants the range in the page cache: read it first.
        extent = None
        for _ in range(3):
            extent = layer.local_extent(0, 2 * CS)
            if extent is not None:
                break
            await layer.read(0, 2 * CS)
        if extent is None:
            pytest.skip("no zero-copy extents here (mincore)")
        assert layer._leases == 1
        eviction = asyncio.ensure_future(layer.evict([(0, 2)]))
        await asyncio.sleep(0.1)
        assert not eviction.done()      # waits for the lease
        assert layer.local_extent(4 * CS, CS) is None   # none handed out
        assert os.pread(extent[0], 2 * CS, extent[1]) == data[:2 * CS]
        del extent
        gc.collect()
        assert await asyncio.wait_for(eviction, 5) == 2
        assert layer._leases == 0
        # A lease never returned: the marks go, the data stays.
        lease = None
        await layer.read(8 * CS, CS)
        for _ in range(3):
            lease = layer.local_extent(8 * CS, CS)
            if lease is not None:
                break
            await layer.read(8 * CS, CS)
        before = allocated(layer)
        assert await layer.evict([(8, 9)], lease_timeout=0.1) == 1
        assert allocated(layer) == before
        assert not layer.map.present(8)
        assert os.pread(lease[0], CS, 8 * CS) == data[8 * CS:9 * CS]
        del lease
        await layer.close()
    run(main())


class Space:
    """A host capacity stand-in (agent/capacity.py) with room for
    ``room`` bytes."""

    def __init__(self, room):
        self.room = room
        self.reserved = self.stored_bytes = 0

    def reserve(self, cache, nbytes):
        if nbytes > self.room:
            return False
        self.room -= nbytes
        self.reserved += nbytes
        return True

    def stored(self, cache, nbytes):
        self.stored_bytes += nbytes


def test_capacity_refusal_serves_without_keeping(tmp_path):
    async def main():
        path, data = make_image(tmp_path / "img")
        layer = CacheLayer(CountingSource(path), str(tmp_path / "c"),
                           chunk_size=CS)
        layer.space = Space(4 * CS)
        assert await layer.read(0, 4 * CS) == data[:4 * CS]
        await drain(layer)
        assert await layer.read(10 * CS, 2 * CS) == data[10 * CS:12 * CS]
        await drain(layer)
        assert layer.map.count_present() == 4
        assert layer.counters["chunks_not_kept"] == 2
        assert layer.space.stored_bytes == 4 * CS
        assert allocated(layer) <= 4 * CS
        # Not kept: read again from the source.
        before = len(layer.source.reads)
        assert await layer.read(10 * CS, 2 * CS) == data[10 * CS:12 * CS]
        assert len(layer.source.reads) - before == 2
        await drain(layer)
        await layer.close()
    run(main())


def test_a_cancelled_eviction_waits_for_its_punch(tmp_path, monkeypatch):
    """The punch runs in a thread on the cache file's descriptor: a
    cancelled eviction returns only once it is done (the file may be
    closed right after, and its descriptor number reused)."""
    import threading
    import time
    started, done = threading.Event(), []
    real = fileio.punch_hole

    def slow(fd, offset, length):
        started.set()
        time.sleep(0.2)
        real(fd, offset, length)
        done.append(offset)

    monkeypatch.setattr(fileio, "punch_hole", slow)

    async def main():
        layer, data = await filled(tmp_path)
        eviction = asyncio.ensure_future(layer.evict([(2, 3)]))
        for _ in range(1000):
            if started.is_set():
                break
            await asyncio.sleep(0.005)
        assert started.is_set()
        eviction.cancel()
        with pytest.raises(asyncio.CancelledError):
            await eviction
        assert done == [2 * CS]
        assert not layer.map.present(2)
        assert layer._zero_copy_off == 0 and not layer._evictions
        assert await layer.read(0, SIZE) == data
        await layer.close()
    run(main())
